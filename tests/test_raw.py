"""Camera RAWs: DNGs written by pidng from generated sensor data (tests/raw_files.py), decoded by
LibRaw through rawpy; the effect at 16 bits; RAW + JPEG pairs and the files that are no photos."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from raw_files import CAMERA, GPS, LENS, TAKEN, dng_bytes, scene, srgb, stored

from pipeline import raw_io
from pipeline.effect import composite, luminance, painterly_background, render
from pipeline.errors import CorruptImageError, EmptyFileError, TooManyPixelsError, UnsupportedCameraError
from pipeline.params import effect_params
from pipeline.photo import RenderSettings, SceneMaps, prepare, render_on_host
from pipeline.photo_io import PHOTO_EXTENSIONS, decode_photo, encode_photo

SCENE = scene(120, 180)
# Where the scene's patches are, as (rows, columns) slices of the upright picture, inset from edges.
GREY = np.s_[4:30, 4:40]
RED = np.s_[48:72, 55:80]
GREEN = np.s_[48:72, 100:125]
BLUE = np.s_[92:100, 55:125]


def mean(pixels: np.ndarray, where) -> np.ndarray:
    values = pixels[where].reshape(-1, 3).astype(np.float64)
    return values.mean(axis=0) / (257 if pixels.dtype == np.uint16 else 1)


def assert_scene_colours(pixels: np.ndarray) -> None:
    """Grey is grey (the camera's white balance undid its weak red and blue), patches keep their hue."""
    grey = mean(pixels, GREY)
    assert np.ptp(grey) <= 6 and grey.mean() > 60, grey
    for where, channel in ((RED, 0), (GREEN, 1), (BLUE, 2)):
        colour = mean(pixels, where)
        others = np.delete(colour, channel)
        assert colour[channel] > 2 * others.max(), (channel, colour)


@pytest.mark.parametrize("bits", [10, 12, 14, 16])
@pytest.mark.parametrize("pattern", ["RGGB", "BGGR", "GRBG", "GBRG"])
def test_dng_of_any_bit_depth_and_cfa_pattern_decodes_to_the_scene(bits, pattern):
    photo = decode_photo(dng_bytes(SCENE, bits, pattern), "IMG_0001.DNG")
    assert photo.pixels.dtype == np.uint16 and photo.pixels.shape == (120, 180, 3)
    assert_scene_colours(photo.pixels)
    # The sensor's depth survives: a 16-bit result is not 8-bit values scaled up.
    assert np.count_nonzero(photo.pixels % 257) > photo.pixels.size // 2


def test_extensions_in_any_letter_case_are_raw():
    for name in ("a.dng", "b.DNG", "c.Nef", "d.CR3", "e.arw", "f.ORF", "g.raf", "h.RW2", "i.pef", "j.SRW", "k.cr2"):
        assert raw_io.is_raw(name) and f".{name.rsplit('.', 1)[1].lower()}" in PHOTO_EXTENSIONS
    assert not raw_io.is_raw("a.jpg") and not raw_io.is_raw("dng")


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_orientation_from_the_raw_applies_to_the_preview_and_the_full_picture(orientation):
    data = dng_bytes(stored(SCENE, orientation), orientation=orientation, preview=stored(srgb(SCENE), orientation))
    full = decode_photo(data, "x.dng").pixels
    preview = prepare(data, "x.dng", 200.0)
    assert full.shape == (120, 180, 3) and preview.shape == (120, 180, 3)  # upright, both
    assert_scene_colours(full)
    assert_scene_colours(preview)


def marked_preview(size: tuple[int, int]) -> np.ndarray:
    """The scene's preview with its red patch painted yellow: tells whether the preview was used."""
    picture = srgb(SCENE)
    picture[RED] = (230, 220, 20)
    return np.asarray(Image.fromarray(picture).resize(size[::-1], Image.Resampling.BILINEAR))


def test_a_large_enough_preview_is_the_model_copy():
    data = dng_bytes(SCENE, preview=marked_preview((120, 180)))
    copy = prepare(data, "x.dng", 200.0)
    assert copy.dtype == np.uint8 and copy.shape == (120, 180, 3)
    r, g, b = mean(copy, RED)
    assert r > 150 and g > 150 and b < 90  # the preview's yellow: no demosaic happened


@pytest.mark.parametrize(
    "preview",
    [None, marked_preview((40, 60)), marked_preview((120, 120))],
    ids=["no preview", "too small", "other shape"],
)
def test_without_a_usable_preview_the_model_copy_is_the_half_size_image(preview):
    data = dng_bytes(SCENE, preview=preview)
    copy = prepare(data, "x.dng", 200.0)
    assert copy.dtype == np.uint8 and copy.shape == (60, 90, 3)  # 2x2 sensor blocks as pixels
    half = np.s_[RED[0].start // 2 : RED[0].stop // 2, RED[1].start // 2 : RED[1].stop // 2]
    r, g, b = mean(copy, half)
    assert r > 2 * max(g, b)  # red, from the sensor data


def test_result_carries_the_raws_exif_date_camera_lens_and_gps():
    data = dng_bytes(stored(SCENE, 6), orientation=6)
    flat = np.zeros((60, 90), np.float32)
    done = render_on_host(data, "x.dng", SceneMaps(flat, flat), RenderSettings(effect_params("default")))
    with Image.open(io.BytesIO(done.encoded)) as out:
        assert out.format == "JPEG" and out.size == (180, 120)
        exif = out.getexif()
        details, gps = exif.get_ifd(0x8769), exif.get_ifd(0x8825)
    assert (exif[0x010F], exif[0x0110], exif[0x0132]) == (*CAMERA, TAKEN)
    assert exif.get(0x0112, 1) == 1  # pixels are upright: nothing to turn again
    assert details[0x9003] == TAKEN and details[0xA434] == LENS and float(details[0x829D]) == 1.4
    assert gps[1] == GPS[1] and gps[3] == GPS[3]
    assert [float(v) for v in gps[2]] == [48.0, 51.0, 24.0]


def test_raw_without_metadata_gives_a_result_without_exif_trouble():
    flat = np.zeros((4, 4), np.float32)
    done = render_on_host(
        dng_bytes(SCENE, metadata=False), "x.dng", SceneMaps(flat, flat), RenderSettings(effect_params("default"))
    )
    with Image.open(io.BytesIO(done.encoded)) as out:
        exif = out.getexif()
    assert exif.get(0x010F) == CAMERA[0] and 0x9003 not in exif.get_ifd(0x8769)


def test_effect_keeps_sixteen_bits_until_the_result_is_encoded():
    """A dark, smooth ramp: the painterly background stretches it to 40..255. At 8 bits the
    stretch leaves gaps between levels (banding); from 16 bits every output level is reached."""
    ramp = np.linspace(0, 20 / 255, 2048, dtype=np.float64)
    photo16 = np.rint(np.tile(ramp, (16, 1))[..., None].repeat(3, axis=2) * 65535).astype(np.uint16)
    photo8 = np.rint(photo16 / 257).astype(np.uint8)
    levels8 = np.unique(painterly_background(photo8, 1))
    levels16 = np.unique(encode_ready(painterly_background(photo16, 1)))
    assert len(levels8) <= 22 and len(levels16) >= 200  # 21 input levels vs the whole 40..255 range

    # The same effect at both depths gives the same picture, but for the 8-bit one's banding
    # (at most one input step, stretched: 215 / 21 levels).
    fg = np.zeros((16, 2048), np.float32)
    fg[:, 900:1100] = 1
    depth = np.tile(np.linspace(0, 1, 2048, dtype=np.float32), (16, 1))
    params = effect_params("default")
    out16, out8 = render(photo16, fg, depth, params).image, render(photo8, fg, depth, params).image
    assert out16.dtype == np.uint16 and out8.dtype == np.uint8
    difference = np.abs(encode_ready(out16).astype(int) - out8)
    assert difference.max() <= 11 and difference.mean() < 2.5
    assert np.allclose(luminance(photo16), luminance(photo8), atol=1 / 255)


def encode_ready(pixels16: np.ndarray) -> np.ndarray:
    """What encode_photo makes of 16-bit pixels: the JPEG of a PNG round trip shows it exactly."""
    data = encode_photo(pixels16 if pixels16.ndim == 3 else pixels16[..., None].repeat(3, 2), "png")
    return np.asarray(Image.open(io.BytesIO(data)))


def test_sixteen_bit_composite_and_encoding_round_to_nearest():
    photo = np.full((2, 2, 3), 65535, np.uint16)
    background = np.zeros((2, 2, 3), np.uint16)
    alpha = np.array([[1.0, 0.5], [0.25, 0.0]], np.float32)
    blended = composite(photo, background, alpha)
    assert blended.dtype == np.uint16 and blended[:, :, 0].tolist() == [[65535, 32768], [16384, 0]]
    values = np.array([[[0, 128, 129], [32767, 65535, 257]]], np.uint16)
    assert encode_ready(values).tolist() == [[[0, 0, 1], [127, 255, 1]]]


def test_truncated_or_corrupt_raw_is_a_clear_error():
    data = dng_bytes(SCENE)
    for cut in (len(data) // 2, 600, 40):
        with pytest.raises(CorruptImageError, match=r"x\.dng: truncated or corrupt RAW"):
            decode_photo(data[:cut], "x.dng")
    garbage = np.random.default_rng(0).bytes(5000)
    with pytest.raises(CorruptImageError, match=r"not a RAW file LibRaw can read"):
        decode_photo(garbage, "x.NEF")
    with pytest.raises(EmptyFileError):
        prepare(b"", "x.cr2", 200.0)


def test_a_camera_libraw_does_not_know_is_named():
    tiff = io.BytesIO()
    Image.new("RGB", (64, 48), (90, 90, 90)).save(tiff, "TIFF", tiffinfo={0x010F: "Acme Photonics", 0x0110: "AP-1"})
    with pytest.raises(UnsupportedCameraError, match=r"x\.nef: camera not supported by LibRaw .*Acme Photonics AP-1"):
        prepare(tiff.getvalue(), "x.nef", 200.0)


def test_megapixel_limit_is_checked_before_unpacking():
    with pytest.raises(TooManyPixelsError, match=r"180x120 = 0\.0 MP exceeds the 0\.001 MP limit"):
        prepare(dng_bytes(SCENE), "x.dng", 0.001)


def test_preview_orientation_codes_match_libraws_own():
    """orient() turns stored pixels upright as LibRaw's output is (3, 5, 6 and the mirrored codes)."""
    upright = np.arange(6 * 4 * 3, dtype=np.uint8).reshape(6, 4, 3)
    assert np.array_equal(raw_io.orient(np.rot90(upright, 1), 6), upright)  # stored turned 90 CCW
    assert np.array_equal(raw_io.orient(np.rot90(upright, 3), 5), upright)
    assert np.array_equal(raw_io.orient(np.rot90(upright, 2), 3), upright)
    assert np.array_equal(raw_io.orient(upright[:, ::-1], 1), upright)


def test_cr3_metadata_boxes_give_camera_date_and_gps():
    """CR3 (ISO base media) keeps its metadata as TIFF structures in CMT1 (main), CMT2 (EXIF)
    and CMT4 (GPS) boxes inside moov's Canon uuid box."""

    def tiff(tags: dict) -> bytes:
        exif = Image.Exif()
        exif.update(tags)
        return exif.tobytes()[6:]  # without the "Exif\0\0" of a JPEG segment

    def box(name: bytes, body: bytes) -> bytes:
        return (8 + len(body)).to_bytes(4, "big") + name + body

    cmts = box(b"CMT1", tiff({0x010F: "Canon", 0x0110: "Canon EOS R5"}))
    cmts += box(b"CMT2", tiff({0x9003: TAKEN, 0xA434: LENS}))
    cmts += box(b"CMT4", tiff({1: "N", 3: "E"}))
    data = box(b"ftyp", b"crx \x00\x00\x00\x01crx isom") + box(b"moov", box(b"uuid", bytes(16) + cmts))
    main_tags, exif_tags, gps = raw_io._tiff_ifds(data)
    assert (main_tags[0x010F], main_tags[0x0110]) == ("Canon", "Canon EOS R5")
    assert (exif_tags[0x9003], exif_tags[0xA434]) == (TAKEN, LENS)
    assert (gps[1], gps[3]) == ("N", "E")
    assert raw_io._camera_named(data) == "Canon Canon EOS R5"


@pytest.mark.parametrize("magic", [b"IIRO", b"IIU\x00"])
def test_orf_and_rw2_metadata_is_read_as_the_tiff_it_is(magic):
    """Olympus ORF and Panasonic RW2 are TIFF structures under their own magic numbers."""
    data = magic + dng_bytes(SCENE)[4:]
    main_tags, exif_tags, gps = raw_io._tiff_ifds(data)
    assert (main_tags[0x010F], exif_tags[0x9003], gps[1]) == (CAMERA[0], TAKEN, GPS[1])


def test_monochrome_sensor_gives_a_grey_rgb_picture():
    """A monochrome DNG (LinearRaw, one sample per pixel): LibRaw gives one channel, the job three."""
    data = dng_bytes(SCENE, 12, None)
    full = decode_photo(data, "mono.dng").pixels
    copy = prepare(data, "mono.dng", 200.0)
    for pixels in (full, copy):
        assert pixels.ndim == 3 and pixels.shape[2] == 3
        assert np.array_equal(pixels[..., 0], pixels[..., 1]) and np.array_equal(pixels[..., 1], pixels[..., 2])
    assert mean(full, GREY)[0] > mean(full, BLUE)[0]  # luminance: the grey frame is brighter than the blue patch
