"""The GPU layout on simulated GPUs: Ray nodes declare GPUs they do not have (Ray schedules on
declared resources), the models run with --device cpu, and the job runs against the cluster with
--address, as on a real one (DESIGN.md, "Testing GPU layouts without a GPU").

For each layout: exactly one model actor per GPU (each holding both models), no GPU demand left
pending while the job works, results arriving while it runs, and every photo done exactly once.

Every Ray node is a `ray start --block` process in a session of its own, on free ports and under
a temporary directory of its own; stopping it kills its session (GCS, raylet, agents) and the
workers under it by their process ids, and nothing else on the machine: no `ray stop`. The
nodes are asked for 127.0.0.1; Ray registers them under the machine's own address, so all
traffic stays on this machine.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.manifest import read_manifest
from pipeline.storage import Storage

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
N_PHOTOS = 40  # groups of 16 enter the dataset: three groups
TRIVIAL = ("--saliency-model", "trivial-saliency", "--depth-model", "trivial-depth", "--device", "cpu")
MODEL_ACTOR = "ModelStage"  # Ray Data names the pool's actors MapWorker(MapBatches(ModelStage))
START_TIMEOUT = 120
JOB_TIMEOUT = 300


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port free now and not handed out before by this process: the system may give a port
    just closed out again, and a node whose components were given the same one fails to start."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def ray_env() -> dict[str, str]:
    """The environment of Ray's processes and of the job: what the test process has (the S3
    endpoint and credentials of the moto fixture included), local auth off, and this venv's
    python first on PATH (a submitted job's `python` is the one the raylet finds)."""
    return dict(
        os.environ,
        RAY_AUTH_MODE="disabled",
        RAY_USAGE_STATS_ENABLED="0",
        PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    )


class RayCluster:
    """A head and worker nodes started with `ray start --block` on this machine."""

    def __init__(self, node_env: Callable[[str], dict[str, str]] | None = None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="rayl", dir="/tmp"))  # short: Ray's socket paths
        self.node_env = node_env  # node name ("head", "worker0", ...) -> extra environment of its processes
        self.nodes: list[subprocess.Popen] = []
        self.address = f"127.0.0.1:{free_port()}"
        self.dashboard_url: str | None = None

    def _launch(self, name: str, args: list[str]) -> tuple[subprocess.Popen, Path]:
        log = self.dir / f"{name}.log"
        with open(log, "wb") as out:
            node = subprocess.Popen(
                [
                    str(VENV_BIN / "ray"),
                    "start",
                    "--block",
                    "--disable-usage-stats",
                    "--node-ip-address=127.0.0.1",
                    f"--dashboard-agent-listen-port={free_port()}",
                    f"--dashboard-agent-grpc-port={free_port()}",
                    f"--runtime-env-agent-port={free_port()}",
                    f"--metrics-export-port={free_port()}",
                    "--object-store-memory=150000000",
                    *args,
                ],
                env=dict(ray_env(), **(self.node_env(name) if self.node_env else {})),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.nodes.append(node)
        return node, log

    @staticmethod
    def _wait_started(*started: tuple[subprocess.Popen, Path]) -> None:
        deadline = time.time() + START_TIMEOUT
        for node, log in started:
            while "Ray runtime started" not in log.read_text(errors="replace"):
                assert node.poll() is None, f"ray start exited:\n{log.read_text(errors='replace')}"
                assert time.time() < deadline, f"ray start not up in {START_TIMEOUT} s:\n{log.read_text()}"
                time.sleep(0.1)

    def start_head(self, num_gpus: int, num_cpus: int = 2, dashboard: bool = False) -> RayCluster:
        dashboard_port = free_port()
        self._wait_started(
            self._launch(
                "head",
                [
                    "--head",
                    f"--port={self.address.rsplit(':', 1)[1]}",
                    f"--num-gpus={num_gpus}",
                    f"--num-cpus={num_cpus}",
                    f"--temp-dir={self.dir / 'ray'}",
                    f"--include-dashboard={str(dashboard).lower()}",
                    "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={dashboard_port}",
                    f"--ray-client-server-port={free_port()}",
                ],
            )
        )
        if dashboard:
            self.dashboard_url = f"http://127.0.0.1:{dashboard_port}"
        return self

    def add_workers(self, *gpus: int, num_cpus: int = 1) -> RayCluster:
        """Worker nodes, one per entry of `gpus` (the GPUs it declares). One after the other: nodes
        starting side by side on one machine can pick the same socket and log names."""
        for i, n in enumerate(gpus):
            self._wait_started(
                self._launch(f"worker{i}", [f"--address={self.address}", f"--num-gpus={n}", f"--num-cpus={num_cpus}"])
            )
        return self

    def wait_for(self, nodes: int, gpus: int) -> None:
        """Until the GCS reports every node registered, with its GPUs."""
        deadline = time.time() + START_TIMEOUT
        while True:
            status = cluster_status(self.address)
            alive = len(status.active_nodes) + len(status.idle_nodes)
            if alive == nodes and status.total_resources().get("GPU", 0) == gpus:
                return
            assert time.time() < deadline, f"cluster not up: {alive} nodes, {status.total_resources()}"
            time.sleep(0.2)

    def stop(self) -> None:
        """Kill every process the nodes started: their sessions (GCS, raylet, agents) and their
        other descendants (workers, which put themselves in process groups of their own)."""
        started = [pid for node in self.nodes for pid in (node.pid, *descendants(node.pid))]
        for node in self.nodes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.pid, signal.SIGKILL)
        for pid in started:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for node in self.nodes:
            node.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def descendants(pid: int) -> list[int]:
    """The processes under `pid`, from /proc (none where there is no /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        children.setdefault(parent, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def cluster_status(address: str):
    """What `ray status` shows: nodes, resource usage, pending demands (from the GCS)."""
    from ray.autoscaler.v2.sdk import get_cluster_status

    return get_cluster_status(address, timeout=10)


def pending_gpu_demands(status) -> list[dict]:
    """The "Pending Demands" of `ray status` that ask for a GPU: tasks, actors, placement groups."""
    demands = status.resource_demands
    return [
        dict(b.bundle)
        for d in [*demands.ray_task_actor_demand, *demands.placement_group_demand]
        for b in d.bundles_by_count
        if b.bundle.get("GPU", 0) > 0
        for _ in range(b.count)
    ]


def gcs_state(address: str):
    """The GCS's actor and node tables, read without joining the cluster as a driver."""
    import ray._private.state
    from ray._raylet import GcsClientOptions

    state = ray._private.state.GlobalState()
    state._initialize_global_state(
        GcsClientOptions.create(address, None, allow_cluster_id_nil=True, fetch_cluster_id_if_nil=False)
    )
    return state


def model_actors(address: str) -> dict[str, dict]:
    state = gcs_state(address)
    try:
        return {
            actor_id: actor
            for actor_id, actor in state.actor_table(None).items()
            if MODEL_ACTOR in actor["ActorClassName"]
        }
    finally:
        state.disconnect()


def gpu_nodes(address: str) -> dict[str, float]:
    """node id -> declared GPUs, for the live nodes."""
    state = gcs_state(address)
    try:
        return {n["NodeID"]: n["Resources"].get("GPU", 0.0) for n in state.node_table() if n["Alive"]}
    finally:
        state.disconnect()


@dataclass
class Watched:
    """What was seen while a job ran."""

    started: float
    ended: float = 0.0
    gpu_peak: float = 0.0
    actors_up: float | None = None  # when the GPUs in use first reached the expected number
    pending: list[tuple[float, dict]] = field(default_factory=list)  # (when, GPU demand)
    outputs: list[tuple[float, int]] = field(default_factory=list)  # (when, outputs present)

    def pending_after_actors_up(self) -> list[tuple[float, dict]]:
        return [(t, d) for t, d in self.pending if self.actors_up is not None and t >= self.actors_up]

    def first_output(self) -> float | None:
        return next((t for t, n in self.outputs if n), None)


def watch(
    address: str,
    running: Callable[[], bool],
    count_outputs: Callable[[], int],
    gpus: float,
    until: Callable[[Watched], bool] = lambda w: False,
) -> Watched:
    """Poll the cluster (every 0.25 s) and OUTPUT (every 0.1 s) while `running()`, or until
    `until(watched)`; fails after JOB_TIMEOUT."""
    seen = Watched(started=time.time())
    deadline, next_status = seen.started + JOB_TIMEOUT, 0.0
    while running() and not until(seen):
        now = time.time()
        assert now < deadline, f"job still running after {JOB_TIMEOUT} s"
        seen.outputs.append((now, count_outputs()))
        if now >= next_status:
            status = cluster_status(address)
            used = {r.resource_name: r.used for r in status.cluster_resource_usage}.get("GPU", 0.0)
            seen.gpu_peak = max(seen.gpu_peak, used)
            if seen.actors_up is None and used >= gpus:
                seen.actors_up = now
            seen.pending.extend((now, d) for d in pending_gpu_demands(status))
            next_status = now + 0.25
        time.sleep(0.1)
    seen.ended = time.time()
    return seen


def make_photos(n: int = N_PHOTOS) -> dict[str, bytes]:
    """Small noisy JPEGs (detail everywhere, so none is left alone as 'background already soft')."""
    rng = np.random.default_rng(7)
    photos = {}
    for i in range(n):
        encoded = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)).save(encoded, "JPEG", quality=90)
        photos[f"day{i % 3}/p{i:02d}.jpg"] = encoded.getvalue()
    return photos


def write_local(root: Path, photos: dict[str, bytes]) -> Path:
    for relpath, data in photos.items():
        (root / relpath).parent.mkdir(parents=True, exist_ok=True)
        (root / relpath).write_bytes(data)
    return root


def local_outputs(output: Path) -> Callable[[], int]:
    return lambda: sum(1 for _ in (output / "images").rglob("*.jpg")) if (output / "images").exists() else 0


def start_cli(address: str, inputs: str, output: str, *extra: str, log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "run", inputs, output, "--address", address, *TRIVIAL, *extra],
            cwd=ROOT,
            env=ray_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def run_cli(
    address: str, inputs: str, output: str, *extra: str, gpus: float, log: Path, count_outputs: Callable[[], int]
) -> Watched:
    job = start_cli(address, inputs, output, *extra, log=log)
    try:
        seen = watch(address, lambda: job.poll() is None, count_outputs, gpus)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    assert job.returncode == 0, log.read_text(errors="replace")
    return seen


def check_run(
    seen: Watched,
    output: str,
    photos: dict[str, bytes],
    gpus: int,
    new_actors: dict[str, dict],
    output_exists: Callable[[str], bool],
    count_outputs: Callable[[], int],
) -> None:
    """One model actor per GPU, no GPU demand left pending, results while running, each photo once."""
    # Exactly one model actor per GPU, each started (it has a process). The pool is the only
    # actor pool of the job, and every row carries both models' names: each actor holds both.
    assert len(new_actors) == gpus, new_actors
    assert all(a["Pid"] for a in new_actors.values()), new_actors
    assert seen.gpu_peak == gpus and seen.actors_up is not None  # each actor held one whole GPU
    # Nothing asked for a GPU that it did not get once the actors were up.
    assert not seen.pending_after_actors_up(), seen.pending_after_actors_up()

    rows = read_manifest(Storage(f"{output}/manifest")).to_pylist()
    # Every photo exactly once: one ok row each, one output each, and nothing else in OUTPUT/images.
    assert sorted(r["relpath"] for r in rows) == sorted(photos)
    assert {r["status"] for r in rows} == {"ok"} and {r["attempt"] for r in rows} == {1}
    assert {(r["saliency_model"], r["depth_model"]) for r in rows} == {("trivial-saliency", "trivial-depth")}
    outputs = [r["output_uri"] for r in rows]
    assert len(set(outputs)) == len(photos) and all(output_exists(uri) for uri in outputs)
    assert count_outputs() == len(photos)

    # Results arrive while the job runs: an output was there while the job was still running
    # (seen.outputs is sampled only then), before the driver had received the last row.
    first_output = seen.first_output()
    assert first_output is not None, "no output seen while the job ran"
    last_row = max(r["finished_at"].timestamp() for r in rows)
    assert first_output < last_row, (first_output, last_row)


def check_streaming_on_disk(output: Path) -> None:
    """With more groups (3) than CPUs for the CPU stages (2), the stages stream only if the driver
    had rows before the last output was written: run one after the other over the whole
    library, every output would be written before the first row reached the driver."""
    rows = read_manifest(Storage(f"{output}/manifest")).to_pylist()
    first_row = min(r["finished_at"].timestamp() for r in rows)
    last_write = max(os.stat(r["output_uri"]).st_mtime for r in rows)
    assert first_row < last_write, (first_row, last_write)


# ---------------------------------------------------------------------------------------------
# One node with one GPU (and the job server, for the submitted job), one node with two GPUs.


@pytest.fixture(scope="module")
def one_gpu_head():
    cluster = RayCluster()
    try:
        cluster.start_head(num_gpus=1, dashboard=True).wait_for(nodes=1, gpus=1)
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def two_gpu_head():
    cluster = RayCluster()
    try:
        cluster.start_head(num_gpus=2).wait_for(nodes=1, gpus=2)
        yield cluster
    finally:
        cluster.stop()


@pytest.mark.parametrize("head, gpus", [("one_gpu_head", 1), ("two_gpu_head", 2)])
def test_one_model_actor_per_gpu_on_a_gpu_node(head, gpus, request, tmp_path):
    cluster: RayCluster = request.getfixturevalue(head)
    photos = make_photos()
    inputs, output = write_local(tmp_path / "in", photos), tmp_path / "out"
    before = model_actors(cluster.address)
    seen = run_cli(
        cluster.address,
        str(inputs),
        str(output),
        gpus=gpus,
        log=tmp_path / "job.log",
        count_outputs=local_outputs(output),
    )
    new_actors = {k: a for k, a in model_actors(cluster.address).items() if k not in before}
    check_run(seen, str(output), photos, gpus, new_actors, lambda uri: Path(uri).is_file(), local_outputs(output))
    check_streaming_on_disk(output)


def test_job_submitted_to_the_cluster(one_gpu_head, tmp_path):
    """jobs/run_library.py through Ray's job server, with the command of the README:
    `ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/run_library.py ...`."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    photos = make_photos()
    inputs, output = write_local(tmp_path / "in", photos), tmp_path / "out"
    client = JobSubmissionClient(one_gpu_head.dashboard_url)
    before = model_actors(one_gpu_head.address)
    job_id = f"layout-{uuid.uuid4().hex[:8]}"
    submit = subprocess.run(
        [
            str(VENV_BIN / "ray"),
            "job",
            "submit",
            "--address",
            one_gpu_head.dashboard_url,
            "--working-dir",
            ".",
            "--submission-id",
            job_id,
            "--no-wait",
            "--",
            "python",
            "jobs/run_library.py",
            str(inputs),
            str(output),
            "--address",
            "auto",
            *TRIVIAL,
        ],
        cwd=ROOT,
        env=ray_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert submit.returncode == 0, submit.stdout + submit.stderr
    try:
        seen = watch(
            one_gpu_head.address, lambda: not client.get_job_status(job_id).is_terminal(), local_outputs(output), gpus=1
        )
    finally:
        if not client.get_job_status(job_id).is_terminal():
            client.stop_job(job_id)
    info, logs = client.get_job_info(job_id), client.get_job_logs(job_id)
    assert info.status == JobStatus.SUCCEEDED, f"{info.status}: {info.message}\n{logs[-4000:]}"
    assert f"{N_PHOTOS} to process: ok {N_PHOTOS} " in logs
    new_actors = {k: a for k, a in model_actors(one_gpu_head.address).items() if k not in before}
    check_run(seen, str(output), photos, 1, new_actors, lambda uri: Path(uri).is_file(), local_outputs(output))
    check_streaming_on_disk(output)


def test_more_model_actors_than_gpus_show_as_pending_demand(one_gpu_head, tmp_path):
    """The check above can fail: two one-GPU actors on a one-GPU node leave a GPU demand pending."""
    inputs, output = write_local(tmp_path / "in", make_photos()), tmp_path / "out"
    job = start_cli(
        one_gpu_head.address,
        str(inputs),
        str(output),
        "--model-actors",
        "2",
        "--gpus-per-actor",
        "1",
        log=tmp_path / "job.log",
    )
    try:
        seen = watch(
            one_gpu_head.address,
            lambda: job.poll() is None,
            local_outputs(output),
            gpus=1,
            until=lambda w: bool(w.pending_after_actors_up()),
        )
        assert seen.pending_after_actors_up(), (tmp_path / "job.log").read_text(errors="replace")
        assert seen.pending_after_actors_up()[0][1] == {"GPU": 1.0}
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    # With its driver gone, the job's actors go, the pending one included.
    deadline = time.time() + 60
    while pending_gpu_demands(cluster_status(one_gpu_head.address)):
        assert time.time() < deadline, "the GPU demand outlived the job"
        time.sleep(0.25)


# ---------------------------------------------------------------------------------------------
# Several nodes: a head without GPUs, two one-GPU workers; INPUT and OUTPUT on S3.


@pytest.fixture(scope="module")
def gpu_workers_cluster(s3_server):  # the S3 endpoint first: Ray's processes inherit the environment
    cluster = RayCluster()
    try:
        cluster.start_head(num_gpus=0).add_workers(1, 1)
        cluster.wait_for(nodes=3, gpus=2)
        yield cluster
    finally:
        cluster.stop()


def test_one_model_actor_per_gpu_node_with_s3(gpu_workers_cluster, s3_bucket, tmp_path):
    import boto3

    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    bucket = s3_bucket.removeprefix("s3://")
    photos = make_photos()
    for relpath, data in photos.items():
        s3.put_object(Bucket=bucket, Key=f"photos/{relpath}", Body=data)

    def count_outputs() -> int:
        return s3.list_objects_v2(Bucket=bucket, Prefix="edited/images/").get("KeyCount", 0)

    def output_exists(uri: str) -> bool:
        key = uri.removeprefix(f"{s3_bucket}/")
        return s3.head_object(Bucket=bucket, Key=key)["ContentLength"] > 0

    address = gpu_workers_cluster.address
    before = model_actors(address)
    seen = run_cli(
        address,
        f"{s3_bucket}/photos",
        f"{s3_bucket}/edited",
        gpus=2,
        log=tmp_path / "job.log",
        count_outputs=count_outputs,
    )
    new_actors = {k: a for k, a in model_actors(address).items() if k not in before}
    check_run(seen, f"{s3_bucket}/edited", photos, 2, new_actors, output_exists, count_outputs)

    # One actor on each GPU node, none on the head.
    nodes = gpu_nodes(address)
    placed = [a["Address"]["NodeID"] for a in new_actors.values()]
    assert len(set(placed)) == 2 and all(nodes.get(node) == 1.0 for node in placed), (placed, nodes)
