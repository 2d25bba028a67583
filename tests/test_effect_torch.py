"""The torch effect (pipeline/effect_torch.py) on the CPU gives effect.py's pictures: the result,
the background, alpha and the subject kept crisp to at least 45 dB PSNR, both presets, on the
examples, an 8-MP photo, the cases where a decision falls back (flat depth, no subject, all
subject, a soft background, a flat photo) and the decisions on the subject (no clear subject,
a partial mask extended to the whole object, with measured depth or the ground prior)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import effect
from pipeline import effect_torch as et
from pipeline.params import PRESETS, effect_params

EXAMPLES = __import__("pathlib").Path(__file__).resolve().parents[1] / "examples"
NAMES = ("astronaut", "chelsea", "coffee", "motorcycle_left", "rocket")


def psnr(a: np.ndarray, b: np.ndarray, peak: float) -> float:
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(peak**2 / mse)


def example(name: str) -> np.ndarray:
    return np.asarray(Image.open(EXAMPLES / f"{name}.jpg").convert("RGB"))


def scene_maps(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Maps at a model copy's size: a soft elliptical subject standing on a near-to-far ramp."""
    scale = min(1.0, 1024 / max(height, width))
    h, w = round(height * scale), round(width * scale)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    fg = ((((yy - h / 2) / (h / 3)) ** 2 + ((xx - w / 2) / (w / 5)) ** 2) < 1).astype(np.float32)
    fg = cv2.GaussianBlur(fg, (0, 0), 5)
    depth = yy / h + 0.3 * fg + 0.05 * np.sin(xx / 20)
    return fg, depth


def torch_render(
    photo: np.ndarray, fg: np.ndarray, depth: np.ndarray, params, depth_measured: bool = True
) -> effect.Rendering:
    batch = torch.from_numpy(np.ascontiguousarray(photo.transpose(2, 0, 1)))[None]
    return et.render(batch, torch.from_numpy(fg)[None], torch.from_numpy(depth)[None], params, depth_measured).host(0)


def assert_same_picture(ref: effect.Rendering, got: effect.Rendering) -> None:
    assert psnr(ref.image, got.image, 255) >= 45
    assert psnr(ref.background, got.background, 255) >= 45
    assert psnr(ref.alpha, got.alpha, 1.0) >= 45
    assert psnr(ref.depth, got.depth, 1.0) >= 45
    assert psnr(ref.fg, got.fg, 1.0) >= 45  # the whole subject
    assert ref.saliency is not None and got.saliency is not None
    assert psnr(ref.saliency, got.saliency, 1.0) >= 45
    assert got.no_subject == ref.no_subject
    if not np.isnan(got.subject_confidence):  # nan: not measured (no subject checks, no extension)
        assert got.subject_confidence == pytest.approx(ref.subject_confidence, abs=1e-5)
    assert got.start == pytest.approx(ref.start, abs=1e-5)
    assert got.stop == pytest.approx(ref.stop, abs=1e-5)
    assert got.fg_fraction == pytest.approx(ref.fg_fraction, abs=1e-4)
    assert got.left_alone == ref.left_alone
    if np.isnan(ref.background_detail):
        assert np.isnan(got.background_detail)
    else:
        assert got.background_detail == pytest.approx(ref.background_detail, rel=1e-3)


@pytest.mark.parametrize("preset", ["seed", "default"])
@pytest.mark.parametrize("name", NAMES)
def test_examples_match_the_numpy_effect(name, preset):
    photo = example(name)
    fg, depth = scene_maps(*photo.shape[:2])
    assert_same_picture(
        effect.render(photo, fg, depth, PRESETS[preset]), torch_render(photo, fg, depth, PRESETS[preset])
    )


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["seed", "default"])
def test_an_8_megapixel_photo_matches(preset):
    photo = cv2.resize(example("motorcycle_left"), (3466, 2339), interpolation=cv2.INTER_CUBIC)  # 8.1 MP, odd sizes
    fg, depth = scene_maps(*photo.shape[:2])
    ref = effect.render(photo, fg, depth, PRESETS[preset])
    got = torch_render(photo, fg, depth, PRESETS[preset])
    assert ref.factor == got.factor == (1 if preset == "seed" else 6)
    assert_same_picture(ref, got)


@pytest.mark.parametrize("preset", ["seed", "default"])
@pytest.mark.parametrize(
    "case", ["flat depth", "no subject", "all subject", "flat photo", "nan depth", "gradient", "soft background"]
)
def test_fallback_cases_match(case, preset):
    photo = example("chelsea")
    fg, depth = scene_maps(*photo.shape[:2])
    params = PRESETS[preset]
    if case == "flat depth":
        depth = np.full_like(depth, 3.0)
    elif case == "no subject":
        fg = np.zeros_like(fg)
    elif case == "all subject":
        fg = np.ones_like(fg)
    elif case == "flat photo":
        photo = np.full_like(photo, 90)
    elif case == "nan depth":
        depth = depth.copy()
        depth[:10] = np.nan
    elif case == "gradient":
        params = effect_params(preset, gradient="right", gradient_strength=0.7)
    elif case == "soft background":  # the subject keeps its detail, the background is blurred away
        blurred = cv2.GaussianBlur(photo, (0, 0), 8)
        big = cv2.resize(fg, (photo.shape[1], photo.shape[0]))[..., None]
        photo = (photo * big + blurred * (1 - big)).astype(np.uint8)
        params = effect_params(preset, min_background_detail=0.5)
    ref = effect.render(photo, fg, depth, params)
    got = torch_render(photo, fg, depth, params)
    assert_same_picture(ref, got)
    if case == "soft background":
        assert got.left_alone and np.array_equal(got.image, photo)
    if case == "flat depth":
        assert got.start == got.stop


def test_a_batch_gives_each_photo_its_own_result():
    photo = example("coffee")
    fg, depth = scene_maps(*photo.shape[:2])
    photos = np.stack([photo, photo[:, ::-1]])
    fgs, depths = np.stack([fg, np.zeros_like(fg)]), np.stack([depth, depth[::-1]])
    batch = et.render(
        torch.from_numpy(np.ascontiguousarray(photos.transpose(0, 3, 1, 2))),
        torch.from_numpy(fgs),
        torch.from_numpy(np.ascontiguousarray(depths)),
        PRESETS["default"],
    )
    for i in range(2):
        ref = effect.render(
            np.ascontiguousarray(photos[i]), fgs[i], np.ascontiguousarray(depths[i]), PRESETS["default"]
        )
        assert_same_picture(ref, batch.host(i))


def test_masked_percentile_is_numpy_percentile():
    rng = np.random.default_rng(1)
    values = rng.random((4, 501)).astype(np.float32)
    chosen = rng.random((4, 501)) < np.array([[0.0], [0.01], [0.5], [1.0]])
    ordered, order = torch.sort(torch.from_numpy(values), dim=1)
    picked = torch.from_numpy(chosen).gather(1, order)
    for q in (0.0, 13.0, 50.0, 100.0):
        got = et._masked_percentile(ordered, picked, q, torch.full((4,), -1.0, dtype=torch.float64)).numpy()
        for row in range(4):
            expected = np.percentile(values[row][chosen[row]], q) if chosen[row].any() else -1.0
            assert got[row] == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("kernel_size", [1, 2, 5, 16, 24, 31])
def test_opening_is_opencvs(kernel_size):
    photo = example("astronaut")[::2, ::2].copy()
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (kernel_size, kernel_size))
    expected = cv2.normalize(cv2.morphologyEx(photo, cv2.MORPH_OPEN, kernel), None, 40, 255, cv2.NORM_MINMAX)
    got = et.painterly_background(torch.from_numpy(photo.transpose(2, 0, 1).copy())[None], kernel_size)
    assert np.abs(got[0].permute(1, 2, 0).numpy().astype(int) - expected).max() <= 1


def partial_mask(fg: np.ndarray) -> np.ndarray:
    """The right half of the subject only, as a model that missed part of it gives."""
    part = fg.copy()
    part[:, : fg.shape[1] // 2] = 0
    return cv2.GaussianBlur(part, (0, 0), 3)


@pytest.mark.parametrize("case", ["tiny subject", "unsure subject", "clear subject"])
def test_no_clear_subject_matches(case):
    photo = example("coffee")
    fg, depth = scene_maps(*photo.shape[:2])
    if case == "tiny subject":  # a speck: well under min_subject_area
        speck = cv2.resize(fg, None, fx=0.05, fy=0.05)
        fg = np.zeros_like(fg)
        fg[: speck.shape[0], : speck.shape[1]] = speck
    elif case == "unsure subject":  # large, but the model is unsure of it
        fg = fg * np.float32(0.6)
    params = PRESETS["default"]
    ref = effect.render(photo, fg, depth, params)
    got = torch_render(photo, fg, depth, params)
    assert ref.no_subject == (case != "clear subject")
    assert_same_picture(ref, got)
    if ref.no_subject:
        assert got.left_alone and np.array_equal(got.image, photo)
        assert got.subject_confidence == pytest.approx(ref.subject_confidence, abs=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_a_partial_mask_grows_to_the_same_whole_subject(name):
    photo = example(name)
    fg, depth = scene_maps(*photo.shape[:2])
    part = partial_mask(fg)
    params = PRESETS["default"]
    wholes = {}
    for measured in (True, False):
        ref = effect.render(photo, part, depth, params, depth_measured=measured)
        got = torch_render(photo, part, depth, params, depth_measured=measured)
        assert ref.saliency is not None
        assert np.count_nonzero((ref.fg >= 0.5) & (ref.saliency < 0.5)) > 0.01 * ref.fg.size  # it did grow
        assert np.array_equal(got.fg, ref.fg)  # the same decision, pixel for pixel
        assert_same_picture(ref, got)
        wholes[measured] = got.fg
    assert not np.array_equal(wholes[True], wholes[False])  # the ground prior decides otherwise


def test_depth_measured_is_per_photo_in_a_batch():
    photo = example("chelsea")
    fg, depth = scene_maps(*photo.shape[:2])
    part = partial_mask(fg)
    batch = et.render(
        torch.from_numpy(np.ascontiguousarray(np.stack([photo, photo]).transpose(0, 3, 1, 2))),
        torch.from_numpy(np.stack([part, part])),
        torch.from_numpy(np.stack([depth, depth])),
        PRESETS["default"],
        [True, False],
    )
    for i, measured in enumerate((True, False)):
        assert_same_picture(effect.render(photo, part, depth, PRESETS["default"], measured), batch.host(i))
