"""Decoding and encoding of real photos, masks and depth maps, as pure functions on bytes.

Photos come out as HxWx3 uint8 sRGB, upright (EXIF orientation applied), whatever the input:
grayscale, palette, alpha (composited over white), CMYK, 16-bit, float, an embedded ICC profile,
HEIC; camera RAWs (raw_io.py) as HxWx3 uint16, quantised to 8 bits only by `encode_photo`.
Every problem with an input raises a BadInputError subclass naming its kind, with one line
naming the file.

Every open checks the megapixel limit from the header, before any pixel is decoded, in place
of Pillow's own decompression-bomb guard (which is lifted for the duration of the open only).
"""

from __future__ import annotations

import contextlib
import io
import struct
import threading
from dataclasses import dataclass

import cv2
import numpy as np
import pillow_heif
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError, features

from . import raw_io
from .errors import (
    BadInputError,
    CorruptImageError,
    EmptyFileError,
    NotAnImageError,
    TooManyPixelsError,
    UnsupportedImageError,
)

pillow_heif.register_heif_opener()
Image.init()

# Only the plugins we mean to read: untrusted files never reach EPS (Ghostscript) and the like.
_FORMATS = tuple(f for f in ("JPEG", "PNG", "WEBP", "TIFF", "BMP", "GIF", "HEIF", "AVIF") if f in Image.OPEN)

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp", ".gif", ".heic", ".heif"}
    | ({".avif"} if "AVIF" in _FORMATS and features.check("avif") else set())
)
# Everything a library job processes: images Pillow reads and camera RAWs LibRaw reads.
PHOTO_EXTENSIONS = IMAGE_EXTENSIONS | raw_io.RAW_EXTENSIONS
OUTPUT_EXTENSIONS = {"jpeg": ".jpg", "png": ".png", "webp": ".webp"}

_SRGB = ImageCms.createProfile("sRGB")
SRGB_ICC = ImageCms.ImageCmsProfile(_SRGB).tobytes()
_ORIENTATION = 0x0112
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")

# Signatures of the formats we read, to tell "corrupt PNG" from "not an image at all".
_MAGIC = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF8", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"BM", "BMP"),
)


@dataclass
class Photo:
    pixels: np.ndarray  # HxWx3 RGB, sRGB, upright: uint8, or uint16 for a RAW; may be read-only, copy to edit
    exif: bytes | None  # the EXIF block ("Exif\0\0" + TIFF data) with Orientation reset to 1
    format: str  # as Pillow names it: "JPEG", "PNG", "HEIF", ...; "RAW" for a camera RAW


def _sniff(data: bytes) -> str | None:
    for magic, name in _MAGIC:
        if data.startswith(magic):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    if data[4:8] == b"ftyp":
        return "HEIF/AVIF"
    return None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


_PIXEL_LIMIT_LOCK = threading.Lock()


@contextlib.contextmanager
def _our_pixel_limit():
    """Pillow's guard lifted while one file's header is read: _open checks max_megapixels itself
    right after, with a message that names the file and the limit."""
    with _PIXEL_LIMIT_LOCK:
        previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = previous


def _open(
    data: bytes, source: str, max_megapixels: float = 200.0, draft_size: int | None = None
) -> tuple[Image.Image, bytes | None]:
    """A fully decoded, upright image and the file's EXIF block as it was (JPEG, PNG, WebP,
    HEIF, AVIF; TIFF tags are not one). The size is checked before any pixel is read.
    draft_size: JPEGs may be decoded at a reduced scale whose sides stay >= draft_size."""
    if not data:
        raise EmptyFileError(f"{source}: empty file (0 bytes)")
    try:
        with _our_pixel_limit():
            im = Image.open(io.BytesIO(data), formats=_FORMATS)
    except UnidentifiedImageError:
        kind = _sniff(data)
        if kind is None:
            raise NotAnImageError(f"{source}: not an image (unrecognised format)") from None
        raise CorruptImageError(
            f"{source}: truncated or corrupt image data ({kind} signature but unreadable header)"
        ) from None
    except Exception as exc:
        raise CorruptImageError(f"{source}: truncated or corrupt image data ({_one_line(exc)})") from exc
    width, height = im.size
    if width * height > max_megapixels * 1e6:
        raise TooManyPixelsError(
            f"{source}: {width}x{height} = {width * height / 1e6:.1f} MP exceeds the "
            f"{max_megapixels:g} MP limit (max_megapixels)"
        )
    if draft_size and im.format == "JPEG":
        im.draft(im.mode, (draft_size, draft_size))  # DCT-domain scaling: far cheaper than decode + resize
    try:
        im.load()  # full decode here, so truncation surfaces now and not in a later stage
        exif = im.info.get("exif")  # before exif_transpose rewrites it
        ImageOps.exif_transpose(im, in_place=True)
    except Exception as exc:
        raise CorruptImageError(f"{source}: truncated or corrupt image data ({_one_line(exc)})") from exc
    return im, exif


def reset_orientation(raw: bytes) -> bytes | None:
    """The EXIF block with Orientation set to 1 in place, every other byte kept (maker notes
    hold absolute offsets, which rewriting the block with Pillow could break); None if unparsable."""
    body = raw[6:] if raw.startswith(b"Exif\x00\x00") else raw
    try:
        order = {b"II": "<", b"MM": ">"}[body[:2]]
        (ifd,) = struct.unpack_from(order + "I", body, 4)
        (count,) = struct.unpack_from(order + "H", body, ifd)
        out = bytearray(body)
        for pos in range(ifd + 2, ifd + 2 + 12 * count, 12):
            tag, kind = struct.unpack_from(order + "HH", body, pos)
            if tag == _ORIENTATION and kind == 3:  # SHORT, value stored inline
                struct.pack_into(order + "H", out, pos + 8, 1)
        return b"Exif\x00\x00" + bytes(out)
    except (KeyError, struct.error):
        return None


def _gray16_to_8bit(values: np.ndarray) -> np.ndarray:
    """16-bit (or 32-bit int holding 16-bit) gray scaled to 0..255: 65535 -> 255, 32768 -> 128."""
    return np.clip(values.astype(np.float32) / 257.0 + 0.5, 0, 255).astype(np.uint8)


def _float_to_8bit(values: np.ndarray) -> np.ndarray:
    """Float gray: taken as 0..1 when it fits, else as 0..255 or 0..65535."""
    values = np.nan_to_num(values.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    top = float(values.max(initial=0.0))
    scale = 255.0 if top <= 1.0 else 1.0 if top <= 255.0 else 255.0 / 65535.0
    return np.clip(values * scale + 0.5, 0, 255).astype(np.uint8)


def is_srgb(profile: ImageCms.ImageCmsProfile) -> bool:
    """Whether an ICC profile is an sRGB one, by its description (False when that is unreadable)."""
    try:
        return "srgb" in ImageCms.getProfileDescription(profile).lower()
    except ImageCms.PyCMSError:
        return False


def _to_srgb_profile(im: Image.Image, profile) -> Image.Image:
    converted = ImageCms.profileToProfile(im, profile, _SRGB, outputMode="RGB")
    assert converted is not None  # only an in-place conversion returns None
    return converted


def _to_srgb(im: Image.Image) -> np.ndarray:
    """HxWx3 uint8 sRGB of an image in any mode; alpha is composited over white."""
    icc = im.info.get("icc_profile")
    if im.mode in _SIXTEEN_BIT:
        im = Image.fromarray(_gray16_to_8bit(np.asarray(im)))
    elif im.mode == "F":
        im = Image.fromarray(_float_to_8bit(np.asarray(im)))
    elif im.mode == "LAB":
        im, icc = _to_srgb_profile(im, ImageCms.createProfile("LAB")), None

    alpha = None
    if im.has_transparency_data:  # RGBA, LA, PA, or P/L/RGB with a transparent colour
        im = im.convert("LA" if im.mode in ("L", "LA", "La") else "RGBA")
        alpha = np.asarray(im.getchannel("A"))
        im = im.convert("L" if im.mode == "LA" else "RGB")
    if im.mode not in ("L", "RGB", "CMYK"):
        im = im.convert("RGB")

    if icc:
        try:
            profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            if not is_srgb(profile):
                im = _to_srgb_profile(im, profile)
        except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
            pass  # a broken or mismatched profile: the pixels are still usable as they are

    rgb = np.asarray(im if im.mode == "RGB" else im.convert("RGB"))
    if alpha is not None and alpha.min() < 255:
        a = alpha[..., None].astype(np.uint32)
        rgb = ((rgb * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)
    return rgb


def decode_photo(data: bytes, source: str, max_megapixels: float = 200.0, draft_size: int | None = None) -> Photo:
    """An upright sRGB photo from the bytes of any supported file; BadInputError if unusable.

    Only the first frame of animated or multi-page files is used. With draft_size, a JPEG may
    come back reduced (both sides still >= draft_size): for model copies. A camera RAW (told by
    its name) comes back as 16-bit pixels, demosaiced; with draft_size, as the 8-bit copy for
    the models (its embedded preview, or its half-size image), without EXIF.
    """
    if raw_io.is_raw(source):
        if draft_size:
            return Photo(raw_io.raw_preview(data, source, max_megapixels, draft_size), None, "RAW")
        pixels, exif = raw_io.decode_raw(data, source, max_megapixels)
        return Photo(pixels, exif, "RAW")
    im, raw_exif = _open(data, source, max_megapixels, draft_size)
    try:
        pixels = _to_srgb(im)
    except Exception as exc:
        raise UnsupportedImageError(f"{source}: unsupported image ({im.mode} pixels: {_one_line(exc)})") from exc
    return Photo(pixels=pixels, exif=reset_orientation(raw_exif) if raw_exif else None, format=im.format or "unknown")


def encode_photo(pixels: np.ndarray, fmt: str = "jpeg", quality: int = 92, exif: bytes | None = None) -> bytes:
    """JPEG, PNG or WebP bytes of an HxWx3 uint8 (or uint16, rounded to 8 bits here) sRGB image,
    with an sRGB ICC profile and the given EXIF block. quality applies to JPEG and WebP."""
    key = fmt.lower().lstrip(".")
    key = "jpeg" if key == "jpg" else key
    if key not in OUTPUT_EXTENSIONS:
        raise BadInputError(f"unknown output format {fmt!r} (expected jpeg, png or webp)")
    pixels = np.asarray(pixels)
    if pixels.dtype not in (np.uint8, np.uint16) or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected HxWx3 uint8 or uint16 pixels, got {pixels.dtype} {pixels.shape}")
    if pixels.dtype == np.uint16:
        pixels = cv2.convertScaleAbs(pixels, alpha=1 / 257)  # round(v / 257): 65535 -> 255, 128 -> 0, 129 -> 1
    options: dict = {"icc_profile": SRGB_ICC}
    if exif:
        options["exif"] = exif
    if key in ("jpeg", "webp"):
        options["quality"] = quality
    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(out, format=key.upper(), **options)
    return out.getvalue()


_MASK_EXPECTED = "expected a grayscale mask image (8- or 16-bit, or float TIFF), or RGB/RGBA"


def read_mask(data: bytes, source: str) -> np.ndarray:
    """A float32 0..1 mask from an image file, scaled by the range of its type.

    8-bit / 255, 16-bit / 65535, float clipped to 0..1; RGB gives its luminance; an image with
    alpha (RGBA, LA, transparent palette) gives its alpha channel unless that is fully opaque,
    in which case its luminance is used (a mask saved as an opaque RGBA PNG).
    """
    try:
        im, _ = _open(data, source)
    except BadInputError as exc:
        raise type(exc)(f"{exc}; {_MASK_EXPECTED}") from None
    if im.mode in _SIXTEEN_BIT:
        return np.clip(np.asarray(im, dtype=np.float32) / 65535.0, 0.0, 1.0)
    if im.mode == "F":
        return np.clip(np.nan_to_num(np.asarray(im, dtype=np.float32)), 0.0, 1.0)
    if im.mode not in ("1", "L", "P", "LA", "PA", "RGB", "RGBA", "RGBX"):
        raise BadInputError(f"{source}: not a usable mask ({im.mode} pixels); {_MASK_EXPECTED}")
    if im.has_transparency_data:
        alpha = im.convert("RGBA").getchannel("A")
        gray = alpha if np.asarray(alpha).min() < 255 else im.convert("RGBA").convert("L")
    else:
        gray = im.convert("L")
    return np.asarray(gray, dtype=np.float32) / np.float32(255)


_DEPTH_EXPECTED = "expected a single-channel depth map: .npy (2-D), 8- or 16-bit grayscale PNG, or float32 TIFF"


def read_depth(data: bytes, source: str) -> np.ndarray:
    """A float32 2-D depth map, values as given (larger = nearer), non-finite values set to the
    finite minimum. The format is told by content: .npy by its magic, else an image.

    An RGB image is accepted only when it is gray (all channels equal), as some tools save depth.
    """
    if data.startswith(b"\x93NUMPY"):
        try:
            depth = np.load(io.BytesIO(data), allow_pickle=False)
        except Exception as exc:
            raise BadInputError(f"{source}: corrupt .npy file ({_one_line(exc)}); {_DEPTH_EXPECTED}") from exc
        if depth.ndim == 3 and 1 in depth.shape:
            depth = depth.squeeze(axis=depth.shape.index(1))
        if depth.ndim != 2 or depth.dtype.kind not in "biuf":
            raise BadInputError(
                f"{source}: .npy array of shape {depth.shape} and dtype {depth.dtype}; {_DEPTH_EXPECTED}"
            )
    else:
        try:
            im, _ = _open(data, source)
        except BadInputError as exc:
            raise type(exc)(f"{exc}; {_DEPTH_EXPECTED}") from None
        if im.mode == "RGB":
            r, g, b = (np.asarray(c) for c in im.split())
            if np.array_equal(r, g) and np.array_equal(g, b):
                im = im.convert("L")
        if im.mode not in ("L", "F") + _SIXTEEN_BIT:
            raise BadInputError(
                f"{source}: a {len(im.getbands())}-channel {im.mode} image is not a depth map; {_DEPTH_EXPECTED}"
            )
        depth = np.asarray(im)
    depth = depth.astype(np.float32)
    finite = np.isfinite(depth)
    if not finite.any():
        raise BadInputError(f"{source}: depth map has no finite values; {_DEPTH_EXPECTED}")
    if not finite.all():
        depth[~finite] = depth[finite].min()
    return depth
