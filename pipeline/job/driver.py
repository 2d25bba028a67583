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

import contextlib
import functools
import itertools
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

from ..errors import OutputError
from ..manifest import (
    FAILED,
    MANIFEST_DIR,
    OK,
    OTHER_FILES,
    SKIPPED,
    ManifestWriter,
    OtherFilesWriter,
    compact_manifest,
    image_id,
    new_run_id,
)
from ..models import DEPTH, SALIENCY
from ..storage import Storage
from .console import Progress, without_native_noise
from .lease import RENEW_SECONDS, Lease
from .plan import IMAGES_DIR, JobConfig, OtherFile, PlanItem, check_locations, make_plan, render_backend_for
from .stages import DeviceRendering, ModelStage, finish_stage, read_stage
from .weights import JobModel, resolve_models, ship

log = logging.getLogger(__name__)

# Photos per group entering the dataset: a group is one read task, one block between stages and
# one finish task. Tens, not thousands, so every core is busy from the start and results flow
# out as groups are done; not fewer, as each group costs Ray Data about 80 ms of scheduling.
GROUP_SIZE = 16
PLAN_CHUNK = 2000  # plan rows per object put into Ray's object store as the listing proceeds
MAX_FAILING_WRITES = 8


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

    def lines(self) -> list[str]:
        done = ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items())) or "nothing to do"
        kept = ", ".join(f"{v} {k}" for k, v in sorted(self.skipped.items()))
        others = ", ".join(f"{v} {k}" for k, v in sorted(self.others.items(), key=lambda kv: (-kv[1], kv[0])))
        return [
            f"run {self.run_id}: {self.planned} to process: {done} in {self.seconds:.1f} s "
            f"({self.processing_seconds:.1f} s processing)",
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
                refused.append(_refused_row(item, inputs, config, run_id))
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
            failing_writes = 0
            rows = _execute(config, inputs, chunk_refs, run_id, models) if chunk_refs and models else iter(())
            try:
                for row in itertools.chain(refused, rows):
                    ticker.check()
                    writer.add(row)
                    progress.add(row["status"])
                    counts[row["status"]] = counts.get(row["status"], 0) + 1
                    # A full or read-only OUTPUT fails every photo: stop instead of failing them all.
                    failing_writes = failing_writes + 1 if row["error_kind"] == OutputError.kind else 0
                    if failing_writes >= MAX_FAILING_WRITES:
                        raise OutputError(
                            f"{output.uri}: {failing_writes} writes in a row failed, stopping (last: {row['error']})"
                        )
            finally:
                ticker.follow(None, None)
                writer.flush()
                progress.close()
                if hasattr(rows, "close"):
                    rows.close()  # stops the dataset's workers now when the loop ended early
            ended = time.perf_counter()
        if other_files is not None and (others or output.exists(OTHER_FILES)):
            other_files.close(output)  # replaces the last run's listing
    return JobSummary(run_id, planned, counts, skipped, ended - started, ended - processing_started, output.uri, others)


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


def _execute(
    config: JobConfig, inputs: Storage, chunk_refs: list, run_id: str, models: dict[str, JobModel]
) -> Iterator[dict[str, Any]]:
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
            DeviceRendering.of(config) if on_device else None,
            config.runtime,
        ),
        batch_size=layout.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=layout.actors),
        num_gpus=layout.gpus_per_actor,
        num_cpus=config.cpus_per_actor,
    )
    ds = ds.map_batches(
        functools.partial(finish_stage, config=config), batch_size=None, batch_format="pyarrow", num_cpus=1
    )

    source_root = inputs.uri
    # No prefetch: with one, Ray Data holds each finished group back until the next is done too.
    for table in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):
        for row in table.to_pylist():  # type: ignore[union-attr] # a pyarrow batch, as asked
            yield _manifest_row(row, source_root, config, run_id)


def _refused_row(item: PlanItem, inputs: Storage, config: JobConfig, run_id: str) -> dict[str, Any]:
    assert item.error is not None
    row = {
        "relpath": item.source.relpath,
        "source_size": item.source.size,
        "source_fingerprint": item.source.fingerprint,
        "attempt": item.attempt,
        "status": FAILED,
        "error_kind": item.error.kind,
        "error": str(item.error),
        "reason": "",
    }
    if item.error.leaves_alone:  # say, the RAW of a RAW + JPEG pair
        row.update(status=SKIPPED, error="", reason=str(item.error))
    return _manifest_row(row, inputs.uri, config, run_id)


def _manifest_row(row: dict, source_root: str, config: JobConfig, run_id: str) -> dict[str, Any]:
    relpath = row["relpath"]
    finished_at = datetime.now(UTC)
    started_at = row.get("started_at")
    row.update(
        started_at=started_at.replace(tzinfo=UTC) if started_at else finished_at,
        image_id=image_id(relpath),
        source_uri=f"{source_root}/{relpath}",
        preset=config.params.preset,
        job_hash=config.job_hash(),
        run_id=run_id,
        finished_at=finished_at,
    )
    if row["status"] != OK:
        row["output_uri"] = None
    row["render_path"] = row.get("render_path") or None  # null where no path rendered it
    return row
