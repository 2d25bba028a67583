"""Faults mid-run: each case injects one kind of fault into a real run (real Ray, moto S3 on
loopback behind a fault-injecting proxy, a real tmpfs, trivial models) and measures what became
of the library: photos with no `ok` row and output at the end (rows lost), photos with more than
one `ok` row (rows twice), and the reruns it took to a complete OUTPUT. A last rerun then must
find nothing to do: nothing is done twice.

The fault matrix, as the tests measure it (README.md, "Faults", quotes it; the last test checks
that both say what the cases measured):

| case | injected | rows lost | rows twice | reruns |
|---|---|---|---|---|
| s3-read | photo reads throttled (503) past s3fs's retries; one photo's reads failing all run | 0 | 0 | 1 |
| s3-write | photo writes answered 500 three times; a write that landed but whose answer was lost | 0 | 0 | 0 |
| s3-commit | lease and manifest commits throttled past every retry; a commit's answer lost | 0 | 0 | 0 |
| photo-changed | photos replaced as they are read, and between read and check; one deleted as read | 0 | 0 | 0 |
| disk-full | OUTPUT a tmpfs that fills mid-run (ENOSPC); space freed before the rerun | 0 | 0 | 1 |
| actor-killed | `ray.kill` of the model actor while it holds a batch | 0 | 0 | 0 |
| actor-restarted | `ray.kill(no_restart=False)` of the model actor while it holds a batch | 0 | 0 | 0 |
| node-lost | the model actor's node removed mid-batch (`ray.cluster_utils.Cluster`); a new node joins | 0 | 0 | 0 |

S3 faults come from `FaultyS3`, an HTTP proxy on loopback in front of moto that answers chosen
requests with an error, drops the connection before or after forwarding them, or changes the
bucket just before forwarding them. The client's own retries are off (AWS_MAX_ATTEMPTS=1) so a
burst of a few faulted requests outlives s3fs's retries and reaches the job's, as a longer
burst would with them on. Nothing waits on time: the tests wait on the run itself, on a gate
actor that a model actor reaches mid-batch, or on the proxy seeing a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import io
import logging
import os
import re
import socket
import subprocess
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
import ray
from PIL import Image

from pipeline.cli import main
from pipeline.job import JobConfig, JobSummary, run_job
from pipeline.manifest import latest_rows, read_manifest
from pipeline.models import register
from pipeline.models.trivial import TrivialSaliency
from pipeline.storage import Storage

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
TRIVIAL = dict(saliency_model="trivial-saliency", depth_model="trivial-depth")
RUN_TIMEOUT = 300  # seconds a run may take on a slow, shared machine before the test fails
GATE = "dreamfocus-test-gate"  # the named actor a gated model actor reports to mid-batch


# ------------------------------------------------------------------------------ the fault matrix


@dataclass(frozen=True)
class Outcome:
    case: str
    injected: str
    rows_lost: int
    rows_twice: int
    reruns: int

    def table_row(self) -> str:
        return f"| {self.case} | {self.injected} | {self.rows_lost} | {self.rows_twice} | {self.reruns} |"


INJECTED = {  # case -> what it injects, as the table says it
    "s3-read": "photo reads throttled (503) past s3fs's retries; one photo's reads failing all run",
    "s3-write": "photo writes answered 500 three times; a write that landed but whose answer was lost",
    "s3-commit": "lease and manifest commits throttled past every retry; a commit's answer lost",
    "photo-changed": "photos replaced as they are read, and between read and check; one deleted as read",
    "disk-full": "OUTPUT a tmpfs that fills mid-run (ENOSPC); space freed before the rerun",
    "actor-killed": "`ray.kill` of the model actor while it holds a batch",
    "actor-restarted": "`ray.kill(no_restart=False)` of the model actor while it holds a batch",
    "node-lost": "the model actor's node removed mid-batch (`ray.cluster_utils.Cluster`); a new node joins",
}
MEASURED: dict[str, Outcome] = {}  # what the cases measured, for the table's test at the end


def settle(case: str, config: JobConfig, photos: list[str], reruns_allowed: int = 1) -> Outcome:
    """Rerun (plain reruns, faults gone) until OUTPUT is complete, then once more, which must find
    nothing to do; measure the outcome and record it for the table."""
    reruns = 0
    while not complete(config, photos) and reruns <= reruns_allowed:
        run_job(config)
        reruns += 1
    last = run_job(config)
    assert last.counts == {}, f"a run after a complete one did something: {last.lines()}"
    ok = Counter(r["relpath"] for r in manifest_rows(config) if r["status"] == "ok")
    written = output_files(config)
    outcome = Outcome(
        case,
        INJECTED[case],
        rows_lost=sum(1 for p in photos if ok[p] == 0 or output_name(p) not in written),
        rows_twice=sum(1 for p in photos if ok[p] > 1),
        reruns=reruns,
    )
    MEASURED[case] = outcome
    return outcome


def complete(config: JobConfig, photos: list[str]) -> bool:
    latest = {r["relpath"]: r["status"] for r in latest_rows(read_manifest(manifest_of(config))).to_pylist()}
    written = output_files(config)
    return all(latest.get(p) == "ok" and output_name(p) in written for p in photos)


def manifest_of(config: JobConfig) -> Storage:
    return Storage(f"{config.output}/manifest")


def manifest_rows(config: JobConfig) -> list[dict]:
    return read_manifest(manifest_of(config)).to_pylist()


def output_files(config: JobConfig) -> set[str]:
    """The files under OUTPUT/images; never a temporary one among them."""
    try:
        found = {f.relpath for f in Storage(f"{config.output}/images").list_files(None)}
    except FileNotFoundError:
        return set()
    if "://" not in config.output:  # list_files skips hidden names: look for temporary files directly
        assert not list(Path(config.output).rglob("*.partial")), "temporary files left in OUTPUT"
    return found


def output_name(relpath: str) -> str:
    return os.path.splitext(relpath)[0] + ".jpg"


def assert_storage_line(line: str, photos: int, listing: int) -> None:
    """The summary's storage line: so many transient errors retried on photos, so many on the rest."""
    pattern = (
        rf"storage: {photos + listing} transient errors .* retried: {photos} reading or writing photos, "
        rf"{listing} listing .*"
    )
    assert re.fullmatch(pattern, line), line


def assert_clean(outcome: Outcome, reruns: int) -> None:
    assert (outcome.rows_lost, outcome.rows_twice, outcome.reruns) == (0, 0, reruns), outcome


def photo_bytes(i: int, size=(48, 32)) -> bytes:
    rng = np.random.default_rng(i)
    image = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


# ------------------------------------------------------------------------------ S3 behind a faulty proxy


@dataclass
class Fault:
    """What the proxy does to the next `times` requests of `method` whose path matches `path`."""

    method: str
    path: re.Pattern
    times: int
    answer: str  # "slowdown" (503), "internal-error" (500), "reset" (dropped before), "lost-answer" (after)
    before: Callable[[], None] | None = None  # done to the bucket just before forwarding
    taken: int = 0


_ERRORS = {
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "internal-error": (500, "InternalError", "We encountered an internal error. Please try again."),
}


class FaultyS3:
    """An HTTP proxy on loopback in front of moto's S3 server, injecting the faults it is given."""

    def __init__(self, upstream: str) -> None:
        self.upstream = urlsplit(upstream)
        self.faults: list[Fault] = []
        self.seen: Counter[str] = Counter()  # "METHOD path" of the requests forwarded
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _ProxyHandler)
        self.server.daemon_threads = True
        self.server.proxy = self  # type: ignore[attr-defined]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def inject(self, method: str, path: str, times: int, answer: str, before=None) -> Fault:
        fault = Fault(method, re.compile(path), times, answer, before)
        with self.lock:
            self.faults.append(fault)
        return fault

    def clear(self) -> None:
        with self.lock:
            self.faults.clear()

    def take(self, method: str, path: str) -> Fault | None:
        with self.lock:
            for fault in self.faults:
                if fault.method == method and fault.taken < fault.times and fault.path.search(path):
                    fault.taken += 1
                    return fault
        return None

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args) -> None:  # noqa: A002 - the base class's name
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                chunk = self.rfile.read(size + 2)[:size]
                if not size:
                    break
                chunks.append(chunk)
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _drop(self) -> None:
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)

    def _forward(self) -> None:
        proxy: FaultyS3 = self.server.proxy  # type: ignore[attr-defined]
        body = self._body()
        fault = proxy.take(self.command, self.path)
        if fault is not None and fault.before is not None:
            fault.before()
        answer = fault.answer if fault is not None else "pass"
        if answer == "reset":
            return self._drop()
        if answer in _ERRORS:
            status, code, message = _ERRORS[answer]
            xml = (
                f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code><Message>{message}</Message></Error>"
            )
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(xml)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(xml.encode())
            return None
        headers = {
            k: v for k, v in self.headers.items() if k.lower() not in ("expect", "transfer-encoding", "content-length")
        }
        upstream = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
        upstream.request(self.command, self.path, body=body, headers=headers)
        response = upstream.getresponse()
        data = response.read()
        upstream.close()
        with proxy.lock:
            proxy.seen[f"{self.command} {self.path.split('?')[0]}"] += 1
        if answer == "lost-answer":  # it landed; the client never hears so
            return self._drop()
        self.send_response(response.status)
        for key, value in response.getheaders():
            if key.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                self.send_header(key, value)
        self.send_header("Content-Length", response.getheader("Content-Length") or str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        return None

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward


# ------------------------------------------------------------------------------ gated model actors


@register
class GatedSaliency(TrivialSaliency):
    """trivial-saliency that, while the gate is armed, reports its actor to the gate at its first
    batch and holds that batch until the actor is killed."""

    name = "gated-saliency"

    def _predict_batch(self, photos):
        gate = ray.get_actor(GATE)
        me = ray.get_runtime_context()
        if ray.get(gate.arrive.remote(me.current_actor, me.get_node_id())):
            threading.Event().wait(RUN_TIMEOUT)  # held: the test kills this actor now
        return super()._predict_batch(photos)


@ray.remote(num_cpus=0)
class Gate:
    """Armed once: the first model actor to arrive is held, and its handle handed to the test."""

    def __init__(self) -> None:
        self.arrived = asyncio.Event()
        self.held: tuple | None = None

    async def arrive(self, actor, node_id: str) -> bool:
        if self.held is not None:
            return False
        self.held = (actor, node_id)
        self.arrived.set()
        return True

    async def wait(self) -> tuple:
        await self.arrived.wait()
        assert self.held is not None
        return self.held


def in_ray_workers() -> None:
    """Ray runs this in each of its workers: importing this module has registered the gated model."""


def ray_options() -> dict:
    return dict(
        runtime_env={"worker_process_setup_hook": f"{__name__}.in_ray_workers"},
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )


def run_in_thread(config: JobConfig) -> tuple[threading.Thread, dict]:
    result: dict = {}

    def target() -> None:
        try:
            result["summary"] = run_job(config)
        except BaseException as exc:  # noqa: BLE001 - the test reports it
            result["error"] = exc

    runner = threading.Thread(target=target, daemon=True)
    runner.start()
    return runner, result


def joined(runner: threading.Thread, result: dict) -> JobSummary:
    runner.join(RUN_TIMEOUT)
    assert not runner.is_alive(), f"the run did not end within {RUN_TIMEOUT} s"
    assert "error" not in result, f"the run failed: {result['error']!r}"
    return result["summary"]


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def faulty_s3(s3_server):
    """The proxy, and the environment that sends every S3 client of this module through it."""
    proxy = FaultyS3(s3_server)
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_MAX_ATTEMPTS", "PYTHONPATH")}
    os.environ.update(
        AWS_ENDPOINT_URL=proxy.endpoint,
        AWS_MAX_ATTEMPTS="1",  # the client's own retries off: a short burst reaches the job's retries
        PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), str(TESTS), saved["PYTHONPATH"]) if p),
    )
    yield proxy
    proxy.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def local_ray(faulty_s3):  # the environment first: Ray's workers inherit it
    ray.init(num_cpus=2, **ray_options())
    yield
    ray.shutdown()


@pytest.fixture
def bucket(faulty_s3, s3_bucket):
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # clients made from here on go through the proxy
    yield s3_bucket
    faulty_s3.clear()


def put_photos(s3_server: str, bucket: str, n: int, prefix: str = "in") -> list[str]:
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server)  # moto itself: no faults while setting up
    names = [f"p{i:02d}.jpg" for i in range(n)]
    for i, name in enumerate(names):
        s3.put_object(Bucket=bucket.removeprefix("s3://"), Key=f"{prefix}/{name}", Body=photo_bytes(i))
    return names


def s3_config(bucket: str, **kwargs) -> JobConfig:
    return JobConfig(input=f"{bucket}/in", output=f"{bucket}/out", **{**TRIVIAL, **kwargs})


@contextlib.contextmanager
def on_log(logger: str, words: str, action: Callable[[], None]):
    """Do `action` when `logger` logs a message with `words` in it: the moment a fault has been
    seen through, without waiting on time."""

    class Trigger(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if words in record.getMessage():
                action()

    handler, target = Trigger(), logging.getLogger(logger)
    target.addHandler(handler)
    try:
        yield
    finally:
        target.removeHandler(handler)


# ------------------------------------------------------------------------------ S3 errors and throttling


@pytest.mark.slow
def test_s3_reads_throttled_and_failing_lose_nothing(local_ray, faulty_s3, s3_server, bucket):
    photos = put_photos(s3_server, bucket, 6)
    # Six in a row: s3fs's five tries fail, the job's retry gets through.
    faulty_s3.inject("GET", r"/in/p01\.jpg$", 6, "slowdown")
    reset = faulty_s3.inject("GET", r"/in/p02\.jpg$", 6, "reset")  # absorbed by aiobotocore and s3fs
    failing = faulty_s3.inject("GET", r"/in/p03\.jpg$", 1000, "slowdown")  # for the whole run
    config = s3_config(bucket)
    first = run_job(config)
    assert reset.taken == 6
    assert failing.taken == 25  # five tries of s3fs, five times: every retry was made
    faulty_s3.clear()

    assert first.counts == {"ok": 5, "failed": 1}
    [row] = [r for r in manifest_rows(config) if r["status"] == "failed"]
    assert (row["relpath"], row["error_kind"]) == ("p03.jpg", "read-error")
    assert row["error"].startswith(f"cannot read {bucket}/in/p03.jpg: ")
    assert "reduce your request rate" in row["error"]
    storage_line, rerun_line = first.faults
    assert_storage_line(storage_line, photos=5, listing=0)
    assert rerun_line == "failed for reasons not their own: 1 read-error; a plain rerun retries them"
    assert_clean(settle("s3-read", config, photos), reruns=1)


@pytest.mark.slow
def test_s3_writes_failing_and_answers_lost_lose_nothing(local_ray, faulty_s3, s3_server, bucket):
    photos = put_photos(s3_server, bucket, 6)
    faulty_s3.inject("PUT", r"/out/images/p01\.jpg$", 3, "internal-error")  # s3fs leaves these to the job
    lost = faulty_s3.inject("PUT", r"/out/images/p02\.jpg$", 1, "lost-answer")
    config = s3_config(bucket)
    first = run_job(config)
    assert lost.taken == 1 and faulty_s3.seen[f"PUT /{bucket.removeprefix('s3://')}/out/images/p02.jpg"] == 2
    assert first.counts == {"ok": 6}
    [storage_line] = first.faults
    assert_storage_line(storage_line, photos=3, listing=0)
    assert_clean(settle("s3-write", config, photos), reruns=0)


@pytest.mark.slow
def test_s3_manifest_commits_failing_lose_nothing(local_ray, faulty_s3, s3_server, bucket):
    photos = put_photos(s3_server, bucket, 8)
    faulty_s3.inject("PUT", r"/out/manifest/lease\.json$", 6, "slowdown")
    # The first commit lands but its answer is lost, and every try after fails: it is made
    # again, under the same name, with the rows that came meanwhile.
    part = r"/out/manifest/part-.*-00000\.parquet$"
    lost = faulty_s3.inject("PUT", part, 1, "lost-answer")
    throttled = faulty_s3.inject("PUT", part, 1000, "slowdown")
    config = s3_config(bucket, commit_every=3)
    with on_log("pipeline.manifest", "manifest commit failed", lambda: faulty_s3.clear()):  # over then
        first = run_job(config)
    assert lost.taken == 1 and throttled.taken >= 25
    assert first.counts == {"ok": 8}
    storage_line, commit_line = first.faults
    assert_storage_line(storage_line, photos=0, listing=5)
    assert commit_line == "manifest: 1 commit failed; their rows went with a later one"
    assert_clean(settle("s3-commit", config, photos), reruns=0)


# ------------------------------------------------------------------------------ photos changed while read


@pytest.mark.slow
def test_photos_replaced_or_deleted_while_read_are_recorded_as_read(local_ray, faulty_s3, s3_server, bucket):
    import boto3

    photos = put_photos(s3_server, bucket, 6)
    s3, name = boto3.client("s3", endpoint_url=s3_server), bucket.removeprefix("s3://")
    new_size = (40, 30)

    def replace_photo(relpath: str) -> Callable[[], None]:
        return lambda: s3.put_object(Bucket=name, Key=f"in/{relpath}", Body=photo_bytes(99, new_size))

    # p01 replaced as its bytes are asked for; p02 just after they came, before the check that
    # follows a read; p03 deleted as it is read.
    faulty_s3.inject("GET", r"/in/p01\.jpg$", 1, "pass", before=replace_photo("p01.jpg"))
    faulty_s3.inject("HEAD", r"/in/p02\.jpg$", 1, "pass", before=replace_photo("p02.jpg"))
    faulty_s3.inject("GET", r"/in/p03\.jpg$", 1, "pass", before=lambda: s3.delete_object(Bucket=name, Key="in/p03.jpg"))
    config = s3_config(bucket)
    first = run_job(config)

    assert first.counts == {"ok": 5, "skipped": 1}
    assert first.faults == [
        "2 photos replaced after the listing: the version read is the one recorded",
        "1 photo deleted after the listing: left alone",
    ]
    rows = {r["relpath"]: r for r in manifest_rows(config)}
    for relpath in ("p01.jpg", "p02.jpg"):  # the new version: its fingerprint, its output
        etag = s3.head_object(Bucket=name, Key=f"in/{relpath}")["ETag"].strip('"')
        assert rows[relpath]["source_fingerprint"] == f"etag:{etag}"
        assert (rows[relpath]["width"], rows[relpath]["height"]) == new_size
    gone = rows["p03.jpg"]
    assert (gone["status"], gone["error_kind"]) == ("skipped", "deleted-while-read")
    assert gone["reason"] == "p03.jpg: deleted since the listing found it"
    photos.remove("p03.jpg")
    assert_clean(settle("photo-changed", config, photos), reruns=0)


# ------------------------------------------------------------------------------ a model actor killed


def local_photos(folder: Path, n: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"p{i:02d}.jpg" for i in range(n)]
    for i, name in enumerate(names):
        (folder / name).write_bytes(photo_bytes(i))
    return names


@pytest.mark.slow
@pytest.mark.parametrize("case", ["actor-killed", "actor-restarted"])
def test_a_model_actor_killed_mid_batch_loses_nothing(local_ray, tmp_path, case):
    photos = local_photos(tmp_path / "in", 8)
    gate = Gate.options(name=GATE).remote()
    config = JobConfig(
        input=str(tmp_path / "in"),
        output=str(tmp_path / "out"),
        saliency_model=GatedSaliency.name,
        depth_model="trivial-depth",
        model_batch_size=2,
    )
    try:
        runner, result = run_in_thread(config)
        actor, _ = ray.get(gate.wait.remote(), timeout=RUN_TIMEOUT)  # a model actor holds its first batch
        ray.kill(actor, no_restart=case == "actor-killed")
        first = joined(runner, result)
    finally:
        ray.kill(gate)

    assert first.counts == {"ok": 8}
    [line] = first.faults
    if case == "actor-killed":  # for good: Ray Data's dataset fails, and the job starts it again
        assert re.fullmatch(r"dataset started again: a model actor was lost \(ActorDiedError\): \d photos left", line)
    else:  # Ray restarts it, and Ray Data sends it its batch again
        assert line == "model actors: 1 restart mid-run; their batches were redone"
    assert_clean(settle(case, config, photos), reruns=0)


# ------------------------------------------------------------------------------ OUTPUT's disk full


@pytest.fixture
def tmpfs():
    """mount(path, size): a fresh tmpfs of that size at path (a real disk that fills), unmounted
    after the test; skipped where mounting is not permitted."""
    mounted: list[Path] = []

    def mount(path: Path, size: str) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()}); a full OUTPUT needs one")
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.mark.slow
def test_output_disk_filling_mid_run_loses_nothing(local_ray, tmp_path, tmpfs, capsys, caplog):
    inputs = tmp_path / "in"
    inputs.mkdir()
    photos = [f"p{i:02d}.jpg" for i in range(40)]
    for i, name in enumerate(photos):
        (inputs / name).write_bytes(photo_bytes(i))  # outputs of a page or two, smaller than a part
    output = tmpfs(tmp_path / "out", "80k")  # room for some, and a few parts: parts fail first
    flags = ["--saliency-model", "trivial-saliency", "--depth-model", "trivial-depth", "--commit-every", "2"]

    assert main(["run", str(inputs), str(output), *flags]) == 2
    lines = capsys.readouterr().err.splitlines()
    [stopped] = [line for line in lines if line.startswith("dreamfocus: error: ")]
    assert re.fullmatch(
        rf"dreamfocus: error: {output}: 8 writes in a row failed, stopping \(last: cannot write {output}/images/"
        r"p\d\d\.jpg: OSError: \[Errno 28\] No space left on device\)",
        stopped,
    ), lines
    commits = [r.getMessage() for r in caplog.records if r.name == "pipeline.manifest"]
    assert commits and all("No space left on device" in m for m in commits), commits  # parts too
    subprocess.run(["mount", "-o", "remount,size=64m", str(output)], check=True)  # space freed
    config = JobConfig(input=str(inputs), output=str(output), commit_every=2, **TRIVIAL)
    assert_clean(settle("disk-full", config, photos), reruns=1)


# ------------------------------------------------------------------------------ a worker node lost


@pytest.fixture
def two_node_cluster(local_ray):
    """A head (CPUs only) and a worker node declaring the one GPU, so the model actor sits there
    (Ray schedules on declared resources; the models run on the CPU). The module's own Ray is
    shut down for it: this test comes last of those that need one."""
    from ray.cluster_utils import Cluster

    ray.shutdown()
    # A lost node is known in about 3 s, not Ray's 15 (five failed health checks 3 s apart); a
    # second of timeout still leaves a busy machine's live nodes time to answer.
    health = {"health_check_period_ms": 1000, "health_check_timeout_ms": 1000, "health_check_failure_threshold": 3}
    cluster = Cluster(initialize_head=True, head_node_args=dict(num_cpus=2, num_gpus=0, _system_config=health))
    worker = cluster.add_node(num_cpus=1, num_gpus=1)
    ray.init(address=cluster.address, **ray_options())
    yield cluster, worker
    ray.shutdown()
    cluster.shutdown()


@pytest.mark.slow
def test_a_worker_node_lost_mid_batch_loses_nothing(two_node_cluster, tmp_path):
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    cluster, worker = two_node_cluster
    photos = local_photos(tmp_path / "in", 8)
    head = ray.get_runtime_context().get_node_id()
    gate = Gate.options(name=GATE, scheduling_strategy=NodeAffinitySchedulingStrategy(head, soft=False)).remote()
    config = JobConfig(
        input=str(tmp_path / "in"),
        output=str(tmp_path / "out"),
        saliency_model=GatedSaliency.name,
        depth_model="trivial-depth",
        model_batch_size=2,
        gpus_per_actor=1,
        device="cpu",
    )
    runner, result = run_in_thread(config)
    _, node_id = ray.get(gate.wait.remote(), timeout=RUN_TIMEOUT)  # the model actor holds its first batch
    assert node_id == worker.node_id
    cluster.remove_node(worker, allow_graceful=False)  # the node and everything on it, at once
    cluster.add_node(num_cpus=1, num_gpus=1)  # as an autoscaler would start one
    first = joined(runner, result)

    assert first.counts == {"ok": 8}
    assert (
        first.faults
        == [
            "model actors: 1 restart mid-run; their batches were redone",  # on the new node
            f"nodes lost mid-run: {worker.node_ip_address} ({worker.node_id[:8]}); their work was redone on the others",
        ]
    )
    assert_clean(settle("node-lost", config, photos), reruns=0)


# ------------------------------------------------------------------------------ the table


def matrix_table(outcomes: list[Outcome]) -> list[str]:
    return ["| case | injected | rows lost | rows twice | reruns |", "|---|---|---|---|---|"] + [
        o.table_row() for o in outcomes
    ]


def test_the_fault_matrix_in_the_docstring_and_readme_is_what_the_cases_measured():
    """Runs last: the table of the cases that ran in this session, against the two copies."""
    if set(MEASURED) != set(INJECTED):
        pytest.skip(f"only some cases ran ({', '.join(sorted(MEASURED)) or 'none'}): no whole table to compare")
    measured = matrix_table([MEASURED[case] for case in INJECTED])
    assert all(line in __doc__.splitlines() for line in measured), "\n".join(measured)
    readme = (ROOT / "README.md").read_text().splitlines()
    assert all(line in readme for line in measured), "\n".join(measured)
