"""Camera RAW files through LibRaw (rawpy), as pure functions on bytes.

A RAW is told by its file name (DNG, NEF, CR2 and most makers' formats start like a TIFF, so
their content does not tell them from one). Two ways in:

- `raw_preview`: the models' reduced copy. The camera's embedded JPEG preview when it is large
  enough and has the picture's shape, else LibRaw's half-size image (each 2x2 block of the
  sensor read as one pixel), so no demosaic happens before the models.
- `decode_raw`: the full picture, demosaiced once: the camera's white balance, sRGB primaries
  and transfer curve, upright by the RAW's own orientation, 16 bits per channel (quantised to
  8 bits only when the result is encoded), with an EXIF block (date, camera, lens, exposure,
  GPS) built from the RAW's metadata.

Every problem raises a BadInputError subclass with one line naming the file.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator

import numpy as np
import rawpy
from PIL import Image

from .errors import CorruptImageError, EmptyFileError, TooManyPixelsError, UnsupportedCameraError

RAW_EXTENSIONS = frozenset(
    {
        ".dng",  # Adobe DNG (phones, Leica, Pentax, Ricoh, Hasselblad, converters)
        ".cr2", ".cr3", ".crw",  # Canon
        ".nef", ".nrw",  # Nikon
        ".arw", ".srf", ".sr2",  # Sony
        ".orf",  # Olympus / OM System
        ".raf",  # Fujifilm
        ".rw2", ".rwl", ".raw",  # Panasonic, Leica
        ".pef",  # Pentax
        ".srw",  # Samsung
        ".3fr", ".fff",  # Hasselblad
        ".iiq",  # Phase One
        ".mos",  # Leaf
        ".mef",  # Mamiya
        ".mrw",  # Minolta
        ".x3f",  # Sigma
        ".erf",  # Epson
        ".kdc", ".dcr",  # Kodak
    }
)  # fmt: skip

# How far a preview's shape may differ from the picture's (as a share of its aspect ratio):
# the models' maps are stretched onto the full picture.
_ASPECT_TOLERANCE = 0.02
_LIBRAW = ".".join(map(str, rawpy.libraw_version))


def is_raw(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in RAW_EXTENSIONS


@contextlib.contextmanager
def _opened(data: bytes, source: str, max_megapixels: float) -> Iterator[rawpy.RawPy]:
    """A RawPy with its metadata read and its size checked before any pixel is unpacked."""
    if not data:
        raise EmptyFileError(f"{source}: empty file (0 bytes)")
    try:
        raw = rawpy.imread(io.BytesIO(data))
    except rawpy.LibRawFileUnsupportedError:
        camera = _camera_named(data)
        if camera:
            raise UnsupportedCameraError(
                f"{source}: camera not supported by LibRaw {_LIBRAW} ({camera}); a newer rawpy may know it"
            ) from None
        raise CorruptImageError(
            f"{source}: not a RAW file LibRaw can read (unknown format or a damaged header)"
        ) from None
    except rawpy.LibRawError as exc:
        raise CorruptImageError(f"{source}: truncated or corrupt RAW file ({_libraw_says(exc)})") from exc
    with raw:
        sizes = raw.sizes
        if sizes.width * sizes.height > max_megapixels * 1e6:
            raise TooManyPixelsError(
                f"{source}: {sizes.width}x{sizes.height} = {sizes.width * sizes.height / 1e6:.1f} MP exceeds the "
                f"{max_megapixels:g} MP limit (max_megapixels)"
            )
        try:
            yield raw
        except (rawpy.LibRawFileUnsupportedError, rawpy.LibRawNotImplementedError) as exc:
            camera = _camera_named(data) or "camera not named in the file"
            raise UnsupportedCameraError(
                f"{source}: RAW data of a kind LibRaw {_LIBRAW} cannot decode ({camera}; {_libraw_says(exc)})"
            ) from exc
        except (rawpy.LibRawIOError, rawpy.LibRawDataError) as exc:
            raise CorruptImageError(f"{source}: truncated or corrupt RAW data ({_libraw_says(exc)})") from exc
        except rawpy.LibRawError as exc:
            raise CorruptImageError(f"{source}: unreadable RAW data ({_libraw_says(exc)})") from exc


def _libraw_says(exc: BaseException) -> str:
    message = exc.args[0] if exc.args else ""
    text = message.decode(errors="replace") if isinstance(message, bytes) else str(message)
    return f"LibRaw: {text}" if text else f"LibRaw: {type(exc).__name__}"


def orient(pixels: np.ndarray, flip: int) -> np.ndarray:
    """Pixels as stored turned upright by LibRaw's flip code (3: 180, 5: 90 CCW, 6: 90 CW;
    bit 2 transposes, bit 1 mirrors rows, bit 0 mirrors columns), as its own output is."""
    if flip & 2:
        pixels = pixels[::-1]
    if flip & 1:
        pixels = pixels[:, ::-1]
    if flip & 4:
        pixels = pixels.swapaxes(0, 1)
    return np.ascontiguousarray(pixels)


def raw_preview(data: bytes, source: str, max_megapixels: float, min_size: int) -> np.ndarray:
    """An upright HxWx3 uint8 sRGB copy for the models: the embedded preview when its long
    side is at least min_size (or the picture's own, if smaller), else the half-size image."""
    with _opened(data, source, max_megapixels) as raw:
        sizes = raw.sizes
        preview = _embedded_preview(raw, min(min_size, max(sizes.width, sizes.height)))
        if preview is not None and _same_shape(preview.shape, (sizes.height, sizes.width)):
            return orient(preview, sizes.flip)
        return _rgb(raw.postprocess(half_size=True, use_camera_wb=True, output_bps=8, gamma=(2.4, 12.92)))


def _rgb(pixels: np.ndarray) -> np.ndarray:
    """HxWx3 of LibRaw's output, which is a single channel for a monochrome sensor."""
    if pixels.ndim == 3 and pixels.shape[2] == 3:
        return pixels
    gray = pixels if pixels.ndim == 2 else pixels[..., 0]
    return np.repeat(gray[..., None], 3, axis=2)


def _embedded_preview(raw: rawpy.RawPy, min_size: int) -> np.ndarray | None:
    """The camera's preview as stored (not yet upright), or None when absent, unreadable or small.
    A JPEG preview is decoded at a reduced scale (DCT scaling) that keeps it >= min_size."""
    try:
        thumb = raw.extract_thumb()
    except rawpy.LibRawError:
        return None  # no preview, or one in a form LibRaw does not hand out: the half-size image serves
    if thumb.format == rawpy.ThumbFormat.BITMAP:
        pixels = np.asarray(thumb.data)
        return pixels if pixels.ndim == 3 and pixels.shape[2] == 3 and max(pixels.shape[:2]) >= min_size else None
    try:
        with Image.open(io.BytesIO(bytes(thumb.data)), formats=["JPEG"]) as im:
            if max(im.size) < min_size:
                return None
            im.draft("RGB", (min_size, min_size))
            return np.asarray(im.convert("RGB"))  # its own EXIF orientation is ignored: the RAW's decides
    except Exception:  # noqa: BLE001 - a broken preview is no reason to fail a readable RAW
        return None


def _same_shape(preview: tuple[int, ...], picture: tuple[int, int]) -> bool:
    (ph, pw), (h, w) = preview[:2], picture
    return abs((pw / ph) / (w / h) - 1) <= _ASPECT_TOLERANCE


def decode_raw(data: bytes, source: str, max_megapixels: float = 200.0) -> tuple[np.ndarray, bytes | None]:
    """The full picture as upright HxWx3 uint16 sRGB, and an EXIF block for the result."""
    with _opened(data, source, max_megapixels) as raw:
        pixels = raw.postprocess(use_camera_wb=True, output_bps=16, gamma=(2.4, 12.92))
        return _rgb(pixels), raw_exif(data, raw)


# --------------------------------------------------------------------------- metadata

_EXIF_IFD, _GPS_IFD, _INTEROP_IFD, _MAKER_NOTE = 0x8769, 0x8825, 0xA005, 0x927C
_MAKE, _MODEL = 0x010F, 0x0110
# Of the main IFD, what describes the shot (not the sensor data, which a DNG also keeps there).
_MAIN_TAGS = (0x010E, _MAKE, _MODEL, 0x0131, 0x0132, 0x013B, 0x8298)  # description, software, date, artist, (c)
_DATE_TIME_ORIGINAL, _LENS_MAKE, _LENS_MODEL = 0x9003, 0xA433, 0xA434
# Of the EXIF IFD: everything but the maker's private notes, pointers and the stored size.
_EXIF_LEFT_OUT = frozenset({_MAKER_NOTE, _INTEROP_IFD, 0xA002, 0xA003, 0x9101})
_TIFF = (b"II*\x00", b"MM\x00*")
_TIFF_LIKE = (b"IIRO", b"IIU\x00")  # Olympus ORF, Panasonic RW2: a TIFF under another magic number


def _tiff_ifds(data: bytes) -> tuple[dict, dict, dict] | None:
    """(main, EXIF, GPS) tags of a TIFF-structured RAW (DNG, NEF, CR2, ARW, PEF, SRW, ORF,
    RW2, ...), or of a CR3's metadata boxes; None when neither applies."""
    if data[:4] in _TIFF + _TIFF_LIKE:
        exif = Image.Exif()
        if data[:4] in _TIFF_LIKE:
            data = b"II*\x00" + data[4:]
        exif.load(data)
        return dict(exif), dict(exif.get_ifd(_EXIF_IFD)), dict(exif.get_ifd(_GPS_IFD))
    if data[4:8] == b"ftyp" and data[8:12] == b"crx ":  # CR3: CMT1 main, CMT2 EXIF, CMT4 GPS, each a TIFF
        boxes = []
        for name in (b"CMT1", b"CMT2", b"CMT4"):
            at = data.find(name, 0, 1 << 20)
            size = int.from_bytes(data[at - 4 : at], "big") if at >= 4 else 0
            exif = Image.Exif()
            if size > 8:
                exif.load(data[at + 4 : at - 4 + size])
            boxes.append(dict(exif))
        main, exif_tags, gps = boxes
        return main, exif_tags, gps
    return None


def _camera_named(data: bytes) -> str:
    """Make and model as the file states them ("" if it states none): for the message of a
    camera that LibRaw does not know."""
    try:
        found = _tiff_ifds(data)
    except Exception:  # noqa: BLE001 - only for a message
        return ""
    if not found:
        return ""
    words = [str(found[0].get(tag, "")).strip("\0 ") for tag in (_MAKE, _MODEL)]
    return " ".join(w for w in words if w)


def raw_exif(data: bytes, raw: rawpy.RawPy) -> bytes | None:
    """An EXIF block for the result: date, camera, lens, exposure and GPS from the RAW's
    metadata (its main, EXIF and GPS IFDs; else its embedded preview's EXIF), completed from
    what LibRaw decoded. Orientation is left out: the pixels are upright."""
    try:
        found = _tiff_ifds(data)
    except Exception:  # noqa: BLE001 - unreadable metadata: the picture is still usable
        found = None
    if found is None:
        found = _preview_exif(raw)
    main, exif_tags, gps = found or ({}, {}, {})
    other, lens = raw.other, raw.lens
    if _DATE_TIME_ORIGINAL not in exif_tags and other.timestamp and other.timestamp.year > 1970:
        exif_tags[_DATE_TIME_ORIGINAL] = other.timestamp.strftime("%Y:%m:%d %H:%M:%S")
    if _LENS_MODEL not in exif_tags and lens.model:
        exif_tags[_LENS_MODEL] = lens.model
    if _LENS_MAKE not in exif_tags and lens.make:
        exif_tags[_LENS_MAKE] = lens.make
    out = Image.Exif()
    for tag in _MAIN_TAGS:
        if _plain(main.get(tag)):
            out[tag] = main[tag]
    sub = out.get_ifd(_EXIF_IFD)
    sub.update((tag, value) for tag, value in exif_tags.items() if tag not in _EXIF_LEFT_OUT and _plain(value))
    if gps:
        out.get_ifd(_GPS_IFD).update((tag, value) for tag, value in gps.items() if _plain(value))
    if not len(out) and not sub:
        return None
    try:
        return out.tobytes()
    except Exception:  # noqa: BLE001 - a value Pillow cannot write: keep the main tags at least
        fallback = Image.Exif()
        for tag in _MAIN_TAGS:
            if _plain(main.get(tag)):
                fallback[tag] = main[tag]
        return fallback.tobytes() if len(fallback) else None


def _plain(value: object) -> bool:
    """A value that can be written back as it was read: text, numbers and short byte strings
    (no nested directories, no large binary blobs)."""
    if isinstance(value, tuple):
        return 0 < len(value) <= 64 and all(_plain(v) for v in value)
    if isinstance(value, bytes):
        return len(value) <= 64
    return isinstance(value, (str, int, float)) or hasattr(value, "numerator")


def _preview_exif(raw: rawpy.RawPy) -> tuple[dict, dict, dict] | None:
    """(main, EXIF, GPS) tags of the embedded JPEG preview's EXIF (RAF keeps its metadata there)."""
    try:
        thumb = raw.extract_thumb()
        if thumb.format != rawpy.ThumbFormat.JPEG:
            return None
        with Image.open(io.BytesIO(bytes(thumb.data)), formats=["JPEG"]) as im:
            exif = im.getexif()
            return dict(exif), dict(exif.get_ifd(_EXIF_IFD)), dict(exif.get_ifd(_GPS_IFD))
    except Exception:  # noqa: BLE001 - no usable preview: no metadata from it
        return None
