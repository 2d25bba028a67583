"""Storage: the photos, the outputs and the manifest, in local folders or at any fsspec URI
(model weights have a cache of their own: models/weights.py).

A `Storage` is rooted at a folder (``/photos``, ``s3://bucket/photos``, ``gs://...``,
``memory://...``). Inputs are listed as `SourceFile` rows with a path relative to that root
and a fingerprint that changes when a file's content is replaced; outputs are written
atomically, so a killed job never leaves a half-written file under its final name.
Transient errors (dropped connections, timeouts, S3 throttling and 5xx) are retried with
exponential backoff; missing files and refused permissions are not.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import functools
import logging
import mimetypes
import os
import random
import re
import secrets
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline.errors import (
    BadInputError,
    OutputError,
    ReadError,
    SourceChangedError,
    SourceVanishedError,
    UnsafeNameError,
)

log = logging.getLogger(__name__)
T = TypeVar("T")
# Folders listed at once ahead of the one the listing is at (Storage.list_folders).
LISTING_PREFETCH = 16


@dataclass(frozen=True)
class SourceFile:
    relpath: str  # posix, relative to the storage root
    size: int
    fingerprint: str  # "etag:<etag>" or "mtime:<mtime>:<size>"
    broken: str = ""  # why it cannot be read, for a symbolic link that leads to no file ("" otherwise)


# --------------------------------------------------------------------------- retries

_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)
_TRANSIENT_ERRNOS = {
    errno.EAGAIN,
    errno.EBUSY,
    errno.ETIMEDOUT,
    errno.ECONNRESET,
    errno.ECONNABORTED,
    errno.ECONNREFUSED,
    errno.EPIPE,
    errno.ENETDOWN,
    errno.ENETUNREACH,
    errno.EHOSTUNREACH,
    getattr(errno, "EREMOTEIO", -1),
}
_TRANSIENT_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "TooManyRequests",
    "RequestLimitExceeded",
    "ServiceUnavailable",
    "InternalError",
    "RequestTimeout",
}
_TRANSIENT_TEXT = re.compile(
    r"\b(?:SlowDown|Throttl\w*|TooManyRequests|RequestLimitExceeded|ServiceUnavailable"
    r"|InternalError|reduce your request rate)\b"
    r"|\b(?:status(?: code)?|HTTP)[ :=]*(?:5\d\d|429)\b",
    re.IGNORECASE,
)


@functools.cache
def _transient_types() -> tuple[type, ...]:
    types: list[type] = [ConnectionError, TimeoutError]  # TimeoutError covers asyncio's
    with contextlib.suppress(ImportError):
        import botocore.exceptions as bx

        types += [bx.ConnectionError, bx.HTTPClientError]  # endpoint, read/connect timeouts
    with contextlib.suppress(ImportError):
        import aiohttp

        types += [aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, aiohttp.ServerTimeoutError]
    return tuple(types)


def is_transient(exc: BaseException) -> bool:
    """True for errors worth retrying: connection trouble, timeouts, throttling, 5xx."""
    if isinstance(exc, _PERMANENT):
        return False
    seen = 0
    e: BaseException | None = exc
    while e is not None and seen < 5:  # s3fs wraps the botocore error as __cause__
        if isinstance(e, _transient_types()):
            return True
        if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS:
            return True
        response = getattr(e, "response", None)  # botocore ClientError
        if isinstance(response, dict):
            code = str(response.get("Error", {}).get("Code", ""))
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            if code in _TRANSIENT_CODES or status >= 500 or status == 429:
                return True
        status = getattr(e, "status", None)  # aiohttp.ClientResponseError
        if isinstance(status, int) and (status >= 500 or status == 429):
            return True
        if _TRANSIENT_TEXT.search(str(e)):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


# Transient errors retried in this process so far, by operation ("read", "write", "list", ...):
# a run's summary says how many it met, so recovered faults are seen, not only lost ones.
RETRIED: Counter[str] = Counter()


def retried_total() -> int:
    return sum(RETRIED.values())


def retry(fn: Callable[[], T], *, attempts: int = 5, base_delay: float = 0.2, what: str = "storage operation") -> T:
    """Call fn(); on a transient error wait base_delay * 2**n (with jitter) and try again.

    Permanent errors (missing file, permission, ...) are raised at once; after `attempts`
    tries the last error is raised. Each retry is counted in RETRIED under what's first word.
    """
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:
            if attempt >= attempts or not is_transient(exc):
                raise
            RETRIED[what.split(" ", 1)[0]] += 1
            delay = base_delay * 2 ** (attempt - 1) * random.uniform(0.5, 1.5)
            log.warning(
                "%s failed (%s: %s); retry %d/%d in %.2fs", what, type(exc).__name__, exc, attempt, attempts - 1, delay
            )
            time.sleep(delay)
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------- paths

_DRIVE = re.compile(r"^[A-Za-z]:")


def safe_relpath(relpath: str) -> str:
    """Validate a path relative to the input root before an output path is derived from it.

    Rejects absolute paths, drive letters, "..", empty components ("a//b", trailing "/"),
    backslashes and NUL; drops "." components; returns a posix relative path.
    """

    def bad(why: str) -> UnsafeNameError:
        return UnsafeNameError(f"unsafe relative path {relpath!r}: {why}")

    if not isinstance(relpath, str) or not relpath:
        raise bad("empty")
    if "\0" in relpath:
        raise bad("contains NUL")
    if "\\" in relpath:
        raise bad("contains a backslash")
    if relpath.startswith("/") or _DRIVE.match(relpath):
        raise bad("absolute path")
    parts = [p for p in relpath.split("/") if p != "."]
    if "" in parts:
        raise bad("empty path component")
    if ".." in parts:
        raise bad("'..' component")
    if not parts:
        raise bad("no file name")
    return "/".join(parts)


_PROTOCOL_ALIASES = {"s3a": "s3", "gcs": "gs", "abfs": "az", "abfss": "az", "local": "file"}


def _split(uri: str) -> tuple[str, str]:
    protocol, path = fsspec.core.split_protocol(uri)
    protocol = _PROTOCOL_ALIASES.get(protocol or "file", protocol or "file")
    if protocol == "file":
        return protocol, os.path.realpath(os.path.expanduser(path))
    return protocol, path.strip("/")


def _within(inner: str, outer: str) -> bool:
    """True where the local path `inner` is `outer` or lies under it."""
    return os.path.commonpath([inner, outer]) == outer


def is_inside(inner_uri: str, outer_uri: str) -> bool:
    """True if inner_uri is outer_uri or lies under it (same protocol, whole components)."""
    (p_in, inner), (p_out, outer) = _split(inner_uri), _split(outer_uri)
    if p_in != p_out:
        return False
    if p_in == "file":
        return _within(inner, outer)
    return outer == "" or inner == outer or inner.startswith(outer + "/")


# --------------------------------------------------------------------------- storage


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _fingerprint(info: dict) -> str:
    """ "etag:<etag>" where the store keeps one (S3, GCS), else "mtime:<mtime>:<size>"."""
    etag = str(info.get("ETag") or info.get("etag") or "").strip('"')
    if etag:
        return f"etag:{etag}"
    keys = ("mtime", "LastModified", "last_modified", "updated", "modified", "created")
    value = next((info[k] for k in keys if info.get(k) is not None), None)
    if isinstance(value, _dt.datetime):
        value = value.isoformat()
    return f"mtime:{value}:{int(info.get('size') or 0)}"


class _FolderLinks:
    """Which folders a local listing enters, so that linked folders are followed once each.

    Each real folder is listed once: at its own path where it lies under the root (a link to it
    from elsewhere under the root is not followed), else at the first link to it in the
    listing's order. A link back into a folder the listing is in (a loop), and one into an
    excluded folder, is named in one warning and not followed.
    """

    def __init__(self, root: str, excluded: Iterable[str] = ()) -> None:
        self.root = root.rstrip("/") or "/"
        self.real_root = os.path.realpath(self.root)
        # An excluded folder that holds the root itself excludes nothing: the root is what is listed.
        real_excluded = (os.path.realpath(path) for path in excluded)
        self.excluded = [path for path in real_excluded if not _within(self.real_root, path)]
        self.listed: dict[str, str] = {}  # real path -> the path it was listed at

    def first_visit(self, folder: str) -> bool:
        """True the first time a real folder comes to be listed, False after (it says so) and for
        an excluded folder that a link leads into (it warns)."""
        real = os.path.realpath(folder)
        inside = next((path for path in self.excluded if _within(real, path)), None)
        if inside is not None:
            log.warning("%s leads into %s, which is left out of the listing; not followed", folder, inside)
            return False
        if real in self.listed:
            log.info("%s: the same folder as %s, listed there only", folder, self.listed[real])
            return False
        self.listed[real] = folder
        return True

    def follow(self, folder: str, link: str, info: dict) -> bool:
        """Whether the listing of `folder` enters its linked folder `link`."""
        real, destination = os.path.realpath(link), info.get("destination", "")
        chain = [folder]  # the folders the listing is in: `folder`, its parents up to the root
        while chain[-1] != self.root and len(chain[-1]) > len(self.root):
            chain.append(os.path.dirname(chain[-1]))
        if any(_within(os.path.realpath(inside), real) for inside in chain):
            log.warning(
                "symbolic link loop: %s -> %s leads back into a folder it is in; not followed", link, destination
            )
            return False
        relative = os.path.relpath(real, self.real_root)
        if _within(real, self.real_root) and not any(_is_hidden(part) for part in relative.split(os.sep)):
            log.info("%s -> %s: a folder under the root, listed at its own path only", link, destination)
            return False
        return True


def read_file(uri: str, storage_options: dict | None = None) -> bytes:
    """One file's bytes by its path or URI (transient errors retried), or a BadInputError that
    says why not: for files a user names one by one, not a library's."""
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    try:
        return retry(lambda: fs.cat_file(path), what=f"read {uri}")
    except FileNotFoundError:
        raise BadInputError(f"{uri}: file not found") from None
    except IsADirectoryError:
        raise BadInputError(f"{uri}: is a directory, not a file") from None
    except PermissionError:
        raise BadInputError(f"{uri}: permission denied") from None


class Storage:
    """Files under one root folder, local or any fsspec URI."""

    def __init__(self, uri: str, storage_options: dict | None = None):
        self.storage_options = dict(storage_options or {})
        if "://" not in uri and "::" not in uri:
            uri = os.path.expanduser(uri)
        self._given_uri = uri
        self.fs, root = fsspec.core.url_to_fs(uri, **self.storage_options)
        self.is_local = isinstance(self.fs, LocalFileSystem)
        self.root = root.rstrip("/") or ("/" if self.is_local else "")
        self.uri = self.root if self.is_local else self.fs.unstrip_protocol(self.root)

    def __reduce__(self):  # ship to Ray workers as (uri, options), not as live clients
        return (Storage, (self._given_uri, self.storage_options))

    def __repr__(self) -> str:
        return f"Storage({self.uri!r})"

    def _path(self, relpath: str) -> str:
        return f"{self.root.rstrip('/')}/{relpath.lstrip('/')}"

    def uri_of(self, relpath: str) -> str:
        path = self._path(relpath)
        return path if self.is_local else self.fs.unstrip_protocol(path)

    # ---- reading

    def list_files(self, extensions: frozenset[str] | None, excluded: Iterable[str] = ()) -> Iterator[SourceFile]:
        """Files under the root whose lower-cased suffix is in `extensions` (".jpg" or "jpg"), or
        all of them (None), in list_folders' order."""
        for _, files in self.list_folders(extensions, excluded=excluded):
            yield from files

    def list_folders(
        self, extensions: frozenset[str] | None, prefetch: int = LISTING_PREFETCH, excluded: Iterable[str] = ()
    ) -> Iterator[tuple[str, list[SourceFile]]]:
        """(folder relative to the root, its files sorted by name) for each folder under the
        root, depth first: a folder comes before its subfolders, which come in name order.

        Up to `prefetch` folders next in that order are listed at once on threads: a listing is
        a round trip to the store (an S3 LIST is tens of milliseconds), and one after another they
        would keep a library of many folders waiting minutes before its first photo. The order is
        the same whatever `prefetch` is. Hidden files and folders and the folder placeholders of
        object stores are skipped. Each listing is retried on transient errors. Raises
        FileNotFoundError if the root does not exist.

        Symbolic links (local folders): a link to a file is listed at the link's path, with the
        fingerprint of the file it leads to; a link that leads to no file (dangling, a loop) is
        listed with the reason in `broken`. Each real folder is listed once (`_FolderLinks`), and
        no local folder of `excluded` (OUTPUT, where a link leads into it) is listed.
        """
        exts = None if extensions is None else {e.lower() if e.startswith(".") else "." + e.lower() for e in extensions}
        prefix = self.root.rstrip("/") + "/"
        links = _FolderLinks(self.root, excluded) if self.is_local else None
        pending = [self.root]  # a stack: the next folder to yield is at its end
        listings: dict[str, Future[list[dict]]] = {}
        with ThreadPoolExecutor(max_workers=max(1, prefetch), thread_name_prefix="dreamfocus-list") as pool:
            while pending:
                for folder in pending[-prefetch:]:  # what is next in depth-first order
                    if folder not in listings:
                        listings[folder] = pool.submit(self._list_folder, folder)
                folder = pending.pop()
                entries = listings.pop(folder)
                if links is not None and not links.first_visit(folder):
                    entries.cancel()
                    continue
                files, subdirs = [], []
                for info in entries.result():
                    name, broken = info["name"], ""
                    if info.get("islink") and links is not None:
                        info, broken = self._link_target(name, info)
                    if info["type"] == "directory":
                        if not info.get("islink") or (links is not None and links.follow(folder, name, info)):
                            subdirs.append(name)
                    elif info["type"] == "file" or broken:
                        if exts is None or os.path.splitext(name)[1].lower() in exts:
                            size = int(info.get("size") or 0)
                            files.append(SourceFile(name[len(prefix) :], size, _fingerprint(info), broken))
                pending.extend(reversed(subdirs))
                yield (folder[len(prefix) :] if folder != self.root else ""), files

    def _list_folder(self, folder: str) -> list[dict]:
        """A folder's entries sorted by name, less hidden ones and placeholders."""
        self.fs.invalidate_cache(folder)  # s3fs/gcsfs cache listings; a rerun must not
        entries = retry(functools.partial(self.fs.ls, folder, detail=True), what=f"list {folder}")
        prefix = self.root.rstrip("/") + "/"
        kept = []
        for info in sorted(entries, key=lambda i: i["name"]):
            name = info["name"]
            if name.endswith("/") or name.rstrip("/") == folder.rstrip("/"):
                continue  # object-store folder placeholder, or the folder itself
            if name.startswith(prefix) and not _is_hidden(name.rsplit("/", 1)[-1]):
                kept.append(info)
        return kept

    def names_in(self, folder: str) -> set[str]:
        """The names of the files directly in a folder (relative to the root; none where it is
        missing): one listing."""
        path = self._path(folder) if folder else self.root
        try:
            entries = self._list_folder(path)
        except FileNotFoundError:
            return set()
        return {info["name"].rsplit("/", 1)[-1] for info in entries if info["type"] == "file"}

    def _link_target(self, path: str, link: dict) -> tuple[dict, str]:
        """What a local symbolic link leads to: its info and "", or the link's own info and why
        it leads to no file."""
        destination = link.get("destination") or os.readlink(path)
        try:
            return self.fs.info(path), ""  # info() of a path follows links
        except FileNotFoundError:
            return link, f"dangling symbolic link -> {destination}"
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return link, f"symbolic link loop -> {destination} (it never reaches a file)"
            return link, f"symbolic link -> {destination} cannot be followed ({exc.strerror or exc})"

    def stat(self, relpath: str) -> SourceFile:
        path = self._path(relpath)
        self.fs.invalidate_cache(path)  # info/exists/size may answer from a cached listing
        info = retry(lambda: self.fs.info(path), what=f"stat {self.uri_of(relpath)}")
        return SourceFile(relpath, int(info.get("size") or 0), _fingerprint(info))

    def read_bytes(self, relpath: str) -> bytes:
        """The file's bytes. ReadError where transient errors outlived the retries (a plain rerun
        tries again); missing files and refused permissions raise as they are."""
        try:
            return retry(lambda: self.fs.cat_file(self._path(relpath)), what=f"read {self.uri_of(relpath)}")
        except Exception as exc:
            if is_transient(exc):
                raise ReadError(f"cannot read {self.uri_of(relpath)}: {type(exc).__name__}: {exc}") from exc
            raise

    def read_version(self, source: SourceFile, attempts: int = 3) -> tuple[bytes, SourceFile]:
        """The bytes of the file the listing found, and the SourceFile they are the bytes of.

        A file replaced since it was listed (or while it is read) is read again until a read
        begins and ends with the same fingerprint, so a row never names one version of a photo
        while its output is made from another. SourceVanishedError for a file deleted since the
        listing; SourceChangedError for one that kept changing for `attempts` reads.
        """
        expected = source
        for _ in range(attempts):
            try:
                data = self.read_bytes(source.relpath)
                now = self.stat(source.relpath)
            except FileNotFoundError:
                raise SourceVanishedError(f"{source.relpath}: deleted since the listing found it") from None
            if now.fingerprint == expected.fingerprint:
                return data, now
            expected = now  # replaced: the version there now, if it holds still while read
        raise SourceChangedError(f"{source.relpath}: replaced again while being read, {attempts} times")

    def exists(self, relpath: str) -> bool:
        path = self._path(relpath)
        self.fs.invalidate_cache(path)
        return retry(lambda: self.fs.exists(path), what=f"check {self.uri_of(relpath)}")

    def size(self, relpath: str) -> int:
        path = self._path(relpath)
        self.fs.invalidate_cache(path)
        return int(retry(lambda: self.fs.size(path), what=f"size {self.uri_of(relpath)}"))

    # ---- writing

    def remove(self, relpath: str) -> None:
        """Delete one file under the root (the job only ever removes what it wrote itself)."""
        path = self._path(safe_relpath(relpath))
        retry(lambda: self.fs.rm_file(path), what=f"remove {self.uri_of(relpath)}")

    def write_atomic(self, relpath: str, data: bytes) -> None:
        """Write `data` so the final name shows either nothing (or the old file) or all of it.

        Raises UnsafeNameError for an unsafe relpath, OutputError if the write fails.
        """
        relpath = safe_relpath(relpath)
        path = self._path(relpath)
        write = self._write_local if self.is_local else self._put
        try:
            retry(lambda: write(path, data), what=f"write {self.uri_of(relpath)}")
        except Exception as exc:
            raise OutputError(f"cannot write {self.uri_of(relpath)}: {type(exc).__name__}: {exc}") from exc

    def create(self, relpath: str, data: bytes) -> bool:
        """Write `data` only where nothing is yet (False, writing nothing, where something is).

        Local folders: a hard link of a complete temporary file, which fails if the name exists.
        S3: a conditional put (If-None-Match: *). Other stores check first, then write: not
        atomic, which is the best their semantics allow. OutputError where it cannot be written.
        """
        relpath = safe_relpath(relpath)
        path = self._path(relpath)
        protocols = (self.fs.protocol,) if isinstance(self.fs.protocol, str) else self.fs.protocol
        try:
            if self.is_local:
                return self._create_local(path, data)
            if "s3" in protocols:
                # Retried: a put whose answer was lost and that did land answers the retry with
                # FileExistsError, which the caller tells apart by reading what is there.
                retry(lambda: self.fs.pipe_file(path, data, mode="create"), what=f"create {self.uri_of(relpath)}")
                return True
        except FileExistsError:  # s3fs raises it for a failed precondition
            return False
        except OSError as exc:
            raise OutputError(f"cannot write {self.uri_of(relpath)}: {type(exc).__name__}: {exc}") from exc
        if self.exists(relpath):
            return False
        self.write_atomic(relpath, data)
        return True

    @classmethod
    def _create_local(cls, path: str, data: bytes) -> bool:
        folder, name = os.path.split(path)
        tmp = os.path.join(folder, f".{name}.{secrets.token_hex(4)}.partial")
        cls._write_local(tmp, data)
        try:
            os.link(tmp, path)  # raises FileExistsError where the name is taken
            return True
        finally:
            os.unlink(tmp)

    def _put(self, path: str, data: bytes) -> None:
        # One put: an object only becomes visible once complete (s3fs switches to a
        # multipart upload for large data, which is also only visible once completed).
        options = self._content_type(path)
        try:
            self.fs.pipe_file(path, data, **options)
        except FileNotFoundError:  # stores with real folders (sftp, hdfs, memory, ...)
            self.fs.makedirs(self.fs._parent(path), exist_ok=True)
            self.fs.pipe_file(path, data, **options)

    def _content_type(self, path: str) -> dict[str, str]:
        """The Content-Type an object store serves the file with, from its name: a photo, or the
        review page from a bucket's static website hosting, shows in a browser rather than
        downloading as binary/octet-stream."""
        kind = mimetypes.guess_type(path)[0]
        protocols = (self.fs.protocol,) if isinstance(self.fs.protocol, str) else self.fs.protocol
        if kind and "s3" in protocols:
            return {"ContentType": kind}
        if kind and ("gs" in protocols or "gcs" in protocols):
            return {"content_type": kind}
        return {}

    @staticmethod
    def _write_local(path: str, data: bytes) -> None:
        folder, name = os.path.split(path)
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".{name}.{secrets.token_hex(4)}.partial")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        with contextlib.suppress(OSError, AttributeError):  # make the rename durable
            dfd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
