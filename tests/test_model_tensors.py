"""The models' image work on tensors against the OpenCV/numpy functions it stands in for."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from pipeline.effect import normalize_depth
from pipeline.effect import resize_map as resize_map_numpy
from pipeline.models import tensors as T
from pipeline.models.base import squash as squash_numpy


def _image(h: int, w: int, seed: int) -> np.ndarray:
    """Smooth noise: every pixel differs from its neighbours, as in a photo."""
    rng = np.random.default_rng(seed)
    return cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (5, 5), 1.5)


def _hwc(x: torch.Tensor) -> np.ndarray:
    return x.permute(1, 2, 0).numpy()


@pytest.mark.parametrize(
    "size,out",
    [((300, 500), (100, 160)), ((1024, 768), (518, 392)), ((37, 1100), (14, 518)), ((2000, 1500), (1024, 1024))],
)
def test_area_is_opencv_inter_area(size, out):
    img = _image(*size, seed=0)
    got = T.resize_area(T.photo_to_chw(torch.from_numpy(img)), *out)
    want = cv2.resize(img.astype(np.float32), out[::-1], interpolation=cv2.INTER_AREA)
    np.testing.assert_allclose(_hwc(got), want, atol=1e-3)  # exact but for float rounding
    as_uint8 = _hwc(T.as_uint8_values(got))
    want_uint8 = cv2.resize(img, out[::-1], interpolation=cv2.INTER_AREA)
    assert np.abs(as_uint8 - want_uint8).max() <= 1 and (as_uint8 != want_uint8).mean() < 1e-4


@pytest.mark.parametrize("mode,flag", [("bilinear", cv2.INTER_LINEAR), ("bicubic", cv2.INTER_CUBIC)])
@pytest.mark.parametrize("size,out", [((100, 160), (300, 500)), ((300, 90), (518, 154)), ((700, 50), (384, 32))])
def test_interpolation_is_opencv(mode, flag, size, out):
    img = _image(*size, seed=1).astype(np.float32)
    got = _hwc(T.resize_interpolate(T.photo_to_chw(torch.from_numpy(img)), *out, mode))
    want = cv2.resize(img, out[::-1], interpolation=flag)
    assert np.abs(got - want).max() < 0.02  # 0..255 values; edges replicated alike


def test_squash_and_resize_photo_match_the_numpy_paths():
    for h, w in ((120, 200), (1100, 1300), (1024, 1024), (40, 500)):
        img = _image(h, w, seed=2)
        got = _hwc(T.squash(torch.from_numpy(img), 1024))
        want = squash_numpy(img, 1024).astype(np.float32)
        assert np.abs(got - want).max() <= 1  # OpenCV's fixed-point uint8 arithmetic: one level
    img = _image(700, 900, seed=3)  # shrinks: area
    got = _hwc(T.resize_photo(torch.from_numpy(img), 406, 518))
    assert np.abs(got - cv2.resize(img, (518, 406), interpolation=cv2.INTER_AREA)).max() <= 1
    img = _image(120, 200, seed=4)  # grows: bicubic
    got = _hwc(T.resize_photo(torch.from_numpy(img), 308, 518))
    assert np.abs(got - cv2.resize(img, (518, 308), interpolation=cv2.INTER_CUBIC)).max() <= 1


@pytest.mark.parametrize("out", [(1024, 768), (300, 200), (100, 90), (1024, 1024)])
def test_resize_map_is_the_effects(out):
    values = np.random.default_rng(5).random((1024, 1024)).astype(np.float32)
    values = cv2.GaussianBlur(values, (9, 9), 3)
    got = T.resize_map(torch.from_numpy(values), *out).numpy()
    np.testing.assert_allclose(got, resize_map_numpy(values, *out), atol=1e-4)


def test_min_max_is_normalize_depth():
    values = np.random.default_rng(6).normal(3, 2, (50, 70)).astype(np.float32)
    np.testing.assert_allclose(T.min_max(torch.from_numpy(values)).numpy(), normalize_depth(values), atol=1e-6)
    assert not T.min_max(torch.full((4, 4), 7.0)).any()
    with_nan = values.copy()
    with_nan[0, 0] = np.nan
    np.testing.assert_allclose(T.min_max(torch.from_numpy(with_nan)).numpy(), normalize_depth(with_nan), atol=1e-6)


def test_upload_and_download_round_trip():
    arrays = [_image(30, 40, 7), _image(5, 90, 8)]
    tensors = T.upload(arrays, "cpu")
    assert [tuple(t.shape) for t in tensors] == [(30, 40, 3), (5, 90, 3)] and tensors[0].dtype == torch.uint8
    maps = [torch.rand(30, 40), torch.rand(5, 90)]
    for got, want in zip(T.download(maps), maps):
        np.testing.assert_array_equal(got, want.numpy())
