"""The default depth model in OpenVINO on the CPU: the choice of runtime, its maps against torch's
(a tiny random configuration of the real architecture), the converted graph cached by the weights'
digest and made once, a damaged cached graph converted again, and a failed conversion that
leaves the model in torch."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from random_weights import scramble
from scenes import scene

from pipeline.errors import BadInputError
from pipeline.models import DEPTH, load_model
from pipeline.models import hf_depth as hf_depth_module
from pipeline.models.base import CPU_STREAMS, cpu_threads
from pipeline.models.depth_anything import DepthAnythingV2Small
from pipeline.models.dpt import DPTLarge
from pipeline.models.hf_depth import RUNTIME_ENV, choose_runtime, map_agreement

PHOTOS = [scene(0, 240, 320), scene(1, 300, 200), scene(2, 96, 500)]


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    """A tiny Depth Anything V2 (the real architecture, few small layers) with He-scaled random
    weights, saved as a hub-style folder."""
    model = DepthAnythingV2Small.from_config(DepthAnythingV2Small.small_config(), device="cpu", runtime="torch")
    scramble(model.model, 3)
    folder = tmp_path_factory.mktemp("tiny-da")
    model.model.save_pretrained(folder)
    return folder


def _graphs(cache):
    return sorted(p.name for p in cache.glob("depth-anything-v2-small.*.openvino.v*.*")) if cache.exists() else []


def test_the_cpu_runs_depth_anything_in_openvino_and_a_gpu_in_torch(cache, monkeypatch):
    assert choose_runtime(DepthAnythingV2Small, "cpu") == choose_runtime(DepthAnythingV2Small, "cpu", "auto")
    assert choose_runtime(DepthAnythingV2Small, "cpu") == "openvino"
    assert choose_runtime(DepthAnythingV2Small, "cuda") == choose_runtime(DepthAnythingV2Small, "cuda:1") == "torch"
    assert choose_runtime(DPTLarge, "cpu") == "torch"  # not measured in OpenVINO: stays in torch
    monkeypatch.setenv(RUNTIME_ENV, "Torch")
    assert choose_runtime(DepthAnythingV2Small, "cpu") == "torch"
    monkeypatch.setattr("pipeline.models.isnet.missing_packages", lambda runtime: [runtime])
    monkeypatch.delenv(RUNTIME_ENV)
    assert choose_runtime(DepthAnythingV2Small, "cpu") == "torch"  # OpenVINO not installed
    with pytest.raises(BadInputError, match="openvino package is not installed"):
        choose_runtime(DepthAnythingV2Small, "cpu", "openvino")


def test_a_depth_runtime_that_cannot_be_is_a_clear_error(cache, monkeypatch):
    with pytest.raises(BadInputError, match=r"runtime 'onnx': expected auto, openvino or torch"):
        choose_runtime(DepthAnythingV2Small, "cpu", "onnx")
    with pytest.raises(BadInputError, match="on the CPU only, not on cuda"):
        choose_runtime(DepthAnythingV2Small, "cuda", "openvino")
    monkeypatch.setenv(RUNTIME_ENV, "tensorrt")
    with pytest.raises(BadInputError, match=f"{RUNTIME_ENV} 'tensorrt'"):
        DepthAnythingV2Small.from_config(DepthAnythingV2Small.small_config(), device="cpu")


def test_openvino_maps_agree_with_torch_and_the_graph_is_cached_once(tiny_weights, cache, monkeypatch, caplog):
    in_torch = DepthAnythingV2Small(weights=str(tiny_weights), device="cpu", runtime="torch")
    with caplog.at_level(logging.WARNING):
        in_openvino = load_model(DEPTH, weights=str(tiny_weights), device="cpu")
    assert in_openvino.runtime == "openvino" and in_torch.runtime == "torch"
    assert in_openvino.describe() == f"depth-anything-v2-small {in_torch.version} (openvino, cpu)"
    assert not in_openvino.accepts_tensors and in_torch.accepts_tensors
    assert any("converting depth-anything-v2-small to OpenVINO" in r.getMessage() for r in caplog.records)
    digest = in_torch._weights_digest
    assert _graphs(cache) == [f"depth-anything-v2-small.{digest[:16]}.openvino.v1.{ext}" for ext in ("bin", "xml")]

    expected = in_torch.predict(PHOTOS)
    found = in_openvino.predict(PHOTOS)
    for e, f in zip(expected, found):
        assert f.shape == e.shape and f.dtype == np.float32
        assert np.ptp(e) > 1e-3  # a real map, so that agreement says something
        assert map_agreement(e, f).agrees, map_agreement(e, f)

    def no_conversion(self):
        raise AssertionError("converted again although the graph is cached")

    monkeypatch.setattr(DepthAnythingV2Small, "_converted", no_conversion)
    again = DepthAnythingV2Small(weights=str(tiny_weights), device="cpu")
    assert again.runtime == "openvino"
    for f, a in zip(found, again.predict(PHOTOS)):
        np.testing.assert_array_equal(f, a)

    # A batch runs two photos at once (where there are two cores); one at a time, the same maps.
    alone = DepthAnythingV2Small(weights=str(tiny_weights), device="cpu", batch_size=1)
    assert (alone._graph.streams, again._graph.streams) == (1, min(CPU_STREAMS, cpu_threads()))
    for f, a in zip(found, alone.predict(PHOTOS)):
        np.testing.assert_allclose(f, a, rtol=1e-4, atol=1e-4 * float(np.ptp(f)))


def test_a_damaged_cached_graph_is_converted_again(tiny_weights, cache, caplog):
    first = DepthAnythingV2Small(weights=str(tiny_weights), device="cpu")
    xml = first.openvino_path()
    assert xml is not None and xml.is_file()
    xml.write_text("<net><not a graph")
    with caplog.at_level(logging.WARNING):
        second = DepthAnythingV2Small(weights=str(tiny_weights), device="cpu")
    assert any(f"cached OpenVINO graph {xml} cannot be read" in r.getMessage() for r in caplog.records)
    assert second.runtime == "openvino" and xml.read_text().startswith("<?xml")
    for a, b in zip(first.predict(PHOTOS[:1]), second.predict(PHOTOS[:1])):
        np.testing.assert_array_equal(a, b)


def test_a_graph_that_cannot_be_made_leaves_the_model_in_torch(tiny_weights, cache, monkeypatch, caplog):
    def disagrees(self):
        raise ValueError("its OpenVINO graph's map differs from torch's")

    monkeypatch.setattr(DepthAnythingV2Small, "_converted", disagrees)
    with caplog.at_level(logging.WARNING):
        model = DepthAnythingV2Small(weights=str(tiny_weights), device="cpu")
    assert model.runtime == "torch" and model.accepts_tensors
    warnings = [r.getMessage() for r in caplog.records if "cannot run in OpenVINO" in r.getMessage()]
    assert warnings == [
        "depth-anything-v2-small cannot run in OpenVINO (its OpenVINO graph's map differs from torch's); "
        "running it in torch"
    ]
    assert _graphs(cache) == []  # nothing cached that would be taken for a good graph
    assert [m.shape for m in model.predict(PHOTOS)] == [p.shape[:2] for p in PHOTOS]


def test_the_conversion_refuses_a_graph_whose_map_disagrees(tiny_weights, cache, monkeypatch):
    """The check itself: an OpenVINO graph that computes something else is refused."""
    model = DepthAnythingV2Small(weights=str(tiny_weights), device="cpu", runtime="torch")

    class Shifted(hf_depth_module.CpuGraph):
        def run(self, inputs):
            return [out * 0.5 + 1.0 for out in super().run(inputs)]

    monkeypatch.setattr(hf_depth_module, "CpuGraph", Shifted)
    with pytest.raises(ValueError, match="map differs from torch's"):
        model._converted()


def test_random_weights_convert_without_touching_the_cache(cache):
    model = DepthAnythingV2Small.from_config(DepthAnythingV2Small.small_config(), device="cpu")
    assert model.runtime == "openvino" and model.version == "random-init" and model.openvino_path() is None
    assert not cache.exists()


def test_map_agreement():
    rng = np.random.default_rng(0)
    a = rng.random((60, 80)).astype(np.float32)
    assert map_agreement(a, a).agrees and map_agreement(a, a).error == 0
    assert map_agreement(a, a * 3 + 1).error > 0.01  # same ranks, other values: not the same map
    nudged = a.copy()
    nudged[5, 5] += 0.02 * np.ptp(a)
    agreement = map_agreement(a, nudged)
    assert 0.019 < agreement.error < 0.021 and not agreement.agrees and agreement.pearson > 0.999
    assert map_agreement(a, a[::-1]).spearman < 0.5
    flat = np.zeros((4, 4), np.float32)
    assert map_agreement(flat, flat).agrees and not map_agreement(flat, flat + 1).agrees
    with pytest.raises(ValueError, match="cannot be compared"):
        map_agreement(a, a[:10])


def test_fetching_the_weights_converts_the_graph_then(tiny_weights, cache):
    path = DepthAnythingV2Small.fetch(str(tiny_weights))
    assert path == cache / "depth-anything-v2-small"
    graphs = _graphs(cache)
    assert len(graphs) == 2 and DepthAnythingV2Small.cache_paths() == [path] + [cache / g for g in graphs]
