"""The library job: Ray Data over a whole photo library, resumable through the manifest.

    list inputs -> plan (skip what the manifest settled) -> read + decode a model copy (CPU tasks)
    -> saliency model (actors) -> depth model (actors) -> decode, effect, encode, write (CPU tasks)
    -> manifest rows, committed by the driver in atomically written Parquet parts.

Rows carry the compressed bytes and a reduced copy for the models; full-resolution pixels exist
only inside the last CPU stage. A row that fails at any stage carries its error to the end and
becomes a failed manifest row; the job goes on.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import logging
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from .effect import render
from .errors import BadInputError, DreamfocusError, OutputError
from .batches import (HEAVY, ROW_STATE, UPDATED, arrow_stage, pack, pack_map, unpack, unpack_map,
                      writable)
from .manifest import (FAILED, MANIFEST_DIR, OK, SKIPPED, KeySet, ManifestWriter, ResumeIndex, image_id, key_of,
                       new_run_id)
from .models import DEPTH, SALIENCY, default_model, load_model
from .params import EffectParams
from .photo_io import IMAGE_EXTENSIONS, OUTPUT_EXTENSIONS, decode_photo, encode_photo
from .process import MODEL_INPUT_SIZE, intermediate_pngs, model_copy
from .storage import SourceFile, Storage, is_inside, safe_relpath

log = logging.getLogger(__name__)

IMAGES_DIR, INTERMEDIATES_DIR = "images", "intermediates"


@dataclass
class JobConfig:
    input: str
    output: str
    params: EffectParams = field(default_factory=EffectParams)
    storage_options: dict = field(default_factory=dict)
    saliency_model: str | None = None
    depth_model: str | None = None
    saliency_weights: str | None = None
    depth_weights: str | None = None
    device: str | None = None
    format: str = "jpeg"
    quality: int = 92
    max_megapixels: float = 200.0
    model_batch_size: int = 4
    saliency_actors: int | None = None  # default: one per GPU, else 1
    depth_actors: int | None = None
    gpus_per_actor: float | None = None  # default: 1 where the cluster has GPUs, else 0
    # Model actors reserve no CPU by default: on a GPU they mostly wait for it, and on a CPU-only
    # machine a reservation would idle cores whenever the models are quicker than the CPU stages.
    cpus_per_actor: float = 0.0
    cpu_workers: int | None = None  # CPUs of the embedded local Ray (default: all)
    address: str | None = None  # None: embedded local Ray; "auto" or ray://host:port: a cluster
    limit: int | None = None
    dry_run: bool = False
    force: bool = False
    retry_failed: bool = False
    save_intermediates: bool = False
    manifest_rows_per_part: int = 1000

    def __post_init__(self) -> None:
        self.saliency_model = self.saliency_model or default_model(SALIENCY)
        self.depth_model = self.depth_model or default_model(DEPTH)
        if self.format not in OUTPUT_EXTENSIONS:
            raise BadInputError(f"unknown output format {self.format!r}; choose {', '.join(OUTPUT_EXTENSIONS)}")
        if not 1 <= self.quality <= 100:
            raise BadInputError("quality must be within 1..100")

    def job_hash(self) -> str:
        """What decides how an output looks: effect parameters, models and encoding."""
        what = {"params": self.params.digest(), "saliency": self.saliency_model, "depth": self.depth_model,
                "format": self.format, "quality": self.quality}
        return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class PlanItem:
    source: SourceFile
    output_relpath: str
    reason: str  # why it is (re)processed
    attempt: int
    error: str = ""  # set when the input is refused before any reading (an unsafe name)


def output_relpath(relpath: str, fmt: str, keep_extension: bool = False) -> str:
    """images/<relpath with the output extension>; keep_extension gives x.png -> x.png.jpg."""
    stem, ext = os.path.splitext(safe_relpath(relpath))
    if keep_extension:
        stem += ext.lower()
    return f"{stem}{OUTPUT_EXTENSIONS[fmt]}"


def check_locations(config: JobConfig) -> tuple[Storage, Storage]:
    inputs = Storage(config.input, config.storage_options)
    output = Storage(config.output, config.storage_options)
    if is_inside(output.uri, inputs.uri):
        raise BadInputError(f"{config.output}: OUTPUT must not be INPUT or inside it ({config.input})")
    if not inputs.exists(""):
        raise BadInputError(f"{config.input}: input folder not found")
    return inputs, output


def make_plan(config: JobConfig, inputs: Storage, output: Storage) -> Iterator[PlanItem | str]:
    """Each input's fate, decided from the listing and the manifest without reading any image:
    a PlanItem to process, or the reason it is skipped."""
    job_hash = config.job_hash()
    resume = ResumeIndex.load(Storage(f"{output.uri}/{MANIFEST_DIR}", config.storage_options))
    images = Storage(f"{output.uri}/{IMAGES_DIR}", config.storage_options)
    outputs = frozenset({OUTPUT_EXTENSIONS[config.format]})
    try:  # one listing of OUTPUT/images answers "does the output exist" for every input
        existing = KeySet(key_of(f.relpath) for f in images.list_files(outputs))
    except FileNotFoundError:
        existing = KeySet(())

    claimed: set[int] = set()  # outputs given out in this listing: x.jpg and x.png must not share one
    for source in inputs.list_files(IMAGE_EXTENSIONS):
        try:
            target, error = output_relpath(source.relpath, config.format), ""
            if int(key_of(target.lower())) in claimed:  # the listing is sorted: the same file wins each run
                target = output_relpath(source.relpath, config.format, keep_extension=True)
            claimed.add(int(key_of(target.lower())))
        except BadInputError as exc:
            target, error = "", str(exc)
        attempts = resume.attempts_of(source.relpath)
        same = (source.relpath, source.fingerprint, job_hash)
        if config.force:
            reason = "forced"
        elif resume.latest_is(*same, OK) and key_of(target) in existing:
            yield "done"
            continue
        elif resume.latest_is(*same, SKIPPED):
            yield "skipped before (not an image, or its background is already soft)"
            continue
        elif resume.latest_is(*same, FAILED) and not config.retry_failed:
            yield "failed before (use --retry-failed)"
            continue
        elif resume.latest_is(*same, OK):
            reason = "output missing"
        elif resume.latest_is(*same, FAILED):
            reason = "retrying failure"
        elif attempts:
            reason = "changed photo or parameters, or a failure not of its own making"
        else:
            reason = "new"
        yield PlanItem(source, target, reason, attempts + 1, error)


# ---- stages (run on Ray workers; each takes a dict of numpy arrays and returns it with its results)

def _now() -> float:
    return time.perf_counter()


def _fail(batch: dict, i: int, exc: BaseException) -> None:
    kind = error_kind(exc, batch["relpath"][i])
    batch["status"][i] = SKIPPED if isinstance(exc, BadInputError) and kind == "not-an-image" else FAILED
    batch["error_kind"][i] = kind
    batch["error"][i] = (str(exc) if isinstance(exc, DreamfocusError)  # these name the file already
                         else f"{batch['relpath'][i]}: {type(exc).__name__}: {exc}")


def soft_background_reason(result, params: EffectParams) -> str:
    return (f"left as it is: the background has little fine detail, already soft or plain "
            f"({result.background_detail:.2f} of the subject's, below min_background_detail "
            f"{params.min_background_detail:g})")


def error_kind(exc: BaseException, relpath: str = "") -> str:
    """A short, countable name for what went wrong; the file's own name is no hint ("empty file.jpg")."""
    text = str(exc)
    if relpath and text.startswith(f"{relpath}: "):
        text = text[len(relpath) + 2:]
    for marker, kind in (("cannot write", "write-error"), ("empty file", "empty-file"),
                         ("not an image", "not-an-image"), ("MP limit", "too-many-pixels"),
                         ("truncated or corrupt", "corrupt-image"), ("unsupported image", "unsupported-image"),
                         ("out of memory", "out-of-memory")):
        if marker in text:
            return kind
    if isinstance(exc, MemoryError):
        return "out-of-memory"
    return "bad-input" if isinstance(exc, BadInputError) else type(exc).__name__


def read_photos(batch: dict, input_uri: str, storage_options: dict, max_megapixels: float) -> dict:
    """Read the bytes, decode a reduced copy for the models (CPU task)."""
    inputs = Storage(input_uri, storage_options)
    n = len(batch["relpath"])
    batch["status"] = np.array([OK] * n, dtype=object)
    batch["error_kind"] = np.array([""] * n, dtype=object)
    batch["error"] = np.array([""] * n, dtype=object)
    batch["data"] = np.array([b""] * n, dtype=object)
    batch["model_copy"] = np.array([b""] * n, dtype=object)
    batch["seconds_read"] = np.zeros(n, np.float32)
    batch["seconds_decode"] = np.zeros(n, np.float32)
    batch["started_at"] = np.empty(n, dtype="datetime64[ms]")
    for i, relpath in enumerate(batch["relpath"]):
        batch["started_at"][i] = np.datetime64(datetime.now(timezone.utc).replace(tzinfo=None), "ms")
        t0 = _now()
        try:
            data = inputs.read_bytes(relpath)
            t1 = _now()
            photo = decode_photo(data, relpath, max_megapixels, draft_size=MODEL_INPUT_SIZE)
            batch["model_copy"][i] = pack(model_copy(photo.pixels))
            batch["data"][i] = data
            batch["seconds_read"][i], batch["seconds_decode"][i] = t1 - t0, _now() - t1
        except Exception as exc:  # noqa: BLE001 - any failure becomes this photo's row
            _fail(batch, i, exc)
    return batch


def read_stage(table: pa.Table, **kwargs) -> pa.Table:
    """read_photos as a Ray Data stage (CPU task)."""
    return arrow_stage(table, functools.partial(read_photos, **kwargs), reads=("relpath",))


class ModelStage:
    """One model on the photos of a batch that are still ok (actor: loads the model once)."""

    def __init__(self, task: str, name: str, weights: str | None, device: str | None, batch_size: int) -> None:
        self.task = task
        self.model = load_model(task, name, weights, device, batch_size)
        self.column = "fg" if task == SALIENCY else "depth"  # the map's column

    def __call__(self, table: pa.Table) -> pa.Table:
        reads = ("relpath", *ROW_STATE, "model_copy", *(("fg",) if self.task == DEPTH else ()))
        # Depth is the last stage that needs the model copy: don't ship it on to the CPU stage.
        return arrow_stage(table, self.predict, reads, drops=("model_copy",) if self.task == DEPTH else ())

    def predict(self, batch: dict) -> dict:
        writable(batch, *ROW_STATE)
        n = len(batch["relpath"])
        live = [i for i in range(n) if batch["status"][i] == OK]
        maps = np.array([b""] * n, dtype=object)
        t0 = _now()
        photos = [unpack(batch["model_copy"][i]) for i in live]
        saliency = [unpack_map(batch["fg"][i]) for i in live] if self.task == DEPTH else None
        try:
            results = self.model.predict(photos, saliency=saliency)
        except Exception:  # noqa: BLE001 - retry one by one, so one bad photo fails alone
            log.warning("%s failed on a batch of %d; retrying one by one", self.model.name, len(live), exc_info=True)
            _release_gpu_cache()
            results = []
            for k, i in enumerate(live):
                try:
                    results.extend(self.model.predict([photos[k]], saliency=saliency and [saliency[k]]))
                except Exception as exc:  # noqa: BLE001
                    _fail(batch, i, exc)
                    results.append(None)
        for i, values in zip(live, results):
            if values is not None:
                maps[i] = pack_map(values, self.task)
        batch[self.column] = maps
        batch[f"seconds_{self.task}"] = np.full(
            n, (_now() - t0) / max(1, len(live)), np.float32)
        batch[f"{self.task}_model"] = np.array([self.model.name] * n, dtype=object)
        batch[f"{self.task}_version"] = np.array([self.model.version] * n, dtype=object)
        return batch


def _release_gpu_cache() -> None:
    """After a CUDA out-of-memory, give cached blocks back before the smaller retries."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def finish_photos(batch: dict, config: JobConfig) -> dict:
    """Decode at full resolution, apply the effect, encode and write atomically (CPU task)."""
    images = Storage(f"{config.output.rstrip('/')}/{IMAGES_DIR}", config.storage_options)
    intermediates = Storage(f"{config.output.rstrip('/')}/{INTERMEDIATES_DIR}", config.storage_options)
    writable(batch, *ROW_STATE, "seconds_decode")
    n = len(batch["relpath"])
    for column, dtype in (("width", np.int32), ("height", np.int32), ("fg_fraction", np.float32),
                          ("interp_start", np.float32), ("interp_stop", np.float32),
                          ("seconds_effect", np.float32), ("seconds_encode", np.float32),
                          ("seconds_write", np.float32)):
        batch[column] = np.zeros(n, dtype)
    batch["output_uri"] = np.array([""] * n, dtype=object)
    for i in range(n):
        if batch["status"][i] != OK:
            continue
        relpath = batch["relpath"][i]
        try:
            t0 = _now()
            photo = decode_photo(batch["data"][i], relpath, config.max_megapixels)
            t1 = _now()
            result = render(photo.pixels, unpack_map(batch["fg"][i]), unpack_map(batch["depth"][i]),
                            config.params)
            t2 = _now()
            data = encode_photo(result.image, config.format, config.quality, photo.exif)
            t3 = _now()
            target = batch["output_relpath"][i]
            images.write_atomic(target, data)
            if config.save_intermediates:
                stem = os.path.splitext(target)[0]
                for kind, png in intermediate_pngs(result, *photo.pixels.shape[:2]).items():
                    intermediates.write_atomic(f"{stem}.{kind}.png", png)
            batch["seconds_decode"][i] += t1 - t0
            batch["seconds_effect"][i], batch["seconds_encode"][i] = t2 - t1, t3 - t2
            batch["seconds_write"][i] = _now() - t3
            batch["height"][i], batch["width"][i] = photo.pixels.shape[:2]
            batch["fg_fraction"][i] = result.fg_fraction
            batch["interp_start"][i], batch["interp_stop"][i] = result.start, result.stop
            batch["output_uri"][i] = images.uri_of(target)
            if result.left_alone:  # written unchanged, so the library's output stays complete
                batch["status"][i], batch["error_kind"][i] = SKIPPED, "background-already-soft"
                batch["error"][i] = soft_background_reason(result, config.params)
        except Exception as exc:  # noqa: BLE001 - any failure becomes this photo's row
            _fail(batch, i, exc)
    return batch


def finish_stage(table: pa.Table, config: JobConfig) -> pa.Table:
    """finish_photos as a Ray Data stage (CPU task)."""
    return arrow_stage(table, functools.partial(finish_photos, config=config), drops=HEAVY,
                       reads=("relpath", "output_relpath", *UPDATED, "data", "fg", "depth"))


# ---- the driver

@dataclass
class JobSummary:
    run_id: str
    planned: int
    counts: dict[str, int]
    skipped: dict[str, int]
    seconds: float  # the whole run, start-up included
    processing_seconds: float  # from the first photo's start to the last row
    output: str

    def lines(self) -> list[str]:
        done = ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items())) or "nothing to do"
        kept = ", ".join(f"{v} {k}" for k, v in sorted(self.skipped.items()))
        return [f"run {self.run_id}: {self.planned} to process: {done} in {self.seconds:.1f} s "
                f"({self.processing_seconds:.1f} s processing)",
                *([f"left alone: {kept}"] if kept else []),
                f"results: {self.output}/{IMAGES_DIR}  manifest: {self.output}/{MANIFEST_DIR}"]


def run_job(config: JobConfig) -> JobSummary:
    """Plan, then process what is left; returns counts.

    The plan streams: to-do items go to Ray's object store in chunks as the listing proceeds,
    so the driver's memory does not grow with the library. Ray starts only if there is work.
    """
    started = time.perf_counter()
    inputs, output = check_locations(config)
    run_id = new_run_id()
    skipped: dict[str, int] = {}
    planned, chunk, chunk_refs, refused = 0, [], [], []
    for item in make_plan(config, inputs, output):
        if isinstance(item, str):
            skipped[item] = skipped.get(item, 0) + 1
        elif config.limit is not None and planned >= config.limit:
            skipped["over --limit"] = skipped.get("over --limit", 0) + 1
        elif config.dry_run:
            planned += 1
            print(f"would process {item.source.relpath} -> {IMAGES_DIR}/{item.output_relpath} ({item.reason})")
        elif item.error:
            planned += 1
            refused.append(_refused_row(item, inputs, config, run_id))
        else:
            planned += 1
            chunk.append(item)
            if len(chunk) == TASK_CHUNK:
                chunk_refs.append(_put_tasks(config, chunk))
                chunk = []
    if chunk:
        chunk_refs.append(_put_tasks(config, chunk))

    counts: dict[str, int] = {}
    processing_started = ended = time.perf_counter()
    if chunk_refs or refused:
        check_writable(output)
        writer = ManifestWriter(Storage(f"{output.uri}/{MANIFEST_DIR}", config.storage_options), run_id,
                                config.manifest_rows_per_part)
        failing_writes = 0
        rows = _execute(config, inputs, chunk_refs, run_id) if chunk_refs else iter(())
        try:
            for row in itertools.chain(refused, rows):
                writer.add(row)
                counts[row["status"]] = counts.get(row["status"], 0) + 1
                # A full or read-only OUTPUT fails every photo: stop instead of failing them all.
                failing_writes = failing_writes + 1 if row["error_kind"] == "write-error" else 0
                if failing_writes >= MAX_FAILING_WRITES:
                    raise OutputError(f"{output.uri}: {failing_writes} writes in a row failed, stopping "
                                      f"(last: {row['error']})")
        finally:
            writer.flush()
            if hasattr(rows, "close"):
                rows.close()  # stops the dataset's workers now when the loop ended early
        ended = time.perf_counter()
    return JobSummary(run_id, planned, counts, skipped, ended - started, ended - processing_started,
                      output.uri)


TASK_CHUNK = 2000  # to-do items per object in Ray's object store
MAX_FAILING_WRITES = 8


def check_writable(output: Storage) -> None:
    """Fail fast, before any work, when OUTPUT cannot be written."""
    probe = f"{MANIFEST_DIR}/.write-probe-{uuid.uuid4().hex[:8]}"
    output.write_atomic(probe, b"")
    output.remove(probe)


def _put_tasks(config: JobConfig, items: list[PlanItem]):
    import ray

    _start_ray(config)
    return ray.put(pa.table({
        "relpath": [it.source.relpath for it in items],
        "source_size": pa.array([it.source.size for it in items], pa.int64()),
        "source_fingerprint": [it.source.fingerprint for it in items],
        "output_relpath": [it.output_relpath for it in items],
        "attempt": pa.array([it.attempt for it in items], pa.int32()),
    }))


def _start_ray(config: JobConfig) -> None:
    """An embedded local Ray, or the cluster at config.address; an already started Ray is used."""
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")  # no per-dataset INFO lines on the console
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    import ray

    if not ray.is_initialized():
        ray.init(address=config.address, num_cpus=None if config.address else config.cpu_workers,
                 include_dashboard=False, logging_level=logging.WARNING)


def _execute(config: JobConfig, inputs: Storage, chunk_refs: list, run_id: str) -> Iterator[dict[str, Any]]:
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.verbose_stats_logs = False

    gpus = ray.cluster_resources().get("GPU", 0)
    gpus_per_actor = config.gpus_per_actor if config.gpus_per_actor is not None else (1 if gpus else 0)
    default_actors = max(1, int(gpus // max(gpus_per_actor, 1e-9))) if gpus_per_actor else 1
    device = config.device or ("cuda" if gpus_per_actor else "cpu")

    ds = ray.data.from_arrow_refs(chunk_refs)
    ds = ds.map_batches(read_stage, fn_kwargs=dict(input_uri=inputs.uri, storage_options=config.storage_options,
                                                        max_megapixels=config.max_megapixels),
                        batch_size=8, batch_format="pyarrow", num_cpus=1)
    for task, name, weights, actors in ((SALIENCY, config.saliency_model, config.saliency_weights,
                                         config.saliency_actors),
                                        (DEPTH, config.depth_model, config.depth_weights, config.depth_actors)):
        ds = ds.map_batches(ModelStage, fn_constructor_args=(task, name, weights, device, config.model_batch_size),
                            batch_size=config.model_batch_size, batch_format="pyarrow",
                            compute=ray.data.ActorPoolStrategy(size=actors or default_actors), num_gpus=gpus_per_actor,
                            num_cpus=config.cpus_per_actor)
    ds = ds.map_batches(finish_stage, fn_kwargs=dict(config=config), batch_size=4, batch_format="pyarrow",
                        num_cpus=1)

    source_root = inputs.uri
    for table in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=1):
        for row in table.to_pylist():
            yield _manifest_row(row, source_root, config, run_id)


def _refused_row(item: PlanItem, inputs: Storage, config: JobConfig, run_id: str) -> dict[str, Any]:
    row = {"relpath": item.source.relpath, "source_size": item.source.size,
           "source_fingerprint": item.source.fingerprint, "attempt": item.attempt,
           "status": FAILED, "error_kind": "unsafe-name", "error": item.error}
    return _manifest_row(row, inputs.uri, config, run_id)


def _manifest_row(row: dict, source_root: str, config: JobConfig, run_id: str) -> dict[str, Any]:
    relpath = row["relpath"]
    finished_at = datetime.now(timezone.utc)
    started_at = row.get("started_at")
    row.update(
        started_at=started_at.replace(tzinfo=timezone.utc) if started_at else finished_at,
        image_id=image_id(relpath),
        source_uri=f"{source_root}/{relpath}",
        preset=config.params.preset,
        params_hash=config.job_hash(),
        run_id=run_id,
        finished_at=finished_at,
    )
    if row["status"] != OK:
        row["output_uri"] = None
    return row
