"""The Parquet manifest: one row per input file per attempt, in append-only parts.

OUTPUT/manifest/part-<run>-<seq>.parquet; each part is written atomically, so a part either
exists whole or not at all, and a row in a part is what "committed" means for the job. The
functions here take a Storage rooted at the manifest folder.

A part that cannot be read all the same (a disk that filled, a copy cut short) is named in one
warning and set aside in OUTPUT/manifest/damaged/: its rows count as never committed, so the
next run redoes exactly the photos whose rows were only in it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .errors import LISTING_KINDS, RETRIED_KINDS, OutputError
from .storage import Storage

log = logging.getLogger(__name__)

MANIFEST_DIR = "manifest"
DAMAGED_DIR = "damaged"  # in MANIFEST_DIR: files of OUTPUT that could not be read, set aside
OK, FAILED, SKIPPED = "ok", "failed", "skipped"
STAGES = ("read", "decode", "saliency", "depth", "effect", "encode", "write")
# Columns renamed since: old parts are read under the new name.
RENAMED = {"job_hash": "params_hash"}
REPLACES = b"dreamfocus.replaces"  # a compacted part's metadata: the parts it replaces
COMPACT_MIN_PARTS = 64  # a run or `status` finding this many parts merges them into one
PART_READERS = 16  # parts read at once
RETRY_COMMIT_SECONDS = 5.0  # after a failed commit, the next try waits this long (or a commit interval)
MAX_PART_GROWTH = 16  # a group commit's part holds at most this many times rows_per_part

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
        ("storage_retries", pa.int32()),  # transient storage errors retried reading and writing this photo
        ("source_changed", pa.bool_()),  # replaced after the listing: the row names the version read
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
    """Buffers manifest rows (Arrow tables of SCHEMA, as manifest_rows makes them) and writes
    them as numbered parts: once `rows_per_part` rows wait, and at least every
    `seconds_per_part` seconds while rows arrive (flush_if_due() from a timer), so a killed run
    loses little.

    Within `committing()`, parts are written by a thread of their own while rows go on arriving
    (a group commit): a part then takes every row that waits, so when rows come faster than one
    part per write, parts grow instead of the driver waiting. Thread-safe: rows come from the
    driver, time from a ticker."""

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
        self.tables: list[pa.Table] = []
        self.pending = 0  # rows in self.tables
        self.parts = 0
        self.first_pending = 0.0  # when the oldest uncommitted row arrived
        self.error: BaseException | None = None  # of the committing thread, raised to the driver
        self.failed_commits = 0  # commits that failed while the run went on; their rows went with a later one
        self.retry_at = 0.0  # after a failed commit, no new try before this
        self._lock = threading.Lock()  # the pending rows
        self._writing = threading.Lock()  # one part at a time, numbered in order
        self._wake = threading.Condition(self._lock)
        self._committer: threading.Thread | None = None
        self._stopping = False

    def add(self, row: dict) -> None:
        """One row given as a dict of SCHEMA's columns (missing ones are null)."""
        self.add_table(pa.Table.from_pylist([{c: row.get(c) for c in COLUMNS}], schema=SCHEMA))

    def add_table(self, rows: pa.Table) -> None:
        """Rows with SCHEMA's columns."""
        if self.error is not None:
            raise self.error
        if not rows.num_rows:
            return
        with self._lock:
            if not self.pending:
                self.first_pending = self.clock()
            self.tables.append(rows)
            self.pending += rows.num_rows
        self.flush_if_due()

    def _due(self) -> bool:
        if self.clock() < self.retry_at:
            return False
        return self.pending >= self.rows_per_part or (
            self.pending > 0 and self.clock() - self.first_pending >= self.seconds_per_part
        )

    def flush_if_due(self) -> None:
        with self._lock:
            if not self._due():
                return
            if self._committer is not None:
                self._wake.notify()
                return
        self._commit()

    def flush(self) -> None:
        """Commit every waiting row now (after the part being written, if any)."""
        self._commit()
        while self.pending and self.error is None:
            self._commit()
        if self.error is not None:
            raise self.error

    @contextlib.contextmanager
    def committing(self) -> Iterator[ManifestWriter]:
        """Parts written by a thread beside the caller; on leaving, the rest is committed.

        Where the caller stops on an error of its own, a last commit that fails too is logged:
        what stopped the run is what it raises."""
        self._stopping = False
        self._committer = threading.Thread(target=self._commit_when_due, name="dreamfocus-manifest", daemon=True)
        self._committer.start()
        stopped = True
        try:
            yield self
            stopped = False
        finally:
            with self._lock:
                self._stopping = True
                self._wake.notify()
            self._committer.join()
            self._committer = None
            try:
                self.flush()
            except OutputError as exc:
                if not stopped:
                    raise
                log.error("%d rows not committed, a rerun redoes their photos: %s", self.pending, exc)

    def _commit_when_due(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not self._due():
                    self._wake.wait(timeout=1.0)  # the time limit is checked on waking, too
                if self._stopping:
                    return
            try:
                self._commit()
            except OutputError as exc:  # storage errors past every retry, a full disk: the rows wait
                self.failed_commits += 1
                self.retry_at = self.clock() + min(self.seconds_per_part, RETRY_COMMIT_SECONDS)
                log.warning("manifest commit failed, %d rows kept for the next one: %s", self.pending, exc)
            except Exception as exc:  # noqa: BLE001 - raised in the driver's next add or flush
                self.error = exc
                return

    def _commit(self) -> None:
        with self._writing:
            with self._lock:  # at most MAX_PART_GROWTH parts' worth: a crash loses little whatever the rate
                taken, rows = 0, 0
                while taken < len(self.tables) and rows < self.rows_per_part * MAX_PART_GROWTH:
                    rows += self.tables[taken].num_rows
                    taken += 1
                tables, self.tables, self.pending = self.tables[:taken], self.tables[taken:], self.pending - rows
                if self.pending:
                    self.first_pending = self.clock()
            if not tables:
                return
            try:
                table = pa.concat_tables(tables).select(list(COLUMNS)).cast(SCHEMA)
                self.store.write_atomic(f"part-{self.run_id}-{self.parts:05d}.parquet", _parquet(table))
            except BaseException:
                with self._lock:  # not committed: they wait for the next try
                    self.tables = tables + self.tables
                    self.pending += sum(t.num_rows for t in tables)
                raise
            self.parts += 1


def manifest_rows(
    rows: pa.Table,
    *,
    source_root: str,
    preset: str,
    job_hash: str,
    run_id: str,
    finished_at: datetime | None = None,
) -> pa.Table:
    """Manifest rows (SCHEMA) of photos' results, column by column: `rows` holds at least
    relpath, status and attempt, and any of SCHEMA's other columns; the rest is filled in here.
    The job's finishing tasks call it, so the driver only commits the tables."""
    n = rows.num_rows
    now = pa.scalar(finished_at or datetime.now(UTC), SCHEMA.field("finished_at").type)
    relpaths = rows.column("relpath").to_pylist()
    filled = {
        "image_id": pa.array([image_id(r) for r in relpaths], pa.string()),
        "source_uri": pc.binary_join_element_wise(source_root, rows.column("relpath"), "/"),
        "preset": pa.array([preset] * n, pa.string()),
        "job_hash": pa.array([job_hash] * n, pa.string()),
        "run_id": pa.array([run_id] * n, pa.string()),
        "finished_at": pa.array([now.as_py()] * n, now.type),
    }
    columns = []
    for column_field in SCHEMA:
        if column_field.name in filled:
            column = filled[column_field.name]
        elif column_field.name in rows.column_names:
            column = rows.column(column_field.name).cast(column_field.type, safe=False)  # say, naive us times to UTC ms
        else:
            column = pa.nulls(n, column_field.type)
        columns.append(column)
    table = pa.Table.from_arrays(columns, schema=SCHEMA)
    started = table.column("started_at")
    table = table.set_column(
        SCHEMA.get_field_index("started_at"),
        "started_at",
        pc.if_else(pc.is_null(started), table.column("finished_at"), started),
    )
    # The file written (ok, or left alone and written unchanged) and the path that rendered it:
    # null where there is none, not an empty name.
    for name in ("output_uri", "render_path"):
        values = table.column(name)
        table = table.set_column(SCHEMA.get_field_index(name), name, pc.if_else(pc.equal(values, ""), None, values))
    return table


def _parquet(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


def part_names(store: Storage) -> list[str]:
    """The manifest's part files (none when there is no manifest yet): a listing, no reads.
    Only the manifest folder's own files: not those set aside in damaged/."""
    try:
        return [part.relpath for part in store.list_files(frozenset({".parquet"})) if "/" not in part.relpath]
    except FileNotFoundError:
        return []


def damaged_names(store: Storage) -> list[str]:
    """The files set aside in the manifest folder's damaged/ (a listing, no reads)."""
    try:
        return [f.relpath for f in Storage(f"{store.uri}/{DAMAGED_DIR}", store.storage_options).list_files(None)]
    except FileNotFoundError:
        return []


def set_aside(store: Storage, relpath: str, target: str, data: bytes, damage: str, consequence: str) -> None:
    """Move a file of OUTPUT that cannot be read to `target` (its bytes kept for a look) and say
    so in one warning line. Where it cannot be moved (a read-only OUTPUT), the warning says so
    and the file stays: readers go on as if it were absent."""
    where = store.uri_of(relpath)
    try:
        store.write_atomic(target, data)
        if store.read_bytes(relpath) == data:  # not replaced since it was read (say, a new lease)
            store.remove(relpath)
    except FileNotFoundError:  # another reader moved it first
        pass
    except (OutputError, OSError) as exc:
        log.warning("%s is damaged (%s) and cannot be moved aside (%s); %s", where, damage, exc, consequence)
        return
    log.warning("%s is damaged (%s); moved to %s; %s", where, damage, store.uri_of(target), consequence)


def damage_of(exc: BaseException) -> str:
    """What is wrong with a file, in one line (pyarrow's messages may span lines)."""
    return " ".join(f"{type(exc).__name__}: {exc}".split())


def read_part(
    store: Storage, name: str, set_aside_damaged: bool = True, columns: set[str] | None = None
) -> pa.Table | None:
    """A part's rows (only `columns` of them, where given); None for a damaged part, which is
    named in a warning and moved to damaged/ (where `set_aside_damaged`; else only named)."""
    data = store.read_bytes(name)
    try:
        part = pq.ParquetFile(io.BytesIO(data))
        found = part.schema_arrow.names
        missing = [c for c in ("relpath", "status") if c not in found]
        if not missing:
            table = part.read(columns=None if columns is None else [c for c in found if c in columns])
            return table.replace_schema_metadata(part.schema_arrow.metadata)
        damage = f"not a manifest part: no {' or '.join(missing)} column"
    except (pa.ArrowException, OSError) as exc:  # the bytes are read: an OSError here is pyarrow's
        damage = damage_of(exc)
    consequence = "the photos whose rows were only in it are done again by the next run"
    if set_aside_damaged:
        set_aside(store, name, f"{DAMAGED_DIR}/{name}", data, damage, consequence)
    else:
        log.warning("%s is damaged (%s); left where it is; %s", store.uri_of(name), damage, consequence)
    return None


def _read_parts(
    store: Storage,
    names: list[str] | None = None,
    set_aside_damaged: bool = True,
    columns: Iterable[str] | None = None,
) -> tuple[dict[str, pa.Table], list[str]]:
    """Every committed part by name (of `names`, else of a listing), less those a compacted part
    has replaced (a compaction killed before it removed them leaves them behind; their rows are
    in the compacted part) and those that are damaged (read_part), and the names of such
    leftovers. With `columns`, only those (under their old names too, where renamed) are read.
    Parts are read on threads: each is a round trip to the store."""
    names = part_names(store) if names is None else names
    wanted = None if columns is None else set(columns) | {RENAMED[c] for c in columns if c in RENAMED}
    with ThreadPoolExecutor(max_workers=PART_READERS, thread_name_prefix="dreamfocus-parts") as pool:
        read = pool.map(lambda name: read_part(store, name, set_aside_damaged, wanted), names)
        parts = {name: table for name, table in zip(names, read) if table is not None}
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
    no run has written the listing yet, or when it is damaged: then it is set aside)."""
    if not output.exists(OTHER_FILES):
        return _OTHER_SCHEMA.empty_table()
    data = output.read_bytes(OTHER_FILES)
    try:
        return pq.read_table(io.BytesIO(data)).cast(_OTHER_SCHEMA)
    except (pa.ArrowException, OSError, ValueError) as exc:  # ValueError: columns that do not cast
        target = f"{MANIFEST_DIR}/{DAMAGED_DIR}/{OTHER_FILES}"
        set_aside(output, OTHER_FILES, target, data, damage_of(exc), "the next run lists them again")
        return _OTHER_SCHEMA.empty_table()


def read_manifest(store: Storage, columns: Iterable[str] | None = None, set_aside_damaged: bool = True) -> pa.Table:
    """Every committed row (an empty table when there is no manifest yet). Damaged parts are
    left out, and set aside (read_part) unless `set_aside_damaged` is False."""
    names = list(columns) if columns is not None else list(COLUMNS)
    schema = pa.schema([SCHEMA.field(n) for n in names])
    tables = [
        pa.table({n: _column(table, n, schema.field(n).type) for n in names})
        for table in _read_parts(store, set_aside_damaged=set_aside_damaged, columns=names)[0].values()
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


@dataclass(frozen=True)
class FolderResume:
    """What earlier runs settled for the inputs of one folder: name -> (fingerprint, job_hash,
    status as listing_status gives it, attempts so far, whether a rerun retries it anyway)."""

    latest: dict[str, tuple[str, str, str, int, bool]]

    def latest_is(self, name: str, fingerprint: str, job_hash: str, status: str) -> bool:
        entry = self.latest.get(name)
        return entry is not None and not entry[4] and entry[:3] == (fingerprint, job_hash, status)

    def attempts_of(self, name: str) -> int:
        entry = self.latest.get(name)
        return entry[3] if entry is not None else 0

    @property
    def any_ok(self) -> bool:
        """Whether some input here has an output that should exist."""
        return any(entry[2] == OK for entry in self.latest.values())


_RESUME_COLUMNS = ("relpath", "source_fingerprint", "job_hash", "status", "error_kind", "attempt", "finished_at")


class ResumeIndex:
    """Each input's latest row, as Arrow columns sorted by folder (tens of bytes per input, no
    Python object per photo): the plan asks for one folder's entries at a time."""

    def __init__(self, latest: pa.Table) -> None:
        relpaths = latest.column("relpath")
        folders = pc.replace_substring_regex(relpaths, r"/?[^/]*$", "")
        names = pc.replace_substring_regex(relpaths, r"^.*/", "")
        kinds = latest.column("error_kind")
        status = latest.column("status")
        listing = pc.is_in(kinds, value_set=pa.array(sorted(LISTING_KINDS), pa.string()))
        table = pa.table(
            {
                "folder": folders,
                "name": names,
                "fingerprint": pc.fill_null(latest.column("source_fingerprint"), ""),
                "job_hash": pc.fill_null(latest.column("job_hash"), "").dictionary_encode(),
                "status": pc.if_else(
                    pc.fill_null(listing, False), pc.binary_join_element_wise(status, kinds, ":"), status
                ).dictionary_encode(),
                "attempt": pc.fill_null(latest.column("attempt"), 0),
                "retried": pc.fill_null(pc.is_in(kinds, value_set=pa.array(sorted(RETRIED_KINDS), pa.string())), False),
            }
        ).sort_by("folder")
        runs = pc.run_end_encode(table.column("folder").combine_chunks())
        ends = runs.run_ends.to_numpy()
        starts = np.concatenate([[0], ends[:-1]]) if len(ends) else ends
        self.slices = {
            folder: (int(start), int(end)) for folder, start, end in zip(runs.values.to_pylist(), starts, ends)
        }
        self.table = table.drop_columns(["folder"])

    @classmethod
    def load(cls, store: Storage, set_aside_damaged: bool = True) -> ResumeIndex:
        return cls(latest_rows(read_manifest(store, _RESUME_COLUMNS, set_aside_damaged)))

    def folder(self, folder: str) -> FolderResume:
        """The entries of the inputs directly in `folder` (relative to INPUT, "" for its top)."""
        where = self.slices.get(folder)
        if where is None:
            return FolderResume({})
        part = self.table.slice(where[0], where[1] - where[0])
        columns = [
            part.column(c).to_pylist() for c in ("name", "fingerprint", "job_hash", "status", "attempt", "retried")
        ]
        return FolderResume({name: tuple(rest) for name, *rest in zip(*columns)})  # type: ignore[misc]


@dataclass
class ManifestReport:
    rows: int
    latest_counts: dict[str, int]  # status of each input's latest attempt -> inputs
    failure_kinds: list[tuple[str, int, str]]  # (kind, inputs, an example error)
    left_alone_kinds: list[tuple[str, int, str]]  # (kind, inputs, an example reason)
    runs: list[tuple[str, int, float]]  # (run id, rows, photos per second)
    stage_seconds: dict[str, float]  # stage -> seconds summed over the rows that have timings
    timed_rows: int  # rows with per-stage timings (rows of older versions have none per model)
    damaged: list[str] = field(default_factory=list)  # files set aside in manifest/damaged/

    def lines(self) -> list[str]:
        if not self.rows:
            return ["no manifest rows yet", *self.damaged_lines()]
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
        return out + self.damaged_lines()

    def damaged_lines(self) -> list[str]:
        if not self.damaged:
            return []
        return [
            f"damaged, set aside in {MANIFEST_DIR}/{DAMAGED_DIR}/: {', '.join(self.damaged)} (a run redoes the "
            "photos whose rows were only in a damaged part; remove these files once looked at)"
        ]


def manifest_report(store: Storage, top: int = 5) -> ManifestReport:
    stage_columns = [f"seconds_{stage}" for stage in STAGES]
    table = read_manifest(
        store,
        ["relpath", "status", "error_kind", "error", "reason", "attempt", "run_id", "started_at", "finished_at"]
        + stage_columns,
    )
    return dataclasses.replace(report_of(table, top), damaged=damaged_names(store))


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
