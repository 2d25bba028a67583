"""Decoding, encoding, masks and depth maps: inputs are built in memory with Pillow / OpenCV."""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from pathlib import Path

import cv2
import numpy as np
import pillow_heif
import pytest
from PIL import Image, ImageCms

from pipeline.errors import BadInputError
from pipeline.photo_io import (
    IMAGE_EXTENSIONS,
    OUTPUT_EXTENSIONS,
    Photo,
    decode_photo,
    encode_photo,
    read_depth,
    read_mask,
)

pillow_heif.register_heif_opener()

RED = (200, 30, 40)


def save(im: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    im.save(out, format=fmt, **options)
    return out.getvalue()


def patch(color=RED, size=(24, 16)) -> Image.Image:
    return Image.new("RGB", size, color)


def assert_color(pixels: np.ndarray, color, tol: int = 0) -> None:
    assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3
    diff = np.abs(pixels.astype(int) - np.array(color)).max()
    assert diff <= tol, f"{pixels.reshape(-1, 3)[0]} != {color} (max diff {diff} > {tol})"


def exif_with(orientation: int | None = None) -> Image.Exif:
    exif = Image.Exif()
    exif[0x010F] = "TestCam"  # Make
    if orientation is not None:
        exif[0x0112] = orientation
    exif.get_ifd(0x8769)[0x9003] = "2024:05:06 07:08:09"  # DateTimeOriginal, in the Exif sub-IFD
    return exif


def swapped_srgb_profile() -> bytes:
    """An RGB profile that is sRGB with the red and green primaries exchanged: pure red in it is
    pure sRGB green. Made by swapping the rXYZ/gXYZ tag offsets of Pillow's sRGB profile."""
    icc = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    entries = {}
    for i in range(struct.unpack_from(">I", icc, 128)[0]):
        sig = bytes(icc[132 + 12 * i : 136 + 12 * i])
        entries[sig] = 132 + 12 * i
    r, g = entries[b"rXYZ"], entries[b"gXYZ"]
    icc[r + 4 : r + 12], icc[g + 4 : g + 12] = icc[g + 4 : g + 12], icc[r + 4 : r + 12]
    icc = bytes(icc).replace("sRGB".encode("utf-16-be"), "Swap".encode("utf-16-be"))
    assert "srgb" not in ImageCms.getProfileDescription(ImageCms.ImageCmsProfile(io.BytesIO(icc))).lower()
    return icc


def png_declaring(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose IHDR is patched to declare width x height (CRC fixed)."""
    data = bytearray(save(Image.new("RGB", (1, 1)), "PNG"))
    struct.pack_into(">II", data, 16, width, height)
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
    return bytes(data)


# --- input kinds -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fmt, options, tol",
    [
        ("PNG", {}, 0),
        ("BMP", {}, 0),
        ("TIFF", {}, 0),
        ("GIF", {}, 0),
        ("WEBP", {"lossless": True}, 0),
        ("JPEG", {"quality": 95}, 4),
        ("HEIF", {"quality": 95}, 6),
    ],
)
def test_rgb_formats(fmt, options, tol):
    photo = decode_photo(save(patch(), fmt, **options), f"patch.{fmt.lower()}")
    assert isinstance(photo, Photo)
    assert photo.format == fmt
    assert photo.pixels.shape == (16, 24, 3)
    assert photo.pixels.flags.c_contiguous
    assert_color(photo.pixels, RED, tol)


def test_grayscale_8bit():
    photo = decode_photo(save(Image.new("L", (8, 8), 77), "PNG"), "gray.png")
    assert_color(photo.pixels, (77, 77, 77))


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_grayscale_16bit_is_scaled_not_clipped(fmt):
    values = np.array([[0, 32768, 65535, 257 * 100]], dtype=np.uint16)
    photo = decode_photo(save(Image.fromarray(values), fmt), f"gray16.{fmt.lower()}")
    assert photo.pixels[0, :, 0].tolist() == [0, 128, 255, 100]
    assert (photo.pixels == photo.pixels[..., :1]).all()


@pytest.mark.parametrize("ext", [".png", ".tiff"])
def test_rgb_16bit_is_scaled_not_clipped(ext):
    rgb = np.zeros((4, 4, 3), np.uint16)
    rgb[...] = (65535, 32768, 257 * 10)
    ok, buf = cv2.imencode(ext, rgb[..., ::-1])  # OpenCV writes BGR
    assert ok
    assert_color(decode_photo(buf.tobytes(), f"rgb16{ext}").pixels, (255, 128, 10), tol=0)


def test_float_tiff_gray():
    values = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    photo = decode_photo(save(Image.fromarray(values), "TIFF"), "float.tiff")
    assert photo.pixels[0, :, 0].tolist() == [0, 128, 255]


def test_rgba_is_composited_over_white():
    im = Image.new("RGBA", (8, 8), (255, 0, 0, 128))
    im.putpixel((0, 0), (0, 0, 255, 0))
    pixels = decode_photo(save(im, "PNG"), "rgba.png").pixels
    assert_color(pixels[1:, 1:], (255, 127, 127), tol=1)
    assert_color(pixels[:1, :1], (255, 255, 255))


def test_gray_alpha_is_composited_over_white():
    pixels = decode_photo(save(Image.new("LA", (4, 4), (0, 64)), "PNG"), "la.png").pixels
    assert_color(pixels, (191, 191, 191), tol=1)


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_with_transparency(fmt):
    im = Image.new("P", (8, 8), 1)
    im.putpalette([0, 0, 0, *RED, 10, 200, 30] + [0] * 759)
    im.paste(2, (0, 0, 4, 8))
    im.info["transparency"] = 0
    im.paste(0, (0, 0, 2, 2))
    pixels = decode_photo(save(im, fmt, transparency=0), f"palette.{fmt.lower()}").pixels
    assert_color(pixels[:2, :2], (255, 255, 255))
    assert_color(pixels[4:, :4], (10, 200, 30))
    assert_color(pixels[:, 4:], RED)


@pytest.mark.parametrize("fmt, tol", [("TIFF", 0), ("JPEG", 6)])
def test_cmyk(fmt, tol):
    im = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red
    im.paste((0, 0, 0, 128), (0, 8, 16, 16))  # mid gray
    pixels = decode_photo(save(im, fmt, **({"quality": 95} if fmt == "JPEG" else {})), "cmyk").pixels
    assert_color(pixels[2:6, 2:14], (255, 0, 0), tol)
    assert_color(pixels[10:14, 2:14], (127, 127, 127), tol)


# --- EXIF orientation ------------------------------------------------------------------------

EXPECTED_TRANSFORM = {  # stored pixels -> what a viewer shows, per EXIF orientation
    1: lambda a: a,
    2: np.fliplr,
    3: lambda a: np.rot90(a, 2),
    4: np.flipud,
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: np.rot90(a, 2).transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),
}


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation(orientation, fmt):
    stored = np.full((16, 24, 3), 128, np.uint8)  # 24 wide, 16 high
    stored[:8, :8] = (255, 0, 0)  # distinct top-left corner
    stored[:8, 16:] = (0, 0, 255)  # and top-right one
    data = save(
        Image.fromarray(stored),
        fmt,
        exif=exif_with(orientation).tobytes(),
        **({"quality": 95, "subsampling": 0} if fmt == "JPEG" else {}),
    )

    photo = decode_photo(data, f"oriented.{fmt.lower()}")

    expected = EXPECTED_TRANSFORM[orientation](stored)
    assert photo.pixels.shape == expected.shape
    assert np.abs(photo.pixels.astype(int) - expected).mean() < 3
    ys, xs = np.nonzero((expected == (255, 0, 0)).all(axis=2))  # where the red corner must land
    assert_color(photo.pixels[ys.min() + 1 : ys.max(), xs.min() + 1 : xs.max()], (255, 0, 0), tol=8)
    kept = Image.Exif()
    kept.load(photo.exif)
    assert kept[0x0112] == 1
    assert kept[0x010F] == "TestCam"


def test_heic_orientation_is_applied():
    exif = exif_with(6)
    data = save(patch(size=(32, 16)), "HEIF", exif=exif.tobytes(), quality=95)
    photo = decode_photo(data, "IMG_0001.HEIC")
    assert photo.format == "HEIF"
    assert photo.pixels.shape == (32, 16, 3)
    assert_color(photo.pixels[4:-4, 4:-4], RED, tol=6)
    kept = Image.Exif()
    kept.load(photo.exif)
    assert kept.get(0x0112, 1) == 1 and kept[0x010F] == "TestCam"


def test_no_exif_gives_none():
    assert decode_photo(save(patch(), "PNG"), "plain.png").exif is None


# --- colour management ---------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "TIFF", "JPEG", "WEBP"])
def test_non_srgb_profile_is_converted(fmt):
    icc = swapped_srgb_profile()
    im = Image.new("RGB", (16, 16), (255, 0, 0))
    im.paste((20, 60, 200), (0, 8, 16, 16))
    options = {"JPEG": {"quality": 100, "subsampling": 0}, "WEBP": {"lossless": True}}.get(fmt, {})
    photo = decode_photo(save(im, fmt, icc_profile=icc, **options), f"wide.{fmt.lower()}")

    tol = 6 if fmt == "JPEG" else 1
    assert_color(photo.pixels[:6], (0, 255, 0), tol)  # red in the swapped profile is sRGB green
    direct = ImageCms.profileToProfile(
        im, ImageCms.ImageCmsProfile(io.BytesIO(icc)), ImageCms.createProfile("sRGB"), outputMode="RGB"
    )
    assert_color(photo.pixels[10:], np.asarray(direct)[12, 4], tol)
    assert np.asarray(direct)[12, 4].tolist() != [20, 60, 200]  # the profile does change it


def test_srgb_profile_keeps_pixels():
    im = patch()
    photo = decode_photo(
        save(im, "PNG", icc_profile=ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()), "srgb.png"
    )
    assert_color(photo.pixels, RED)


def test_broken_profile_is_ignored():
    photo = decode_photo(save(patch(), "PNG", icc_profile=b"not a profile at all" * 10), "broken.png")
    assert_color(photo.pixels, RED)


# --- encoding -------------------------------------------------------------------------------


def rainbow(height=64, width=96) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // width, y * 255 // height, (x + y) % 256], axis=-1).astype(np.uint8)


@pytest.mark.parametrize(
    "fmt, magic, tol",
    [
        ("jpeg", b"\xff\xd8\xff", 12),
        ("jpg", b"\xff\xd8\xff", 12),
        ("JPEG", b"\xff\xd8\xff", 12),
        ("png", b"\x89PNG", 0),
        ("webp", b"RIFF", 16),
    ],
)
def test_encode_roundtrip_profile_and_exif(fmt, magic, tol):
    source = save(Image.fromarray(rainbow()), "JPEG", quality=98, exif=exif_with(6).tobytes())
    photo = decode_photo(source, "src.jpg")
    assert photo.pixels.shape == (96, 64, 3)

    data = encode_photo(photo.pixels, fmt, exif=photo.exif)

    assert data.startswith(magic)
    with Image.open(io.BytesIO(data)) as out:
        icc = ImageCms.ImageCmsProfile(io.BytesIO(out.info["icc_profile"]))
        assert "srgb" in ImageCms.getProfileDescription(icc).lower()
        exif = out.getexif()
        assert exif[0x0112] == 1
        assert exif[0x010F] == "TestCam"
        assert exif.get_ifd(0x8769)[0x9003] == "2024:05:06 07:08:09"
    back = decode_photo(data, f"out{OUTPUT_EXTENSIONS[fmt.lower().replace('jpg', 'jpeg')]}")
    assert back.pixels.shape == photo.pixels.shape
    assert np.abs(back.pixels.astype(int) - photo.pixels).mean() <= max(tol / 4, 0.01)
    assert np.abs(back.pixels.astype(int) - photo.pixels).max() <= max(tol * 4, 0)


def test_encode_without_exif_has_profile_only():
    data = encode_photo(rainbow(), "png")
    with Image.open(io.BytesIO(data)) as out:
        assert "icc_profile" in out.info
        assert not out.getexif()
    assert np.array_equal(decode_photo(data, "x.png").pixels, rainbow())


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_quality_changes_size(fmt):
    noisy = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    assert len(encode_photo(noisy, fmt, quality=40)) < len(encode_photo(noisy, fmt, quality=95))


def test_encode_bad_arguments():
    with pytest.raises(BadInputError, match="bmp"):
        encode_photo(rainbow(), "bmp")
    with pytest.raises(ValueError):
        encode_photo(rainbow().astype(np.float32), "png")
    with pytest.raises(ValueError):
        encode_photo(rainbow()[..., 0], "png")


def test_extension_tables():
    basics = {".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp", ".gif", ".heic", ".heif"}
    assert basics <= IMAGE_EXTENSIONS
    assert all(ext == ext.lower() and ext.startswith(".") for ext in IMAGE_EXTENSIONS)
    assert OUTPUT_EXTENSIONS == {"jpeg": ".jpg", "png": ".png", "webp": ".webp"}
    if ".avif" in IMAGE_EXTENSIONS:  # claimed only when it really decodes
        assert_color(decode_photo(save(patch(), "AVIF", quality=95), "x.avif").pixels, RED, tol=8)


# --- bad input ------------------------------------------------------------------------------


def truncated_jpeg() -> bytes:
    data = save(Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), np.uint8)), "JPEG")
    return data[: len(data) // 2]


@pytest.mark.parametrize(
    "name, data, words",
    [
        ("empty.jpg", b"", "empty file (0 bytes)"),
        ("noise.jpg", np.random.default_rng(2).bytes(4096), "not an image"),
        ("half.jpg", truncated_jpeg(), "truncated or corrupt"),
        ("header.png", b"\x89PNG\r\n\x1a\n", "truncated or corrupt"),
        ("ihdr-only.png", png_declaring(4, 4)[:33], "truncated or corrupt"),
        ("bomb.png", png_declaring(40000, 40000), "40000x40000 = 1600.0 MP exceeds the 200 MP limit"),
    ],
)
def test_bad_photos(name, data, words):
    with pytest.raises(BadInputError) as info:
        decode_photo(data, f"albums/2024/{name}")
    message = str(info.value)
    assert message.startswith(f"albums/2024/{name}: ")
    assert words in message
    assert "\n" not in message


def test_own_limit_replaces_pillows_bomb_check():
    # 20000x10000 = 200 MP is above Pillow's own error threshold (2 x 89.5 MP) and 100 MP above
    # its warning one: our limit and message apply, and no Pillow warning escapes.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(BadInputError, match="200.0 MP exceeds the 150 MP limit"):
            decode_photo(png_declaring(20000, 10000), "big.png", max_megapixels=150)
        with pytest.raises(BadInputError, match=r"big\.png: 10000x10000 = 100.0 MP exceeds the 0.5 MP"):
            decode_photo(png_declaring(10000, 10000), "big.png", max_megapixels=0.5)
    with pytest.raises(BadInputError, match="exceeds the 0.0001 MP limit"):
        decode_photo(save(patch(), "PNG"), "small.png", max_megapixels=0.0001)


# --- masks ----------------------------------------------------------------------------------


def test_mask_8bit():
    mask = read_mask(save(Image.fromarray(np.array([[0, 128, 255]], np.uint8)), "PNG"), "m.png")
    assert mask.dtype == np.float32
    np.testing.assert_allclose(mask, [[0, 128 / 255, 1]], atol=1e-6)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_mask_16bit(fmt):
    values = np.array([[0, 32768, 65535]], np.uint16)
    mask = read_mask(save(Image.fromarray(values), fmt), "m16")
    np.testing.assert_allclose(mask, [[0, 32768 / 65535, 1]], atol=1e-6)


def test_mask_float_tiff_is_clipped():
    values = np.array([[-0.5, 0.25, 2.0]], np.float32)
    np.testing.assert_allclose(read_mask(save(Image.fromarray(values), "TIFF"), "m.tif"), [[0, 0.25, 1]])


def test_mask_rgb_luminance_and_rgba_alpha():
    rgb = Image.new("RGB", (4, 4), (100, 100, 100))
    np.testing.assert_allclose(read_mask(save(rgb, "PNG"), "rgb.png"), 100 / 255, atol=1e-6)
    rgba = Image.new("RGBA", (4, 4), (255, 255, 255, 51))
    np.testing.assert_allclose(read_mask(save(rgba, "PNG"), "rgba.png"), 0.2, atol=1e-6)
    opaque = Image.new("RGBA", (4, 4), (51, 51, 51, 255))  # a mask saved with an unused alpha
    np.testing.assert_allclose(read_mask(save(opaque, "PNG"), "opaque.png"), 0.2, atol=1e-6)


@pytest.mark.parametrize("data", [b"", b"plain text, not a mask", save(Image.new("CMYK", (4, 4)), "TIFF")])
def test_bad_mask(data):
    with pytest.raises(BadInputError, match=r"^masks/a\.png: .*expected a grayscale mask"):
        read_mask(data, "masks/a.png")


# --- depth ----------------------------------------------------------------------------------


def npy(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array)
    return out.getvalue()


@pytest.mark.parametrize("shape", [(3, 4), (3, 4, 1), (1, 3, 4)])
def test_depth_npy(shape):
    values = np.arange(12, dtype=np.float64).reshape(shape) * 1.5
    depth = read_depth(npy(values), "depth.png")  # told by content, not by name
    assert depth.dtype == np.float32 and depth.shape == (3, 4)
    np.testing.assert_allclose(depth, np.arange(12).reshape(3, 4) * 1.5)


def test_depth_images_keep_values():
    values16 = np.array([[0, 1000, 65535]], np.uint16)
    np.testing.assert_array_equal(read_depth(save(Image.fromarray(values16), "PNG"), "d16.png"), values16)
    valuesf = np.array([[0.5, 12.25, -3.0]], np.float32)
    np.testing.assert_array_equal(read_depth(save(Image.fromarray(valuesf), "TIFF"), "d.tif"), valuesf)
    values8 = np.array([[0, 7, 255]], np.uint8)
    np.testing.assert_array_equal(read_depth(save(Image.fromarray(values8), "PNG"), "d8.png"), values8)
    gray_rgb = Image.fromarray(np.repeat(values8[..., None], 3, axis=2))  # gray saved as RGB
    np.testing.assert_array_equal(read_depth(save(gray_rgb, "PNG"), "d.png"), values8)


def test_depth_sample_file():
    data = (Path(__file__).parent / "data" / "motorcycle_disp.png").read_bytes()
    depth = read_depth(data, "motorcycle_disp.png")
    assert depth.ndim == 2 and depth.dtype == np.float32 and depth.max() > depth.min()


def test_depth_non_finite_become_finite_min():
    values = np.array([[np.nan, 2.0], [np.inf, -np.inf], [5.0, 3.0]], np.float32)
    np.testing.assert_array_equal(read_depth(npy(values), "d.npy"), [[2, 2], [2, 2], [5, 3]])


@pytest.mark.parametrize(
    "data, words",
    [
        (save(Image.fromarray(rainbow()), "PNG"), "3-channel RGB image is not a depth map"),
        (npy(np.arange(5.0)), "shape (5,)"),
        (npy(np.zeros((2, 3, 4))), "shape (2, 3, 4)"),
        (npy(np.array([["a", "b"]])), "dtype <U1"),
        (npy(np.full((2, 2), np.nan)), "no finite values"),
        (b"\x93NUMPY garbage", "corrupt .npy"),
        (b"", "empty file"),
        (b"\x00" * 64, "not an image"),
    ],
)
def test_bad_depth(data, words):
    with pytest.raises(BadInputError) as info:
        read_depth(data, "depth/x.npy")
    message = str(info.value)
    assert message.startswith("depth/x.npy: ")
    assert words in message
    assert "expected a single-channel depth map" in message
