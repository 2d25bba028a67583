"""The ``nnpack`` CPU runtime: NNPACK's Winograd convolutions against torch's own, the whole
network against the plain one, the fast max-pool against max_pool2d, and the runtime's choice."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.errors import BadInputError
from pipeline.models import isnet as isnet_module
from pipeline.models import winograd
from pipeline.models.isnet import ISNet, choose_runtime
from pipeline.models.rsu import SMALL, ISNetNetwork, MaxPool2x2

needs_nnpack = pytest.mark.skipif(not winograd.available(), reason="NNPACK does not run on this CPU")


def _network(seed: int) -> ISNetNetwork:
    torch.manual_seed(seed)
    network = ISNetNetwork(SMALL).eval()
    with torch.no_grad():
        for m in network.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.normal_(0.0, (2.0 / m.weight[0].numel()) ** 0.5)
                m.bias.normal_(0.0, 0.1)
    return network


@needs_nnpack
@pytest.mark.parametrize("threads", [2, 1])
@pytest.mark.parametrize("size", [256, 20])  # in NNPACK; on 2 threads below MIN_MULTIPLY_ADDS (F.conv2d)
def test_a_winograd_convolution_is_the_convolution(size, threads, monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)  # what the rule reads
    conv = torch.nn.Conv2d(64, 48, 3, padding=1)
    x = torch.randn(1, 64, size, size)
    fast = winograd.WinogradConv2d(conv)
    with torch.inference_mode():
        want, got = conv(x), fast(x)
        channels_last = fast(x.contiguous(memory_format=torch.channels_last))
    assert winograd.in_nnpack(x, conv.weight, size * size) == (size == 256 or threads == 1)
    assert got.shape == want.shape == (1, 48, size, size)
    # Winograd rounds differently: within 1e-4 of the largest output
    scale = float(want.abs().max())
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-4 * scale)
    np.testing.assert_allclose(channels_last.numpy(), want.numpy(), atol=1e-4 * scale)


@needs_nnpack
@pytest.mark.parametrize(
    ("size", "dilation", "mosaic"),
    [(32, 2, True), (32, 8, True), (16, 2, True), (16, 4, False), (30, 4, False), (24, 3, True)],
)
def test_a_dilated_convolution_as_a_mosaic_is_the_convolution(size, dilation, mosaic, monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    conv = torch.nn.Conv2d(16, 24, 3, padding=dilation, dilation=dilation)
    x = torch.randn(2, 16, size, size)
    fast = winograd.MosaicConv2d(conv)
    calls = []
    nnpack = torch._nnpack_spatial_convolution
    monkeypatch.setattr(torch, "_nnpack_spatial_convolution", lambda *a: calls.append(a[0].shape) or nnpack(*a))
    with torch.inference_mode():
        want, got = conv(x), fast(x)
    side = dilation * (size // dilation + 1)  # the maps of every d-th pixel, a zero gutter after each
    assert calls == ([(2, 16, side, side)] if mosaic else [])
    assert got.shape == want.shape == (2, 24, size, size)
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-4 * float(want.abs().max()))


@pytest.mark.parametrize(("outputs", "bias", "batch"), [(1, True, 1), (2, False, 2)])
def test_a_convolution_to_few_maps_as_shifted_sums_is_the_convolution(outputs, bias, batch):
    conv = torch.nn.Conv2d(32, outputs, 3, padding=1, bias=bias)
    x = torch.randn(batch, 32, 40, 56)
    fast = winograd.ShiftedSumConv2d(conv)
    with torch.inference_mode():
        want, got = conv(x), fast(x)
    assert got.shape == want.shape == (batch, outputs, 40, 56)
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-5 * float(want.abs().max()))
    assert not winograd.shifted_sum_eligible(torch.nn.Conv2d(32, winograd.FEW_OUTPUTS + 1, 3, padding=1))
    assert not winograd.shifted_sum_eligible(torch.nn.Conv2d(32, 1, 3, padding=0))


def test_only_plain_3x3_convolutions_of_stride_1_are_replaced():
    assert winograd.eligible(torch.nn.Conv2d(8, 8, 3, padding=1))
    assert not winograd.eligible(torch.nn.Conv2d(8, 8, 3, padding=2, dilation=2))
    assert winograd.mosaic_eligible(torch.nn.Conv2d(8, 8, 3, padding=2, dilation=2))
    assert not winograd.mosaic_eligible(torch.nn.Conv2d(8, 8, 3, padding=1, dilation=2))  # not of the input's size
    assert not winograd.mosaic_eligible(torch.nn.Conv2d(8, 8, 3, padding=1))
    assert not winograd.eligible(torch.nn.Conv2d(8, 8, 3, stride=2, padding=1))
    assert not winograd.eligible(torch.nn.Conv2d(8, 8, 1))
    assert not winograd.eligible(torch.nn.Conv2d(8, 8, 3, padding=1, groups=2))
    with pytest.raises(ValueError, match="not a plain 3x3 convolution"):
        winograd.WinogradConv2d(torch.nn.Conv2d(8, 8, 3, stride=2))


@needs_nnpack
def test_the_winograd_network_gives_the_plain_networks_maps():
    plain = _network(3)
    state = {k: v.clone() for k, v in plain.state_dict().items()}
    fast = winograd.winograd_network(_network(3))
    replaced = [m for m in fast.modules() if isinstance(m, winograd.WinogradConv2d)]
    mosaics = [m for m in fast.modules() if isinstance(m, winograd.MosaicConv2d)]
    kept = [m for m in fast.modules() if isinstance(m, torch.nn.Conv2d)]
    # conv_in (stride 2) stays; every other convolution is replaced, the dilated ones by
    # mosaics, side1 (to one map) by shifted sums
    assert [m.stride for m in kept] == [(2, 2)]
    assert isinstance(fast.side1, winograd.ShiftedSumConv2d)
    assert len(replaced) == sum(1 for m in plain.modules() if winograd.eligible(m)) - 1 > 0
    assert len(mosaics) == sum(1 for m in plain.modules() if winograd.mosaic_eligible(m)) > 0
    assert fast.state_dict().keys() == state.keys()
    assert all(torch.equal(fast.state_dict()[k], v) for k, v in state.items())
    x = torch.randn(1, 3, 512, 512)  # large enough that stage 1 runs in NNPACK

    def logits(network):  # before the sigmoid, which would hide differences where it saturates
        return network.side1(network.decode(network.conv_in(x))[0])

    with torch.inference_mode():
        want, got = logits(plain), logits(fast)
        assert torch.equal(fast(x), torch.sigmoid(F.interpolate(got, size=(512, 512), mode="bilinear")))
    scale = float(want.abs().max())
    assert float(want.std()) > 0.1 * scale  # a map with structure, so agreement means something
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-4 * scale)


@pytest.mark.parametrize("shape", [(1, 5, 16, 24), (2, 3, 9, 14), (1, 4, 7, 7)])
def test_the_fast_max_pool_is_max_pool2d_with_ceil_mode(shape):
    x = torch.randn(*shape)
    x[0, 0, 0, 0] = float("nan")  # a NaN propagates in both
    want = F.max_pool2d(x, 2, stride=2, ceil_mode=True)
    for layout in (torch.contiguous_format, torch.channels_last):
        got = MaxPool2x2()(x.contiguous(memory_format=layout))
        torch.testing.assert_close(got, want, equal_nan=True)


@needs_nnpack
def test_nnpack_is_a_runtime_of_its_own(monkeypatch):
    monkeypatch.delenv(isnet_module.RUNTIME_ENV, raising=False)
    assert choose_runtime("cpu", "nnpack") == "nnpack"
    model = ISNet.from_network(_network(4), device="cpu", batch_size=1, size=128, runtime="nnpack")
    assert model.runtime == "nnpack" and not model.accepts_tensors
    photo = np.random.default_rng(0).integers(0, 255, (90, 140, 3), dtype=np.uint8)
    (saliency,) = model.predict([photo])
    assert saliency.shape == (90, 140) and saliency.dtype == np.float32
    assert 0.0 <= saliency.min() < saliency.max() <= 1.0


def test_photos_run_side_by_side_only_on_one_thread_each():
    assert [winograd.streams(photos, threads=2) for photos in (1, 2, 4)] == [1, 2, 2]
    assert winograd.streams(4, threads=1) == 1  # one core: nothing to share
    assert winograd.streams(4, threads=4) == 1  # NNPACK's one pool would have 4 threads: all on it


@needs_nnpack
def test_two_cores_run_two_photos_at_once_with_the_maps_of_one_at_a_time(monkeypatch):
    import threading

    monkeypatch.setattr(isnet_module, "cpu_threads", lambda: 2)
    one, two = (ISNet.from_network(_network(5), device="cpu", batch_size=n, size=128, runtime="nnpack") for n in (1, 2))
    assert one._streams is None and two._streams is not None
    ran_on = set()
    predict_one = two._predict_one

    def recorded(photo):
        ran_on.add(threading.current_thread().name)
        return predict_one(photo)

    monkeypatch.setattr(two, "_predict_one", recorded)
    rng = np.random.default_rng(1)
    photos = [rng.integers(0, 255, (90 + 10 * i, 140, 3), dtype=np.uint8) for i in range(3)]
    want, got = one.predict(photos), two.predict(photos)
    assert len(ran_on) == 2 and all(name.startswith("dreamfocus-nnpack") for name in ran_on)
    assert [m.shape for m in got] == [p.shape[:2] for p in photos]  # each photo's own, in order
    for a, b in zip(want, got):  # one thread sends the small convolutions to NNPACK too: rounded otherwise
        np.testing.assert_allclose(b, a, atol=1e-4)


def test_nnpack_asked_for_where_it_does_not_run_is_a_clear_error(monkeypatch):
    monkeypatch.delenv(isnet_module.RUNTIME_ENV, raising=False)
    monkeypatch.setattr(winograd, "available", lambda: False)
    with pytest.raises(BadInputError, match=r"'nnpack': NNPACK does not run on this CPU .*choose another runtime: "):
        choose_runtime("cpu", "nnpack")


@pytest.mark.parametrize("outside", [None, "ACTIVE"])
def test_openmp_threads_sleep_between_operations_unless_told_otherwise(outside):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if outside:
        env["OMP_WAIT_POLICY"] = outside
    code = "import os, pipeline, torch; print(os.environ['OMP_WAIT_POLICY'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == (outside or "PASSIVE")
