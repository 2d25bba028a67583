"""The torch effect (pipeline/effect_torch.py) on the CPU gives effect.py's pictures: the result,
the background and alpha to at least 45 dB PSNR, both presets, on the examples, an 8-MP photo,
and the cases where a decision falls back (flat depth, no subject, all subject, a soft
background, a flat photo)."""

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


def torch_render(photo: np.ndarray, fg: np.ndarray, depth: np.ndarray, params) -> effect.Rendering:
    batch = torch.from_numpy(np.ascontiguousarray(photo.transpose(2, 0, 1)))[None]
    return et.render(batch, torch.from_numpy(fg)[None], torch.from_numpy(depth)[None], params).host(0)


def assert_same_picture(ref: effect.Rendering, got: effect.Rendering) -> None:
    assert psnr(ref.image, got.image, 255) >= 45
    assert psnr(ref.background, got.background, 255) >= 45
    assert psnr(ref.alpha, got.alpha, 1.0) >= 45
    assert psnr(ref.depth, got.depth, 1.0) >= 45
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
