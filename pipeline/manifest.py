"""The Parquet manifest: one row per input file per attempt, in append-only parts.

OUTPUT/manifest/part-<run>-<seq>.parquet; each part is written atomically, so a part either
exists whole or not at all, and a row in a part is what "committed" means for the job. The
functions here take a Storage rooted at the manifest folder.
"""

from __future__ import annotations

import hashlib
import io
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .errors import RETRIED_KINDS
from .storage import Storage

MANIFEST_DIR = "manifest"
OK, FAILED, SKIPPED = "ok", "failed", "skipped"
STAGES = ("read", "decode", "models", "effect", "encode", "write")
# Columns renamed since: old parts are read under the new name.
RENAMED = {"job_hash": "params_hash"}

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
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("saliency_model", pa.string()),
        ("saliency_version", pa.string()),
        ("depth_model", pa.string()),
        ("depth_version", pa.string()),
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


def image_id(relpath: str) -> str:
    return hashlib.sha256(relpath.encode()).hexdigest()[:16]


def key_of(*parts: str) -> np.int64:
    """A 64-bit key of some strings: resume state for millions of files fits in a few MB."""
    digest = hashlib.blake2b("\0".join(parts).encode(), digest_size=8).digest()
    return np.frombuffer(digest, dtype=np.int64)[0]


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


class ManifestWriter:
    """Buffers rows and writes them as numbered parts; flush() commits what is buffered."""

    def __init__(self, store: Storage, run_id: str, rows_per_part: int = 1000) -> None:
        self.store = store
        self.run_id = run_id
        self.rows_per_part = rows_per_part
        self.rows: list[dict] = []
        self.parts = 0

    def add(self, row: dict) -> None:
        self.rows.append(row)
        if len(self.rows) >= self.rows_per_part:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        table = pa.Table.from_pylist([{c: r.get(c) for c in COLUMNS} for r in self.rows], schema=SCHEMA)
        buffer = io.BytesIO()
        pq.write_table(table, buffer, compression="zstd")
        self.store.write_atomic(f"part-{self.run_id}-{self.parts:05d}.parquet", buffer.getvalue())
        self.parts += 1
        self.rows = []


def read_manifest(store: Storage, columns: Iterable[str] | None = None) -> pa.Table:
    """Every committed row (an empty table when there is no manifest yet)."""
    names = list(columns) if columns is not None else list(COLUMNS)
    schema = pa.schema([SCHEMA.field(n) for n in names])
    tables = []
    try:
        parts = list(store.list_files(frozenset({".parquet"})))
    except FileNotFoundError:
        parts = []
    for part in parts:
        table = pq.read_table(io.BytesIO(store.read_bytes(part.relpath)))
        tables.append(pa.table({n: _column(table, n, schema.field(n).type) for n in names}))
    if not tables:
        return schema.empty_table()
    return pa.concat_tables(tables).cast(schema)


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
                settled.append(key_of(relpath, fingerprint or "", job_hash or "", status))
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
    runs: list[tuple[str, int, float]]  # (run id, rows, photos per second)

    def lines(self) -> list[str]:
        if not self.rows:
            return ["no manifest rows yet"]
        counts = ", ".join(f"{k} {v}" for k, v in sorted(self.latest_counts.items()))
        out = [f"{sum(self.latest_counts.values())} inputs ({self.rows} attempts): {counts}"]
        if self.failure_kinds:
            out.append("failures by kind:")
            out += [f"  {n:6d}  {kind}  e.g. {example}" for kind, n, example in self.failure_kinds]
        out.append("runs:")
        out += [f"  {run}  {n} photos  {rate:.2f} photos/s" for run, n, rate in self.runs]
        return out


def manifest_report(store: Storage, top: int = 5) -> ManifestReport:
    table = read_manifest(
        store, ["relpath", "status", "error_kind", "error", "attempt", "run_id", "started_at", "finished_at"]
    )
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
    kinds: dict[str, list] = {}
    for kind, error in zip(failed.column("error_kind").to_pylist(), failed.column("error").to_pylist()):
        entry = kinds.setdefault(kind or "unknown", [0, error])
        entry[0] += 1
    failure_kinds = sorted(((k, n, e) for k, (n, e) in kinds.items()), key=lambda t: -t[1])[:top]
    runs = []
    if table.num_rows:
        grouped = table.group_by("run_id").aggregate(
            [("started_at", "min"), ("finished_at", "max"), ("relpath", "count")]
        )
        for run, first, last, n in zip(
            *(grouped.column(c).to_pylist() for c in ("run_id", "started_at_min", "finished_at_max", "relpath_count"))
        ):
            span = (last - first).total_seconds()
            runs.append((run, n, n / span if span > 0 else float("nan")))
        runs.sort()
    return ManifestReport(table.num_rows, latest_counts, failure_kinds, runs)
