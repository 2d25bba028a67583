"""U2Net / U2Net-P: architecture, weight loading (state dict and ONNX), pre/post-processing."""

from __future__ import annotations

import hashlib
import warnings

import numpy as np
import pytest
import torch

from pipeline.effect import resize_map
from pipeline.errors import WeightsUnavailableError
from pipeline.models import SALIENCY, create_model, model_class, model_names
from pipeline.models.base import squash
from pipeline.models.tensors import upload
from pipeline.models.u2net import U2Net, U2NetP, build_u2net, build_u2netp, preprocess


def _randomise(module: torch.nn.Module) -> None:
    """Non-default batch-norm statistics and affine parameters, so that a loader that skipped them
    would give different maps."""
    g = torch.Generator().manual_seed(1)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
            m.num_batches_tracked.fill_(7)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A randomly initialised u2netp, saved as a state dict and exported to ONNX."""
    torch.manual_seed(0)
    module = build_u2netp().eval()
    with torch.no_grad():
        _randomise(module)
    d = tmp_path_factory.mktemp("u2netp")
    pth = d / "u2netp.pth"
    torch.save(module.state_dict(), pth)
    onnx_path = d / "u2netp.onnx"
    with warnings.catch_warnings():  # the TorchScript exporter is deprecated; dynamo needs onnxscript
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (torch.zeros(1, 3, 320, 320),),
            str(onnx_path),
            opset_version=17,
            input_names=["input"],
            output_names=[f"d{i}" for i in range(7)],
            dynamic_axes={"input": {0: "batch"}, **{f"d{i}": {0: "batch"} for i in range(7)}},
            dynamo=False,
        )
    return module, pth, onnx_path


@pytest.fixture(scope="module")
def photos():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (200, 300, 3), dtype=np.uint8)
    # a smooth photo with a bright blob, so the map is not just noise
    yy, xx = np.mgrid[0:480, 0:640]
    blob = np.exp(-(((yy - 200) / 90.0) ** 2 + ((xx - 350) / 120.0) ** 2))
    b = np.stack([blob * 200 + 20, blob * 120 + 30, 60 + 0 * blob], axis=-1)
    b = np.clip(b + rng.normal(0, 8, b.shape), 0, 255).astype(np.uint8)
    return [a, b]


def _reference(module: torch.nn.Module, photos) -> list[np.ndarray]:
    """The reference inference written out: squash to 320, /max, ImageNet mean/std, d0, min-max."""
    mean = np.array([0.485, 0.456, 0.406], np.float32)
    std = np.array([0.229, 0.224, 0.225], np.float32)
    xs = []
    for p in photos:
        x = squash(p, 320).astype(np.float32)
        x = x / x.max()
        xs.append(((x - mean) / std).transpose(2, 0, 1))
    with torch.no_grad():
        d = module(torch.from_numpy(np.ascontiguousarray(np.stack(xs))))
    assert len(d) == 7
    out = []
    for d0 in d[0][:, 0].numpy():
        out.append((d0 - d0.min()) / (d0.max() - d0.min()))
    return out


def _predict_keeping_raw(model, photos):
    """``predict``'s maps and the 320x320 maps it resized them from, in one pass."""
    raw = []
    inner = model._predict_batch
    model._predict_batch = lambda chunk: raw.extend(inner(chunk)) or raw[-len(chunk) :]
    return model.predict(photos), raw


@pytest.fixture(scope="module")
def predictions(small, photos):
    """Batched maps (and their 320x320 originals) from the state dict and the ONNX file."""
    out = {}
    for path in small[1:]:
        model = create_model("u2netp", task=SALIENCY, weights=str(path), device="cpu", batch_size=4)
        out[path.suffix] = (model,) + _predict_keeping_raw(model, photos)
    return out


def test_registered():
    assert {"u2net", "u2netp"} <= set(model_names(SALIENCY))
    assert model_class("u2net") is U2Net and model_class("u2netp") is U2NetP
    assert U2Net.licence == "Apache-2.0" and U2NetP.task == SALIENCY
    assert "weights" in U2Net.source


def test_full_u2net_builds():
    torch.manual_seed(0)
    module = build_u2net().eval()
    n = sum(p.numel() for p in module.parameters())
    assert 43_500_000 < n < 44_500_000
    with torch.inference_mode():
        outs = module(torch.randn(1, 3, 320, 320))
    assert len(outs) == 7
    for o in outs:
        assert tuple(o.shape) == (1, 1, 320, 320)
        assert float(o.min()) >= 0 and float(o.max()) <= 1


def test_state_dict_names_match_reference_checkpoints():
    module = build_u2netp()
    n = sum(p.numel() for p in module.parameters())
    assert 1_000_000 < n < 1_200_000
    sd = module.state_dict()
    for key in [
        "stage1.rebnconvin.conv_s1.weight",
        "stage1.rebnconv7.conv_s1.weight",
        "stage1.rebnconv6d.bn_s1.running_var",
        "stage1.rebnconv1d.conv_s1.bias",
        "stage2.rebnconv6.conv_s1.weight",
        "stage4.rebnconv4.conv_s1.weight",
        "stage5.rebnconv4.conv_s1.weight",
        "stage6.rebnconv3d.bn_s1.weight",
        "stage5d.rebnconv1d.conv_s1.weight",
        "stage1d.rebnconv1d.bn_s1.running_mean",
        "side1.weight",
        "side6.bias",
        "outconv.weight",
    ]:
        assert key in sd, key
    assert not any(k.startswith("stage1.rebnconv8") or k.startswith("stage7") for k in sd)
    assert not any(".pool" in k or k.startswith("pool") for k in sd)  # pools have no parameters
    # dilations: RSU bottom layer 2, RSU-4F 1/2/4/8
    assert module.stage1.rebnconv7.conv_s1.dilation == (2, 2)
    assert module.stage1.rebnconv6.conv_s1.dilation == (1, 1)
    assert [getattr(module.stage5, f"rebnconv{i}").conv_s1.dilation[0] for i in range(1, 5)] == [1, 2, 4, 8]
    assert module.stage5.rebnconv3d.conv_s1.dilation == (4, 4)
    assert tuple(sd["outconv.weight"].shape) == (1, 6, 1, 1)
    full = build_u2net().state_dict()
    assert tuple(full["stage5d.rebnconvin.conv_s1.weight"].shape) == (512, 1024, 3, 3)
    assert tuple(full["stage1d.rebnconv1.conv_s1.weight"].shape) == (16, 64, 3, 3)
    assert tuple(full["side3.weight"].shape) == (1, 128, 3, 3)
    assert set(full) == set(sd)


def test_preprocess():
    rng = np.random.default_rng(3)
    photo = rng.integers(0, 200, (100, 150, 3), dtype=np.uint8)
    x = preprocess([photo, np.zeros((50, 70, 3), np.uint8)])
    assert x.dtype == np.float32 and x.shape == (2, 3, 320, 320)
    img = squash(photo, 320).astype(np.float32)
    img /= img.max()  # the max of the squashed image, as the reference
    np.testing.assert_allclose(x[0, 1], (img[..., 1] - 0.456) / 0.224, atol=1e-5)
    assert np.isfinite(x).all()  # a black photo: no division by zero
    np.testing.assert_allclose(x[1, 2], -0.406 / 0.225, atol=1e-6)


def test_torch_and_onnx_weights_predict(small, photos, predictions):
    module, pth, onnx_path = small
    ref = _reference(module, photos)
    for path in (pth, onnx_path):
        model, maps, raw = predictions[path.suffix]
        assert model.version == hashlib.sha256(path.read_bytes()).hexdigest()[:12]
        assert len(raw) == len(maps) == len(photos)
        for r, m, p, want in zip(raw, maps, photos, ref):
            assert r.dtype == np.float32 and r.shape == (320, 320)
            assert float(r.min()) == 0.0 and float(r.max()) == pytest.approx(1.0, abs=1e-6)
            assert np.abs(r - want).max() < 1e-3
            assert m.dtype == np.float32 and m.shape == p.shape[:2]
            assert float(m.min()) >= -1e-6 and float(m.max()) <= 1 + 1e-6
            np.testing.assert_allclose(m, resize_map(r, *p.shape[:2]), atol=1e-6)
    for r_t, r_o in zip(predictions[".pth"][2], predictions[".onnx"][2]):
        assert np.abs(r_t - r_o).max() < 1e-3
    for m_t, m_o in zip(predictions[".pth"][1], predictions[".onnx"][1]):
        assert np.abs(m_t - m_o).max() < 1e-2


@pytest.mark.parametrize("suffix", [".pth", ".onnx"])
def test_batched_equals_one_by_one(photos, predictions, suffix):
    model, batched, _ = predictions[suffix]
    model.batch_size = 1
    try:
        single = [model.predict([p])[0] for p in photos]
    finally:
        model.batch_size = 4
    for a, b in zip(batched, single):
        assert a.shape == b.shape
        assert np.abs(a - b).max() < 1e-4


def test_wrapped_and_prefixed_state_dicts_load(small, tmp_path):
    module, _, _ = small
    sd = module.state_dict()
    prefixed = tmp_path / "prefixed.pth"
    torch.save({f"module.{k}": v for k, v in sd.items()}, prefixed)
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, wrapped)
    for path in (prefixed, wrapped):
        loaded = create_model("u2netp", weights=str(path), device="cpu")._module.state_dict()
        assert set(loaded) == set(sd)
        for k, v in sd.items():
            assert torch.equal(loaded[k].cpu(), v), k


def test_env_var_supplies_weights(small, monkeypatch):
    monkeypatch.setenv("DREAMFOCUS_U2NETP_WEIGHTS", str(small[1]))
    model = create_model("u2netp", device="cpu")
    assert model.weights == str(small[1])


def test_missing_file(tmp_path):
    missing = tmp_path / "nowhere" / "u2netp.pth"
    with pytest.raises(WeightsUnavailableError, match="nowhere"):
        create_model("u2netp", weights=str(missing))


@pytest.mark.parametrize("name", ["garbage.pth", "garbage.onnx"])
def test_garbage_file(tmp_path, name):
    bad = tmp_path / name
    bad.write_bytes(b"this is not a model\x00\x01\x02" * 10)
    with pytest.raises(WeightsUnavailableError, match=name.replace(".", r"\.")):
        create_model("u2netp", weights=str(bad))


def test_wrong_architecture(small):
    with pytest.raises(WeightsUnavailableError, match="u2netp.pth.*'u2net'"):
        create_model("u2net", weights=str(small[1]), device="cpu")


@pytest.mark.parametrize("name,var", [("u2net", "DREAMFOCUS_U2NET_WEIGHTS"), ("u2netp", "DREAMFOCUS_U2NETP_WEIGHTS")])
def test_no_weights(monkeypatch, name, var):
    monkeypatch.delenv("DREAMFOCUS_U2NET_WEIGHTS", raising=False)
    monkeypatch.delenv("DREAMFOCUS_U2NETP_WEIGHTS", raising=False)
    with pytest.raises(WeightsUnavailableError) as info:
        create_model(name)
    assert var in str(info.value) and "--saliency-weights" in str(info.value)


def test_device_path_matches_predict(photos, predictions):
    torch_model, maps, _ = predictions[".pth"]
    onnx_model = predictions[".onnx"][0]
    assert torch_model.accepts_tensors and torch_model.runtime == "torch"
    assert not onnx_model.accepts_tensors and onnx_model.runtime == "onnxruntime"
    assert onnx_model.describe().endswith("(onnxruntime, cpu)")
    tensors = torch_model.predict_tensors(upload(photos, "cpu"))
    for m, t in zip(maps, tensors):
        assert t.dtype == torch.float32 and tuple(t.shape) == m.shape
        assert float(t.min()) >= 0.0 and float(t.max()) <= 1.0
        # OpenCV resizes uint8 photos with fixed-point weights: inputs differ by one level at most
        assert np.abs(t.numpy() - m).max() < 0.02


def test_weights_from_uri_copied_once_into_cache(small, photos, predictions, tmp_path, monkeypatch):
    import fsspec

    cache = tmp_path / "cache"
    monkeypatch.setenv("DREAMFOCUS_CACHE", str(cache))
    mem = fsspec.filesystem("memory")
    mem.pipe("/u2/u2netp.pth", small[1].read_bytes())
    model = create_model("u2netp", weights="memory://u2/u2netp.pth", device="cpu")
    copied = list(cache.glob("u2netp-*.pth"))
    assert len(copied) == 1 and model.weights == str(copied[0])
    assert model.version == predictions[".pth"][0].version
    mem.rm("/u2", recursive=True)  # the cached copy serves from now on
    again = create_model("u2netp", weights="memory://u2/u2netp.pth", device="cpu")
    np.testing.assert_allclose(again.predict(photos)[1], predictions[".pth"][1][1], atol=1e-6)
