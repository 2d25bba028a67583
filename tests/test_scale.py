"""Libraries of many folders: the listing ahead on threads, the plan per folder against the
resume index, manifest parts written beside the driver, and kills at the moments these add
(during the listing, during a part's write). scripts/bench_scale.py measures the speed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pipeline.errors import OutputError
from pipeline.job.plan import JobConfig, OtherFile, PlanItem, check_locations, make_plan
from pipeline.manifest import ManifestWriter, ResumeIndex, manifest_rows, read_manifest
from pipeline.storage import Storage

TRIVIAL = dict(saliency_model="trivial-saliency", depth_model="trivial-depth")


def tree(root: Path, layout: dict[str, list[str]]) -> None:
    for folder, names in layout.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for name in names:
            (root / folder / name).write_bytes(b"x" * (1 + len(name)))


LAYOUT = {
    ".": ["top.jpg", "notes.txt"],
    "2023": ["a.jpg", "b.JPG"],
    "2023/summer": ["c.jpg", "c.png", "d.heic"],
    "2023/summer/beach": ["e.jpg"],
    "2023/winter": ["f.jpg", ".hidden.jpg"],
    "2024": ["g.jpg", "g.dng", "clip.mov"],
    "2024/.thumbs": ["t.jpg"],
    **{f"many/f{i:02d}": [f"p{j}.jpg" for j in range(3)] for i in range(40)},
}


def walk_order(root: Path) -> list[tuple[str, list[str]]]:
    """What list_folders should give: folders depth first in name order, files sorted, hidden out."""
    out = []

    def visit(folder: Path) -> None:
        entries = sorted(folder.iterdir(), key=lambda p: p.name)
        files = [p for p in entries if p.is_file() and not p.name.startswith(".")]
        rel = folder.relative_to(root).as_posix()
        out.append(("" if rel == "." else rel, [p.relative_to(root).as_posix() for p in files]))
        for sub in entries:
            if sub.is_dir() and not sub.name.startswith("."):
                visit(sub)

    visit(root)
    return out


def test_folders_listed_ahead_come_in_the_same_depth_first_order(tmp_path):
    tree(tmp_path, LAYOUT)
    store = Storage(str(tmp_path))
    expected = walk_order(tmp_path)
    for prefetch in (1, 3, 16):
        got = [(folder, [f.relpath for f in files]) for folder, files in store.list_folders(None, prefetch)]
        assert got == expected, f"prefetch {prefetch}"
    assert [f.relpath for f in store.list_files(frozenset({".png"}))] == ["2023/summer/c.png"]
    assert store.names_in("2023/summer") == {"c.jpg", "c.png", "d.heic"}
    assert store.names_in("no/such/folder") == set()


def test_folders_listed_ahead_on_s3_come_in_the_same_order(s3_bucket):
    import boto3

    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    bucket = s3_bucket.removeprefix("s3://")
    keys = [f"lib/{folder}/{name}" for folder, names in LAYOUT.items() for name in names]
    for key in keys:
        s3.put_object(Bucket=bucket, Key=key.replace("/./", "/"), Body=b"x")
    store = Storage(f"{s3_bucket}/lib")
    serial = [(folder, [f.relpath for f in files]) for folder, files in store.list_folders(None, 1)]
    assert [(folder, [f.relpath for f in files]) for folder, files in store.list_folders(None, 16)] == serial
    assert [folder for folder, _ in serial[:5]] == ["", "2023", "2023/summer", "2023/summer/beach", "2023/winter"]
    assert serial[2][1] == ["2023/summer/c.jpg", "2023/summer/c.png", "2023/summer/d.heic"]
    assert sum(len(files) for _, files in serial) == len([k for k in keys if "/." not in k.replace("/./", "/")])


def finished(relpaths: list[str], status: str = "ok", **columns) -> pa.Table:
    n = len(relpaths)
    return pa.table({"relpath": relpaths, "status": [status] * n, "attempt": pa.array([1] * n, pa.int32()), **columns})


def committed_rows(relpaths: list[str]) -> pa.Table:
    return manifest_rows(finished(relpaths), source_root="/in", preset="p", job_hash="h", run_id="r1")


def describe(item) -> tuple:
    if isinstance(item, PlanItem):
        return ("plan", item.source.relpath, item.output_relpath, item.reason, item.attempt, type(item.error).__name__)
    if isinstance(item, OtherFile):
        return ("other", item.source.relpath)
    return ("skip", item)


def test_the_plan_is_the_same_listed_ahead_or_one_folder_at_a_time(tmp_path):
    inputs, output = tmp_path / "in", tmp_path / "out"
    tree(inputs, LAYOUT)
    config = JobConfig(input=str(inputs), output=str(output), **TRIVIAL)
    store = Storage(str(inputs))
    fingerprints = {f.relpath: f.fingerprint for f in store.list_files(None)}
    # Earlier runs: done (with and without their output), failed, left alone, and one replaced since.
    done = ["2023/a.jpg", "2023/summer/beach/e.jpg", "many/f07/p1.jpg", "top.jpg"]
    writer = ManifestWriter(Storage(f"{output}/manifest"), "r0")
    for status, relpaths in (
        ("ok", done + ["2024/g.jpg"]),
        ("failed", ["2023/b.JPG"]),
        ("skipped", ["many/f03/p0.jpg"]),
    ):
        rows = finished(relpaths, status, source_fingerprint=[fingerprints[r] for r in relpaths])
        writer.add_table(
            manifest_rows(rows, source_root=str(inputs), preset="default", job_hash=config.job_hash(), run_id="r0")
        )
    writer.add_table(
        manifest_rows(
            finished(["many/f10/p2.jpg"], source_fingerprint=["mtime:1:1"]),
            source_root=str(inputs),
            preset="default",
            job_hash=config.job_hash(),
            run_id="r0",
        )
    )
    writer.flush()
    for relpath in done:
        (output / "images" / relpath).parent.mkdir(parents=True, exist_ok=True)
        (output / "images" / relpath).write_bytes(b"done")

    src, out = check_locations(config)
    serial = [describe(item) for item in make_plan(config, src, out, prefetch=1)]
    assert [describe(item) for item in make_plan(config, src, out, prefetch=16)] == serial
    decided = {entry[1]: entry for entry in serial if entry[0] != "skip"}
    assert Counter(entry[1] for entry in serial if entry[0] == "skip") == Counter(
        {"done": 4, "failed before (use --retry-failed)": 1, "skipped before (not an image, or left as it is)": 1}
    )
    assert decided["2024/g.jpg"][3] == "output missing"
    assert decided["many/f10/p2.jpg"][3:5] == ("changed photo or parameters, or a failure not of its own making", 2)
    assert decided["2023/summer/c.png"][2] == "2023/summer/c.png.jpg"  # c.jpg has 2023/summer/c.jpg
    assert decided["2024/g.dng"][3] == "the other half of a RAW + JPEG pair"
    assert decided["2024/clip.mov"] == ("other", "2024/clip.mov")
    assert sum(entry[0] == "plan" and entry[3] == "new" for entry in serial) == 40 * 3 - 3 + 4


def test_the_resume_index_answers_per_folder(tmp_path):
    store = Storage(str(tmp_path / "manifest"))
    writer = ManifestWriter(store, "r0")
    rows = finished(["a.jpg", "x/b.jpg", "x/y/c.jpg", "x/b.jpg"], source_fingerprint=["f1", "f2", "f3", "f4"])
    rows = rows.set_column(2, "attempt", pa.array([1, 1, 1, 2], pa.int32()))
    writer.add_table(manifest_rows(rows, source_root="/in", preset="p", job_hash="h", run_id="r0"))
    writer.flush()
    index = ResumeIndex.load(store)
    assert index.folder("").latest_is("a.jpg", "f1", "h", "ok")
    assert not index.folder("").latest_is("b.jpg", "f2", "h", "ok")  # not in this folder
    assert index.folder("x").latest_is("b.jpg", "f4", "h", "ok") and index.folder("x").attempts_of("b.jpg") == 2
    assert not index.folder("x").latest_is("b.jpg", "f2", "h", "ok")  # an older attempt
    assert index.folder("x/y").attempts_of("c.jpg") == 1 and index.folder("x/y").any_ok
    assert index.folder("elsewhere").attempts_of("c.jpg") == 0 and not index.folder("elsewhere").any_ok


class SlowStore(Storage):
    """A manifest folder whose first part's write waits until `release` is set."""

    def __init__(self, uri: str) -> None:
        super().__init__(uri)
        self.writing, self.release = threading.Event(), threading.Event()
        self.fail = False

    def write_atomic(self, relpath: str, data: bytes) -> None:
        if self.fail:
            raise OutputError(f"cannot write {relpath}: disk full")
        self.writing.set()
        self.release.wait()
        super().write_atomic(relpath, data)


def test_parts_grow_while_a_write_is_slow_and_no_row_is_lost(tmp_path):
    store = SlowStore(str(tmp_path / "manifest"))
    writer = ManifestWriter(store, "r1", rows_per_part=10, seconds_per_part=1e9)
    with writer.committing():
        writer.add_table(committed_rows([f"a{i}.jpg" for i in range(10)]))
        assert store.writing.wait(30)  # the first part is being written: rows go on arriving
        for group in range(5):
            writer.add_table(committed_rows([f"b{group}-{i}.jpg" for i in range(10)]))
        store.release.set()
    rows = read_manifest(Storage(str(tmp_path / "manifest")))
    assert rows.num_rows == 60 and len(set(rows.column("relpath").to_pylist())) == 60
    assert writer.parts <= 3  # the 50 rows that waited went in one or two parts, not five


def test_a_part_that_cannot_be_written_stops_the_driver_and_keeps_its_rows(tmp_path):
    store = SlowStore(str(tmp_path / "manifest"))
    store.release.set()
    store.fail = True
    writer = ManifestWriter(store, "r1", rows_per_part=2, seconds_per_part=1e9)
    with pytest.raises(OutputError, match="disk full"), writer.committing():
        for i in range(200):
            writer.add_table(committed_rows([f"p{i}.jpg"]))
    assert writer.pending >= 2 and writer.parts == 0  # nothing was taken as committed


# ---------------------------------------------------------------------------- kill -9

# A driver in its own process that blocks, at the moment a test wants, where it says so on stdout.
BLOCKING_DRIVER = textwrap.dedent(
    """
    import sys, threading
    from pipeline import storage
    from pipeline.cli import main

    where = sys.argv[1]
    seen = []

    def block():
        print("blocked", flush=True)
        threading.Event().wait()

    if where == "listing":
        listed = storage.Storage._list_folder
        def _list_folder(self, folder):
            seen.append(folder)
            if len(seen) == 3:
                block()
            return listed(self, folder)
        storage.Storage._list_folder = _list_folder
    else:  # halfway through writing the second manifest part
        write = storage.Storage._write_local
        def _write_local(path, data):
            if "/manifest/part-" in path:
                seen.append(path)
                if len(seen) == 2:
                    with open(path + ".partial", "wb") as f:
                        f.write(data[: len(data) // 2])
                    block()
            write(path, data)
        storage.Storage._write_local = staticmethod(_write_local)
    sys.exit(main(sys.argv[2:]))
    """
)


def small_library(root: Path, folders: int, per_folder: int) -> list[str]:
    names = []
    for f in range(folders):
        (root / f"f{f}").mkdir(parents=True)
        for p in range(per_folder):
            noise = np.random.default_rng(10 * f + p).integers(0, 255, (48, 64, 3), dtype=np.uint8)
            Image.fromarray(noise).save(root / f"f{f}" / f"p{p}.jpg")
            names.append(f"f{f}/p{p}.jpg")
    return names


@pytest.mark.slow
@pytest.mark.parametrize("where", ["listing", "manifest"])
def test_a_kill_during_the_listing_or_a_part_write_loses_and_doubles_nothing(tmp_path, where):
    inputs, output = tmp_path / "in", tmp_path / "out"
    names = small_library(inputs, 4, 5)
    command = ["run", str(inputs), str(output), "--commit-every", "3", "--cpu-workers", "2"]
    command += ["--saliency-model", "trivial-saliency", "--depth-model", "trivial-depth"]
    driver = subprocess.Popen(
        [sys.executable, "-c", BLOCKING_DRIVER, where, *command],
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert driver.stdout is not None
    for line in driver.stdout:
        if line.strip() == "blocked":
            break
    else:
        pytest.fail(f"the driver ended before blocking (rc {driver.wait()})")
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and the Ray processes it started
    driver.wait()
    committed = read_manifest(Storage(f"{output}/manifest")).num_rows
    if where == "listing":
        assert committed == 0
    else:  # the first part only: the second is half a temporary file
        assert 0 < committed < len(names) and list((output / "manifest").glob("part-*.partial"))

    rerun = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *command], capture_output=True, text=True, timeout=300
    )
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    rows = read_manifest(Storage(f"{output}/manifest")).to_pylist()
    assert Counter(r["relpath"] for r in rows) == Counter(names)  # each photo exactly one row
    assert all(r["status"] == "ok" for r in rows)
    assert sorted(p.relative_to(output / "images").as_posix() for p in (output / "images").rglob("*.jpg")) == names
