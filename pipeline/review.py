"""The review page: OUTPUT/review/index.html, a static page of every processed photo.

    manifest (latest row per input) -> page rows: status, reason or error, where its files are
    listing of OUTPUT/images, OUTPUT/intermediates, OUTPUT/review/thumbs -> which thumbnails exist
    missing thumbnails, made in parallel from inputs and outputs (storage.py: local or fsspec)
    rows.js (the rows as data) + index.html (header rendered here, rows rendered a page at a
    time in the browser)

Every link in the page is relative and stays inside OUTPUT (../images/..., thumbs/...), so the
folder opens from a local disk or a bucket's static hosting; rows.js is a script rather than
JSON because browsers refuse fetch() of file:// URLs. Thumbnails are named by what they show
(input fingerprint, output time), so a rerun makes only the missing ones and drops stale ones.
"""

from __future__ import annotations

import hashlib
import html
import io
import json
import logging
import math
import os
import urllib.parse
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources

import numpy as np
import pyarrow as pa
from PIL import Image

from .errors import (
    KINDS,
    BadInputError,
    BrokenLinkError,
    CorruptImageError,
    EmptyFileError,
    NotAnImageError,
    TooManyPixelsError,
    UnsupportedImageError,
)
from .job.plan import IMAGES_DIR, INTERMEDIATES_DIR, output_relpath
from .manifest import (
    FAILED,
    MANIFEST_DIR,
    OK,
    SKIPPED,
    STAGES,
    ManifestReport,
    key_of,
    latest_rows,
    read_manifest,
    report_of,
)
from .photo_io import OUTPUT_EXTENSIONS, decode_photo
from .storage import Storage

log = logging.getLogger(__name__)

REVIEW_DIR, THUMBS_DIR = "review", "thumbs"
THUMB_SIZE = 640  # long side, px: sharp enough for the side-by-side slider, ~40 KB as JPEG
THUMB_QUALITY = 80
# The intermediates of photo.INTERMEDIATE_NAMES in the order the page shows them: what the
# salient-object model found, the subject kept crisp, depth, alpha, the painterly background.
INTERMEDIATE_ORDER = ("saliency", "subject", "depth16", "alpha", "background")
STATUS_LABELS = {OK: "ok", SKIPPED: "left alone", FAILED: "failed"}
# Inputs the job could not decode or read: no thumbnail is tried (it would fail again on every rerun).
_UNDECODABLE = (
    EmptyFileError,
    NotAnImageError,
    CorruptImageError,
    UnsupportedImageError,
    TooManyPixelsError,
    BrokenLinkError,
)
UNDECODABLE_KINDS = frozenset(cls.kind for cls in KINDS if issubclass(cls, _UNDECODABLE))
# Left alone before anything was written (not an image, the other half of a RAW + JPEG pair):
# an output of the same name is not theirs. Photos the effect leaves alone are written unchanged.
UNWRITTEN_KINDS = frozenset(cls.kind for cls in KINDS if cls.leaves_alone)


@dataclass(frozen=True)
class Thumb:
    """A thumbnail to make: from `relpath` in `source` to thumbs/`name`."""

    source: Storage
    relpath: str
    name: str


@dataclass
class PageRow:
    """One input as the page shows it; paths are relative to OUTPUT/review."""

    relpath: str
    status: str
    note: str  # the reason it was left alone, or the error; "" when ok
    error_kind: str
    width: int | None
    height: int | None
    seconds: float | None  # sum of its per-stage times
    before: str | None  # thumbnail of the input
    after: str | None  # thumbnail of the output
    output: str | None  # the full-size output
    intermediates: list[tuple[str, str, str]] = field(default_factory=list)  # (name, thumbnail, full file)

    def as_json(self) -> dict:
        return {
            "path": self.relpath,
            "status": self.status,
            "note": self.note,
            "kind": self.error_kind,
            "size": [self.width, self.height] if self.width and self.height else None,
            "seconds": None if self.seconds is None else round(self.seconds, 3),
            "before": self.before,
            "after": self.after,
            "output": self.output,
            "intermediates": [list(i) for i in self.intermediates],
        }


@dataclass
class ReviewSummary:
    page: str  # URI of index.html
    rows: int
    thumbs_made: int
    thumbs_kept: int
    thumbs_failed: int
    stale_removed: int

    def lines(self) -> list[str]:
        line = (
            f"review: {self.page} ({self.rows} photos; thumbnails: {self.thumbs_made} made, "
            f"{self.thumbs_kept} kept, {self.stale_removed} stale removed"
        )
        if self.thumbs_failed:
            line += f", {self.thumbs_failed} unreadable"
        return [line + ")"]


# --------------------------------------------------------------------------- page data


def note_of(status: str, error: str | None, reason: str | None) -> str:
    """What the page says about a row: the reason it was left alone (its own column, or in
    `error` in parts written before that column existed), or the error."""
    if status == SKIPPED:
        return reason or error or ""
    if status == FAILED:
        return error or ""
    return ""


def output_of(row: dict, images_uri: str, images: frozenset[str]) -> str | None:
    """The input's output under OUTPUT/images, if it is there: the manifest's output_uri, else
    the names the job gives outputs (rows of older versions left alone carry no output_uri, and
    OUTPUT may have been copied elsewhere since, to a bucket for instance). A failed row has
    none, whatever an earlier attempt left there, nor has a row left alone before its output
    was written."""
    uri = row.get("output_uri")
    if uri and uri.startswith(images_uri + "/"):
        candidates = [uri[len(images_uri) + 1 :]]
    elif row["status"] == FAILED or row.get("error_kind") in UNWRITTEN_KINDS:
        return None
    else:
        candidates = []
        for fmt in OUTPUT_EXTENSIONS:
            for keep in (False, True):
                try:
                    candidates.append(output_relpath(row["relpath"], fmt, keep_extension=keep))
                except BadInputError:
                    return None
    return next((c for c in candidates if c in images), None)


def thumb_name(kind: str, *what: str) -> str:
    """thumbs/<key>.<kind>.jpg: the key changes when what the thumbnail shows changes."""
    return f"{int(key_of(*what)) & 0xFFFFFFFFFFFFFFFF:016x}.{kind}.jpg"


def page_rows(
    latest: pa.Table,
    output: Storage,
    images: frozenset[str],
    intermediates: frozenset[str],
    inputs: Storage | None = None,
) -> tuple[list[PageRow], list[Thumb]]:
    """The page's rows and the thumbnails they show. inputs: where the photos are now, when
    not at the manifest's source_uri (a moved folder)."""
    images_store = Storage(f"{output.uri}/{IMAGES_DIR}", output.storage_options)
    intermediates_store = Storage(f"{output.uri}/{INTERMEDIATES_DIR}", output.storage_options)
    sources: dict[str, Storage] = {}
    rows, thumbs = [], []
    for row in latest.to_pylist():
        relpath, status = row["relpath"], row["status"]
        before = after = full = None
        source = inputs or _source_store(row, sources, output.storage_options)
        if source is not None and row.get("error_kind") not in UNDECODABLE_KINDS:
            before = thumb_name("before", relpath, row.get("source_fingerprint") or "")
            thumbs.append(Thumb(source, relpath, before))
        target = output_of(row, images_store.uri, images)
        shown: list[tuple[str, str, str]] = []
        if target is not None:
            stamp = str(row.get("finished_at") or "")
            after = thumb_name("after", target, stamp)
            thumbs.append(Thumb(images_store, target, after))
            full = _href(IMAGES_DIR, target)
            stem = os.path.splitext(target)[0]
            for name in INTERMEDIATE_ORDER:
                file = f"{stem}.{name}.png"
                if file in intermediates:
                    thumb = thumb_name(name, file, stamp)
                    thumbs.append(Thumb(intermediates_store, file, thumb))
                    shown.append((name, f"{THUMBS_DIR}/{thumb}", _href(INTERMEDIATES_DIR, file)))
        times = [row[f"seconds_{s}"] for s in STAGES if row.get(f"seconds_{s}") is not None]
        rows.append(
            PageRow(
                relpath=relpath,
                status=status,
                note=note_of(status, row.get("error"), row.get("reason")),
                error_kind=row.get("error_kind") or "",
                width=row.get("width"),
                height=row.get("height"),
                seconds=float(sum(times)) if times else None,
                before=f"{THUMBS_DIR}/{before}" if before else None,
                after=f"{THUMBS_DIR}/{after}" if after else None,
                output=full,
                intermediates=shown,
            )
        )
    return rows, thumbs


def _href(folder: str, relpath: str) -> str:
    """A link from OUTPUT/review to OUTPUT/folder/relpath: names may hold '#', '?' or '%'."""
    return urllib.parse.quote(f"../{folder}/{relpath}")


def _source_store(row: dict, cache: dict[str, Storage], storage_options: dict) -> Storage | None:
    """A Storage at the input root the manifest recorded (source_uri minus relpath)."""
    uri, relpath = row.get("source_uri") or "", row["relpath"]
    if not uri.endswith("/" + relpath):
        return None
    root = uri[: -len(relpath) - 1]
    if root not in cache:
        cache[root] = Storage(root, storage_options)
    return cache[root]


# --------------------------------------------------------------------------- thumbnails


def thumbnail_jpeg(data: bytes, source: str, size: int = THUMB_SIZE) -> bytes:
    """A JPEG of the photo (upright, sRGB, 16-bit maps scaled to 8) with its long side at most `size`."""
    pixels = decode_photo(data, source, draft_size=size).pixels
    im = Image.fromarray(np.ascontiguousarray(pixels))
    im.thumbnail((size, size), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    im.save(out, format="JPEG", quality=THUMB_QUALITY, optimize=True)
    return out.getvalue()


def make_thumbs(thumbs: list[Thumb], target: Storage, workers: int) -> tuple[int, set[str]]:
    """Make each thumbnail in parallel (threads: the time goes to reads and to Pillow's and
    the store's C code); one that cannot be read is reported and left out. Returns the number
    made and the names that failed."""

    def one(thumb: Thumb) -> str | None:
        try:
            target.write_atomic(thumb.name, thumbnail_jpeg(thumb.source.read_bytes(thumb.relpath), thumb.relpath))
            return None
        except Exception as exc:  # noqa: BLE001 - a missing or unreadable file is one blank tile, not a failed page
            log.info("no thumbnail of %s: %s: %s", thumb.source.uri_of(thumb.relpath), type(exc).__name__, exc)
            return thumb.name

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        failed = {name for name in pool.map(one, thumbs) if name}
    return len(thumbs) - len(failed), failed


# --------------------------------------------------------------------------- page


def render_header(report: ManifestReport) -> str:
    """The header's HTML: the figures of `dreamfocus status` (counts, photos per second, time by
    stage), the stages as CSS bars of their mean seconds per photo."""
    counts = {s: report.latest_counts.get(s, 0) for s in (OK, SKIPPED, FAILED)}
    spans = [(n, n / rate) for _, n, rate in report.runs if rate > 0 and math.isfinite(rate)]
    rate = f"{sum(n for n, _ in spans) / sum(t for _, t in spans):.2f} photos/s" if spans else "photos/s unknown"
    runs = f"{len(report.runs)} run{'s' if len(report.runs) != 1 else ''}, {report.rows:,} attempts"
    per_stage = {s: t / report.timed_rows for s, t in report.stage_seconds.items()} if report.timed_rows else {}
    per_photo = sum(per_stage.values())
    bars = [
        f'<div class="stage"><span class="name">{html.escape(stage)}</span>'
        f'<span class="bar"><span style="width:{100 * seconds / per_photo:.1f}%"></span></span>'
        f'<span class="value">{_seconds(seconds)} · {seconds / per_photo:.0%}</span></div>'
        for stage, seconds in per_stage.items()
        if per_photo > 0
    ]
    chart = (
        f'<div class="stages" title="mean seconds per photo in each stage, all workers">{"".join(bars)}'
        f'<div class="stage total"><span class="name">per photo</span><span></span>'
        f'<span class="value">{_seconds(per_photo)}</span></div></div>'
        if bars
        else ""
    )
    counted = " · ".join(f'<span class="count {s}">{n:,} {STATUS_LABELS[s]}</span>' for s, n in counts.items())
    return (
        f'<div class="summary"><h1>{sum(counts.values()):,} photos</h1><p id="counts">{counted}</p>'
        f'<p id="throughput">{rate} · {runs}</p></div>{chart}'
    )


def _seconds(value: float) -> str:
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def render_page(report: ManifestReport, title: str, rows_js: bytes) -> str:
    """index.html; it loads rows.js under a name that changes with its content, so a cache in
    front of a bucket's static hosting never pairs a new page with old rows."""
    template = resources.files("pipeline").joinpath("review.html").read_text(encoding="utf-8")
    version = hashlib.sha256(rows_js).hexdigest()[:12]
    return (
        template.replace("{{title}}", html.escape(title))
        .replace("{{header}}", render_header(report))
        .replace("{{rows}}", f"rows.js?v={version}")
    )


def rows_script(rows: list[PageRow]) -> str:
    """rows.js: the rows as a script the page loads (file:// forbids fetching JSON)."""
    data = json.dumps([r.as_json() for r in rows], separators=(",", ":"), ensure_ascii=False)
    # "</" cannot close a script element when the data is read as a script; JSON reads "<\/" as "</".
    return "window.REVIEW_ROWS = " + data.replace("</", "<\\/") + ";\n"


# --------------------------------------------------------------------------- entry point


def _listing(store: Storage, extensions: Iterable[str]) -> frozenset[str]:
    try:
        return frozenset(f.relpath for f in store.list_files(frozenset(extensions)))
    except FileNotFoundError:
        return frozenset()


def build_review(
    output_uri: str,
    storage_options: dict | None = None,
    inputs_uri: str | None = None,
    workers: int = 8,
    progress: Callable[[str], None] | None = None,
) -> ReviewSummary:
    """Write OUTPUT/review: index.html, rows.js and the thumbnails that are missing."""
    output = Storage(output_uri, storage_options)
    manifest = Storage(f"{output.uri}/{MANIFEST_DIR}", output.storage_options)
    table = read_manifest(manifest)
    if table.num_rows == 0:
        raise BadInputError(f"{output_uri}: no manifest rows (run `dreamfocus run INPUT {output_uri}` first)")
    latest = latest_rows(table)
    images = _listing(Storage(f"{output.uri}/{IMAGES_DIR}", output.storage_options), OUTPUT_EXTENSIONS.values())
    intermediates = _listing(Storage(f"{output.uri}/{INTERMEDIATES_DIR}", output.storage_options), {".png"})
    inputs = Storage(inputs_uri, output.storage_options) if inputs_uri else None
    rows, thumbs = page_rows(latest, output, images, intermediates, inputs)

    review = Storage(f"{output.uri}/{REVIEW_DIR}", output.storage_options)
    thumbs_store = Storage(f"{review.uri}/{THUMBS_DIR}", output.storage_options)
    existing = _listing(thumbs_store, {".jpg"})
    missing = [t for t in thumbs if t.name not in existing]
    if progress:
        progress(f"{len(rows):,} photos, {len(missing):,} thumbnails to make ({len(thumbs) - len(missing):,} kept)")
    made, failed = make_thumbs(missing, thumbs_store, workers)
    for row in rows:  # a tile without a thumbnail says so, rather than showing a broken image
        row.before = None if row.before and row.before.split("/")[-1] in failed else row.before
        row.after = None if row.after and row.after.split("/")[-1] in failed else row.after
        row.intermediates = [i for i in row.intermediates if i[1].split("/")[-1] not in failed]
    wanted = {t.name for t in thumbs}
    stale = sorted(existing - wanted)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:  # one request each on object stores
        list(pool.map(thumbs_store.remove, stale))

    rows_js = rows_script(rows).encode()
    review.write_atomic("rows.js", rows_js)
    page = render_page(report_of(table), output.uri, rows_js)  # the rows read above, not read again
    review.write_atomic("index.html", page.encode())
    return ReviewSummary(
        page=review.uri_of("index.html"),
        rows=len(rows),
        thumbs_made=made,
        thumbs_kept=len(thumbs) - len(missing),
        thumbs_failed=len(failed),
        stale_removed=len(stale),
    )
