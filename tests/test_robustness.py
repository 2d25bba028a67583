"""Robustness of the library job: bad input, faults and interruptions lose nothing.

Real Ray (one local instance for the module), real processes killed with SIGKILL, a real tmpfs
for a full or read-only OUTPUT (skipped where mounting is not permitted), moto S3 on loopback.
Faults that cannot be caused from outside (out of memory, flaky storage) are injected in process
through the model loader and the Storage's filesystem. Killing a driver and rerunning is
tests/test_job.py's.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import ray
import torch
from make_library import FAILED, IGNORED, OK, SKIPPED, Expected, build_library, textured
from PIL import Image

from pipeline import photo, storage
from pipeline.batches import pack, unpack_map
from pipeline.cli import main, parse_args
from pipeline.errors import BadInputError, OutputError
from pipeline.job import JobConfig, JobSummary, driver, run_job
from pipeline.job.plan import make_plan, output_relpath
from pipeline.job.stages import ModelStage, read_photos, render_and_write
from pipeline.manifest import latest_rows, manifest_rows, read_manifest
from pipeline.models import DEPTH, SALIENCY, load_model
from pipeline.storage import Storage, safe_relpath

TRIVIAL = dict(saliency_model="trivial-saliency", depth_model="trivial-depth")
TRIVIAL_FLAGS = ["--saliency-model", "trivial-saliency", "--depth-model", "trivial-depth"]
RUN_TIMEOUT = 300  # seconds a job run may take on a slow, shared machine before the test fails


@pytest.fixture(scope="module", autouse=True)
def local_ray(s3_server):  # the S3 endpoint first: Ray workers inherit the environment
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


# ------------------------------------------------------------------------------ helpers


def manifest(output) -> pa.Table:
    return read_manifest(Storage(f"{output}/manifest"))


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """Every file under root (hidden ones too): relpath -> (sha256, mtime_ns)."""
    return {
        p.relative_to(root).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def noise_photos(folder: Path, n: int, size=(640, 480)) -> list[str]:
    """n different noisy photos (large outputs, slow enough to be caught mid-run)."""
    folder.mkdir(parents=True, exist_ok=True)
    base = np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    names = [f"p{i:02d}.jpg" for i in range(n)]
    for i, name in enumerate(names):
        Image.fromarray(np.roll(base, 7 * i, axis=1)).save(folder / name, quality=85)
    return names


def assert_complete_files(output: Path) -> None:
    """Only whole images under final names in OUTPUT/images, and no temporary files anywhere."""
    for path in output.rglob("*"):
        assert not path.name.endswith(".partial"), f"temporary file left: {path}"
    for path in (output / "images").rglob("*"):
        if path.is_file():
            with Image.open(path) as im:
                im.load()


def assert_each_ok_once(output: Path, names: list[str]) -> None:
    rows = manifest(output).to_pylist()
    ok = Counter(r["relpath"] for r in rows if r["status"] == "ok")
    assert ok == Counter(names), f"each photo ok exactly once, got {ok}"
    assert {r["relpath"] for r in latest_rows(manifest(output)).to_pylist() if r["status"] != "ok"} == set()
    assert sorted(p.name for p in (output / "images").iterdir()) == sorted(names)
    assert_complete_files(output)


@pytest.fixture
def tmpfs(tmp_path):
    """mount(path, size): a fresh tmpfs of that size at path, unmounted after the test."""
    mounted = []

    def mount(path: Path, size: str) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True
        )
        if done.returncode:
            pytest.skip(
                f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode}); "
                "a full or read-only OUTPUT needs one"
            )
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], check=False)


def remount(path: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True)


# ------------------------------------------------------------------------------ bad input


@dataclass
class LibraryRun:
    inputs: Path
    output: Path
    expected: dict[str, Expected]
    before: dict
    summary: JobSummary
    rows: list[dict]


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> LibraryRun:
    """One job run over tests/make_library.py's library: every bad and unusual file at once."""
    root = tmp_path_factory.mktemp("library")
    inputs, output = root / "in", root / "out"
    expected = build_library(inputs)
    before = snapshot(inputs)
    summary = run_job(JobConfig(input=str(inputs), output=str(output), **TRIVIAL))
    return LibraryRun(inputs, output, expected, before, summary, manifest(output).to_pylist())


def rows_by_relpath(rows: list[dict]) -> dict[str, list[dict]]:
    by: dict[str, list[dict]] = {}
    for row in rows:
        by.setdefault(row["relpath"], []).append(row)
    return by


def test_every_bad_file_is_one_row_with_a_specific_error(library):
    by = rows_by_relpath(library.rows)
    listed = {rel for rel, e in library.expected.items() if e.status != IGNORED}
    assert set(by) == listed  # hidden files and other extensions: no row at all
    # Files that are no photos are counted by extension; hidden ones are not even counted.
    assert library.summary.others == {".json": 1, ".mp4": 1, ".txt": 1, ".xmp": 1}
    assert all(len(rows) == 1 for rows in by.values()), {r: len(v) for r, v in by.items() if len(v) != 1}
    assert library.summary.counts == dict(Counter(library.expected[r].status for r in listed))

    bad = {rel: e for rel, e in library.expected.items() if e.status in (FAILED, SKIPPED)}
    assert len(bad) >= 10
    for relpath, e in bad.items():
        [row] = by[relpath]
        assert (row["status"], row["error_kind"]) == (e.status, e.error_kind), (relpath, row["error"])
        # why a photo failed is its error; why it was left alone, its reason
        error, other = (row["error"], row["reason"]) if e.status == FAILED else (row["reason"], row["error"])
        assert other == "", (relpath, other)
        assert relpath in error or repr(relpath) in error, f"{error!r} does not name {relpath!r}"
        assert all(word in error for word in e.error_words), (relpath, error, e.error_words)
        assert "\n" not in error and "Traceback" not in error
        assert row["output_uri"] is None and not row["width"]
        assert not (library.output / "images" / output_name(relpath)).exists()


def output_name(relpath: str) -> str:
    return os.path.splitext(relpath)[0] + ".jpg"


def test_unusual_valid_photos_come_out_upright_and_in_colour(library):
    by = rows_by_relpath(library.rows)
    good = {rel: e for rel, e in library.expected.items() if e.status == OK}
    assert len(good) >= 20
    written = sorted(
        p.relative_to(library.output / "images").as_posix()
        for p in (library.output / "images").rglob("*")
        if p.is_file()
    )
    assert written == sorted(output_name(rel) for rel in good)  # nothing else, no temporary files
    for relpath, e in good.items():
        [row] = by[relpath]
        assert row["status"] == "ok" and row["error"] == "" and row["error_kind"] == "", (relpath, row["error"])
        target = library.output / "images" / output_name(relpath)
        assert row["output_uri"] == str(target)
        with Image.open(target) as result:
            assert (row["width"], row["height"]) == result.size == e.size, relpath
            assert result.getexif().get(0x0112, 1) == 1, f"{relpath}: output would be rotated again"
            pixels = np.asarray(result.convert("RGB")).astype(int)
        for spot, colour in e.colours.items():
            got = mean_colour(pixels, spot, e.window)
            assert np.abs(got - colour).max() <= e.tolerance, f"{relpath} at {spot}: {got} != {colour}"


def mean_colour(pixels: np.ndarray, spot: tuple[float, float], window: int) -> np.ndarray:
    """The mean RGB of a window x window square centred on spot (fractions of width and height)."""
    h, w = pixels.shape[:2]
    half = window // 2
    y = min(max(int(spot[1] * h), half), h - half)
    x = min(max(int(spot[0] * w), half), w - half)
    return pixels[y - half : y + half, x - half : x + half].reshape(-1, 3).mean(axis=0).round()


def test_every_exif_orientation_is_applied(library):
    """Orientations 5-8 are stored transposed: the output's width and height are swapped."""
    seen = set()
    for relpath, e in library.expected.items():
        match = re.fullmatch(r"good/orientation/orient-(\d)\.jpg", relpath)
        if not match:
            continue
        orientation = int(match.group(1))
        seen.add(orientation)
        with Image.open(library.inputs / relpath) as stored:
            assert stored.getexif()[0x0112] == orientation
            stored_size = stored.size
        assert stored_size == (e.size[::-1] if orientation >= 5 else e.size)
        [row] = rows_by_relpath(library.rows)[relpath]
        assert (row["width"], row["height"]) == e.size  # upright; bottom corners checked above
    assert seen == set(range(1, 9))


def test_status_lists_failure_kinds_with_counts(library, capsys):
    code = main(["status", str(library.output)])
    out = capsys.readouterr().out
    assert code == 1, out
    statuses = Counter(e.status for e in library.expected.values() if e.status != IGNORED)
    first = out.splitlines()[0]
    assert first.startswith(f"{sum(statuses.values())} inputs ("), first
    for status, n in statuses.items():
        assert f"{status} {n}" in first, first
    failed = [(rel, e) for rel, e in library.expected.items() if e.status == FAILED]
    for kind, n in Counter(e.error_kind for _, e in failed).items():
        line = re.search(rf"^\s+{n}\s+{re.escape(kind)}\s+e\.g\. (.*)$", out, re.M)
        assert line, f"no '{n} {kind}' line in:\n{out}"
        assert any(rel in line.group(1) or repr(rel) in line.group(1) for rel, e in failed if e.error_kind == kind)


def test_inputs_are_never_modified_or_deleted(library):
    assert snapshot(library.inputs) == library.before


def test_megapixel_limit_is_configurable(tmp_path, capsys):
    assert JobConfig(input="in", output="out").max_megapixels == 200  # admits every real camera
    assert parse_args(["run", "in", "out"]).max_megapixels == 200
    inputs, output = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    textured((40, 200, 40), (200, 150)).save(inputs / "small.jpg")  # 0.03 MP
    textured((200, 40, 40), (400, 300)).save(inputs / "large.png")  # 0.12 MP
    code = main(["run", str(inputs), str(output), "--max-megapixels", "0.05", *TRIVIAL_FLAGS])
    out = capsys.readouterr().out
    assert code == 1, out
    rows = {r["relpath"]: r for r in manifest(output).to_pylist()}
    assert rows["small.jpg"]["status"] == "ok"
    large = rows["large.png"]
    assert (large["status"], large["error_kind"]) == ("failed", "too-many-pixels")
    assert large["error"] == "large.png: 400x300 = 0.1 MP exceeds the 0.05 MP limit (max_megapixels)"
    assert sorted(p.name for p in (output / "images").iterdir()) == ["small.jpg"]


# ------------------------------------------------------------------------------ killed processes


def descendants(root: int) -> list[int]:
    """Process ids under root: the Ray instance this module started, not other Ray instances."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def process_title(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def pipeline_processes() -> list[str]:
    """Titles of this module's Ray workers that run a stage of the job's pipeline."""
    titles = (process_title(pid) for pid in descendants(os.getpid()))
    return [t for t in titles if any(stage in t for stage in ("read_stage", "ModelStage", "finish_stage"))]


def wait_until(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


@dataclass
class KilledRun:
    output: Path
    names: list[str]
    summary: JobSummary
    killed: dict[str, tuple[int, float, str]]  # what -> (pid, when, its title then)
    model_pids: dict[int, float] = field(default_factory=dict)  # ModelStage actor pid -> first seen


# Ray sets a worker's title to what it runs right now; it goes back to ray::IDLE after.
KILL_WHEN_RUNNING = {
    "read": "ray::MapBatches(read_stage)",
    "model": "(MapBatches(ModelStage)).submit",  # an actor busy with a batch
    "finish": "ray::MapBatches(finish_stage)",
}


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory) -> KilledRun:
    """A run during which a read task worker, a model actor and a finish task worker are each
    SIGKILLed while busy (the finish worker after it has written outputs)."""
    root = tmp_path_factory.mktemp("killed")
    inputs, output = root / "in", root / "out"
    names = noise_photos(inputs, 16)
    config = JobConfig(input=str(inputs), output=str(output), commit_every=4, model_batch_size=2, **TRIVIAL)
    result: dict = {}

    def target():
        try:
            result["summary"] = run_job(config)
        except BaseException as exc:  # noqa: BLE001 - reported below
            result["error"] = exc

    runner = threading.Thread(target=target, daemon=True)
    started = time.monotonic()
    runner.start()
    killed: dict[str, tuple[int, float, str]] = {}
    model_pids: dict[int, float] = {}
    while runner.is_alive() and time.monotonic() - started < RUN_TIMEOUT:
        for pid in descendants(os.getpid()):
            title = process_title(pid)
            now = time.monotonic() - started
            if "ModelStage" in title:
                model_pids.setdefault(pid, now)
            for what, marker in KILL_WHEN_RUNNING.items():
                if what in killed or marker not in title:
                    continue
                if what == "finish" and not any((output / "images").glob("*.jpg")):
                    continue  # kill it once it has written some outputs, before its rows are committed
                os.kill(pid, signal.SIGKILL)
                killed[what] = (pid, now, title)
        runner.join(0.02)
    runner.join(1)
    assert not runner.is_alive(), f"the run did not end within {RUN_TIMEOUT} s"
    assert "error" not in result, f"the run failed: {result.get('error')!r}"
    return KilledRun(output, names, result["summary"], killed, model_pids)


def test_model_actor_killed_mid_batch_is_replaced_and_its_batch_retried(killed_run):
    assert "model" in killed_run.killed, "never saw a model actor busy with a batch"
    pid, when, title = killed_run.killed["model"]
    assert title.endswith(".submit")
    replacements = [p for p, first_seen in killed_run.model_pids.items() if first_seen > when]
    assert replacements, "no new model actor process after the kill"
    assert killed_run.summary.counts == {"ok": len(killed_run.names)}
    assert_each_ok_once(killed_run.output, killed_run.names)


def test_task_workers_killed_mid_task_are_retried(killed_run):
    assert {"read", "finish"} <= set(killed_run.killed), f"killed only {sorted(killed_run.killed)}"
    assert killed_run.summary.counts == {"ok": len(killed_run.names)}
    assert_each_ok_once(killed_run.output, killed_run.names)
    rows = manifest(killed_run.output).to_pylist()
    assert len(rows) == len(killed_run.names) and {r["attempt"] for r in rows} == {1}


# ------------------------------------------------------------------------------ out of memory


class OutOfMemoryModel:
    """Fails every call with more than one photo, and the photo whose pixels are `poison` always."""

    name, version, runtime, accepts_tensors, measures_depth = "oom-test", "1", "numpy", False, True

    def __init__(self, error: BaseException, poison: int) -> None:
        self.error, self.poison, self.calls = error, poison, []

    def predict(self, photos, saliency=None):
        self.calls.append(len(photos))
        if saliency is not None:
            assert len(saliency) == len(photos)
        if len(photos) > 1 or photos[0][0, 0, 0] == self.poison:
            raise self.error
        return [np.full(p.shape[:2], p[0, 0, 0] / 255, np.float32) for p in photos]


@pytest.mark.parametrize("task", [SALIENCY, DEPTH])
@pytest.mark.parametrize(
    "error",
    [
        MemoryError(),
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 15.78 GiB total capacity)"),
        RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Failed to allocate memory: out of memory"),
    ],
    ids=["MemoryError", "cuda", "onnxruntime"],
)
def test_out_of_memory_on_a_batch_falls_back_to_smaller_batches(monkeypatch, task, error):
    model = OutOfMemoryModel(error, poison=30)
    monkeypatch.setattr(
        photo, "load_model", lambda t, *args, **kwargs: model if t == task else load_model(t, TRIVIAL[f"{t}_model"])
    )
    stage = ModelStage(TRIVIAL["saliency_model"], TRIVIAL["depth_model"], None, None, "cpu", 4)
    values = [10, 20, 30, 40, 50]  # 30 fails even alone; 50 failed in an earlier stage
    photos = [np.full((12 + v // 10, 16, 3), v, np.uint8) for v in values]
    batch = {
        "relpath": np.array([f"album/{v}.jpg" for v in values], dtype=object),
        "status": np.array(["ok"] * 4 + ["failed"], dtype=object),
        "error_kind": np.array([""] * 4 + ["corrupt-image"], dtype=object),
        "error": np.array([""] * 4 + ["album/50.jpg: truncated or corrupt image data"], dtype=object),
        "reason": np.array([""] * 5, dtype=object),
        "model_copy": np.array([pack(p) for p in photos[:4]] + [b""], dtype=object),
    }
    out = stage.predict(batch)

    assert model.calls[0] == 4 and all(n < 4 for n in model.calls[1:]) and len(model.calls) > 1
    column = task
    for i in (0, 1, 3):
        assert out["status"][i] == "ok", out["error"][i]
        assert unpack_map(out[column][i]).shape == photos[i].shape[:2]
        if task == SALIENCY:  # depth travels min-max normalised: a flat map carries no level
            assert np.allclose(unpack_map(out[column][i]), values[i] / 255, atol=1 / 255)
    assert (out["status"][2], out["error_kind"][2]) == ("failed", "out-of-memory")
    assert out["error"][2].startswith("album/30.jpg: ") and (
        "out of memory" in out["error"][2] or "MemoryError" in out["error"][2]
    )
    assert (out["status"][4], out["error"][4]) == ("failed", "album/50.jpg: truncated or corrupt image data")
    assert all(out[c][2] == b"" and out[c][4] == b"" for c in ("saliency", "depth"))


# ------------------------------------------------------------------------------ flaky storage


def s3_throttling_error() -> Exception:
    """What s3fs raises for a 503 SlowDown that outlived its own retries."""
    from botocore.exceptions import ClientError
    from s3fs.errors import translate_boto_error

    return translate_boto_error(
        ClientError(
            {
                "Error": {"Code": "SlowDown", "Message": "Please reduce your request rate."},
                "ResponseMetadata": {"HTTPStatusCode": 503},
            },
            "ListObjectsV2",
        )
    )


def test_transient_storage_errors_are_retried_with_backoff(s3_bucket, monkeypatch):
    delays = []
    monkeypatch.setattr(storage.time, "sleep", delays.append)
    monkeypatch.setattr(storage.random, "uniform", lambda low, high: 1.0)  # no jitter: exact delays
    store = Storage(f"{s3_bucket}/edited")
    calls = Counter()

    def flaky(method: str, errors: list[Exception]) -> None:
        real = getattr(store.fs, method)

        def call(*args, **kwargs):
            calls[method] += 1
            if errors:
                raise errors.pop(0)
            return real(*args, **kwargs)

        monkeypatch.setattr(store.fs, method, call)

    flaky("pipe_file", [ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")] * 2)
    store.write_atomic("2024/a.jpg", b"photo bytes")
    assert delays == [0.2, 0.4] and calls["pipe_file"] == 3  # exponential backoff

    flaky("cat_file", [OSError(errno.EREMOTEIO, "Remote I/O error")] * 2)
    assert store.read_bytes("2024/a.jpg") == b"photo bytes"
    assert calls["cat_file"] == 3

    flaky("ls", [s3_throttling_error(), TimeoutError("read timed out")])
    assert [f.relpath for f in store.list_files(frozenset({".jpg"}))] == ["2024/a.jpg"]
    assert delays == [0.2, 0.4] * 3


def test_a_write_that_keeps_failing_raises_output_error_and_leaves_nothing(s3_bucket, tmp_path, monkeypatch):
    import boto3

    monkeypatch.setattr(storage.time, "sleep", lambda seconds: None)
    s3 = Storage(f"{s3_bucket}/edited")
    attempts = Counter()

    def failing_put(path, data, **kwargs):
        attempts["s3"] += 1
        raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")

    monkeypatch.setattr(s3.fs, "pipe_file", failing_put)
    with pytest.raises(OutputError, match=r"^cannot write s3://.*/edited/2024/a\.jpg: ConnectionResetError"):
        s3.write_atomic("2024/a.jpg", b"photo bytes")
    assert attempts["s3"] == 5
    bucket = s3_bucket.removeprefix("s3://")
    assert boto3.client("s3").list_objects_v2(Bucket=bucket).get("KeyCount") == 0

    class RemoteDiskOs:  # os for pipeline.storage only: a network disk whose renames keep failing
        def __getattr__(self, name):
            return getattr(os, name)

        @staticmethod
        def replace(src, dst):
            attempts["local"] += 1
            raise OSError(errno.EREMOTEIO, "Remote I/O error")

    monkeypatch.setattr(storage, "os", RemoteDiskOs())
    local = Storage(str(tmp_path / "out"))
    with pytest.raises(OutputError, match=r"cannot write .*/out/2024/a\.jpg: OSError: \[Errno 121\] Remote I/O"):
        local.write_atomic("2024/a.jpg", b"photo bytes")
    assert attempts["local"] == 5
    assert [p.name for p in (tmp_path / "out").rglob("*") if p.is_file()] == []  # no temporary files either


def test_a_photo_whose_write_keeps_failing_fails_alone(tmp_path, monkeypatch):
    """The stages in process, without Ray: one photo's write keeps failing, another's fails twice."""
    inputs, output = tmp_path / "in", tmp_path / "out"
    names = noise_photos(inputs, 3, size=(64, 48))
    config = JobConfig(input=str(inputs), output=str(output), **TRIVIAL)
    real_write, attempts = Storage._write_local, Counter()

    def flaky_write(path, data):
        name = os.path.basename(path)
        attempts[name] += 1
        if name == "p01.jpg" or (name == "p02.jpg" and attempts[name] <= 2):
            raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
        return real_write(path, data)

    monkeypatch.setattr(storage.time, "sleep", lambda seconds: None)
    monkeypatch.setattr(Storage, "_write_local", staticmethod(flaky_write))
    batch = {
        "relpath": np.array(names, dtype=object),
        "output_relpath": np.array([output_relpath(n, "jpeg") for n in names], dtype=object),
    }
    batch = read_photos(batch, str(inputs), {}, config.max_megapixels)
    batch = ModelStage(config.saliency_model, config.depth_model, None, None, "cpu", 4).predict(batch)
    batch = render_and_write(batch, config)

    assert list(batch["status"]) == ["ok", "failed", "ok"], list(batch["error"])
    assert batch["error_kind"][1] == "write-error"
    assert (
        batch["error"][1] == f"cannot write {output}/images/p01.jpg: ConnectionResetError: "
        "[Errno 104] Connection reset by peer"
    )
    assert attempts == {"p00.jpg": 1, "p01.jpg": 5, "p02.jpg": 3}
    assert sorted(p.name for p in (output / "images").iterdir()) == ["p00.jpg", "p02.jpg"]


def fake_execution(kinds: list[str]):
    """Instead of Ray Data: rows as render_and_write would end them, kinds[i] for the i-th photo."""

    def execute(config, inputs, source, run_id, models):
        relpaths = pa.concat_tables(list(source.tables())).column("relpath").to_pylist()
        for relpath, kind in zip(relpaths, kinds):
            failed = kind == "write-error"
            row = dict(
                relpath=relpath,
                status="failed" if failed else "ok",
                error_kind=kind,
                attempt=1,
                error=f"cannot write {config.output}/images/{relpath}: OSError: disk trouble" if failed else "",
            )
            yield manifest_rows(
                pa.Table.from_pylist([row]), source_root=inputs.uri, preset="", job_hash="", run_id=run_id
            )

    return execute


def test_the_job_goes_on_past_failing_writes_and_stops_when_they_all_fail(tmp_path, monkeypatch):
    inputs = tmp_path / "in"
    noise_photos(inputs, 12, size=(16, 16))
    w, ok = "write-error", ""
    # Scattered failures: every photo gets its row, the job goes on.
    monkeypatch.setattr(driver, "_execute", fake_execution([ok, w, w, ok, w, ok, w, w, w, w, w, w]))
    summary = run_job(JobConfig(input=str(inputs), output=str(tmp_path / "a"), **TRIVIAL))
    assert summary.counts == {"ok": 3, "failed": 9}
    # Eight in a row: the job stops with a clear error; the rows so far are committed and readable.
    monkeypatch.setattr(driver, "_execute", fake_execution([ok] + [w] * 11))
    with pytest.raises(OutputError, match=r"out: 8 writes in a row failed, stopping \(last: cannot write "):
        run_job(JobConfig(input=str(inputs), output=str(tmp_path / "out"), **TRIVIAL))
    rows = manifest(tmp_path / "out").to_pylist()
    assert [r["status"] for r in rows] == ["ok"] + ["failed"] * 8


# ------------------------------------------------------------------------------ OUTPUT full or read-only


def test_unwritable_output_stops_with_a_clear_error(library, tmp_path, tmpfs, capsys):
    output, more = tmp_path / "out", tmp_path / "more"
    noise_photos(more, 2, size=(32, 24))
    if os.geteuid() == 0:  # root writes through file modes: make the file system read-only instead
        tmpfs(output, "64m")
        shutil.copytree(library.output, output, dirs_exist_ok=True)
        make_readonly, undo = (lambda: remount(output, "ro")), (lambda: None)
    else:
        shutil.copytree(library.output, output)
        folders = [output, *(p for p in output.rglob("*") if p.is_dir())]
        make_readonly = lambda: [p.chmod(0o500) for p in folders]  # noqa: E731
        undo = lambda: [p.chmod(0o700) for p in folders]  # noqa: E731
    before, rows_before = snapshot(output), manifest(output)
    make_readonly()
    try:
        code = main(["run", str(more), str(output), *TRIVIAL_FLAGS])
        err = capsys.readouterr().err
        assert code == 2, err
        assert re.fullmatch(
            rf"dreamfocus: error: cannot write {re.escape(str(output))}/manifest/\S+: "
            r"\w+: .*(Read-only file system|Permission denied).*\n",
            err,
        ), err
        assert snapshot(output) == before  # nothing changed, nothing half-written
        assert manifest(output).equals(rows_before)  # and the manifest still reads
    finally:
        undo()


def test_full_output_stops_cleanly_and_the_rerun_completes_the_rest(tmp_path, tmpfs):
    inputs = tmp_path / "in"
    names = noise_photos(inputs, 14)  # outputs of about 230 kB each
    output = tmpfs(tmp_path / "out", "600k")
    config = JobConfig(input=str(inputs), output=str(output), **TRIVIAL)
    with pytest.raises(OutputError) as info:
        run_job(config)
    message = str(info.value)
    del info  # its traceback holds the abandoned row iterator: let it go while Ray is up
    assert wait_until(lambda: not pipeline_processes(), 60), f"still running: {pipeline_processes()}"
    assert message.startswith(f"{output}: 8 writes in a row failed, stopping (last: cannot write {output}/images/")
    assert "No space left on device" in message
    assert_complete_files(output)
    rows = manifest(output).to_pylist()  # the manifest still reads
    done = {r["relpath"] for r in rows if r["status"] == "ok"}
    assert 0 < len(done) < len(names) - 8
    assert {r["error_kind"] for r in rows if r["status"] != "ok"} == {"write-error"}
    assert sorted(p.name for p in (output / "images").iterdir()) == sorted(done)

    remount(output, "size=64m")  # space freed; photos whose write failed are retried on request
    summary = run_job(replace(config, retry_failed=True))
    assert summary.skipped == {"done": len(done)} and summary.counts == {"ok": len(names) - len(done)}
    assert_each_ok_once(output, names)


# ------------------------------------------------------------------------------ safety

TRICKY_KEYS = {  # key -> what must become of it: "ok", "unsafe-name", or None (no row, never read)
    "photos/ok.jpg": "ok",
    "photos/sub/fine.jpg": "ok",
    "photos/%2e%2e/encoded.jpg": "ok",  # a literal folder name, not ".."
    "photos/a\\b.jpg": "unsafe-name",
    "photos/C:/drive.jpg": "unsafe-name",
    "photos/../escape.jpg": None,  # "." and ".." are hidden names, like ".thumbnails"
    "photos/sub/../../up.jpg": None,
    "photos/./dot.jpg": None,
    "photos//double.jpg": None,  # s3fs cannot address empty key components
    "photos/sub//x.jpg": None,
    "/photos/lead.jpg": None,  # outside the prefix
    "photos-2/other.jpg": None,
}


def test_unsafe_object_names_never_escape_output_and_inputs_stay(s3_bucket, tmp_path):
    import boto3

    s3, bucket = boto3.client("s3"), s3_bucket.removeprefix("s3://")
    buffer = io.BytesIO()
    textured((20, 90, 200), (48, 32)).save(buffer, "JPEG")
    photo = buffer.getvalue()
    for key in TRICKY_KEYS:
        s3.put_object(Bucket=bucket, Key=key, Body=photo)

    def objects() -> dict[str, str]:
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
        return {
            o["Key"]: hashlib.sha256(s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()).hexdigest()
            for page in pages
            for o in page.get("Contents", [])
        }

    before = objects()
    assert set(before) == set(TRICKY_KEYS)  # moto keeps every trick as given

    # Planning against a local OUTPUT, where ".." would really climb: every target stays inside.
    local = tmp_path / "out"
    config = JobConfig(input=f"{s3_bucket}/photos", output=str(local), **TRIVIAL)
    for item in make_plan(config, Storage(config.input), Storage(str(local))):
        assert not isinstance(item, str)  # nothing done yet: every listed input is planned
        if item.error:
            assert "unsafe relative path" in str(item.error)
        else:
            target = (local / "images" / item.output_relpath).resolve()
            assert target.is_relative_to(local / "images"), item.output_relpath

    config = JobConfig(input=f"{s3_bucket}/photos", output=f"{s3_bucket}/edited", **TRIVIAL)
    run_job(config)
    after = objects()
    assert {k: v for k, v in after.items() if not k.startswith("edited/")} == before  # inputs untouched
    for key in after:
        if key.startswith("edited/"):
            parts = key.split("/")
            assert "" not in parts and "." not in parts and ".." not in parts and "\\" not in key, key

    rows = rows_by_relpath(manifest(f"{s3_bucket}/edited").to_pylist())
    for key, fate in TRICKY_KEYS.items():
        relpath = key.removeprefix("photos/")
        if fate is None:
            assert relpath not in rows, key
            continue
        [row] = rows[relpath]
        if fate == "ok":
            assert row["status"] == "ok", row["error"]
            assert row["output_uri"] == f"{s3_bucket}/edited/images/{output_name(relpath)}"
            assert f"edited/images/{output_name(relpath)}" in after
        else:
            assert (row["status"], row["error_kind"]) == ("failed", fate)
            assert row["error"].startswith(f"unsafe relative path {relpath!r}: ")
    assert set(rows) == {k.removeprefix("photos/") for k, fate in TRICKY_KEYS.items() if fate}


@pytest.mark.parametrize(
    "relpath",
    [
        "../escape.jpg",
        "a/../../up.jpg",
        "./../x.jpg",
        "/etc/x.jpg",
        "a\\..\\b.jpg",
        "C:/x.jpg",
        "a//b.jpg",
        "a/\0.jpg",
        "",
    ],
)
def test_output_paths_refuse_every_escape(relpath):
    with pytest.raises(BadInputError, match="unsafe relative path"):
        output_relpath(relpath, "jpeg")
    with pytest.raises(BadInputError):
        safe_relpath(relpath)
