"""Camera RAW files with real structure, written by pidng from generated sensor data.

A scene (linear sRGB, 0..1) is sampled through a colour filter array the way a sensor sees it:
each photosite keeps one channel, scaled by the camera's response to neutral (AsShotNeutral,
what the camera's white balance undoes), put on the sensor's scale between its black and white
levels at the given bit depth. The DNG says its camera space is linear sRGB (ColorMatrix1 is
XYZ -> linear sRGB), so a correct decode gives back the scene's colours.

    dng_bytes(scene, bits=12, pattern="RGGB", orientation=1, preview=None, ...)

The preview, when given, is stored as the DNG's first IFD (a baseline JPEG, as cameras and
converters store theirs) with the raw data in a SubIFD; EXIF (date, lens, exposure) and GPS
go in their own IFDs, as cameras write them.
"""

from __future__ import annotations

import io

import numpy as np
from pidng.defs import CalibrationIlluminant, CFAPattern, DNGVersion, PhotometricInterpretation
from pidng.dng import DNG, Tag, Type, dngIFD, dngTag
from PIL import Image

# XYZ (D65) -> linear sRGB: the camera space of these DNGs is linear sRGB itself.
XYZ_TO_SRGB = (
    (3.2404542, -1.5371385, -0.4985314),
    (-0.9692660, 1.8760108, 0.0415560),
    (0.0556434, -0.2040259, 1.0572252),
)
PATTERNS = {"RGGB": CFAPattern.RGGB, "BGGR": CFAPattern.BGGR, "GRBG": CFAPattern.GRBG, "GBRG": CFAPattern.GBRG}
NEUTRAL = (0.5, 1.0, 0.7)  # the camera's raw response to grey: red and blue weaker than green
CAMERA = ("Acme Optical", "Sensor One")
TAKEN = "2024:05:06 07:08:09"
LENS = "Acme 35mm F1.4"
GPS = {1: "N", 2: ((48, 1), (51, 1), (2400, 100)), 3: "E", 4: ((2, 1), (21, 1), (700, 100))}


def mosaic(scene: np.ndarray, bits: int, pattern: str | None, black: int) -> np.ndarray:
    """The sensor's readout of a linear HxWx3 scene (0..1): uint16, one channel per photosite
    (pattern None: a monochrome sensor, which reads the scene's luminance)."""
    h, w = scene.shape[:2]
    white = 2**bits - 1
    if pattern is None:
        luminance = scene @ np.array([0.2126, 0.7152, 0.0722], np.float32)
        return np.rint(black + np.clip(luminance, 0, 1) * (white - black)).astype(np.uint16)
    channel = np.array(PATTERNS[pattern], dtype=np.intp).reshape(2, 2)  # 0 R, 1 G, 2 B per site
    sites = np.tile(channel, (h // 2 + 1, w // 2 + 1))[:h, :w]
    response = np.take_along_axis(scene, sites[..., None], axis=2)[..., 0] * np.take(NEUTRAL, sites)
    return np.rint(black + np.clip(response, 0, 1) * (white - black)).astype(np.uint16)


def _rational(value: float, denominator: int = 10000) -> list[int]:
    return [round(value * denominator), denominator]


def _subifd(tag_id: int, ifd: dngIFD) -> dngTag:
    """A tag pointing to a sub-IFD (pidng writes the IFD where the tag's data goes)."""
    tag = dngTag((tag_id, Type.Long), [0])
    tag.subIFD = ifd
    return tag


def _exif_ifd(taken: str, lens: str) -> dngIFD:
    ifd = dngIFD()
    ifd.tags += [
        dngTag(Tag.DateTimeOriginal, taken),
        dngTag(Tag.EXIFPhotoLensModel, lens),
        dngTag(Tag.FNumber, [[14, 10]]),
        dngTag(Tag.ExposureTime, [[1, 250]]),
        dngTag(Tag.PhotographicSensitivity, [200]),
        dngTag(Tag.FocalLength, [[35, 1]]),
    ]
    return ifd


def _gps_ifd() -> dngIFD:
    ifd = dngIFD()
    for tag_id, value in GPS.items():
        kind = Type.Ascii if isinstance(value, str) else Type.Rational
        ifd.tags.append(dngTag((tag_id, kind), value if isinstance(value, str) else [list(v) for v in value]))
    return ifd


def dng_bytes(
    scene: np.ndarray,
    bits: int = 12,
    pattern: str | None = "RGGB",
    orientation: int = 1,
    preview: np.ndarray | None = None,
    black: int = 64,
    camera: tuple[str, str] = CAMERA,
    metadata: bool = True,
) -> bytes:
    """A DNG of the linear scene (HxWx3 float, 0..1, even sides) as a sensor of `bits` bits
    with the given CFA pattern (None: a monochrome sensor) would record it. preview: an HxWx3
    uint8 sRGB picture stored as the DNG's embedded JPEG preview (as stored, not upright:
    orientation applies to it too)."""
    raw = mosaic(scene, bits, pattern, black)
    h, w = raw.shape
    if bits in (10, 12):  # pidng's packers: big-endian bit packing, as DNG stores 10- and 12-bit data
        from pidng import packing

        data = {10: packing.pack10, 12: packing.pack12}[bits](raw).tobytes()
        sample_bits = bits
    else:  # 14 and 16 bits in 16-bit samples, the white level telling the depth (as converters write 14-bit data)
        data, sample_bits = raw.astype("<u2").tobytes(), 16

    main = dngIFD()
    main.tags += [
        dngTag(Tag.NewSubfileType, [0]),
        dngTag(Tag.ImageWidth, [w]),
        dngTag(Tag.ImageLength, [h]),
        dngTag(Tag.BitsPerSample, [sample_bits]),
        dngTag(Tag.Compression, [1]),
        dngTag(Tag.SamplesPerPixel, [1]),
        dngTag(Tag.PlanarConfiguration, [1]),
        dngTag(Tag.RowsPerStrip, [h]),
        dngTag(Tag.BlackLevel, [black]),
        dngTag(Tag.WhiteLevel, [2**bits - 1]),
    ]
    if pattern is None:
        main.tags.append(dngTag(Tag.PhotometricInterpretation, [PhotometricInterpretation.Linear_Raw]))
    else:
        main.tags += [
            dngTag(Tag.PhotometricInterpretation, [PhotometricInterpretation.Color_Filter_Array]),
            dngTag(Tag.CFARepeatPatternDim, [2, 2]),
            dngTag(Tag.CFAPattern, PATTERNS[pattern]),
        ]
    strip_of_raw = dngTag(Tag.StripOffsets, [0])
    main.tags += [strip_of_raw, dngTag(Tag.StripByteCounts, [len(data)])]
    strips = [data]

    camera_tags = [
        dngTag(Tag.Make, camera[0]),
        dngTag(Tag.Model, camera[1]),
        dngTag(Tag.UniqueCameraModel, " ".join(camera)),
        dngTag(Tag.Orientation, [orientation]),
        dngTag(Tag.DNGVersion, DNGVersion.V1_4),
        dngTag(Tag.DNGBackwardVersion, DNGVersion.V1_2),
        dngTag(Tag.ColorMatrix1, [_rational(v) for row in XYZ_TO_SRGB for v in row]),
        dngTag(Tag.CalibrationIlluminant1, [CalibrationIlluminant.D65]),
        dngTag(Tag.AsShotNeutral, [_rational(v) for v in NEUTRAL]),
        dngTag(Tag.Software, "dreamfocus tests"),
    ]
    if metadata:
        camera_tags += [
            dngTag(Tag.DateTime, TAKEN),
            _subifd(Tag.EXIF_IFD[0], _exif_ifd(TAKEN, LENS)),
            _subifd(0x8825, _gps_ifd()),
        ]

    if preview is None:
        main.tags += camera_tags
        ifds = [main]
        strip_tags = [strip_of_raw]
    else:
        jpeg = io.BytesIO()
        Image.fromarray(preview).save(jpeg, "JPEG", quality=90)
        first = dngIFD()  # IFD0: the preview, with the camera's tags; the raw data in a SubIFD
        ph, pw = preview.shape[:2]
        strip_of_preview = dngTag(Tag.StripOffsets, [0])
        first.tags += [
            dngTag(Tag.NewSubfileType, [1]),
            dngTag(Tag.ImageWidth, [pw]),
            dngTag(Tag.ImageLength, [ph]),
            dngTag(Tag.BitsPerSample, [8, 8, 8]),
            dngTag(Tag.Compression, [7]),  # JPEG
            dngTag(Tag.PhotometricInterpretation, [6]),  # YCbCr
            dngTag(Tag.SamplesPerPixel, [3]),
            dngTag(Tag.PlanarConfiguration, [1]),
            dngTag(Tag.RowsPerStrip, [ph]),
            strip_of_preview,
            dngTag(Tag.StripByteCounts, [len(jpeg.getvalue())]),
            _subifd(Tag.SubIFD[0], main),
            *camera_tags,
        ]
        ifds = [first]
        strips.append(jpeg.getvalue())
        strip_tags = [strip_of_raw, strip_of_preview]

    dng = DNG()
    dng.IFDs = ifds
    dng.ImageDataStrips = strips
    length = dng.dataLen()  # lays out the strips after the IFDs: their offsets are known now
    for i, tag in enumerate(strip_tags):
        tag.setValue([dng.StripOffsets[i]])
    buf = bytearray(length)
    dng.setBuffer(buf)
    dng.write()
    return bytes(buf)


def scene(height: int = 240, width: int = 360) -> np.ndarray:
    """A linear scene: a grey frame (for white balance), a red, a green and a blue patch, and
    textured detail so the effect has something to soften."""
    rng = np.random.default_rng(7)
    out = np.full((height, width, 3), 0.18, np.float32)
    out += rng.uniform(-0.03, 0.03, (height, width, 1)).astype(np.float32)  # grey texture, still neutral
    h3, w4 = height // 3, width // 4
    out[h3 : 2 * h3, w4 : 2 * w4] = (0.6, 0.05, 0.05)
    out[h3 : 2 * h3, 2 * w4 : 3 * w4] = (0.05, 0.5, 0.05)
    out[2 * h3 + 10 : height - 10, w4 : 3 * w4] = (0.05, 0.05, 0.6)
    return out


def srgb(linear: np.ndarray) -> np.ndarray:
    """8-bit sRGB of a linear scene, for previews and expected colours."""
    v = np.clip(linear, 0, 1)
    encoded = np.where(v <= 0.0031308, v * 12.92, 1.055 * np.power(v, 1 / 2.4) - 0.055)
    return np.rint(encoded * 255).astype(np.uint8)


def stored(upright: np.ndarray, orientation: int) -> np.ndarray:
    """The pixels as a camera stores them, given the upright picture and the EXIF orientation."""
    turns = {1: 0, 3: 2, 6: 1, 8: 3}[orientation]  # 6: stored turned 90 CCW, shown turned 90 CW
    return np.ascontiguousarray(np.rot90(upright, turns))
