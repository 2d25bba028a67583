"""A damaged OUTPUT: a manifest part, lease.json or other-files.parquet that cannot be read is
named in one warning line, set aside in manifest/damaged/, and the job goes on as if it were
absent; a rerun redoes exactly the photos whose rows were only in a damaged part."""

from __future__ import annotations

import io
import json
import logging
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from pipeline.cli import main
from pipeline.job import JobConfig, run_job
from pipeline.job.lease import LEASE_FILE, Lease
from pipeline.manifest import (
    COLUMNS,
    OTHER_FILES,
    ManifestWriter,
    ResumeIndex,
    compact_manifest,
    damaged_names,
    part_names,
    read_manifest,
    read_other_files,
)
from pipeline.storage import Storage

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.jpg"))
TRIVIAL = dict(saliency_model="trivial-saliency", depth_model="trivial-depth")


def row(relpath: str) -> dict:
    values = {c: None for c in COLUMNS}
    values.update(relpath=relpath, status="ok", attempt=1, run_id="r1", error_kind="", error="", reason="")
    return values


def manifest_of(tmp_path: Path, parts: int, output: str | None = None) -> Storage:
    """OUTPUT/manifest (OUTPUT: `output`, else tmp_path/out) with `parts` parts of one row each:
    p0.jpg, p1.jpg, ..."""
    store = Storage(f"{output or tmp_path / 'out'}/manifest")
    writer = ManifestWriter(store, "r1", rows_per_part=1)
    for i in range(parts):
        writer.add(row(f"p{i}.jpg"))
    return store


def parquet(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


DAMAGE = {
    "truncated": lambda data: data[: len(data) // 2],
    "garbage": lambda data: b"\x00\xffnot parquet at all" * 10,
    "empty": lambda data: b"",
    "foreign": lambda data: parquet(pa.table({"name": ["x"]})),  # valid Parquet, no manifest part
}


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "out")
    return request.getfixturevalue("s3_bucket") + "/out"


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_part_is_named_once_set_aside_and_its_rows_left_out(tmp_path, output, caplog, damage):
    store = manifest_of(tmp_path, 3, output)
    name = part_names(store)[1]
    data = DAMAGE[damage](store.read_bytes(name))
    store.write_atomic(name, data)

    with caplog.at_level(logging.WARNING):
        relpaths = read_manifest(store).column("relpath").to_pylist()
    assert sorted(relpaths) == ["p0.jpg", "p2.jpg"]
    (line,) = warnings_of(caplog)
    assert line.startswith(f"{store.uri_of(name)} is damaged (") and "\n" not in line
    assert line.endswith(
        f"moved to {store.uri}/damaged/{name}; the photos whose rows were only in it are done again by the next run"
    )
    assert part_names(store) == [n for n in part_names(store) if n != name] and name not in part_names(store)
    assert damaged_names(store) == [name] and store.read_bytes(f"damaged/{name}") == data  # kept for a look

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert read_manifest(store).num_rows == 2
    assert warnings_of(caplog) == []  # named once: set aside, it is not read again


def test_a_dry_runs_reading_names_a_damaged_part_and_leaves_it_where_it_is(tmp_path, caplog):
    store = manifest_of(tmp_path, 2)
    name = part_names(store)[0]
    store.write_atomic(name, b"torn")
    with caplog.at_level(logging.WARNING):
        resume = ResumeIndex.load(store, set_aside_damaged=False)
    assert resume.folder("").attempts_of("p0.jpg") == 0 and resume.folder("").attempts_of("p1.jpg") == 1
    (line,) = warnings_of(caplog)
    assert line.startswith(f"{store.uri_of(name)} is damaged (") and "left where it is" in line
    assert name in part_names(store) and damaged_names(store) == []


def test_compaction_sets_a_damaged_part_aside_and_merges_the_rest(tmp_path):
    store = manifest_of(tmp_path, 66)
    damaged = part_names(store)[10]
    store.write_atomic(damaged, b"torn")
    assert compact_manifest(store) == 65
    assert len(part_names(store)) == 1 and damaged_names(store) == [damaged]
    assert read_manifest(store).num_rows == 65


def test_status_says_which_part_was_damaged_and_set_aside(tmp_path, capsys, caplog):
    store = manifest_of(tmp_path, 2)
    name = part_names(store)[0]
    store.write_atomic(name, b"torn")
    with caplog.at_level(logging.WARNING):
        assert main(["status", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "1 inputs (1 attempts): ok 1" in out
    assert f"damaged, set aside in manifest/damaged/: {name} (a run redoes the photos" in out
    (line,) = warnings_of(caplog)
    assert line.startswith(f"{store.uri_of(name)} is damaged")

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert main(["status", str(tmp_path / "out")]) == 0  # said again, from the damaged folder
    assert f"set aside in manifest/damaged/: {name}" in capsys.readouterr().out and warnings_of(caplog) == []


@pytest.mark.parametrize(
    "data",
    [
        b'{"run_id": "r',
        b"\x00\x01\x02",
        b"[1, 2]",
        b'{"run_id": 1, "host": "h", "pid": 1, "started_at": "", "expires_at": 0}',
    ],
    ids=["truncated", "binary", "no record", "wrong types"],
)
def test_a_damaged_lease_is_set_aside_and_the_lease_taken(tmp_path, caplog, data):
    output = Storage(str(tmp_path / "out"))
    output.write_atomic(LEASE_FILE, data)
    with caplog.at_level(logging.WARNING):
        Lease(output, "rerun").check()
        lease = Lease(output, "rerun").acquire()
    (line,) = warnings_of(caplog)
    assert line.startswith(f"{output.uri_of(LEASE_FILE)} is damaged (")
    assert line.endswith(f"moved to {output.uri}/manifest/damaged/lease.json; taken as no job's lease")
    assert output.read_bytes("manifest/damaged/lease.json") == data
    assert json.loads(output.read_bytes(LEASE_FILE))["run_id"] == "rerun"
    lease.release()


def test_a_damaged_listing_of_other_files_is_set_aside(tmp_path, capsys, caplog):
    output = Storage(str(tmp_path / "out"))
    output.write_atomic(OTHER_FILES, b"PAR1 cut short")
    with caplog.at_level(logging.WARNING):
        assert main(["status", output.uri, "--other-files"]) == 0
    assert capsys.readouterr().out.startswith("no other files listed")
    (line,) = warnings_of(caplog)
    assert line.startswith(f"{output.uri_of(OTHER_FILES)} is damaged (") and "the next run lists them again" in line
    assert output.read_bytes(f"manifest/damaged/{OTHER_FILES}") == b"PAR1 cut short"
    assert read_other_files(output).num_rows == 0 and not output.exists(OTHER_FILES)


# ------------------------------------------------------------------------ a real rerun


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def test_a_rerun_redoes_exactly_the_photos_of_a_damaged_part(tmp_path, local_ray, caplog, capsys):
    inputs, output = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    (inputs / "notes.txt").write_text("no photo")
    config = JobConfig(input=str(inputs), output=str(output), commit_every=2, **TRIVIAL)
    for photos in (EXAMPLES[:2], EXAMPLES[2:]):  # two runs: parts of their own
        for photo in photos:
            shutil.copy(photo, inputs / photo.name)
        assert run_job(config).counts == {"ok": len(photos)}
    store = Storage(str(output / "manifest"))
    parts = part_names(store)
    assert len(parts) >= 2
    damaged = parts[0]
    lost = sorted(pq.read_table(output / "manifest" / damaged).column("relpath").to_pylist())
    assert 0 < len(lost) < len(EXAMPLES)
    # A disk that filled: a part cut short, a torn lease as a killed run leaves it, the other files' listing too.
    store.write_atomic(damaged, store.read_bytes(damaged)[:100])
    (output / "manifest" / "lease.json").write_bytes(b'{"run_id": "2026')
    (output / OTHER_FILES).write_bytes(b"PAR1")

    with caplog.at_level(logging.WARNING):
        again = run_job(config)
    assert again.counts == {"ok": len(lost)} and again.others == {".txt": 1}
    named = sorted(line.split(" is damaged ")[0] for line in warnings_of(caplog) if " is damaged " in line)
    assert named == [store.uri_of("lease.json"), store.uri_of(damaged)]  # one line each
    rows = read_manifest(store).to_pylist()
    assert sorted(r["relpath"] for r in rows) == sorted(p.name for p in EXAMPLES)  # each once: none lost, none twice
    assert sorted(r["relpath"] for r in rows if r["run_id"] == again.run_id) == lost
    assert read_other_files(Storage(str(output))).column("relpath").to_pylist() == ["notes.txt"]  # written anew
    assert sorted(damaged_names(store)) == sorted([damaged, "lease.json"])
    assert run_job(config).planned == 0

    assert main(["status", str(output)]) == 0
    out = capsys.readouterr().out
    assert f"{len(EXAMPLES)} inputs ({len(EXAMPLES)} attempts): ok {len(EXAMPLES)}" in out
    assert f"damaged, set aside in manifest/damaged/: lease.json, {damaged}" in out
