"""The driver: starts Ray (or joins a cluster), streams the plan into a Ray Data dataset of
small photo groups, wires the stages, commits manifest rows as they arrive, and sums up. On one
machine without a GPU the same stages run in this process instead (runner_for, local.py).

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
import dataclasses
import functools
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from typing import Any

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
from ..models.base import CPU_STREAMS, cpu_threads, default_device
from ..storage import Storage, retried_total
from .console import Progress, without_native_noise
from .lease import RENEW_SECONDS, Lease
from .local import LocalFeed, run_stages
from .plan import IMAGES_DIR, JobConfig, OtherFile, PlanItem, check_locations, make_plan
from .stages import ModelStage, finish_stage, job_manifest_rows, read_stage
from .weights import JobModel, Shipment, resolve_models, ship

log = logging.getLogger(__name__)

# Photos per group entering the dataset: a group is one read task, one block between stages and
# one finish task. Tens, not thousands, so every core is busy from the start and results flow
# out as groups are done; not fewer, as each group costs Ray Data about 80 ms of scheduling.
GROUP_SIZE = 16
# Device batches (of a model batch each) per call of the model stage with the torch render
# backend: within a call they overlap (device_render: one decoded, one in the models, one in the
# effect, one encoded), so the device idles only at a call's first decode and last encode.
DEVICE_BATCHES_PER_CALL = 4
PLAN_CHUNK = 2000  # plan rows per object put into Ray's object store as the listing proceeds
STOP_SECONDS = 10.0  # the planning thread's time to stop where the run ends early
FLUSH_SECONDS = 0.5  # ... or fewer, this long after the chunk's first photo: the first photos go at once
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
    """Plan and process what is left, at once; returns counts.

    A run refuses at once where another job holds OUTPUT's lease (OutputBusyError). The plan is
    made on a thread (Planner) and streams into the dataset as the listing proceeds, so the
    first photos are processed, and Ray and the model actors start, while the listing goes on,
    and the driver's memory does not grow with the library. At the first photo to process,
    every model's weights are found and checked (WeightsUnavailableError, with nothing started
    or written, where they cannot be had), then the run takes OUTPUT's lease, before anything is
    written or processed, and starts Ray; a run with no photo to process starts no Ray (and
    takes the lease only for the rows its listing decides). Rows are committed every
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
        other_files = None if config.dry_run else OtherFilesWriter()
        planner = held.enter_context(Planner(config, inputs, output, run_id, other_files))
        planner.photo_or_end.wait()  # what comes before the first photo to process needs no lease
        counts: dict[str, int] = {}
        seen = RunFaults()
        models: dict[str, JobModel] | None = None
        processing_started = ended = time.perf_counter()
        if lease is not None and planner.planned:
            if planner.photos:  # the weights, before Ray starts and before the lease
                models = resolve_models(config)
            lease.acquire()  # of runs planned at once, one goes on; nothing was written before
            held.callback(lease.release)
            ticker = held.enter_context(Ticker(lease))
            runner = None if models is None else runner_for(config)
            if runner == "ray":
                _start_ray(config)
                planner.ray_started()  # the chunks planned so far go to Ray's object store
            elif runner == "local":
                planner.run_locally()
            merged = compact_manifest(manifest)
            if merged:
                log.info("merged %d manifest parts into one", merged)
            writer = ManifestWriter(manifest, run_id, config.commit_every, config.commit_seconds)
            console = sys.stderr
            if runner == "ray" and not logging.getLogger().isEnabledFor(logging.INFO):
                console = held.enter_context(without_native_noise())  # Ray is up: its lines from now on
            progress = Progress(planner.planned, console, listing=True)
            planner.follow(progress)
            ticker.follow(writer, progress)
            tally = RowTally(writer, progress, output.uri, seen)
            counts = tally.counts
            rows = _tables(config, inputs, planner, run_id, models, seen)
            try:
                with writer.committing():  # parts are written beside this loop
                    for table in rows:
                        ticker.check()
                        planner.check()
                        tally.add(table)
            finally:
                ticker.follow(None, None)
                planner.follow(None)
                progress.close()
                rows.close()  # stops the dataset's workers now when the loop ended early
            ended = time.perf_counter()
            seen.failed_commits = writer.failed_commits
        planner.finish()  # the plan's own error, if it had one, is the run's
        if other_files is not None and (planner.others or output.exists(OTHER_FILES)):
            other_files.close(output)  # replaces the last run's listing
    seen.driver_retries = retried_total() - retried_here
    return JobSummary(
        run_id,
        planner.planned,
        counts,
        planner.skipped,
        ended - started,
        ended - processing_started,
        output.uri,
        planner.others,
        seen.lines(),
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


def _chunk_table(items: list[PlanItem]) -> pa.Table:
    """The photos to process of a chunk of the plan, as the dataset's rows."""
    return pa.table(
        {
            "relpath": [it.source.relpath for it in items],
            "source_size": pa.array([it.source.size for it in items], pa.int64()),
            "source_fingerprint": [it.source.fingerprint for it in items],
            "output_relpath": [it.output_relpath for it in items],
            "attempt": pa.array([it.attempt for it in items], pa.int32()),
        }
    )


class Planner:
    """The plan, made on a thread beside the run: what is left alone is counted, the files that
    are no photos listed, the rows the listing decides made (refused items, handed to the
    driver's loop), and the photos to process sent on in chunks as the listing goes: PLAN_CHUNK
    photos, or fewer once a chunk's first photo is FLUSH_SECONDS old, so the first photos move
    at once. Until Ray is up, chunks wait here as Arrow tables; then they go to Ray's object
    store (`chunk_refs`, kept for a restart of the dataset) and to the running dataset's feed
    (feed.py), or, with the local runner, to its LocalFeed (local.py). Only counts and the chunk
    being made are kept, never the whole plan."""

    def __init__(
        self, config: JobConfig, inputs: Storage, output: Storage, run_id: str, other_files: OtherFilesWriter | None
    ) -> None:
        self.config, self.inputs, self.output, self.run_id = config, inputs, output, run_id
        self.other_files = other_files
        self.skipped: collections.Counter[str] = collections.Counter()  # reason -> photos left alone
        self.others: collections.Counter[str] = collections.Counter()  # extension -> files that are no photos
        self.planned = 0  # photos to process and rows the listing decides
        self.photos = 0  # photos to process
        self.error: BaseException | None = None
        self.photo_or_end = threading.Event()  # the first photo to process is planned, or the plan is done
        self.chunk_refs: list[tuple[Any, int]] = []  # (ObjectRef of a chunk table, its rows)
        self._lock = threading.Lock()  # what follows, shared with the driver's loop and the flusher
        self._done = False  # the plan is made (or failed) and every chunk flushed
        self._chunk: list[PlanItem] = []
        self._chunk_since = 0.0
        self._refusing: list[PlanItem] = []
        self._refused: collections.deque[pa.Table] = collections.deque()
        self._unsent: list[pa.Table] = []  # chunks made before Ray is up
        self._ray_up = False
        self._feed: Any = None  # the running dataset's PlanFeed actor
        self.local_feed: LocalFeed | None = None  # ... or the local runner's feed
        self._fed = 0  # chunks added to it
        self._progress: Progress | None = None
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._plan, name="dreamfocus-plan", daemon=True),
            threading.Thread(target=self._flush_on_time, name="dreamfocus-plan-flush", daemon=True),
        ]

    def __enter__(self) -> Planner:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:  # done already, but where the run stopped early
            thread.join(timeout=STOP_SECONDS)  # a listing call that hangs does not hold the run's end
        if self._feed is not None:
            import ray

            ray.kill(self._feed)

    def wait(self) -> None:
        for thread in self._threads:
            thread.join()

    def finish(self) -> None:
        """Wait for the plan's end; raise its error, if it had one."""
        self.wait()
        self.check()

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    @property
    def done(self) -> bool:
        return self._done

    def _plan(self) -> None:
        try:
            for item in make_plan(self.config, self.inputs, self.output):  # its listing threads end with it
                if self._stop.is_set():
                    break
                self._take(item)
        except BaseException as exc:  # noqa: BLE001 - raised in the driver's loop
            self.error = exc
        finally:
            with self._lock:
                self._flush()
                self._done = True
                if self.local_feed is not None:
                    self.local_feed.end()
                if self._feed is not None:
                    self._feed.end.remote(self._fed)
                if self._progress is not None:
                    self._progress.set_total(self.planned, listing=False)
            self.photo_or_end.set()

    def _take(self, item: PlanItem | OtherFile | str) -> None:
        config = self.config
        if isinstance(item, str):
            self.skipped[item] += 1
        elif isinstance(item, OtherFile):
            self.others[item.extension] += 1
            if self.other_files is not None:
                self.other_files.add(item.source.relpath, item.extension, item.source.size)
        elif config.limit is not None and self.planned >= config.limit:
            self.skipped["over --limit"] += 1
        elif config.dry_run:
            self.planned += 1
            if item.error:
                print(f"would record {item.source.relpath} as {item.error.kind}: {item.error}")
            else:
                print(f"would process {item.source.relpath} -> {IMAGES_DIR}/{item.output_relpath} ({item.reason})")
        else:
            with self._lock:
                self.planned += 1
                if item.error:
                    self._refusing.append(item)
                    if len(self._refusing) >= PLAN_CHUNK:
                        self._flush_refused()
                else:
                    self.photos += 1
                    if not self._chunk:
                        self._chunk_since = time.monotonic()
                    self._chunk.append(item)
                    if len(self._chunk) >= PLAN_CHUNK:
                        self._flush_chunk()
            if self.photos == 1 and not item.error:
                self.photo_or_end.set()

    def _flush_on_time(self) -> None:
        """A chunk goes at most FLUSH_SECONDS after its first photo, even while the listing waits."""
        while not self._stop.wait(FLUSH_SECONDS / 2) and not self._done:
            with self._lock:
                if self._chunk and time.monotonic() - self._chunk_since >= FLUSH_SECONDS:
                    self._flush()
                if self._progress is not None and not self._done:
                    self._progress.set_total(self.planned, listing=True)

    def _flush(self) -> None:
        self._flush_chunk()
        self._flush_refused()

    def _flush_refused(self) -> None:
        if self._refusing:
            self._refused.extend(_refused_rows(self._refusing, self.inputs, self.config, self.run_id))
            self._refusing = []

    def _flush_chunk(self) -> None:
        if self._chunk:
            table, self._chunk = _chunk_table(self._chunk), []
            if self.local_feed is not None:
                self.local_feed.add(table)
            elif self._ray_up:
                self._send(table)
            else:
                self._unsent.append(table)

    def _send(self, table: pa.Table) -> None:
        import ray

        ref = ray.put(table)
        self.chunk_refs.append((ref, table.num_rows))
        if self._feed is not None:
            self._feed.add.remote([ref], [table.num_rows])
            self._fed += 1

    def ray_started(self) -> None:
        with self._lock:
            self._ray_up = True
            for table in self._unsent:
                self._send(table)
            self._unsent = []

    def run_locally(self) -> None:
        """The chunks planned so far, and those to come, go to the local runner's feed."""
        with self._lock:
            self.local_feed = LocalFeed()
            for table in self._unsent:
                self.local_feed.add(table)
            self._unsent = []
            if self._done:
                self.local_feed.end()

    def follow(self, progress: Progress | None) -> None:
        """Raise `progress`'s total as the plan grows."""
        with self._lock:
            if progress is not None:
                progress.set_total(self.planned, listing=not self._done)
            self._progress = progress

    def refused(self) -> Iterator[pa.Table]:
        """The rows the listing decided since the last call."""
        while self._refused:
            yield self._refused.popleft()

    def source(self, settled: np.ndarray | None = None):
        """A source for a new run of the dataset: every chunk so far (less the photos whose keys
        are `settled`, on a restart), then those planned from now on."""
        import ray

        from .feed import PlanDatasource, new_feed

        with self._lock:
            if self._feed is not None:
                ray.kill(self._feed)
            if settled is not None:
                tables = (_without(ray.get(ref), settled) for ref, _ in self.chunk_refs)
                self.chunk_refs = [(ray.put(table), table.num_rows) for table in tables if table.num_rows]
            self._feed, self._fed = new_feed(), len(self.chunk_refs)
            if self.chunk_refs:
                self._feed.add.remote([ref for ref, _ in self.chunk_refs], [rows for _, rows in self.chunk_refs])
            if self._done:
                self._feed.end.remote(self._fed)
            return PlanDatasource(self._feed, PLAN_CHUNK, FLUSH_SECONDS)

    def rows_left(self) -> int:
        """The photos of the chunks sent so far (less those settled at the last restart)."""
        return sum(rows for _, rows in self.chunk_refs)


def _tables(
    config: JobConfig,
    inputs: Storage,
    planner: Planner,
    run_id: str,
    models: dict[str, JobModel] | None,
    seen: RunFaults,
) -> Generator[pa.Table, None, None]:
    """The run's manifest rows: the dataset's as it finishes photos, with the rows the listing
    decides in between, as the plan gives them."""
    if models is not None:
        if planner.local_feed is not None:
            processed = _local_rows(config, inputs, planner.local_feed, run_id, models)
        else:
            processed = _rows(config, inputs, planner, run_id, models, seen)
        for rows in processed:
            yield from planner.refused()
            yield rows
    planner.wait()  # done already: the dataset ends only once the plan is
    yield from planner.refused()


def runner_for(config: JobConfig) -> str:
    """local or ray: what config.runner says, or for auto, local for a job on this machine
    without a GPU (the model is the work there, one instance on every core) where no Ray runs
    or is named (RAY_ADDRESS) already, else ray."""
    if config.runner != "auto":
        return config.runner
    ray = sys.modules.get("ray")
    if config.address or os.environ.get("RAY_ADDRESS") or (ray is not None and ray.is_initialized()):
        return "ray"
    if (config.model_actors or 1) > 1 or config.gpus_per_actor:
        return "ray"
    return "local" if (config.device or default_device()) == "cpu" else "ray"


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


def model_call_rows(layout: ModelLayout, on_device: bool) -> int:
    """Photos per call of the model stage: a model batch, or DEVICE_BATCHES_PER_CALL of them
    on the device path, whose batches overlap within a call."""
    return layout.batch_size * (DEVICE_BATCHES_PER_CALL if on_device else 1)


def _rows(
    config: JobConfig, inputs: Storage, planner: Planner, run_id: str, models: dict[str, JobModel], seen: RunFaults
) -> Iterator[pa.Table]:
    """The dataset's rows; where the dataset fails (a model actor killed for good, a node lost
    with what it held: every photo's own failure is its row, so what stops the dataset is the
    cluster), it starts again for the photos that have no row yet, those planned since included,
    up to MAX_DATASET_RESTARTS. It ends once the plan is done and every photo has its row."""
    import ray

    nodes_before, since_ms = _alive_nodes(), time.time() * 1000
    done = array.array("q")  # 64-bit keys of the relpaths with a row (8 bytes a photo), for a restart
    source = planner.source()
    try:
        for restart in range(MAX_DATASET_RESTARTS + 1):
            try:
                with contextlib.closing(_execute(config, inputs, source, run_id, models)) as execution:
                    for rows in execution:
                        done.extend(int(key_of(relpath)) for relpath in rows.column("relpath").to_pylist())
                        yield rows
                        if _all_in(planner, done):  # the pulls left would give nothing
                            return
                return
            except ray.exceptions.RayError as exc:
                planner.check()  # a failed listing stops the run, not the dataset
                if restart == MAX_DATASET_RESTARTS:
                    raise
                source = planner.source(np.frombuffer(done, dtype=np.int64).copy())  # a view would pin `done`
                left = planner.rows_left()
                log.warning("the dataset stopped (%s); starting it again for the %d photos left", exc, left)
                seen.restarts.append(f"{_lost_what(exc)} ({type(exc).__name__}): {left} photos left")
    finally:
        seen.model_restarts = _model_actor_restarts(since_ms)
        seen.lost_nodes = sorted(nodes_before - _alive_nodes())


def _all_in(planner: Planner, done: array.array) -> bool:
    """Whether the plan is done and each of its photos has a row."""
    if not planner.done or len(done) < planner.photos:
        return False
    return bool(np.unique(np.frombuffer(done, dtype=np.int64)).size >= planner.photos)


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
    config: JobConfig, inputs: Storage, source, run_id: str, models: dict[str, JobModel]
) -> Generator[pa.Table, None, None]:
    """The photos' manifest rows, a group's table at a time, as the dataset finishes them."""
    import ray

    from .feed import plan_groups

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

    # The plan arrives in blocks of chunks as it is made (feed.py: read tasks one at a time);
    # a streaming repartition cuts them into groups without a shuffle, so reading fans out
    # over the cluster's CPUs. While the listing goes on, only whole groups of model batches
    # come: a batch waits for no photo that is yet to be planned.
    # On CPUs alone the model takes seconds a photo: groups of one model batch, so the first
    # results come after one batch and the CPU stages of a group run while the model works on
    # the next one.
    on_device = render_backend_for(config.render_backend, layout.device) == "torch"
    call = model_call_rows(layout, on_device)
    group = GROUP_SIZE if layout.gpus_per_actor else layout.batch_size
    ds = plan_groups(source.in_groups_of(group * -(-call // group)), group)
    ds = ds.map_batches(_read(config, inputs, on_device), batch_size=group, batch_format="pyarrow", num_cpus=1)
    ds = ds.map_batches(
        ModelStage,
        fn_constructor_kwargs=_model_stage_kwargs(config, models, layout, on_device, ship(models)),
        batch_size=call,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=layout.actors),
        num_gpus=layout.gpus_per_actor,
        num_cpus=config.cpus_per_actor,
    )
    ds = ds.map_batches(_finish(config, inputs, run_id), batch_size=None, batch_format="pyarrow", num_cpus=1)

    # No prefetch: with one, Ray Data holds each finished group back until the next is done too.
    yield from ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0)  # type: ignore[misc]


def _local_rows(
    config: JobConfig, inputs: Storage, feed: LocalFeed, run_id: str, models: dict[str, JobModel]
) -> Iterator[pa.Table]:
    """The photos' manifest rows, a group's table at a time, from the stages run in this process."""
    layout = model_layout(config, 0 if (config.device or "cpu") == "cpu" else 1)
    if layout.device == "cpu" and config.model_batch_size is None:
        # As many photos a group as the CPU model runs at once (CPU_STREAMS), no more: the
        # first photos are done after that many photos' time, not a batch's of 4, and no Ray
        # task's cost asks for larger groups here.
        layout = dataclasses.replace(layout, batch_size=CPU_STREAMS)
    on_device = render_backend_for(config.render_backend, layout.device) == "torch"
    kwargs = _model_stage_kwargs(config, models, layout, on_device)
    yield from run_stages(
        feed,
        model_call_rows(layout, on_device),
        _read(config, inputs, on_device),
        functools.partial(ModelStage, **kwargs),
        _finish(config, inputs, run_id),
        config.cpu_workers or cpu_threads(),
    )


def _read(config: JobConfig, inputs: Storage, on_device: bool) -> Callable[[pa.Table], pa.Table]:
    # With the torch render backend the models' stage decodes: the read stage only reads bytes.
    return functools.partial(
        read_stage,
        input_uri=inputs.uri,
        storage_options=config.storage_options,
        max_megapixels=config.max_megapixels,
        model_copy=not on_device,
    )


def _finish(config: JobConfig, inputs: Storage, run_id: str) -> Callable[[pa.Table], pa.Table]:
    return functools.partial(finish_stage, config=config, run_id=run_id, source_root=inputs.uri)


def _model_stage_kwargs(
    config: JobConfig,
    models: dict[str, JobModel],
    layout: ModelLayout,
    on_device: bool,
    shipped: dict[str, Shipment] | None = None,
) -> dict[str, Any]:
    """ModelStage's arguments: the weights from the driver's files, or with the shipment."""
    weights = {task: None if shipped or model.path is None else str(model.path) for task, model in models.items()}
    return {
        "saliency": models[SALIENCY].name,
        "depth": models[DEPTH].name,  # the ground prior where the driver found no depth weights
        "saliency_weights": weights[SALIENCY],
        "depth_weights": weights[DEPTH],
        "device": layout.device,
        "batch_size": layout.batch_size,
        "shipped": shipped,
        "on_device": config.render_settings() if on_device else None,
        "runtime": config.runtime,
    }


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
