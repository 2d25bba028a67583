"""What runs on Ray's workers: the one-photo steps of pipeline.photo over a group of photos,
plus columns, timings and failure capture. A photo that fails at any stage carries its error
to the end and becomes a failed (or skipped) manifest row; the others go on.

    read_stage   (CPU task)   relpath -> data (the file's bytes), model_copy
    ModelStage   (actor)      model_copy -> saliency, depth (both models, one device)
    finish_stage (CPU task)   data, saliency, depth -> the written output, sizes, timings
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import time
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
from ..manifest import FAILED, OK, SKIPPED
from ..models import model_class
from ..photo import SceneMaps, SceneModels, finish, prepare
from ..storage import Storage
from .plan import IMAGES_DIR, INTERMEDIATES_DIR, JobConfig
from .weights import Shipment

log = logging.getLogger(__name__)


def _now() -> float:
    return time.perf_counter()


def fail(batch: dict, i: int, exc: BaseException) -> None:
    """Record a photo's failure in its row: the kind decides failed or skipped."""
    kind = classify(exc)
    batch["status"][i] = SKIPPED if kind is not None and kind.leaves_alone else FAILED
    batch["error_kind"][i] = error_kind(exc)
    batch["error"][i] = (
        str(exc)
        if isinstance(exc, DreamfocusError)  # these name the file already
        else f"{batch['relpath'][i]}: {type(exc).__name__}: {exc}"
    )


def read_photos(batch: dict, input_uri: str, storage_options: dict, max_megapixels: float) -> dict:
    """Read the bytes, decode a reduced copy for the models."""
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
        batch["started_at"][i] = np.datetime64(datetime.now(UTC).replace(tzinfo=None), "ms")
        t0 = _now()
        try:
            data = inputs.read_bytes(relpath)
            t1 = _now()
            batch["model_copy"][i] = pack(prepare(data, relpath, max_megapixels))
            batch["data"][i] = data
            batch["seconds_read"][i], batch["seconds_decode"][i] = t1 - t0, _now() - t1
        except Exception as exc:  # noqa: BLE001 - any failure becomes this photo's row
            fail(batch, i, exc)
    return batch


def read_stage(table: pa.Table, **kwargs) -> pa.Table:
    """read_photos as a Ray Data stage."""
    return arrow_stage(table, functools.partial(read_photos, **kwargs), reads=("relpath",))


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
    ) -> None:
        weights = {"saliency": saliency_weights, "depth": depth_weights}
        for task, shipment in (shipped or {}).items():
            weights[task] = str(shipment.local_path())
        self.models = SceneModels(saliency, depth, weights["saliency"], weights["depth"], device, batch_size).load()

    def __call__(self, table: pa.Table) -> pa.Table:
        # The model copy is not needed after the models: it does not travel on to the CPU stage.
        return arrow_stage(table, self.predict, ("relpath", *ROW_STATE, "model_copy"), drops=("model_copy",))

    def predict(self, batch: dict) -> dict:
        writable(batch, *ROW_STATE)
        n = len(batch["relpath"])
        live = [i for i in range(n) if batch["status"][i] == OK]
        saliency, depth = np.array([b""] * n, dtype=object), np.array([b""] * n, dtype=object)
        t0 = _now()
        copies = [unpack(batch["model_copy"][i]) for i in live]
        maps: list[SceneMaps | None]
        try:
            maps = list(self.models.predict(copies))
        except Exception:  # noqa: BLE001 - retry one by one, so one bad photo fails alone
            log.warning("models failed on a batch of %d; retrying one by one", len(live), exc_info=True)
            _release_gpu_cache()
            maps = []
            for k, i in enumerate(live):
                try:
                    maps.extend(self.models.predict([copies[k]]))
                except Exception as exc:  # noqa: BLE001
                    fail(batch, i, exc)
                    maps.append(None)
        for i, found in zip(live, maps):
            if found is not None:
                saliency[i], depth[i] = pack_saliency(found.saliency), pack_depth(found.depth)
        batch["saliency"], batch["depth"] = saliency, depth
        batch["seconds_models"] = np.full(n, (_now() - t0) / max(1, len(live)), np.float32)
        for task, model in (("saliency", self.models.saliency), ("depth", self.models.depth)):
            batch[f"{task}_model"] = np.array([model.name] * n, dtype=object)
            batch[f"{task}_version"] = np.array([model.version] * n, dtype=object)
        return batch


def _release_gpu_cache() -> None:
    """After a CUDA out-of-memory, give cached blocks back before the smaller retries."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def finish_photos(batch: dict, config: JobConfig) -> dict:
    """Decode at full resolution, apply the effect, encode and write atomically."""
    images = Storage(f"{config.output.rstrip('/')}/{IMAGES_DIR}", config.storage_options)
    intermediates = Storage(f"{config.output.rstrip('/')}/{INTERMEDIATES_DIR}", config.storage_options)
    writable(batch, *UPDATED)
    n = len(batch["relpath"])
    for column, dtype in (
        ("width", np.int32),
        ("height", np.int32),
        ("fg_fraction", np.float32),
        ("interp_start", np.float32),
        ("interp_stop", np.float32),
        ("seconds_effect", np.float32),
        ("seconds_encode", np.float32),
        ("seconds_write", np.float32),
    ):
        batch[column] = np.zeros(n, dtype)
    batch["output_uri"] = np.array([""] * n, dtype=object)
    for i in range(n):
        if batch["status"][i] != OK:
            continue
        relpath = batch["relpath"][i]
        try:
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
            t0 = _now()
            target = batch["output_relpath"][i]
            images.write_atomic(target, done.encoded)
            stem = os.path.splitext(target)[0]
            for name, png in done.intermediates.items():
                intermediates.write_atomic(f"{stem}.{name}.png", png)
            batch["seconds_write"][i] = _now() - t0
            batch["seconds_decode"][i] += done.seconds["decode"]
            batch["seconds_effect"][i], batch["seconds_encode"][i] = done.seconds["effect"], done.seconds["encode"]
            batch["height"][i], batch["width"][i] = done.height, done.width
            batch["fg_fraction"][i] = done.rendering.fg_fraction
            batch["interp_start"][i], batch["interp_stop"][i] = done.rendering.start, done.rendering.stop
            batch["output_uri"][i] = images.uri_of(target)
            if done.left_alone:  # written unchanged, so the library's output stays complete
                batch["status"][i], batch["error_kind"][i], batch["error"][i] = SKIPPED, done.left_alone, done.reason
        except Exception as exc:  # noqa: BLE001 - any failure becomes this photo's row
            fail(batch, i, exc)
    return batch


def finish_stage(table: pa.Table, config: JobConfig) -> pa.Table:
    """finish_photos as a Ray Data stage."""
    return arrow_stage(
        table,
        functools.partial(finish_photos, config=config),
        drops=HEAVY,
        reads=("relpath", "output_relpath", *UPDATED, "data", "saliency", "depth", "depth_model"),
    )
