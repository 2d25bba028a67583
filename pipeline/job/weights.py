"""Model weights for a library job: resolved and checked by the driver before Ray starts, then
shipped to the model actors through Ray's object store.

    resolve_models(config)     (driver, before Ray)  each task's model and its checked weights
                                                     files; a depth model without weights
                                                     becomes the ground prior here, once
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
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import BadInputError, WeightsUnavailableError
from ..models import DEPTH, FALLBACK_DEPTH, SALIENCY, model_class, warn_depth_fallback
from ..models.weights import (
    cache_dir,
    fetch_to_cache,
    fetch_weights,
    replaced_atomically,
    resolve_weights,
    uri_key,
    weights_digest,
    writable_cache_dir,
)

log = logging.getLogger(__name__)

SHIPPED_DIR = "shipped"
_MAPPED = 1 << 20  # files at least this large go to the object store memory-mapped (no copy in the driver)


@dataclass(frozen=True)
class WeightsFile:
    relpath: str  # the file's name (a file model) or its path inside the weights folder
    size: int
    sha256: str


@dataclass(frozen=True)
class JobModel:
    """The model that will run for a task, and the weights the driver checked for it."""

    task: str
    name: str  # the model that runs: the ground prior when the depth model's weights are missing
    path: Path | None = None  # the weights on the driver: a file or a folder; None: no weights
    files: tuple[WeightsFile, ...] = ()
    digest: str = ""  # a file's sha256, or that of a folder's listing (names, sizes, sha256s)
    folder: bool = False  # the weights are a folder (the model loads the folder, not a file)

    @property
    def nbytes(self) -> int:
        return sum(f.size for f in self.files)


def _one_line(message: str) -> str:
    return " ".join(message.split())


def resolve_models(config: Any) -> dict[str, JobModel]:
    """Each task's model with its weights found (cache, the configured path or URI, the model's
    environment variable, its registry or hub) and checked, before any Ray start-up.

    With ``config.weights_from`` (a copy that ``dreamfocus models fetch --to`` wrote), the
    weights come from that copy only, checked against its sha256s (and the model's own, where it
    has one); weights named for one model still win.

    A saliency model without weights raises WeightsUnavailableError in one line that says how to
    supply them. A depth model without weights (none named explicitly) becomes the ground prior,
    with one warning.
    """
    copy = WeightsCopy(config.weights_from, config.storage_options) if getattr(config, "weights_from", None) else None
    # A runtime that is unknown, or not installed here, is said now rather than by a model actor.
    model_class(config.saliency_model).runtime_for(getattr(config, "device", None), getattr(config, "runtime", None))
    saliency = _resolve(SALIENCY, config.saliency_model, config.saliency_weights, copy)
    try:
        depth = _resolve(DEPTH, config.depth_model, config.depth_weights, copy)
    except WeightsUnavailableError as exc:
        if config.depth_weights or config.depth_model == FALLBACK_DEPTH:
            raise  # weights named explicitly that cannot be used: not silently something else
        warn_depth_fallback(log, config.depth_model, exc)
        depth = JobModel(DEPTH, FALLBACK_DEPTH)
    return {SALIENCY: saliency, DEPTH: depth}


def _resolve(task: str, name: str, weights: str | None, copy: WeightsCopy | None = None) -> JobModel:
    cls = model_class(name)
    if cls.task != task:
        raise BadInputError(f"model {name!r} is a {cls.task} model, not a {task} model")
    if not cls.needs_weights:
        return JobModel(task, name)
    t0 = time.perf_counter()
    try:
        where = copy.fetch(cls) if copy is not None and not weights else resolve_weights(cls, weights)
    except WeightsUnavailableError as missing:
        # Weights named by the user or in the copy named, or a corrupt file in the cache: said as is.
        if weights or copy is not None or cls.local_weights() is not None:
            raise WeightsUnavailableError(_one_line(str(missing))) from missing
        try:  # nothing at hand: the registry or hub the weights are published on, into the cache
            where = _fetch(cls)
        except WeightsUnavailableError as exc:
            raise WeightsUnavailableError(
                _one_line(
                    f"no weights for {name} in {cache_dir()}, and {_lower_first(str(exc))} "
                    f"(here: --{task}-weights PATH_OR_URI)"
                )
            ) from exc
    if not isinstance(where, Path):  # a hub id: copied into the cache once, so it can be shipped
        where = _fetch(cls)
    model = describe(task, name, where)
    log.info(
        "%s: weights checked in %.2f s (%.1f MB, %s, sha256 %s)",
        name,
        time.perf_counter() - t0,
        model.nbytes / 1e6,
        where,
        model.digest[:12],
    )
    return model


def _fetch(cls) -> Path:
    path = fetch_weights(cls)
    if path is None:  # pragma: no cover - only models without weights have none
        raise WeightsUnavailableError(f"no weights for {cls.name}; {cls.how_to_fetch()}")
    return path


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]


def describe(task: str, name: str, path: Path) -> JobModel:
    """A JobModel for the weights at ``path`` (a file, or a folder of files), with their hashes."""
    if path.is_file():
        digest = weights_digest(path)
        return JobModel(task, name, path, (WeightsFile(path.name, path.stat().st_size, digest),), digest)
    files = tuple(
        WeightsFile(p.relative_to(path).as_posix(), p.stat().st_size, weights_digest(p))
        for p in sorted(path.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not files:
        raise WeightsUnavailableError(f"{path}: no weights files for {name}")
    listing = json.dumps([(f.relpath, f.size, f.sha256) for f in files]).encode()
    return JobModel(task, name, path, files, hashlib.sha256(listing).hexdigest(), folder=True)


# ------------------------------------------------------------------- a copy for offline clusters

INDEX = "weights.json"


def _fs(uri: str, storage_options: dict | None):
    import fsspec

    try:
        return fsspec.core.url_to_fs(uri, **(storage_options or {}))
    except (ImportError, ValueError) as exc:
        raise WeightsUnavailableError(f"cannot open {uri}: {exc}") from exc


def export_weights(paths: dict[str, Path], uri: str, storage_options: dict | None = None) -> str:
    """Models' weights (name -> the checked local file or folder) copied to ``uri`` (a folder or
    bucket) as ``<uri>/<name>/<file>``, with ``<uri>/weights.json`` listing every file's size and
    sha256, written last. Models already listed there and not given here stay listed."""
    fs, root = _fs(uri, storage_options)
    root = root.rstrip("/")
    local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
    try:
        index = json.loads(fs.cat_file(f"{root}/{INDEX}"))
    except FileNotFoundError:
        index = {}
    listed = index.setdefault("models", {})
    for name, path in paths.items():
        model = describe("", name, path)
        for f in model.files:
            target = f"{root}/{name}/{f.relpath}"
            if local:
                fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
            fs.put_file(str(path / f.relpath if model.folder else path), target)
        listed[name] = {
            "folder": model.folder,
            "digest": model.digest,
            "files": [{"relpath": f.relpath, "size": f.size, "sha256": f.sha256} for f in model.files],
        }
    if local:
        fs.makedirs(root, exist_ok=True)
    fs.pipe_file(f"{root}/{INDEX}", json.dumps(index, indent=1, sort_keys=True).encode())
    return uri.rstrip("/")


class WeightsCopy:
    """A folder or bucket that ``export_weights`` (``dreamfocus models fetch --to``) wrote: each
    model's files are copied into the driver's cache and checked against the sha256s listed."""

    def __init__(self, uri: str, storage_options: dict | None = None) -> None:
        self.uri = uri.rstrip("/")
        self.storage_options = storage_options
        fs, root = _fs(self.uri, storage_options)
        try:
            self.models: dict[str, dict] = json.loads(fs.cat_file(f"{root.rstrip('/')}/{INDEX}"))["models"]
        except FileNotFoundError as exc:
            raise WeightsUnavailableError(
                f"{self.uri} holds no {INDEX}: write a copy there with `dreamfocus models fetch --to {self.uri}`"
            ) from exc
        except (KeyError, TypeError, ValueError) as exc:
            raise WeightsUnavailableError(f"{self.uri}/{INDEX} is not a weights listing: {exc}") from exc
        except Exception as exc:  # noqa: BLE001 - any fsspec backend error means: not available
            raise WeightsUnavailableError(f"cannot read {self.uri}/{INDEX}: {type(exc).__name__}: {exc}") from exc

    def fetch(self, cls) -> Path:
        """``cls``'s weights from the copy, in the driver's cache, checked; their local path."""
        entry = self.models.get(cls.name)
        if entry is None:
            raise WeightsUnavailableError(f"{self.uri}/{INDEX} lists no weights for {cls.name}")
        try:
            files = [WeightsFile(str(f["relpath"]), int(f["size"]), str(f["sha256"])) for f in entry["files"]]
            folder = bool(entry["folder"])
        except (KeyError, TypeError, ValueError) as exc:
            raise WeightsUnavailableError(f"{self.uri}/{INDEX}: bad entry for {cls.name}: {exc}") from exc
        for f in files:
            parts = Path(f.relpath).parts
            if not parts or Path(f.relpath).is_absolute() or ".." in parts:
                raise WeightsUnavailableError(f"{self.uri}/{INDEX}: unsafe file name {f.relpath!r} for {cls.name}")
        if not files or (folder is False and len(files) != 1):
            raise WeightsUnavailableError(f"{self.uri}/{INDEX}: no weights files listed for {cls.name}")
        if cls.sha256 is not None and not folder and files[0].sha256 != cls.sha256:
            raise WeightsUnavailableError(
                f"{self.uri}/{INDEX} lists other weights for {cls.name}: sha256 {files[0].sha256}, "
                f"expected {cls.sha256}"
            )
        base = f"from-{uri_key(self.uri)}/{cls.name}"
        for f in files:
            fetch_to_cache(f"{self.uri}/{cls.name}/{f.relpath}", f"{base}/{f.relpath}", f.sha256, self.storage_options)
        path = cache_dir() / base if folder else cache_dir() / base / files[0].relpath
        cls.check_weights(path)
        return path


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
