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
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa

from ..batches import (
    HEAVY,
    ROW_STATE,
    UPDATED,
    arrow_stage,
    pack,
    pack_depth,
    pack_saliency,
    unpack,
    unpack_map,
    writable,
)
from ..errors import DreamfocusError, classify, error_kind
from ..manifest import FAILED, OK, SKIPPED, manifest_rows
from ..models import model_class
from ..params import EffectParams
from ..photo import INTERMEDIATE_NAMES, NUMPY_PATH, Finished, SceneMaps, SceneModels, finish, prepare
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
    batch["status"] = np.array([OK] * n, dtype=object)
    batch["error_kind"] = np.array([""] * n, dtype=object)
    batch["error"] = np.array([""] * n, dtype=object)
    batch["reason"] = np.array([""] * n, dtype=object)
    batch["data"] = np.array([b""] * n, dtype=object)
    batch["model_copy"] = np.array([b""] * n, dtype=object)
    batch["seconds_read"] = np.zeros(n, np.float32)
    batch["seconds_decode"] = np.zeros(n, np.float32)
    batch["started_at"] = np.empty(n, dtype="datetime64[ms]")
    listed = "source_fingerprint" in batch  # what the listing found, which the read holds to
    if listed:
        writable(batch, "source_fingerprint", "source_size")
    # For the run's summary: transient storage errors met, photos replaced since the listing.
    batch["storage_retries"] = np.zeros(n, np.int32)
    batch["source_changed"] = np.zeros(n, bool)
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
        rendering: DeviceRendering | None = None,
        runtime: str | None = None,
    ) -> None:
        weights = {"saliency": saliency_weights, "depth": depth_weights}
        for task, shipment in (shipped or {}).items():
            weights[task] = str(shipment.local_path())
        self.models = SceneModels(
            saliency, depth, weights["saliency"], weights["depth"], device, batch_size, runtime
        ).load()
        self.rendering = rendering

    def __call__(self, table: pa.Table) -> pa.Table:
        # The model copy is not needed after the models: it does not travel on to the CPU stage.
        if self.rendering is not None:  # "data" is updated: emptied where it is needed no more
            return arrow_stage(
                table, self.render, ("relpath", *UPDATED, "data"), drops=("model_copy",), updates=(*UPDATED, "data")
            )
        return arrow_stage(table, self.predict, ("relpath", *ROW_STATE, "model_copy"), drops=("model_copy",))

    def predict(self, batch: dict) -> dict:
        """The maps of the photos still ok, from their model copies."""
        writable(batch, *ROW_STATE)
        n = len(batch["relpath"])
        live = [i for i in range(n) if batch["status"][i] == OK]
        batch["saliency"], batch["depth"] = np.array([b""] * n, dtype=object), np.array([b""] * n, dtype=object)
        for task in MODEL_TASKS:
            batch[f"seconds_{task}"] = np.zeros(n, np.float32)
        self._maps(batch, live, [unpack(batch["model_copy"][i]) for i in live])
        self._model_names(batch)
        return batch

    def render(self, batch: dict) -> dict:
        """The torch render backend: the photos still ok decoded, rendered and encoded on the
        device (device_render); those it cannot take get their maps for the CPU path instead."""
        from ..device_render import finish_on_device, render_path

        assert self.rendering is not None
        how = self.rendering
        writable(batch, *UPDATED, "data")  # a shallow copy: the bytes themselves are not copied
        n = len(batch["relpath"])
        live = [i for i in range(n) if batch["status"][i] == OK]
        for column in ("encoded", "saliency", "depth"):
            batch[column] = np.array([b""] * n, dtype=object)
        for column, dtype in (*RENDER_NUMBERS.items(), *((f"seconds_{task}", np.float32) for task in MODEL_TASKS)):
            batch[column] = np.zeros(n, dtype)
        batch["render_path"] = np.array([""] * n, dtype=object)
        for name in INTERMEDIATE_NAMES if how.intermediates else ():
            batch[f"png_{name}"] = np.array([b""] * n, dtype=object)

        def on_device(rows: list[int]) -> list[Finished | str]:
            return finish_on_device(
                [batch["data"][i] for i in rows],
                how.params,
                self.models.device or "cpu",
                models=self.models,
                fmt=how.format,
                quality=how.quality,
                max_megapixels=how.max_megapixels,
                intermediates=how.intermediates,
                depth_measured=self.models.depth.measures_depth,
                batch_bytes=how.batch_bytes,
            )

        results: list[Finished | str]
        try:
            results = on_device(live)
        except Exception:  # noqa: BLE001 - one by one, so a photo that breaks the batch goes alone
            log.warning("device path failed on a batch of %d; retrying one by one", len(live), exc_info=True)
            _release_gpu_cache()
            results = []
            for i in live:
                try:
                    results.extend(on_device([i]))
                except Exception as exc:  # noqa: BLE001 - the CPU path is still open to it
                    results.append(f"the device path failed ({type(exc).__name__}: {exc})")
        on_cpu, copies = [], []
        where = render_path(self.models.device or "cpu")
        for i, done in zip(live, results):
            if isinstance(done, str):
                log.info("%s: CPU path (%s)", batch["relpath"][i], done)
                try:
                    copies.append(prepare(batch["data"][i], batch["relpath"][i], how.max_megapixels))
                    on_cpu.append(i)
                except Exception as exc:  # noqa: BLE001 - any failure becomes this photo's row
                    fail(batch, i, exc)
                continue
            batch["encoded"][i], batch["render_path"][i] = done.encoded, where
            batch["data"][i] = b""  # written as encoded: the photo's bytes travel no further
            batch["width"][i], batch["height"][i] = done.width, done.height
            batch["fg_fraction"][i] = done.rendering.fg_fraction
            batch["interp_start"][i], batch["interp_stop"][i] = done.rendering.start, done.rendering.stop
            batch["seconds_decode"][i] += done.seconds["decode"]
            for step in (*MODEL_TASKS, "effect", "encode"):
                batch[f"seconds_{step}"][i] = done.seconds[step]
            for name, png in done.intermediates.items():
                batch[f"png_{name}"][i] = png
            if done.left_alone:  # written unchanged by the finishing task, so the output stays complete
                leave_alone(batch, i, done.left_alone, done.reason)
        if on_cpu:
            self._maps(batch, on_cpu, copies)
        self._model_names(batch)
        return batch

    def _model_names(self, batch: dict) -> None:
        n = len(batch["relpath"])
        for task, model in (("saliency", self.models.saliency), ("depth", self.models.depth)):
            batch[f"{task}_model"] = np.array([model.name] * n, dtype=object)
            batch[f"{task}_version"] = np.array([model.version] * n, dtype=object)
            batch[f"{task}_runtime"] = np.array([model.runtime] * n, dtype=object)

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
            _release_gpu_cache()
            maps = []
            for k, i in enumerate(live):
                try:
                    maps.extend(self.models.predict([copies[k]]))
                    seconds = {task: seconds[task] + t for task, t in self.models.seconds.items()}
                except Exception as exc:  # noqa: BLE001
                    fail(batch, i, exc)
                    maps.append(None)
        for i, found in zip(live, maps):
            if found is not None:
                batch["saliency"][i], batch["depth"][i] = pack_saliency(found.saliency), pack_depth(found.depth)
        for task in MODEL_TASKS:
            batch[f"seconds_{task}"][live] = seconds[task] / max(1, len(live))


def _release_gpu_cache() -> None:
    """After a CUDA out-of-memory, give cached blocks back before the smaller retries."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


# What a photo's rendering tells the manifest; set by whichever stage renders it.
RENDER_NUMBERS = {
    "width": np.int32,
    "height": np.int32,
    "fg_fraction": np.float32,
    "interp_start": np.float32,
    "interp_stop": np.float32,
    "seconds_effect": np.float32,
    "seconds_encode": np.float32,
}
# Columns the model actor adds with the torch render backend, for the finishing task to write.
DEVICE_COLUMNS = ("encoded", "render_path", *RENDER_NUMBERS, *(f"png_{name}" for name in INTERMEDIATE_NAMES))


@dataclass(frozen=True)
class DeviceRendering:
    """What the model actor needs to render on its device (the torch render backend)."""

    params: EffectParams
    format: str
    quality: int
    max_megapixels: float
    intermediates: bool
    batch_bytes: int | None = None  # decoded pixel bytes per device batch (None: from free memory)

    @classmethod
    def of(cls, config: JobConfig) -> DeviceRendering:
        return cls(
            config.params,
            config.format,
            config.quality,
            config.max_megapixels,
            config.save_intermediates,
            config.device_batch_bytes,
        )


def finish_photos(batch: dict, config: JobConfig) -> dict:
    """Write what the device path encoded; decode at full resolution, apply the effect and encode
    the others (the CPU path), then write them. Every write is atomic."""
    images = Storage(f"{config.output.rstrip('/')}/{IMAGES_DIR}", config.storage_options)
    intermediates = Storage(f"{config.output.rstrip('/')}/{INTERMEDIATES_DIR}", config.storage_options)
    writable(batch, *UPDATED)
    n = len(batch["relpath"])
    for column, dtype in (*RENDER_NUMBERS.items(), ("seconds_write", np.float32), ("storage_retries", np.int32)):
        batch[column] = np.array(batch[column], dtype) if column in batch else np.zeros(n, dtype)
    batch["output_uri"] = np.array([""] * n, dtype=object)
    batch["render_path"] = np.array(batch.get("render_path", [""] * n), dtype=object)
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
                done = finish(
                    batch["data"][i],
                    relpath,
                    unpack_map(batch["saliency"][i]),
                    unpack_map(batch["depth"][i]),
                    config.params,
                    config.format,
                    config.quality,
                    config.max_megapixels,
                    config.save_intermediates,
                    depth_measured=model_class(batch["depth_model"][i]).measures_depth,
                )
                data, pngs = done.encoded, done.intermediates
                batch["seconds_decode"][i] += done.seconds["decode"]
                batch["seconds_effect"][i], batch["seconds_encode"][i] = done.seconds["effect"], done.seconds["encode"]
                batch["height"][i], batch["width"][i] = done.height, done.width
                batch["fg_fraction"][i] = done.rendering.fg_fraction
                batch["interp_start"][i], batch["interp_stop"][i] = done.rendering.start, done.rendering.stop
                batch["render_path"][i] = NUMPY_PATH
                if done.left_alone:  # written unchanged, so the library's output stays complete
                    leave_alone(batch, i, done.left_alone, done.reason)
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
    """finish_photos as a Ray Data stage, ending in the photos' manifest rows: the workers build
    them, the driver only commits them."""
    device_columns = tuple(c for c in (*DEVICE_COLUMNS, "storage_retries") if c in table.column_names)
    finished = arrow_stage(
        table,
        functools.partial(finish_photos, config=config),
        drops=(*HEAVY, "encoded", *(f"png_{name}" for name in INTERMEDIATE_NAMES)),
        reads=(
            "relpath",
            "output_relpath",
            *UPDATED,
            "data",
            "saliency",
            "depth",
            "depth_model",
            *device_columns,
        ),
        updates=(*UPDATED, *RENDER_NUMBERS, "render_path", "storage_retries"),
    )
    return job_manifest_rows(finished, config, run_id, source_root)


def job_manifest_rows(rows: pa.Table, config: JobConfig, run_id: str, source_root: str) -> pa.Table:
    """manifest_rows of this job's photos: its preset and job hash, this run (for the finishing
    tasks' rows and the driver's rows of photos the listing decided alike)."""
    return manifest_rows(
        rows, source_root=source_root, preset=config.params.preset, job_hash=config.job_hash(), run_id=run_id
    )
