"""The runtime that runs the salient-object model: the choice (auto, asked for, not installed),
`--runtime` on `render` and `run`, the runtime named in the manifest, and OpenVINO's masks
against onnxruntime's on the examples and on generated scenes."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import ray
from scenes import scene

from pipeline.cli import main
from pipeline.errors import BadInputError, WeightsUnavailableError
from pipeline.job import JobConfig, run_job
from pipeline.manifest import read_manifest
from pipeline.models import create_model
from pipeline.models import isnet as isnet_module
from pipeline.models.isnet import RUNTIME_ENV, ISNet, choose_runtime
from pipeline.storage import Storage

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.jpg"))
TRIVIAL = ("--saliency-model", "trivial-saliency", "--depth-model", "trivial-depth")


@pytest.fixture
def installed(monkeypatch, tmp_path):
    """Say which runtime packages are installed: installed({"onnxruntime"}); with a cache of its
    own, so that no runtime measured on this machine (measure_cpu_runtimes) takes part."""
    monkeypatch.delenv(RUNTIME_ENV, raising=False)
    monkeypatch.setenv("DREAMFOCUS_CACHE", str(tmp_path / "cache"))

    def only(names: set[str]) -> None:
        def missing(runtime: str) -> list[str]:
            return [] if runtime in names else list(isnet_module.RUNTIME_PACKAGES[runtime])

        monkeypatch.setattr(isnet_module, "missing_packages", missing)

    return only


def test_auto_is_torch_on_a_gpu_and_the_fastest_installed_on_the_cpu(installed):
    installed({"onnxruntime", "openvino", "openvino-int8", "torch"})
    assert choose_runtime("cpu") == choose_runtime("cpu", "auto") == "openvino-int8"
    assert choose_runtime("cuda") == choose_runtime("cuda:1") == "torch"
    installed({"onnxruntime", "openvino", "torch"})  # no NNCF to make the int8 graph
    assert choose_runtime("cpu") == "onnxruntime"
    installed({"onnxruntime", "torch"})
    assert choose_runtime("cpu") == "onnxruntime"


def write_measurement(fastest: str, **changes) -> None:
    record = {
        "version": isnet_module.CPU_CHOICE_VERSION,
        "fastest": fastest,
        "seconds": {fastest: 1.0, "onnxruntime": 2.0},
        "machine": isnet_module.this_machine(),
    }
    path = isnet_module.cache_dir() / isnet_module.CPU_CHOICE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record | changes))


def test_auto_on_the_cpu_runs_the_runtime_measured_fastest_on_this_machine(installed):
    installed({"onnxruntime", "openvino", "openvino-int8", "torch", "nnpack"})
    write_measurement("nnpack")
    assert choose_runtime("cpu") == "nnpack" and choose_runtime("cuda") == "torch"
    assert ISNet.runtime_note() == "on this CPU, a photo: nnpack 1.00 s, onnxruntime 2.00 s; auto runs nnpack"
    write_measurement("onnxruntime", seconds={"onnxruntime": 2.0, "openvino-int8": 2.5})
    assert choose_runtime("cpu") == "onnxruntime"  # measured, over the preference for int8
    installed({"onnxruntime", "openvino", "openvino-int8", "torch"})
    write_measurement("nnpack")  # no longer installed
    assert choose_runtime("cpu") == "openvino-int8" and ISNet.runtime_note() is None


@pytest.mark.parametrize(
    "changes",
    [
        {"machine": {"cpu": "another CPU"}},
        {"version": isnet_module.CPU_CHOICE_VERSION + 1},
        {"fastest": "tensorflow"},
        {"seconds": "fast"},
    ],
    ids=["another machine", "another version", "unknown runtime", "damaged"],
)
def test_a_measurement_not_of_this_machine_or_damaged_is_not_used(installed, changes):
    installed({"onnxruntime", "openvino", "openvino-int8", "torch", "nnpack"})
    write_measurement(**({"fastest": "nnpack"} | changes))
    assert choose_runtime("cpu") == "openvino-int8" and ISNet.runtime_note() is None
    (isnet_module.cache_dir() / isnet_module.CPU_CHOICE_FILE).write_text('{"fastest": "nnp')  # cut short
    assert choose_runtime("cpu") == "openvino-int8"


def test_a_runtime_asked_for_wins_by_name_or_alias(installed, monkeypatch):
    installed({"onnxruntime", "openvino", "openvino-int8", "torch"})
    assert choose_runtime("cpu", "ORT") == choose_runtime("cpu", "onnx") == "onnxruntime"
    assert choose_runtime("cpu", "ov") == "openvino"
    assert choose_runtime("cpu", "int8") == "openvino-int8"
    assert choose_runtime("cpu", "torch") == "torch"
    monkeypatch.setenv(RUNTIME_ENV, "onnx")
    assert choose_runtime("cpu") == "onnxruntime"
    assert choose_runtime("cpu", "openvino") == "openvino"  # the option over the environment


def test_an_unknown_or_missing_runtime_is_a_clear_error(installed, monkeypatch):
    installed({"onnxruntime", "torch"})
    with pytest.raises(BadInputError, match=r"the openvino package is not installed here.*onnxruntime, torch"):
        choose_runtime("cpu", "openvino")
    with pytest.raises(BadInputError, match=r"the openvino and nncf packages are not installed here; install them"):
        choose_runtime("cpu", "int8")
    expected = r"'tensorflow': expected auto, nnpack, onnxruntime, openvino, openvino-int8, torch "
    with pytest.raises(BadInputError, match=expected):
        choose_runtime("cpu", "tensorflow")
    monkeypatch.setenv(RUNTIME_ENV, "tensorflow")
    with pytest.raises(BadInputError, match=RUNTIME_ENV):
        choose_runtime("cpu")


def test_a_model_without_a_choice_of_runtime_refuses_one():
    assert create_model("trivial-saliency", runtime="auto").runtime == "numpy"
    with pytest.raises(BadInputError, match="trivial-saliency has no choice of runtime"):
        create_model("trivial-saliency", runtime="onnxruntime")


def run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_render_refuses_a_runtime_that_is_not_installed(tmp_path, capsys, installed):
    installed({"onnxruntime", "torch"})
    out = tmp_path / "result.jpg"
    code, _, err = run(capsys, "render", EXAMPLES[0], "-o", out, "--runtime", "openvino")
    assert code == 2
    assert err.strip().splitlines() == [
        "dreamfocus: error: runtime 'openvino': the openvino package is not installed here; install it "
        "(`make setup` does) or choose another runtime: onnxruntime, torch"
    ]
    assert not out.exists()


def test_run_refuses_a_runtime_before_starting_anything(tmp_path, installed):
    installed({"onnxruntime", "torch"})
    (tmp_path / "in").mkdir()
    cv2.imwrite(str(tmp_path / "in" / "a.jpg"), scene(1, 96, 128))
    config = JobConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), runtime="openvino")
    with pytest.raises(BadInputError, match="the openvino package is not installed"):
        run_job(config)
    assert not ray.is_initialized()
    assert not (tmp_path / "out" / "images").exists()


def test_the_manifest_names_each_models_runtime(tmp_path):
    (tmp_path / "in").mkdir()
    for seed in range(2):
        cv2.imwrite(str(tmp_path / "in" / f"{seed}.jpg"), scene(seed, 96, 128))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        summary = run_job(
            JobConfig(
                input=str(tmp_path / "in"),
                output=str(tmp_path / "out"),
                saliency_model="trivial-saliency",
                depth_model="trivial-depth",
                runtime="auto",
            )
        )
    finally:
        ray.shutdown()
    assert sum(summary.counts.values()) == 2 and "failed" not in summary.counts  # left alone or done
    rows = read_manifest(Storage(str(tmp_path / "out" / "manifest"))).to_pylist()
    assert [(r["saliency_runtime"], r["depth_runtime"]) for r in rows] == [("numpy", "numpy")] * 2


# ----------------------------------------------------------------- the real weights, each runtime


def iou(a: np.ndarray, b: np.ndarray) -> float:
    fa, fb = a >= 0.5, b >= 0.5
    return float((fa & fb).sum() / max(1, (fa | fb).sum()))


@pytest.fixture(scope="module")
def reference():
    if ISNet.local_weights() is None:
        try:
            ISNet.fetch()
        except WeightsUnavailableError as exc:
            pytest.skip(f"IS-Net weights are not cached and could not be fetched: {exc}")
    return create_model("isnet-general-use", device="cpu", runtime="onnxruntime", batch_size=1)


@pytest.mark.slow
def test_the_cpu_runtimes_are_timed_on_the_real_weights_and_the_fastest_kept(reference, monkeypatch, tmp_path):
    monkeypatch.delenv(RUNTIME_ENV, raising=False)
    weights = ISNet.local_weights()
    monkeypatch.setenv("DREAMFOCUS_CACHE", str(tmp_path))  # the fp32 graph is derived again there
    candidates = tuple(r for r in ("nnpack", "onnxruntime") if isnet_module.runtime_available(r))
    seconds = isnet_module.measure_cpu_runtimes(weights, candidates, rounds=1)
    assert set(seconds) == set(candidates) and all(0 < s < 120 for s in seconds.values())
    fastest = min(seconds, key=seconds.__getitem__)
    assert choose_runtime("cpu") == isnet_module.measured_cpu_runtime() == fastest
    assert ISNet.runtime_note().endswith(f"; auto runs {fastest}")


@pytest.mark.slow
@pytest.mark.parametrize("runtime", ["nnpack", "openvino", "openvino-int8"])
def test_cpu_runtimes_masks_agree_with_onnxruntimes_on_generated_scenes_and_examples(reference, runtime):
    """Generated scenes: photos the int8 graph was not calibrated on. The first use of
    openvino-int8 makes its graph (a minute or two), then it is cached."""
    if not isnet_module.runtime_available(runtime):
        pytest.skip(f"{runtime} is not installed here or does not run on this CPU")
    model = create_model("isnet-general-use", device="cpu", runtime=runtime, batch_size=1)
    assert model.describe() == f"isnet-general-use {ISNet.sha256[:12]} ({runtime}, cpu)"
    photos = {f"scene {seed}": scene(seed, 480, 640) for seed in (11, 12, 13)}
    photos.update({p.name: cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in EXAMPLES[:2]})
    for name, photo in photos.items():
        a, b = reference.predict([photo])[0], model.predict([photo])[0]
        assert b.shape == photo.shape[:2] and b.dtype == np.float32
        assert 0.01 < (a >= 0.5).mean() < 0.99, f"{name}: a mask worth comparing"
        assert iou(a, b) >= 0.98, f"{name}: IoU {iou(a, b):.4f}"
        if runtime == "nnpack":  # the same fp32 arithmetic, rounded otherwise
            assert float(np.abs(a - b).max()) < 1e-3, name
