"""The Parquet manifest: one row per input file per attempt, in append-only parts.

OUTPUT/manifest/part-<run>-<seq>.parquet; each part is written atomically, so a part either
exists whole or not at all, and a row in a part is what "committed" means for the job. The
functions here take a Storage rooted at the manifest folder.
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .errors import LISTING_KINDS, RETRIED_KINDS
from .storage import Storage

MANIFEST_DIR = "manifest"
OK, FAILED, SKIPPED = "ok", "failed", "skipped"
STAGES = ("read", "decode", "saliency", "depth", "effect", "encode", "write")
# Columns renamed since: old parts are read under the new name.
RENAMED = {"job_hash": "params_hash"}
REPLACES = b"dreamfocus.replaces"  # a compacted part's metadata: the parts it replaces
COMPACT_MIN_PARTS = 64  # a run or `status` finding this many parts merges them into one

SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),  # stable id of the input: a hash of its relative path
        ("relpath", pa.string()),
        ("source_uri", pa.string()),
        ("source_size", pa.int64()),
        ("source_fingerprint", pa.string()),  # etag:... or mtime:...:size
        ("output_uri", pa.string()),
        ("status", pa.string()),  # ok / failed / skipped
        ("error_kind", pa.string()),
        ("error", pa.string()),
        ("reason", pa.string()),  # why a skipped photo was left alone (old parts: in error)
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("saliency_model", pa.string()),
        ("saliency_version", pa.string()),
        ("depth_model", pa.string()),
        ("depth_version", pa.string()),
        ("saliency_runtime", pa.string()),  # what ran each model: onnxruntime, openvino, torch, numpy
        ("depth_runtime", pa.string()),
        ("preset", pa.string()),
        ("job_hash", pa.string()),  # what decides the output: effect parameters, models, format, quality
        ("fg_fraction", pa.float32()),
        ("interp_start", pa.float32()),
        ("interp_stop", pa.float32()),
        ("render_path", pa.string()),  # numpy (effect.py on the CPU) or torch:<device> (the device path)
        *[(f"seconds_{stage}", pa.float32()) for stage in STAGES],
        ("attempt", pa.int32()),
        ("run_id", pa.string()),
        ("started_at", pa.timestamp("ms", tz="UTC")),  # when reading the photo began
        ("finished_at", pa.timestamp("ms", tz="UTC")),
    ]
)
COLUMNS = tuple(SCHEMA.names)


def listing_status(status: str, kind: str | None) -> str:
    """The status under which the resume index keeps a row: rows the listing decided (a pair's
    other half) apart from the others, so a photo left alone for its pair is not taken as
    settled once an option has it processed."""
    return f"{status}:{kind}" if kind in LISTING_KINDS else status


def image_id(relpath: str) -> str:
    return hashlib.sha256(relpath.encode()).hexdigest()[:16]


def key_of(*parts: str) -> np.int64:
    """A 64-bit key of some strings: resume state for millions of files fits in a few MB."""
    digest = hashlib.blake2b("\0".join(parts).encode(), digest_size=8).digest()
    return np.frombuffer(digest, dtype=np.int64)[0]


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


class ManifestWriter:
    """Buffers rows and writes them as numbered parts: every `rows_per_part` rows, and at least
    every `seconds_per_part` seconds while rows arrive (flush_if_due() from a timer), so a
    killed run loses little. Thread-safe: rows come from the driver, time from a ticker."""

    def __init__(
        self,
        store: Storage,
        run_id: str,
        rows_per_part: int = 1000,
        seconds_per_part: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.run_id = run_id
        self.rows_per_part = rows_per_part
        self.seconds_per_part = seconds_per_part
        self.clock = clock
        self.rows: list[dict] = []
        self.parts = 0
        self.first_pending = 0.0  # when the oldest uncommitted row arrived
        self._lock = threading.Lock()

    def add(self, row: dict) -> None:
        with self._lock:
            if not self.rows:
                self.first_pending = self.clock()
            self.rows.append(row)
            if len(self.rows) >= self.rows_per_part:
                self._flush()
        self.flush_if_due()

    def flush_if_due(self) -> None:
        with self._lock:
            if self.rows and self.clock() - self.first_pending >= self.seconds_per_part:
                self._flush()

    def flush(self) -> None:
        with self._lock:
            self._flush()

    def _flush(self) -> None:
        if not self.rows:
            return
        table = pa.Table.from_pylist([{c: r.get(c) for c in COLUMNS} for r in self.rows], schema=SCHEMA)
        self.store.write_atomic(f"part-{self.run_id}-{self.parts:05d}.parquet", _parquet(table))
        self.parts += 1
        self.rows = []


def _parquet(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


def part_names(store: Storage) -> list[str]:
    """The manifest's part files (none when there is no manifest yet): a listing, no reads."""
    try:
        return [part.relpath for part in store.list_files(frozenset({".parquet"}))]
    except FileNotFoundError:
        return []


def _read_parts(store: Storage, names: list[str] | None = None) -> tuple[dict[str, pa.Table], list[str]]:
    """Every committed part by name (of `names`, else of a listing), less those a compacted part
    has replaced (a compaction killed before it removed them leaves them behind; their rows are
    in the compacted part), and the names of such leftovers."""
    names = part_names(store) if names is None else names
    parts = {name: pq.read_table(io.BytesIO(store.read_bytes(name))) for name in names}
    replaced = set()
    for table in parts.values():
        replaced.update(json.loads((table.schema.metadata or {}).get(REPLACES, b"[]")))
    live = {name: table for name, table in parts.items() if name not in replaced}
    return live, sorted(replaced & set(parts))


OTHER_FILES = "other-files.parquet"  # beside MANIFEST_DIR: the files of INPUT that are no photos, as last listed
_OTHER_SCHEMA = pa.schema([("relpath", pa.string()), ("extension", pa.string()), ("size", pa.int64())])


class OtherFilesWriter:
    """The listing's files that are no photos, streamed into one Parquet file in memory (a few
    bytes per file, compressed) and written to OUTPUT/other-files.parquet at the end."""

    BATCH = 10_000

    def __init__(self) -> None:
        self.buffer = io.BytesIO()
        self.writer = pq.ParquetWriter(self.buffer, _OTHER_SCHEMA, compression="zstd")
        self.rows: list[tuple[str, str, int]] = []

    def add(self, relpath: str, extension: str, size: int) -> None:
        self.rows.append((relpath, extension, size))
        if len(self.rows) >= self.BATCH:
            self._write_rows()

    def _write_rows(self) -> None:
        if self.rows:
            columns = zip(*self.rows)
            self.writer.write_table(pa.Table.from_arrays([pa.array(c) for c in columns], schema=_OTHER_SCHEMA))
            self.rows = []

    def close(self, output: Storage) -> None:
        """Replace OUTPUT's listing with this one."""
        self._write_rows()
        self.writer.close()
        output.write_atomic(OTHER_FILES, self.buffer.getvalue())


def read_other_files(output: Storage) -> pa.Table:
    """relpath, extension and size of the files the last run found to be no photos (none when
    no run has written the listing yet)."""
    if not output.exists(OTHER_FILES):
        return _OTHER_SCHEMA.empty_table()
    return pq.read_table(io.BytesIO(output.read_bytes(OTHER_FILES))).cast(_OTHER_SCHEMA)


def read_manifest(store: Storage, columns: Iterable[str] | None = None) -> pa.Table:
    """Every committed row (an empty table when there is no manifest yet)."""
    names = list(columns) if columns is not None else list(COLUMNS)
    schema = pa.schema([SCHEMA.field(n) for n in names])
    tables = [
        pa.table({n: _column(table, n, schema.field(n).type) for n in names})
        for table in _read_parts(store)[0].values()
    ]
    if not tables:
        return schema.empty_table()
    return pa.concat_tables(tables).cast(schema)


def compact_manifest(store: Storage, min_parts: int = COMPACT_MIN_PARTS) -> int:
    """Merge the parts into one where there are at least `min_parts`; returns the parts merged.

    Only while holding OUTPUT's lease (no run is adding parts). The merged part is written
    first, naming the parts it replaces, and only then are they removed: a kill at any point
    loses no row and counts none twice. Every column of every part is kept, old ones too.
    Fewer part files than `min_parts` cost a listing only: nothing is read.
    """
    names = part_names(store)
    if len(names) < min_parts:
        return 0
    parts, leftovers = _read_parts(store, names)
    for name in leftovers:  # of a compaction killed midway
        store.remove(name)
    if len(parts) < min_parts:
        return 0
    merged = pa.concat_tables(parts.values(), promote_options="permissive")
    merged = merged.replace_schema_metadata({REPLACES: json.dumps(sorted(parts))})
    store.write_atomic(f"part-compacted-{new_run_id()}.parquet", _parquet(merged))
    for name in parts:
        store.remove(name)
    return len(parts)


def _column(table: pa.Table, name: str, type_: pa.DataType) -> pa.ChunkedArray | pa.Array:
    """A column of a part, under its old name where it was renamed; parts written before a
    column existed read as nulls in it."""
    for found in (name, RENAMED.get(name)):
        if found in table.column_names:
            return table.column(found)
    return pa.nulls(table.num_rows, type_)


def latest_rows(table: pa.Table) -> pa.Table:
    """The latest row of each input (highest attempt, then latest time)."""
    if table.num_rows == 0:
        return table
    order = table.sort_by([("relpath", "ascending"), ("attempt", "descending"), ("finished_at", "descending")])
    relpaths = order.column("relpath")
    first = np.ones(order.num_rows, dtype=bool)
    first[1:] = pc.not_equal(relpaths.slice(1), relpaths.slice(0, order.num_rows - 1)).to_numpy(zero_copy_only=False)
    return order.filter(pa.array(first))


class KeySet:
    """A sorted array of 64-bit keys: membership tests for millions of entries in a few MB."""

    def __init__(self, keys: Iterable[np.int64]) -> None:
        self.keys = np.sort(np.fromiter(keys, dtype=np.int64))

    def __contains__(self, key: np.int64) -> bool:
        i = int(np.searchsorted(self.keys, key))
        return i < len(self.keys) and self.keys[i] == key


@dataclass
class ResumeIndex:
    """What earlier runs settled, as sorted 64-bit keys (a few bytes per input).

    settled: key(relpath, fingerprint, job_hash, status) of each input's latest row.
    attempts: key(relpath) -> the number of attempts so far.
    """

    settled: KeySet
    attempt_keys: np.ndarray
    attempts: np.ndarray

    @classmethod
    def load(cls, store: Storage) -> ResumeIndex:
        columns = ("relpath", "source_fingerprint", "job_hash", "status", "error_kind", "attempt")
        latest = latest_rows(read_manifest(store, [*columns, "finished_at"]))
        settled, attempt_keys, attempts = [], [], []
        for relpath, fingerprint, job_hash, status, kind, attempt in zip(
            *(latest.column(c).to_pylist() for c in columns)
        ):
            if kind not in RETRIED_KINDS:
                settled.append(key_of(relpath, fingerprint or "", job_hash or "", listing_status(status, kind)))
            attempt_keys.append(key_of(relpath))
            attempts.append(attempt)
        order = np.argsort(np.array(attempt_keys, dtype=np.int64))
        return cls(
            settled=KeySet(settled),
            attempt_keys=np.array(attempt_keys, dtype=np.int64)[order],
            attempts=np.array(attempts, dtype=np.int32)[order],
        )

    def latest_is(self, relpath: str, fingerprint: str, job_hash: str, status: str) -> bool:
        return key_of(relpath, fingerprint, job_hash, status) in self.settled

    def attempts_of(self, relpath: str) -> int:
        key = key_of(relpath)
        i = int(np.searchsorted(self.attempt_keys, key))
        return int(self.attempts[i]) if i < len(self.attempt_keys) and self.attempt_keys[i] == key else 0


@dataclass
class ManifestReport:
    rows: int
    latest_counts: dict[str, int]  # status of each input's latest attempt -> inputs
    failure_kinds: list[tuple[str, int, str]]  # (kind, inputs, an example error)
    left_alone_kinds: list[tuple[str, int, str]]  # (kind, inputs, an example reason)
    runs: list[tuple[str, int, float]]  # (run id, rows, photos per second)
    stage_seconds: dict[str, float]  # stage -> seconds summed over the rows that have timings
    timed_rows: int  # rows with per-stage timings (rows of older versions have none per model)

    def lines(self) -> list[str]:
        if not self.rows:
            return ["no manifest rows yet"]
        counts = ", ".join(f"{k} {v}" for k, v in sorted(self.latest_counts.items()))
        out = [f"{sum(self.latest_counts.values())} inputs ({self.rows} attempts): {counts}"]
        for title, kinds in (("failures by kind:", self.failure_kinds), ("left alone:", self.left_alone_kinds)):
            if kinds:
                out.append(title)
                out += [f"  {n:6d}  {kind}  e.g. {example}" for kind, n, example in kinds]
        total = sum(self.stage_seconds.values())
        if total > 0:
            shares = "  ".join(f"{stage} {seconds / total:.0%}" for stage, seconds in self.stage_seconds.items())
            out.append(f"time by stage ({total / self.timed_rows:.2f} s per photo, all workers): {shares}")
        out.append("runs:")
        out += [f"  {run}  {n} photos  {rate:.2f} photos/s" for run, n, rate in self.runs]
        return out


def manifest_report(store: Storage, top: int = 5) -> ManifestReport:
    stage_columns = [f"seconds_{stage}" for stage in STAGES]
    table = read_manifest(
        store,
        ["relpath", "status", "error_kind", "error", "reason", "attempt", "run_id", "started_at", "finished_at"]
        + stage_columns,
    )
    return report_of(table, top)


def report_of(table: pa.Table, top: int = 5) -> ManifestReport:
    """The report of manifest rows already read (with at least manifest_report's columns)."""
    latest = latest_rows(table)
    latest_counts = (
        {
            k: int(v)
            for k, v in zip(*np.unique(latest.column("status").to_numpy(zero_copy_only=False), return_counts=True))
        }
        if latest.num_rows
        else {}
    )
    failed = latest.filter(pc.equal(latest.column("status"), FAILED))
    skipped = latest.filter(pc.equal(latest.column("status"), SKIPPED))
    # Parts written before the reason had a column of its own carry it in error.
    reasons = pc.coalesce(
        pc.if_else(pc.equal(skipped.column("reason"), ""), None, skipped.column("reason")), skipped.column("error")
    )
    timed = table.filter(pc.is_valid(table.column("seconds_saliency")))
    return ManifestReport(
        rows=table.num_rows,
        latest_counts=latest_counts,
        failure_kinds=_by_kind(failed.column("error_kind"), failed.column("error"), top),
        left_alone_kinds=_by_kind(skipped.column("error_kind"), reasons, top),
        runs=_run_rates(table),
        stage_seconds={stage: float(pc.sum(timed.column(f"seconds_{stage}")).as_py() or 0) for stage in STAGES},
        timed_rows=timed.num_rows,
    )


def _by_kind(kinds: pa.ChunkedArray, examples: pa.ChunkedArray, top: int) -> list[tuple[str, int, str]]:
    """(kind, how many, one example) for the most frequent kinds."""
    found: dict[str, list] = {}
    for kind, example in zip(kinds.to_pylist(), examples.to_pylist()):
        entry = found.setdefault(kind or "unknown", [0, example])
        entry[0] += 1
    return sorted(((k, n, e) for k, (n, e) in found.items()), key=lambda t: -t[1])[:top]


def _run_rates(table: pa.Table) -> list[tuple[str, int, float]]:
    runs = []
    if table.num_rows:
        grouped = table.group_by("run_id").aggregate(
            [("started_at", "min"), ("finished_at", "max"), ("relpath", "count")]
        )
        for run, first, last, n in zip(
            *(grouped.column(c).to_pylist() for c in ("run_id", "started_at_min", "finished_at_max", "relpath_count"))
        ):
            span = (last - first).total_seconds() if first and last else 0.0
            runs.append((run, n, n / span if span > 0 else float("nan")))
        runs.sort(key=lambda r: r[0] or "")
    return runs
