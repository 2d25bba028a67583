"""What runs on Ray's workers: the one-photo steps of pipeline.photo over a group of photos,
plus columns, timings and failure capture. A photo that fails at any stage carries its error
to the end and becomes a failed (or skipped) manifest row; the others go on.

    read_stage   (CPU task)   relpath -> data (the file's bytes), model_copy
    ModelStage   (actor)      model_copy -> saliency, depth (both models, one device)
    finish_stage (CPU task)   data, saliency, depth -> the written output, sizes, timings

With the torch render backend the actor does the photo's whole work on its device, and the CPU
tasks only read and write bytes:

    read_stage   (CPU task)   relpath -> data
    ModelStage   (actor)      data -> encoded (decode, models, effect, encode on the device); a
                              photo the device path cannot take gets saliency, depth instead
    finish_stage (CPU task)   encoded -> the written output (or the CPU path, as above)
"""

from __future__ import annotations

import functools
import logging
import os
import time
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa

from ..backend import NUMPY_PATH, device_results, release_device_cache, torch_path
from ..batches import (
    HEAVY,
    INTERMEDIATE_COLUMNS,
    RENDERED,
    ROW_STATE,
    UPDATED,
    add_columns,
    arrow_stage,
    keep_or_add_columns,
    pack,
    pack_depth,
    pack_saliency,
    unpack,
    unpack_map,
    writable,
)
from ..errors import DreamfocusError, classify, error_kind
from ..manifest import FAILED, OK, SKIPPED, manifest_rows
from ..photo import INTERMEDIATE_NAMES, Finished, RenderSettings, SceneMaps, SceneModels, prepare, render_on_host
from ..storage import SourceFile, Storage, retried_total
from .plan import IMAGES_DIR, INTERMEDIATES_DIR, JobConfig
from .weights import Shipment

log = logging.getLogger(__name__)

MODEL_TASKS = ("saliency", "depth")  # each model's time has a column of its own


def _now() -> float:
    return time.perf_counter()


def fail(batch: dict, i: int, exc: BaseException) -> None:
    """Record a photo's failure in its row: the kind decides failed, or skipped with a reason."""
    kind = classify(exc)
    message = (
        str(exc)
        if isinstance(exc, DreamfocusError)  # these name the file already
        else f"{batch['relpath'][i]}: {type(exc).__name__}: {exc}"
    )
    if kind is not None and kind.leaves_alone:
        leave_alone(batch, i, error_kind(exc), message)
    else:
        batch["status"][i], batch["error_kind"][i], batch["error"][i] = FAILED, error_kind(exc), message


def leave_alone(batch: dict, i: int, kind: str, reason: str) -> None:
    batch["status"][i], batch["error_kind"][i], batch["reason"][i] = SKIPPED, kind, reason


def read_photos(
    batch: dict, input_uri: str, storage_options: dict, max_megapixels: float, model_copy: bool = True
) -> dict:
    """Read the bytes, decode a reduced copy for the models (unless the model actor decodes)."""
    inputs = Storage(input_uri, storage_options)
    n = len(batch["relpath"])
    add_columns(batch, n, *ROW_STATE, "data", "model_copy", "started_at", "seconds_read", "seconds_decode")
    batch["status"][:] = OK
    listed = "source_fingerprint" in batch  # what the listing found, which the read holds to
    if listed:
        writable(batch, "source_fingerprint", "source_size")
    # For the run's summary: transient storage errors met, photos replaced since the listing.
    add_columns(batch, n, "storage_retries", "source_changed")
    for i, relpath in enumerate(batch["relpath"]):
        batch["started_at"][i] = np.datetime64(datetime.now(UTC).replace(tzinfo=None), "ms")
        retried = retried_total()
        t0 = _now()
        try:
            if listed:
                fingerprint = batch["source_fingerprint"][i]
                data, source = inputs.read_version(SourceFile(relpath, int(batch["source_size"][i]), fingerprint))
                # the version read, should it have been replaced since the listing
                batch["source_changed"][i] = source.fingerprint != fingerprint
                batch["source_size"][i], batch["source_fingerprint"][i] = source.size, source.fingerprint
            else:  # no listing to hold the read to (benchmarks, one-off batches)
                data = inputs.read_bytes(relpath)
            t1 = _now()
            if model_copy:
                batch["model_copy"][i] = pack(prepare(data, relpath, max_megapixels))
            batch["data"][i] = data
            batch["seconds_read"][i], batch["seconds_decode"][i] = t1 - t0, _now() - t1
        except Exception as exc:  # noqa: BLE001 - any failure becomes this photo's row
            fail(batch, i, exc)
        batch["storage_retries"][i] = retried_total() - retried
    return batch


def read_stage(table: pa.Table, **kwargs) -> pa.Table:
    """read_photos as a Ray Data stage."""
    listing = ("source_fingerprint", "source_size")
    return arrow_stage(
        table,
        functools.partial(read_photos, **kwargs),
        reads=("relpath", *listing),
        updates=(*UPDATED, *listing),
    )


class ModelStage:
    """Both models on the photos of a batch that are still ok (an actor: loads them once).

    ``shipped`` (task -> ``weights.Shipment``): weights the driver resolved, checked and put in
    Ray's object store; they replace ``saliency_weights`` / ``depth_weights``, so the actor's
    node needs no weights of its own (see job/weights.py).
    """

    def __init__(
        self,
        saliency: str,
        depth: str,
        saliency_weights: str | None,
        depth_weights: str | None,
        device: str | None,
        batch_size: int,
        shipped: dict[str, Shipment] | None = None,
        on_device: RenderSettings | None = None,
        runtime: str | None = None,
    ) -> None:
        weights = {"saliency": saliency_weights, "depth": depth_weights}
        for task, shipment in (shipped or {}).items():
            weights[task] = str(shipment.local_path())
        self.models = SceneModels(
            saliency, depth, weights["saliency"], weights["depth"], device, batch_size, runtime
        ).load()
        self.on_device = on_device  # the torch render backend's settings: the actor renders

    def __call__(self, table: pa.Table) -> pa.Table:
        # The model copy is not needed after the models: it does not travel on to the CPU stage.
        if self.on_device is not None:  # "data" is updated: emptied where it is needed no more
            return arrow_stage(
                table, self.render, ("relpath", *UPDATED, "data"), drops=("model_copy",), updates=(*UPDATED, "data")
            )
        return arrow_stage(table, self.predict, ("relpath", *ROW_STATE, "model_copy"), drops=("model_copy",))

    def predict(self, batch: dict) -> dict:
        """The maps of the photos still ok, from their model copies."""
        writable(batch, *ROW_STATE)
        n = len(batch["relpath"])
        live = [i for i in range(n) if batch["status"][i] == OK]
        add_columns(batch, n, *MODEL_COLUMNS)
        self._maps(batch, live, [unpack(batch["model_copy"][i]) for i in live])
        self._model_names(batch)
        return batch

    def render(self, batch: dict) -> dict:
        """The torch render backend: the photos still ok decoded, rendered and encoded on the
        device; those it cannot take get their maps for the CPU path (the finish stage) instead."""
        settings = self.on_device
        assert settings is not None
        writable(batch, *UPDATED, "data")  # a shallow copy: the bytes themselves are not copied
        n = len(batch["relpath"])
        live = [i for i in range(n) if batch["status"][i] == OK]
        add_columns(batch, n, *MODEL_COLUMNS, "encoded", *RENDERED)
        if settings.intermediates:
            add_columns(batch, n, *INTERMEDIATE_COLUMNS)
        device = self.models.device or "cpu"
        results = device_results([batch["data"][i] for i in live], settings, device, models=self.models)
        on_cpu, copies = [], []
        for i, done in zip(live, results):
            if isinstance(done, str):
                log.info("%s: CPU path (%s)", batch["relpath"][i], done)
                try:
                    copies.append(prepare(batch["data"][i], batch["relpath"][i], settings.max_megapixels))
                    on_cpu.append(i)
                except Exception as exc:  # noqa: BLE001 - any failure becomes this photo's row
                    fail(batch, i, exc)
                continue
            record_rendering(batch, i, done, torch_path(device))
            batch["encoded"][i] = done.encoded
            batch["data"][i] = b""  # written as encoded: the photo's bytes travel no further
            for name, png in done.intermediates.items():
                batch[f"png_{name}"][i] = png
        if on_cpu:
            self._maps(batch, on_cpu, copies)
        self._model_names(batch)
        return batch

    def _maps(self, batch: dict, live: list[int], copies: list[np.ndarray]) -> None:
        """Both models on the model copies of rows ``live``: their saliency and depth columns,
        and each model's time (a batch runs as one: each photo gets its share)."""
        maps: list[SceneMaps | None]
        seconds = dict.fromkeys(MODEL_TASKS, 0.0)
        try:
            maps = list(self.models.predict(copies))
            seconds = self.models.seconds
        except Exception:  # noqa: BLE001 - retry one by one, so one bad photo fails alone
            log.warning("models failed on a batch of %d; retrying one by one", len(live), exc_info=True)
            release_device_cache()
            maps = []
            for k, i in enumerate(live):
                try:
                    maps.extend(self.models.predict([copies[k]]))
                    seconds = {task: seconds[task] + t for task, t in self.models.seconds.items()}
                except Exception as exc:  # noqa: BLE001
                    fail(batch, i, exc)
                    maps.append(None)
        depth_measured = self.models.depth.measures_depth
        for i, found in zip(live, maps):
            if found is not None:
                batch["saliency"][i], batch["depth"][i] = pack_saliency(found.saliency), pack_depth(found.depth)
                batch["depth_measured"][i] = depth_measured
        for task in MODEL_TASKS:
            batch[f"seconds_{task}"][live] = seconds[task] / max(1, len(live))

    def _model_names(self, batch: dict) -> None:
        for task, model in (("saliency", self.models.saliency), ("depth", self.models.depth)):
            batch[f"{task}_model"][:] = model.name
            batch[f"{task}_version"][:] = model.version
            batch[f"{task}_runtime"][:] = model.runtime


# The columns the model actor sets on every photo of a batch.
MODEL_COLUMNS = (
    "saliency",
    "depth",
    "depth_measured",
    *(f"seconds_{task}" for task in MODEL_TASKS),
    *(f"{task}_{what}" for task in MODEL_TASKS for what in ("model", "version", "runtime")),
)


def record_rendering(batch: dict, i: int, done: Finished, render_path: str) -> None:
    """What a photo's rendering tells its row, whichever path rendered it (the bytes and the
    intermediates go their own way: written by the finish stage, or carried to it)."""
    batch["render_path"][i] = render_path
    batch["width"][i], batch["height"][i] = done.width, done.height
    batch["fg_fraction"][i] = done.rendering.fg_fraction
    batch["interp_start"][i], batch["interp_stop"][i] = done.rendering.start, done.rendering.stop
    for step, spent in done.seconds.items():
        if step == "decode":  # the model copy's decode came first, in the read stage
            batch["seconds_decode"][i] += spent
        else:
            batch[f"seconds_{step}"][i] = spent
    if done.left_alone:  # written unchanged by the finish stage, so the library's output stays complete
        leave_alone(batch, i, done.left_alone, done.reason)


def render_and_write(batch: dict, config: JobConfig) -> dict:
    """Write what the device path encoded; decode at full resolution, apply the effect and encode
    the others (the CPU path), then write them. Every write is atomic."""
    images = Storage(f"{config.output.rstrip('/')}/{IMAGES_DIR}", config.storage_options)
    intermediates = Storage(f"{config.output.rstrip('/')}/{INTERMEDIATES_DIR}", config.storage_options)
    settings = config.render_settings()
    writable(batch, *UPDATED)
    n = len(batch["relpath"])
    keep_or_add_columns(batch, n, *RENDERED, "storage_retries")
    add_columns(batch, n, "seconds_write", "output_uri")
    encoded = batch.get("encoded", [b""] * n)
    for i in range(n):
        on_device = len(encoded[i]) > 0  # rendered by the model actor, left alone or not
        if batch["status"][i] != OK and not on_device:
            continue
        relpath = batch["relpath"][i]
        retried = retried_total()
        try:
            if on_device:
                data = encoded[i]
                pngs = {name: batch[f"png_{name}"][i] for name in INTERMEDIATE_NAMES if f"png_{name}" in batch}
            else:
                maps = SceneMaps(
                    unpack_map(batch["saliency"][i]), unpack_map(batch["depth"][i]), bool(batch["depth_measured"][i])
                )
                done = render_on_host(batch["data"][i], relpath, maps, settings)
                data, pngs = done.encoded, done.intermediates
                record_rendering(batch, i, done, NUMPY_PATH)
            t0 = _now()
            target = batch["output_relpath"][i]
            images.write_atomic(target, data)
            stem = os.path.splitext(target)[0]
            for name, png in pngs.items():
                intermediates.write_atomic(f"{stem}.{name}.png", png)
            batch["seconds_write"][i] = _now() - t0
            batch["output_uri"][i] = images.uri_of(target)
        except Exception as exc:  # noqa: BLE001 - any failure becomes this photo's row
            fail(batch, i, exc)
        batch["storage_retries"][i] += retried_total() - retried
    return batch


def finish_stage(table: pa.Table, config: JobConfig, run_id: str, source_root: str) -> pa.Table:
    """render_and_write as a Ray Data stage, ending in the photos' manifest rows: the workers
    build them, the driver only commits them."""
    carried = tuple(
        c for c in ("encoded", *RENDERED, *INTERMEDIATE_COLUMNS, "storage_retries") if c in table.column_names
    )
    finished = arrow_stage(
        table,
        functools.partial(render_and_write, config=config),
        drops=(*HEAVY, "encoded", "depth_measured", *INTERMEDIATE_COLUMNS),
        reads=("relpath", "output_relpath", *UPDATED, "data", "saliency", "depth", "depth_measured", *carried),
        updates=(*UPDATED, *RENDERED, "storage_retries"),
    )
    return job_manifest_rows(finished, config, run_id, source_root)


def job_manifest_rows(rows: pa.Table, config: JobConfig, run_id: str, source_root: str) -> pa.Table:
    """manifest_rows of this job's photos: its preset and job hash, this run (for the finishing
    tasks' rows and the driver's rows of photos the listing decided alike)."""
    return manifest_rows(
        rows, source_root=source_root, preset=config.params.preset, job_hash=config.job_hash(), run_id=run_id
    )
