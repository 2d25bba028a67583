"""Model weights for a library job: found and checked by the driver before Ray starts (in
``pipeline.models.weights``, the one place weights are looked up), then shipped to the model
actors through Ray's object store.

    resolve_models(config)     (driver, before Ray)  each task's model and its checked weights
                                                     files (models.weights.job_models); a depth
                                                     model without weights becomes the ground
                                                     prior there, once
    ship(models)               (driver, Ray up)      each weights file put in the object store
    Shipment.local_path()      (model actor)         the weights on the actor's node: the
                                                     driver's own files on the driver's node,
                                                     elsewhere one copy per node, written by
                                                     the first actor of the node

So worker nodes need no set-up, no network to the weights' source and nothing in their cache:
what the driver checked is what every actor loads. The copy on a node lives in that node's
cache (``$DREAMFOCUS_CACHE/shipped/<model>-<digest>/``), written under a lock and moved into
place whole, so any number of actors on a node transfer the weights once; later jobs with the
same weights reuse it after checking it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import WeightsUnavailableError
from ..models import model_class
from ..models.weights import (
    JobModel,
    WeightsCopy,
    job_models,
    replaced_atomically,
    weights_digest,
    writable_cache_dir,
)

log = logging.getLogger(__name__)

SHIPPED_DIR = "shipped"
_MAPPED = 1 << 20  # files at least this large go to the object store memory-mapped (no copy in the driver)


def resolve_models(config: Any) -> dict[str, JobModel]:
    """The job's models (``config``: a JobConfig) with their weights checked, before any Ray
    start-up: ``models.weights.job_models`` with the config's models, weights and copy
    (``config.weights_from``)."""
    copy = WeightsCopy(config.weights_from, config.storage_options) if getattr(config, "weights_from", None) else None
    # A runtime that is unknown, or not installed here, is said now rather than by a model actor.
    model_class(config.saliency_model).runtime_for(getattr(config, "device", None), getattr(config, "runtime", None))
    return job_models(config.saliency_model, config.depth_model, config.saliency_weights, config.depth_weights, copy)


# ------------------------------------------------------------------------------ shipping


@dataclass(frozen=True)
class Shipment:
    """A model's weights in Ray's object store, as the driver checked them; picklable, so it
    travels to the actors with their constructor arguments."""

    model: JobModel
    refs: dict[str, Any]  # relpath -> ObjectRef of the file's bytes (a uint8 array)
    origin_node: str | None  # the driver's node, whose actors use the driver's files in place

    @property
    def key(self) -> str:
        return f"{self.model.name}-{self.model.digest[:16]}"

    def local_path(self) -> Path:
        """The weights on this node: a file or folder as the model loads it."""
        import ray

        node = ray.get_runtime_context().get_node_id()
        origin = self.model.path
        if origin is not None and node == self.origin_node and origin.exists():
            return origin
        return self._entry(self.materialise(writable_cache_dir() / SHIPPED_DIR, node))

    def materialise(self, root: Path, node: str = "") -> Path:
        """This node's copy of the weights under ``root`` (one folder, keyed by the digest):
        reused when there and intact, else fetched from the object store, checked and moved into
        place under a lock, so that concurrent actors of a node transfer the weights once."""
        import ray

        root.mkdir(parents=True, exist_ok=True)
        final = root / self.key
        t0 = time.perf_counter()
        with _locked(root / f"{self.key}.lock"):
            if final.is_dir() and self._intact(final):
                self._record(root, "reused", node, 0, time.perf_counter() - t0)
                return final
            if final.exists():
                log.warning("%s does not hold the weights it should; fetching them again", final)
                shutil.rmtree(final)
            with replaced_atomically(final) as tmp:
                for wanted in self.model.files:
                    target = tmp / wanted.relpath
                    target.parent.mkdir(parents=True, exist_ok=True)
                    data = ray.get(self.refs[wanted.relpath])
                    with open(target, "wb") as out:
                        out.write(memoryview(data).cast("B"))
                    del data
                self._check(tmp)
            seconds = time.perf_counter() - t0
            self._record(root, "fetched", node, self.model.nbytes, seconds)
        log.info("%s: %.1f MB of weights from the object store in %.2f s", self.key, self.model.nbytes / 1e6, seconds)
        return final

    def _entry(self, folder: Path) -> Path:
        """What the model loads: the file itself for a one-file model, else the folder."""
        return folder if self.model.folder else folder / self.model.files[0].relpath

    def _check(self, folder: Path) -> None:
        for wanted in self.model.files:
            path = folder / wanted.relpath
            actual = weights_digest(path) if path.is_file() else "missing"
            if actual != wanted.sha256:
                raise WeightsUnavailableError(
                    f"shipped weights of {self.model.name}: {wanted.relpath} has sha256 {actual}, "
                    f"expected {wanted.sha256}"
                )

    def _intact(self, folder: Path) -> bool:
        try:
            self._check(folder)
        except (WeightsUnavailableError, OSError):
            return False
        return True

    def _record(self, root: Path, what: str, node: str, nbytes: int, seconds: float) -> None:
        """One line per actor start in ``<key>.log``: whether it transferred the weights or reused them."""
        line = json.dumps({"event": what, "node": node, "pid": os.getpid(), "bytes": nbytes, "seconds": seconds})
        with open(root / f"{self.key}.log", "a", encoding="utf-8") as f:
            f.write(line + "\n")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ship(models: dict[str, JobModel]) -> dict[str, Shipment]:
    """Every model's weights files put in Ray's object store (Ray started): task -> Shipment."""
    import numpy as np
    import ray

    # Through Ray Client (ray://) the driver's files are on another machine than its node.
    client = ray.util.client.ray.is_connected()
    origin = None if client else ray.get_runtime_context().get_node_id()
    shipped = {}
    for task, model in models.items():
        if model.path is None:
            continue
        t0 = time.perf_counter()
        refs = {}
        for f in model.files:
            path = model.path / f.relpath if model.folder else model.path
            if f.size >= _MAPPED:  # copied once, from the page cache into the object store
                refs[f.relpath] = ray.put(np.asarray(np.memmap(path, dtype=np.uint8, mode="r")))
            else:
                refs[f.relpath] = ray.put(np.frombuffer(path.read_bytes(), dtype=np.uint8))
        seconds = time.perf_counter() - t0
        log.info("%s: %.1f MB of weights in the object store in %.2f s", model.name, model.nbytes / 1e6, seconds)
        shipped[task] = Shipment(model, refs, origin)
    return shipped
