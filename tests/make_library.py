"""A photo library full of trouble, for robustness tests of the library job.

    python tests/make_library.py DIR     # builds DIR and prints what each file should become

`build_library(root)` writes the files and returns {relpath: Expected}: for each file under the
root, the manifest row the job should end with (status ok / failed / skipped, the error kind and
words of the error) and, for good photos, the output size and mean colours at a few spots. Files
that get no manifest row (hidden ones, and files that are no photos, which are only counted) are
listed with status IGNORED.

Good photos are a fine checkerboard of two shades of one colour: detail everywhere (so the job
does not leave them alone as "background already soft"), and a known mean colour over any window
two checker periods wide. The subject area of the trivial models (a centred ellipse) and the
bottom rows (nearest on their depth ramp) stay crisp, so the centre of a photo, or for the
orientation photos (four coloured quadrants) the bottom corners, show the decoded colours.
"""

from __future__ import annotations

import io
import struct
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pillow_heif
from PIL import Image, ImageCms
from raw_files import dng_bytes, scene

pillow_heif.register_heif_opener()

OK, FAILED, SKIPPED, IGNORED = "ok", "failed", "skipped", "ignored"

# Mean colours of the orientation photos' upright quadrants.
TL, TR, BL, BR = (210, 30, 30), (30, 190, 30), (30, 30, 210), (220, 210, 30)
ORIENTATION_SIZE = (360, 240)  # upright width x height
# Pillow's transposition that turns the stored pixels upright, per EXIF orientation; all are
# their own inverse except the rotations, so the stored image is the inverse applied to upright.
_TO_STORED = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}

CENTRE = (0.5, 0.5)
BOTTOM_LEFT, BOTTOM_RIGHT = (0.12, 0.9), (0.88, 0.9)
NESTING = 12  # folder levels of the deeply nested photo
SIZE = (240, 160)
SHADE = 20  # the checkerboard's two shades: mean colour +- SHADE


@dataclass
class Expected:
    """What one input file should become in the manifest."""

    status: str  # ok / failed / skipped, or IGNORED: no manifest row at all
    error_kind: str = ""
    error_words: tuple[str, ...] = ()  # substrings of the error text (besides the file name)
    size: tuple[int, int] | None = None  # (width, height) of the output, upright
    # (x, y) as fractions of the output's size -> mean RGB over `window` x `window` pixels there
    colours: dict[tuple[float, float], tuple[int, int, int]] = field(default_factory=dict)
    window: int = 0
    tolerance: int = 12  # per channel (lossy input and output, the effect's soft edges)
    what: str = ""


def _save(im: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    im.save(out, format=fmt, **options)
    return out.getvalue()


def cell_of(size) -> int:
    """Checker cell size: large enough to survive the effect's reduction to its working size."""
    return max(2, max(size) // 120)


def checker(size, a, b, mode: str = "RGB", dtype=np.uint8) -> Image.Image:
    """A checkerboard of band values a and b (a number or a tuple per band), in any mode."""
    w, h = size
    cell = cell_of(size)
    ys, xs = np.mgrid[0:h, 0:w]
    first = (ys // cell + xs // cell) % 2 == 0
    a, b = np.atleast_1d(np.asarray(a, dtype)), np.atleast_1d(np.asarray(b, dtype))
    values = np.where(first[..., None], a, b).astype(dtype)
    if mode == "I;16":
        return Image.fromarray(values[..., 0])
    return Image.frombytes(mode, size, values.tobytes())


def shades(mean, spread: int = SHADE):
    """Two shades around a mean colour (no channel clipped)."""
    mean = np.asarray(mean)
    assert (mean - spread >= 0).all() and (mean + spread <= 255).all(), mean
    return tuple(int(v) for v in mean + spread), tuple(int(v) for v in mean - spread)


def textured(mean, size=SIZE) -> Image.Image:
    return checker(size, *shades(mean))


def quadrants(size=ORIENTATION_SIZE) -> Image.Image:
    w, h = size
    im = textured(TL, size)
    im.paste(textured(TR, (w - w // 2, h // 2)), (w // 2, 0))
    im.paste(textured(BL, (w // 2, h - h // 2)), (0, h // 2))
    im.paste(textured(BR, (w - w // 2, h - h // 2)), (w // 2, h // 2))
    return im


def png_declaring(width: int, height: int) -> bytes:
    """A decompression bomb: a valid 1x1 PNG whose IHDR is patched to declare width x height."""
    data = bytearray(_save(Image.new("RGB", (1, 1)), "PNG"))
    struct.pack_into(">II", data, 16, width, height)
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def swapped_profile() -> bytes:
    """A valid RGB ICC profile that is not sRGB: sRGB with its red and green primaries exchanged,
    so pure red in it is pure sRGB green (a profile that is ignored shows as red)."""
    icc = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    entries = {
        bytes(icc[132 + 12 * i : 136 + 12 * i]): 132 + 12 * i for i in range(struct.unpack_from(">I", icc, 128)[0])
    }
    r, g = entries[b"rXYZ"], entries[b"gXYZ"]
    icc[r + 4 : r + 12], icc[g + 4 : g + 12] = icc[g + 4 : g + 12], icc[r + 4 : r + 12]
    icc = bytes(icc).replace("sRGB".encode("utf-16-be"), "Swap".encode("utf-16-be"))
    return icc.replace(b"sRGB", b"Swap")


def with_orientation(orientation: int) -> bytes:
    stored = quadrants()
    if _TO_STORED[orientation] is not None:
        stored = stored.transpose(_TO_STORED[orientation])
    exif = Image.Exif()
    exif[0x010F] = "TestCam"
    exif[0x0112] = orientation
    return _save(stored, "JPEG", quality=95, exif=exif.tobytes())


def _noise_jpeg(size=(200, 150), seed=1) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), np.uint8)
    return _save(Image.fromarray(pixels), "JPEG", quality=90)


def _noise_png(size=(200, 150), seed=2) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), np.uint8)
    return _save(Image.fromarray(pixels), "PNG")


def bad_files() -> dict[str, tuple[bytes, Expected]]:
    """Files that must each end as one failed (or skipped) row."""
    jpeg, png = _noise_jpeg(), _noise_png()
    random_bytes = b"\x00" + np.random.default_rng(3).bytes(4095)  # no image signature
    jfif_header = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    corrupt_png = bytearray(png)
    idat = corrupt_png.index(b"IDAT") + 4
    corrupt_png[idat : idat + 64] = bytes(64)  # zeroed compressed data: zlib cannot inflate it
    _dng = dng_bytes(scene(120, 180))
    return {
        "bad/empty.jpg": (b"", Expected(FAILED, "empty-file", ("empty file", "0 bytes"))),
        "bad/empty.PNG": (b"", Expected(FAILED, "empty-file", ("empty file",))),
        "bad/text.jpg": (
            b"this is a shopping list, not a photo\n" * 20,
            Expected(SKIPPED, "not-an-image", ("not an image",)),
        ),
        "bad/random.png": (random_bytes, Expected(SKIPPED, "not-an-image", ("not an image",))),
        "bad/truncated.jpg": (jpeg[: len(jpeg) // 2], Expected(FAILED, "corrupt-image", ("truncated or corrupt",))),
        "bad/truncated.png": (png[: len(png) // 2], Expected(FAILED, "corrupt-image", ("truncated or corrupt",))),
        "bad/corrupt-data.png": (bytes(corrupt_png), Expected(FAILED, "corrupt-image", ("truncated or corrupt",))),
        "bad/header-only.jpg": (jfif_header, Expected(FAILED, "corrupt-image", ("truncated or corrupt", "JPEG"))),
        "bad/header-only.png": (
            png[:33],  # signature + IHDR chunk
            Expected(FAILED, "corrupt-image", ("truncated or corrupt",)),
        ),
        "bad/bomb.png": (
            png_declaring(30000, 30000),
            Expected(FAILED, "too-many-pixels", ("30000x30000", "900.0 MP", "200 MP limit")),
        ),
        # A file's name is no hint of what is wrong with it.
        "bad/not an image, empty file.jpg": (
            jpeg[: len(jpeg) // 3],
            Expected(FAILED, "corrupt-image", ("truncated or corrupt",)),
        ),
        # Camera RAWs: a stub with a TIFF signature, one cut in half, and a camera LibRaw does not know.
        "bad/stub.CR2": (
            b"II*\x00\x10\x00\x00\x00CR",
            Expected(FAILED, "corrupt-image", ("truncated or corrupt RAW", "LibRaw")),
        ),
        "bad/cut-in-half.dng": (
            _dng[: len(_dng) // 2],
            Expected(FAILED, "corrupt-image", ("truncated or corrupt RAW",)),
        ),
        "bad/unknown-camera.nef": (
            _save(textured((90, 90, 90)), "TIFF", tiffinfo={0x010F: "Acme Photonics", 0x0110: "AP-1"}),
            Expected(FAILED, "unsupported-camera", ("camera not supported by LibRaw", "Acme Photonics AP-1")),
        ),
        # A good photo, but a backslash is a folder separator elsewhere: refused before reading.
        "bad/back\\slash.jpg": (jpeg, Expected(FAILED, "unsafe-name", ("unsafe relative path", "backslash"))),
    }


def good_files() -> dict[str, tuple[bytes, Expected]]:
    """Unusual but valid photos: each must come out ok, upright, in the right colours."""

    def ok(data: bytes, colour, size=SIZE, tolerance: int = 12) -> tuple[bytes, Expected]:
        return data, Expected(OK, size=size, colours={CENTRE: colour}, window=4 * cell_of(size), tolerance=tolerance)

    palette = checker(SIZE, 1, 2, "P")
    palette.putpalette([0, 0, 0, 20, 60, 200, 60, 100, 240] + [0] * 759)
    palette.paste(0, (0, 0, 60, 40))  # a transparent corner
    alpha = checker(SIZE, (255, 0, 0, 128), (135, 0, 0, 128), "RGBA")  # half-transparent reds over white
    cmyk = checker(SIZE, (0, 255, 255, 0), (0, 255, 255, 40), "CMYK")  # red, and red with some black
    sixteen = checker(SIZE, 32896, 23130, "I;16", np.uint16)  # 32896 / 257 = 128, 23130 / 257 = 90
    files = {
        "good/gray.jpg": ok(_save(checker(SIZE, 130, 90, "L"), "JPEG", quality=95), (110, 110, 110)),
        "good/palette-transparent.png": ok(_save(palette, "PNG", transparency=0), (40, 80, 220)),
        "good/rgba.png": ok(_save(alpha, "PNG"), (225, 127, 127)),  # (c * 128 + 255 * 127) / 255
        "good/cmyk.jpg": ok(_save(cmyk, "JPEG", quality=95), (235, 0, 0)),
        "good/16bit.png": ok(_save(sixteen, "PNG"), (109, 109, 109)),
        # Red in the swapped profile is green in sRGB: a decoder ignoring the profile shows red.
        "good/wide-gamut-icc.jpg": ok(
            _save(textured((200, 30, 30)), "JPEG", quality=100, subsampling=0, icc_profile=swapped_profile()),
            (30, 200, 30),
        ),
        "good/phone.heic": ok(_save(textured((45, 200, 75)), "HEIF", quality=95), (45, 200, 75)),
        "good/web.webp": ok(_save(textured((185, 45, 145)), "WEBP", quality=95), (185, 45, 145)),
        "good/scan.tiff": ok(_save(textured((110, 60, 30)), "TIFF"), (110, 60, 30)),
        "good/tiny-16x16.png": ok(_save(textured((60, 180, 110), (16, 16)), "PNG"), (60, 180, 110), (16, 16)),
        "good/panorama.jpg": ok(
            _save(textured((90, 150, 200), (4000, 300)), "JPEG", quality=95), (90, 150, 200), (4000, 300)
        ),
        "good/UPPER CASE.JPG": ok(_save(textured((30, 30, 220)), "JPEG", quality=95), (30, 30, 220)),
        "good/Other.PNG": ok(_save(textured((220, 100, 30)), "PNG"), (220, 100, 30)),
        "good/ünïcødé 写真 été.jpg": ok(_save(textured((140, 20, 140)), "JPEG", quality=95), (140, 20, 140)),
        "/".join(f"level {i:02d}" for i in range(1, NESTING + 1)) + "/deep.jpg": ok(
            _save(textured((20, 170, 170)), "JPEG", quality=95), (20, 170, 170)
        ),
    }
    for orientation in range(1, 9):
        files[f"good/orientation/orient-{orientation}.jpg"] = (
            with_orientation(orientation),
            Expected(
                OK,
                size=ORIENTATION_SIZE,
                colours={BOTTOM_LEFT: BL, BOTTOM_RIGHT: BR},
                window=4 * cell_of(ORIENTATION_SIZE),
                what=f"EXIF orientation {orientation}, stored {'transposed' if orientation >= 5 else 'as is'}",
            ),
        )
    return files


def ignored_files() -> dict[str, tuple[bytes, Expected]]:
    """Files that get no row: hidden ones (not even counted) and files that are no photos (counted)."""
    photo = _save(textured((100, 100, 100)), "JPEG")
    ignore = Expected(IGNORED)
    return {
        ".hidden.jpg": (photo, ignore),
        "good/.DS_Store": (b"\x00\x00\x00\x01Bud1", ignore),
        ".thumbnails/cache.jpg": (photo, ignore),
        "good/.trash/deleted.png": (_save(textured((100, 100, 100)), "PNG"), ignore),
        "notes.txt": (b"not a photo", ignore),
        "good/sidecar.xmp": (b"<x:xmpmeta/>", ignore),
        "good/photo.json": (b"{}", ignore),
        "good/clip.mp4": (b"\x00\x00\x00\x18ftypmp42", ignore),
    }


def library_files() -> dict[str, tuple[bytes, Expected]]:
    return {**bad_files(), **good_files(), **ignored_files()}


def build_library(root: str | Path) -> dict[str, Expected]:
    """Write every file under root (created if needed); {relpath: what it should become}."""
    root = Path(root)
    expected = {}
    for relpath, (data, what) in library_files().items():
        path = root / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        expected[relpath] = what
    return expected


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python tests/make_library.py DIR", file=sys.stderr)
        return 2
    for relpath, what in sorted(build_library(argv[0]).items()):
        detail = what.error_kind or (f"{what.size[0]}x{what.size[1]}" if what.size else "")
        print(f"{what.status:8s} {detail:16s} {relpath}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
