"""The driver: starts Ray (or joins a cluster), streams the plan into a Ray Data dataset of
small photo groups, wires the stages, commits manifest rows as they arrive, and sums up.

    plan (listing + manifest)  -> groups of GROUP_SIZE photos (one model batch on CPUs alone)
    -> read_stage (CPU tasks) -> ModelStage (one actor per GPU, both models) -> finish_stage (CPU tasks)
    -> manifest rows, committed in atomically written Parquet parts

Model weights are resolved and checked before Ray starts (a run that cannot have them ends in
one line, having started nothing) and travel to the model actors through Ray's object store
(job/weights.py).
"""

from __future__ import annotations

import array
import collections
import contextlib
import functools
import itertools
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from ..backend import render_backend_for
from ..errors import RETRIED_KINDS, OutputError, SourceVanishedError
from ..manifest import (
    FAILED,
    MANIFEST_DIR,
    OTHER_FILES,
    SKIPPED,
    ManifestWriter,
    OtherFilesWriter,
    compact_manifest,
    key_of,
    new_run_id,
)
from ..models import DEPTH, SALIENCY
from ..storage import Storage, retried_total
from .console import Progress, without_native_noise
from .lease import RENEW_SECONDS, Lease
from .plan import IMAGES_DIR, JobConfig, OtherFile, PlanItem, check_locations, make_plan
from .stages import ModelStage, finish_stage, job_manifest_rows, read_stage
from .weights import JobModel, resolve_models, ship

log = logging.getLogger(__name__)

# Photos per group entering the dataset: a group is one read task, one block between stages and
# one finish task. Tens, not thousands, so every core is busy from the start and results flow
# out as groups are done; not fewer, as each group costs Ray Data about 80 ms of scheduling.
GROUP_SIZE = 16
PLAN_CHUNK = 2000  # plan rows per object put into Ray's object store as the listing proceeds
MAX_FAILING_WRITES = 8
MAX_DATASET_RESTARTS = 3  # starts of the dataset again, for the photos left, after the cluster lost a part


@dataclass
class JobSummary:
    run_id: str
    planned: int
    counts: dict[str, int]
    skipped: dict[str, int]
    seconds: float  # the whole run, start-up included
    processing_seconds: float  # from the first photo's start to the last row
    output: str
    others: dict[str, int]  # files that are no photos (videos, sidecars, documents): extension -> files
    faults: list[str] = field(default_factory=list)  # what went wrong beside the photos, one line each

    def lines(self) -> list[str]:
        done = ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items())) or "nothing to do"
        kept = ", ".join(f"{v} {k}" for k, v in sorted(self.skipped.items()))
        others = ", ".join(f"{v} {k}" for k, v in sorted(self.others.items(), key=lambda kv: (-kv[1], kv[0])))
        return [
            f"run {self.run_id}: {self.planned} to process: {done} in {self.seconds:.1f} s "
            f"({self.processing_seconds:.1f} s processing)",
            *self.faults,
            *([f"left alone: {kept}"] if kept else []),
            *(
                [f"not photos, not processed: {others} (`dreamfocus status {self.output} --other-files` lists them)"]
                if others
                else []
            ),
            f"results: {self.output}/{IMAGES_DIR}  manifest: {self.output}/{MANIFEST_DIR}",
        ]


def run_job(config: JobConfig) -> JobSummary:
    """Plan, then process what is left; returns counts.

    A run refuses at once where another job holds OUTPUT's lease (OutputBusyError), and takes
    the lease itself once its plan has work, before anything is written or processed. The plan
    streams: to-do items go to Ray's object store in chunks as the listing proceeds, so the
    driver's memory does not grow with the library. Ray starts only if there is work, and only
    once every model's weights are found and checked (WeightsUnavailableError, with nothing
    started or written, where they cannot be had). Rows are committed every
    config.commit_every photos and at least every config.commit_seconds.
    """
    started = time.perf_counter()
    retried_here = retried_total()  # the driver's own: listing, manifest, lease
    inputs, output = check_locations(config)
    run_id = new_run_id()
    manifest = Storage(f"{output.uri}/{MANIFEST_DIR}", config.storage_options)
    lease = None if config.dry_run else Lease(output, run_id)
    if lease is not None:
        lease.check()
    with contextlib.ExitStack() as held:
        skipped: dict[str, int] = {}
        others: dict[str, int] = {}
        other_files = None if config.dry_run else OtherFilesWriter()
        planned, chunk, chunk_refs, refused = 0, [], [], []
        models: dict[str, JobModel] | None = None
        for item in make_plan(config, inputs, output):
            if isinstance(item, str):
                skipped[item] = skipped.get(item, 0) + 1
            elif isinstance(item, OtherFile):
                others[item.extension] = others.get(item.extension, 0) + 1
                if other_files is not None:
                    other_files.add(item.source.relpath, item.extension, item.source.size)
            elif config.limit is not None and planned >= config.limit:
                skipped["over --limit"] = skipped.get("over --limit", 0) + 1
            elif config.dry_run:
                planned += 1
                if item.error:
                    print(f"would record {item.source.relpath} as {item.error.kind}: {item.error}")
                else:
                    print(f"would process {item.source.relpath} -> {IMAGES_DIR}/{item.output_relpath} ({item.reason})")
            elif item.error:
                planned += 1
                refused.append(item)
            else:
                planned += 1
                if models is None:  # the first photo to process: the weights, before Ray starts
                    models = resolve_models(config)
                chunk.append(item)
                if len(chunk) == PLAN_CHUNK:
                    chunk_refs.append(_put_tasks(config, chunk))
                    chunk = []
        if chunk:
            chunk_refs.append(_put_tasks(config, chunk))

        counts: dict[str, int] = {}
        seen = RunFaults()
        processing_started = ended = time.perf_counter()
        if lease is not None and (chunk_refs or refused):
            lease.acquire()  # of runs planned at once, one goes on; nothing was written before
            held.callback(lease.release)
            ticker = held.enter_context(Ticker(lease))
            merged = compact_manifest(manifest)
            if merged:
                log.info("merged %d manifest parts into one", merged)
            writer = ManifestWriter(manifest, run_id, config.commit_every, config.commit_seconds)
            console = sys.stderr
            if chunk_refs and not logging.getLogger().isEnabledFor(logging.INFO):
                console = held.enter_context(without_native_noise())  # Ray is up: its lines from now on
            progress = Progress(planned, console)
            ticker.follow(writer, progress)
            tally = RowTally(writer, progress, output.uri, seen)
            counts = tally.counts
            rows = _rows(config, inputs, chunk_refs, run_id, models, seen) if chunk_refs and models else iter(())
            try:
                with writer.committing():  # parts are written beside this loop
                    for table in itertools.chain(_refused_rows(refused, inputs, config, run_id), rows):
                        ticker.check()
                        tally.add(table)
            finally:
                ticker.follow(None, None)
                progress.close()
                if hasattr(rows, "close"):
                    rows.close()  # stops the dataset's workers now when the loop ended early
            ended = time.perf_counter()
            seen.failed_commits = writer.failed_commits
        if other_files is not None and (others or output.exists(OTHER_FILES)):
            other_files.close(output)  # replaces the last run's listing
    seen.driver_retries = retried_total() - retried_here
    return JobSummary(
        run_id, planned, counts, skipped, ended - started, ended - processing_started, output.uri, others, seen.lines()
    )


class RowTally:
    """The driver's part in a row's life: commit the manifest rows the workers made, count them
    for the progress line and the summary, and stop a job whose every write fails."""

    def __init__(self, writer: ManifestWriter, progress: Progress, output_uri: str, seen: RunFaults) -> None:
        self.writer, self.progress, self.output_uri, self.seen = writer, progress, output_uri, seen
        self.counts: dict[str, int] = {}
        self.failing_writes = 0

    def add(self, rows: pa.Table) -> None:
        self.writer.add_table(rows)
        self.seen.add(rows)
        for status, n in collections.Counter(rows.column("status").to_pylist()).items():
            self.counts[status] = self.counts.get(status, 0) + n
            self.progress.add(status, n)
        # A full or read-only OUTPUT fails every photo: stop instead of failing them all.
        for i, kind in enumerate(rows.column("error_kind").to_pylist()):
            self.failing_writes = self.failing_writes + 1 if kind == OutputError.kind else 0
            if self.failing_writes >= MAX_FAILING_WRITES:
                error = rows.column("error")[i].as_py()
                raise OutputError(
                    f"{self.output_uri}: {self.failing_writes} writes in a row failed, stopping (last: {error})"
                )


@dataclass
class RunFaults:
    """What went wrong beside the photos during a run, and what became of it: the run's summary
    says so in one line each, so a fault the job survived is seen, not only the ones it lost."""

    photo_retries: int = 0  # transient storage errors met reading and writing photos (workers)
    driver_retries: int = 0  # ... listing, committing the manifest, renewing the lease (driver)
    failed_commits: int = 0  # manifest commits that failed while the run went on
    replaced: int = 0  # photos replaced after the listing: the version read is the one recorded
    # kind -> photos a plain rerun retries
    not_their_own: collections.Counter[str] = field(default_factory=collections.Counter)
    vanished: int = 0  # photos deleted after the listing
    model_restarts: int = 0  # model actors restarted mid-run
    lost_nodes: list[str] = field(default_factory=list)
    restarts: list[str] = field(default_factory=list)  # why the dataset was started again

    def add(self, rows: pa.Table) -> None:
        """The manifest rows of a group of photos."""
        # A group is tens of rows: plain Python over them costs less than Arrow calls here.
        self.photo_retries += sum(n for n in rows.column("storage_retries").to_pylist() if n)
        self.replaced += sum(1 for changed in rows.column("source_changed").to_pylist() if changed)
        for kind in rows.column("error_kind").to_pylist():
            if kind in RETRIED_KINDS:
                self.not_their_own[kind] += 1
            elif kind == SourceVanishedError.kind:
                self.vanished += 1

    def lines(self) -> list[str]:
        out = []
        if self.photo_retries or self.driver_retries:
            out.append(
                f"storage: {_many(self.photo_retries + self.driver_retries, 'transient error')} "
                f"(throttling, 5xx, dropped connections) retried: {self.photo_retries} reading or writing photos, "
                f"{self.driver_retries} listing or committing the manifest"
            )
        if self.failed_commits:
            out.append(f"manifest: {_many(self.failed_commits, 'commit')} failed; their rows went with a later one")
        if self.replaced:
            replaced = _many(self.replaced, "photo")
            out.append(f"{replaced} replaced after the listing: the version read is the one recorded")
        if self.vanished:
            out.append(f"{_many(self.vanished, 'photo')} deleted after the listing: left alone")
        if self.model_restarts:
            out.append(f"model actors: {_many(self.model_restarts, 'restart')} mid-run; their batches were redone")
        out += [f"dataset started again: {why}" for why in self.restarts]
        if self.lost_nodes:
            out.append(f"nodes lost mid-run: {', '.join(self.lost_nodes)}; their work was redone on the others")
        if self.not_their_own:
            kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(self.not_their_own.items()))
            out.append(f"failed for reasons not their own: {kinds}; a plain rerun retries them")
        return out


def _many(n: int, thing: str) -> str:
    return f"{n} {thing}" if n == 1 else f"{n} {thing}s"


class Ticker:
    """Once a second, beside the driver's loop: renew OUTPUT's lease, commit rows that are due
    and redraw the progress line. The loop waits on Ray; this goes on meanwhile."""

    def __init__(self, lease: Lease, period: float = 1.0) -> None:
        self.lease, self.period = lease, period
        self.writer: ManifestWriter | None = None
        self.progress: Progress | None = None
        self.error: BaseException | None = None
        self.renewed = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dreamfocus-ticker", daemon=True)

    def __enter__(self) -> Ticker:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def follow(self, writer: ManifestWriter | None, progress: Progress | None) -> None:
        self.writer, self.progress = writer, progress

    def check(self) -> None:
        """Raise, in the driver's loop, what went wrong beside it (say, a lease taken over)."""
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            try:
                if time.monotonic() - self.renewed >= RENEW_SECONDS:
                    self.lease.renew()
                    self.renewed = time.monotonic()
                writer, progress = self.writer, self.progress
                if writer is not None:
                    writer.flush_if_due()
                if progress is not None:
                    progress.show()
            except Exception as exc:  # noqa: BLE001 - handed to the driver's loop
                log.debug("ticker", exc_info=True)
                self.error = self.error or exc


def _put_tasks(config: JobConfig, items: list[PlanItem]):
    import ray

    _start_ray(config)
    return ray.put(
        pa.table(
            {
                "relpath": [it.source.relpath for it in items],
                "source_size": pa.array([it.source.size for it in items], pa.int64()),
                "source_fingerprint": [it.source.fingerprint for it in items],
                "output_relpath": [it.output_relpath for it in items],
                "attempt": pa.array([it.attempt for it in items], pa.int32()),
            }
        )
    )


def _start_ray(config: JobConfig) -> None:
    """An embedded local Ray, or the cluster at config.address; an already started Ray is used.

    Ray's own console output (progress bars, worker log lines, its C++ error lines such as Ray
    Data's note on actor constructor arguments) shows only with --verbose: the job's progress
    line and manifest say what happened to each photo, and Ray's log files keep the rest.
    """
    verbose = logging.getLogger().isEnabledFor(logging.INFO)
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "INFO" if verbose else "WARNING")
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    import ray

    if not ray.is_initialized():
        ray.init(
            address=config.address,
            num_cpus=None if config.address else config.cpu_workers,
            include_dashboard=False,
            logging_level=logging.INFO if verbose else logging.WARNING,
            log_to_driver=verbose,
        )
    ray.data.DataContext.get_current().enable_progress_bars = verbose
    if not verbose:  # "progress bars disabled": ours replace them
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


@dataclass(frozen=True)
class ModelLayout:
    """How the model actors sit on the cluster: one per GPU by default, each holding both models."""

    actors: int
    gpus_per_actor: float
    device: str
    batch_size: int


def model_layout(config: JobConfig, cluster_gpus: float) -> ModelLayout:
    gpus_per_actor = config.gpus_per_actor if config.gpus_per_actor is not None else (1.0 if cluster_gpus else 0.0)
    default_actors = max(1, int(cluster_gpus // gpus_per_actor)) if gpus_per_actor else 1
    return ModelLayout(
        actors=config.model_actors or default_actors,
        gpus_per_actor=gpus_per_actor,
        device=config.device or ("cuda" if gpus_per_actor else "cpu"),
        batch_size=config.model_batch_size or (16 if gpus_per_actor else 4),
    )


def _rows(
    config: JobConfig, inputs: Storage, chunk_refs: list, run_id: str, models: dict[str, JobModel], seen: RunFaults
) -> Iterator[pa.Table]:
    """The dataset's rows; where the dataset fails (a model actor killed for good, a node lost
    with what it held: every photo's own failure is its row, so what stops the dataset is the
    cluster), it starts again for the photos that have no row yet, up to MAX_DATASET_RESTARTS."""
    import ray

    nodes_before, since_ms = _alive_nodes(), time.time() * 1000
    done = array.array("q")  # 64-bit keys of the relpaths with a row (8 bytes a photo), for a restart
    try:
        for restart in range(MAX_DATASET_RESTARTS + 1):
            try:
                for rows in _execute(config, inputs, chunk_refs, run_id, models):
                    done.extend(int(key_of(relpath)) for relpath in rows.column("relpath").to_pylist())
                    yield rows
                return
            except ray.exceptions.RayError as exc:
                if restart == MAX_DATASET_RESTARTS:
                    raise
                settled = np.frombuffer(done, dtype=np.int64).copy()  # a view would pin `done`
                chunk_refs = [ray.put(_without(ray.get(ref), settled)) for ref in chunk_refs]
                left = sum(ray.get(ref).num_rows for ref in chunk_refs)
                log.warning("the dataset stopped (%s); starting it again for the %d photos left", exc, left)
                seen.restarts.append(f"{_lost_what(exc)} ({type(exc).__name__}): {left} photos left")
    finally:
        seen.model_restarts = _model_actor_restarts(since_ms)
        seen.lost_nodes = sorted(nodes_before - _alive_nodes())


def _without(table: pa.Table, done: np.ndarray) -> pa.Table:
    keys = np.array([key_of(relpath) for relpath in table.column("relpath").to_pylist()], dtype=np.int64)
    return table.filter(pa.array(~np.isin(keys, done)))


def _lost_what(exc: BaseException) -> str:
    """What a dataset's failure says was lost, in a few words."""
    import ray

    if isinstance(exc, ray.exceptions.NodeDiedError):
        return "a node was lost"
    if isinstance(exc, ray.exceptions.ActorDiedError):
        return "a model actor was lost" if "ModelStage" in str(exc) else "an actor was lost"
    if isinstance(exc, ray.exceptions.ObjectLostError):
        return "data held by a lost node or worker"
    return "a worker was lost"


def _execute(
    config: JobConfig, inputs: Storage, chunk_refs: list, run_id: str, models: dict[str, JobModel]
) -> Iterator[pa.Table]:
    """The photos' manifest rows, a group's table at a time, as the dataset finishes them."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.verbose_stats_logs = False
    cluster_gpus = ray.cluster_resources().get("GPU", 0)
    layout = model_layout(config, cluster_gpus)
    if layout.gpus_per_actor and cluster_gpus < layout.gpus_per_actor * layout.actors:
        log.warning(
            "%d model actors ask for %g GPU each and the cluster has %g GPUs now: they wait until "
            "GPU nodes join (an autoscaler starts them; without one, the job waits)",
            layout.actors,
            layout.gpus_per_actor,
            cluster_gpus,
        )

    # The plan arrives in large chunks (cheap to hold); streaming repartition cuts them into
    # groups without a shuffle, so reading fans out over the cluster's CPUs.
    # On CPUs alone the model takes seconds a photo: groups of one model batch, so the first
    # results come after one batch and the CPU stages of a group run while the model works on
    # the next one.
    group = GROUP_SIZE if layout.gpus_per_actor else layout.batch_size
    ds = ray.data.from_arrow_refs(chunk_refs).repartition(target_num_rows_per_block=group)
    # With the torch render backend the model actor decodes: the read tasks only read bytes.
    on_device = render_backend_for(config.render_backend, layout.device) == "torch"
    read = functools.partial(
        read_stage,
        input_uri=inputs.uri,
        storage_options=config.storage_options,
        max_megapixels=config.max_megapixels,
        model_copy=not on_device,
    )
    ds = ds.map_batches(read, batch_size=group, batch_format="pyarrow", num_cpus=1)
    ds = ds.map_batches(
        ModelStage,
        fn_constructor_args=(
            models[SALIENCY].name,
            models[DEPTH].name,  # the ground prior where the driver found no depth weights
            None,  # the weights come with the shipment
            None,
            layout.device,
            layout.batch_size,
            ship(models),
            config.render_settings() if on_device else None,
            config.runtime,
        ),
        batch_size=layout.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=layout.actors),
        num_gpus=layout.gpus_per_actor,
        num_cpus=config.cpus_per_actor,
    )
    finish = functools.partial(finish_stage, config=config, run_id=run_id, source_root=inputs.uri)
    ds = ds.map_batches(finish, batch_size=None, batch_format="pyarrow", num_cpus=1)

    # No prefetch: with one, Ray Data holds each finished group back until the next is done too.
    yield from ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0)  # type: ignore[misc]


def _alive_nodes() -> set[str]:
    """The cluster's live nodes, as "<address> (<node id>)"."""
    import ray

    return {f"{n['NodeManagerAddress']} ({n['NodeID'][:8]})" for n in ray.nodes() if n["Alive"]}


def _model_actor_restarts(since_ms: float) -> int:
    """Restarts of this run's model actors (Ray restarts one that died: killed, out of memory)."""
    from ray._private import state  # the actor table; ray.util.state needs the dashboard

    return sum(
        int(a.get("NumRestarts") or 0)
        for a in state.actors().values()
        if "ModelStage" in a.get("ActorClassName", "") and (a.get("StartTime") or 0) >= since_ms
    )


def _refused_rows(items: list[PlanItem], inputs: Storage, config: JobConfig, run_id: str) -> Iterator[pa.Table]:
    """The rows the listing decided (an unsafe name, a pair's other half), PLAN_CHUNK at a time."""
    for start in range(0, len(items), PLAN_CHUNK):
        rows = []
        for item in items[start : start + PLAN_CHUNK]:
            assert item.error is not None
            leaves_alone = item.error.leaves_alone  # say, the RAW of a RAW + JPEG pair
            rows.append(
                {
                    "relpath": item.source.relpath,
                    "source_size": item.source.size,
                    "source_fingerprint": item.source.fingerprint,
                    "attempt": item.attempt,
                    "status": SKIPPED if leaves_alone else FAILED,
                    "error_kind": item.error.kind,
                    "error": "" if leaves_alone else str(item.error),
                    "reason": str(item.error) if leaves_alone else "",
                }
            )
        yield job_manifest_rows(pa.Table.from_pylist(rows), config, run_id, inputs.uri)
