"""Running a long job: the progress line, commits in time, compaction, OUTPUT's lease, the
reason column and the per-stage shares of `dreamfocus status`."""

from __future__ import annotations

import io
import json
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from pipeline.errors import OutputBusyError
from pipeline.job.console import LOG_SECONDS, Progress, duration, progress_line, without_native_noise
from pipeline.job.lease import LEASE_FILE, Lease
from pipeline.manifest import (
    COLUMNS,
    SCHEMA,
    STAGES,
    ManifestWriter,
    compact_manifest,
    latest_rows,
    manifest_report,
    read_manifest,
)
from pipeline.storage import Storage


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def row(relpath: str, status: str = "ok", **extra) -> dict:
    values = {c: None for c in COLUMNS}
    values.update(relpath=relpath, status=status, attempt=1, run_id="r1", error_kind="", error="", reason="")
    values.update(extra)
    return values


# ---------------------------------------------------------------------------- progress


def test_progress_line_reads_as_the_user_wants():
    line = progress_line(1204, 20000, 3, 41, 7.9)
    assert line == "1,204/20,000 photos · 3 failed · 41 left alone · 7.9 photos/s · 40 min left"  # 18,796 / 7.9 s
    assert progress_line(0, 10, 0, 0, None).endswith("starting")
    assert progress_line(10, 10, 0, 0, 2.0).endswith("2.0 photos/s · done")
    assert progress_line(5, 10, 0, 0, 0.0).endswith("stalled")
    assert (duration(30), duration(90), duration(3 * 3600 + 300)) == ("under 1 min", "2 min", "3 h 05 min")
    # While the listing goes on, the total is what it found so far: no time left, no "done".
    listing = progress_line(1204, 20000, 3, 41, 7.9, listing=True)
    assert listing == "1,204/20,000+ photos · 3 failed · 41 left alone · 7.9 photos/s · listing"
    assert progress_line(10, 10, 0, 0, 2.0, listing=True).endswith("2.0 photos/s · listing")


def test_progress_total_grows_with_the_plan():
    clock, out = Clock(), io.StringIO()
    progress = Progress(2, out, clock, listing=True)
    progress.add("ok", 2)
    clock.now += 60
    progress.show()
    progress.set_total(5, listing=True)
    clock.now += 60
    progress.show()
    progress.set_total(7, listing=False)
    progress.add("ok", 5)
    progress.close()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("2/2+ photos") and lines[0].endswith("listing")
    assert lines[1].startswith("2/5+ photos") and lines[-1].startswith("7/7 photos") and lines[-1].endswith("done")


def test_progress_rate_follows_the_last_minute_and_logs_every_few_seconds():
    clock, out = Clock(), io.StringIO()
    progress = Progress(1000, out, clock)
    assert progress.rate() is None
    for _ in range(10):  # 10 photos/s for two minutes
        clock.now += 1
        for _ in range(10):
            progress.add("ok")
    for _ in range(110):
        clock.now += 1
        for _ in range(10):
            progress.add("ok")
    assert progress.rate() == pytest.approx(10, rel=0.05)
    for _ in range(60):  # then 2 photos/s for a minute: the rate is that pace, not the average
        clock.now += 1
        progress.add("failed")
        progress.add("skipped")
    assert progress.rate() == pytest.approx(2, rel=0.05)
    assert (progress.done, progress.failed, progress.left_alone) == (1320, 60, 60)

    progress.show()
    clock.now += LOG_SECONDS / 2
    progress.show()  # too soon for another line in a log
    clock.now += LOG_SECONDS / 2
    progress.show()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("1,320/1,000 photos · 60 failed · 60 left alone · 2.0 photos/s")


def test_progress_draws_a_live_line_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Terminal()
    progress = Progress(3, out)
    progress.add("ok")
    progress.show()
    progress.close()
    assert "1/3 photos · 0 failed" in out.getvalue() and "\x1b[" in out.getvalue()  # drawn, in place


def test_native_noise_is_dropped_and_the_rest_passes(capfd):
    import os

    with without_native_noise(("noise from the core",)) as console:
        os.write(2, b"[E core_worker.cc] noise from the core: actor arguments\n")
        os.write(2, b"a real error line\n")
        console.write("progress line\n")
    err = capfd.readouterr().err
    assert "a real error line" in err and "progress line" in err and "noise from the core" not in err


# ---------------------------------------------------------------------------- commits


def test_rows_are_committed_every_n_and_every_so_many_seconds(tmp_path):
    store, clock = Storage(str(tmp_path / "manifest")), Clock()
    writer = ManifestWriter(store, "r1", rows_per_part=3, seconds_per_part=30, clock=clock)
    writer.add(row("a.jpg"))
    clock.now += 29
    writer.flush_if_due()
    assert read_manifest(store).num_rows == 0  # not yet
    clock.now += 1
    writer.flush_if_due()  # the ticker's call: 30 s after the oldest waiting row
    assert read_manifest(store).num_rows == 1
    for name in "bcd":
        writer.add(row(f"{name}.jpg"))
    assert read_manifest(store).num_rows == 4  # three in a row made a part
    writer.add(row("e.jpg"))
    writer.flush()
    assert sorted(read_manifest(store).column("relpath").to_pylist()) == [f"{n}.jpg" for n in "abcde"]
    assert writer.parts == 3


def test_rows_added_while_a_ticker_commits_are_never_lost(tmp_path):
    store = Storage(str(tmp_path / "manifest"))
    writer = ManifestWriter(store, "r1", rows_per_part=10_000, seconds_per_part=0.0)
    stop, added = threading.Event(), threading.Event()

    def tick() -> None:  # commits whenever rows came, while more keep coming
        while not stop.is_set():
            added.wait()
            added.clear()
            writer.flush_if_due()

    ticker = threading.Thread(target=tick)
    ticker.start()
    for i in range(500):
        writer.add(row(f"{i:04d}.jpg"))
        added.set()
    stop.set()
    added.set()
    ticker.join()
    writer.flush()
    relpaths = read_manifest(store).column("relpath").to_pylist()
    assert sorted(relpaths) == [f"{i:04d}.jpg" for i in range(500)] and writer.parts > 1


def test_compaction_merges_parts_and_a_kill_midway_loses_and_doubles_nothing(tmp_path):
    store = Storage(str(tmp_path / "manifest"))
    for part in range(6):
        writer = ManifestWriter(store, f"run{part}", rows_per_part=2)
        for i in range(4):
            writer.add(row(f"{part}-{i}.jpg", run_id=f"run{part}"))
    old = pa.table({"relpath": ["old.jpg"], "status": ["ok"], "params_hash": ["h"], "seconds_models": [1.5]})
    pq.write_table(old, tmp_path / "manifest" / "part-old.parquet")  # a part of an older version
    before = read_manifest(store)
    assert before.num_rows == 25 and len(list(store.list_files(frozenset({".parquet"})))) == 13

    assert compact_manifest(store, min_parts=20) == 0  # few parts: left as they are
    # A compaction killed after writing the merged part, before removing the parts it replaces:
    stay = Storage(str(tmp_path / "manifest"))
    stay.remove = lambda relpath: None  # type: ignore[method-assign]
    assert compact_manifest(stay, min_parts=5) == 13
    assert len(list(store.list_files(frozenset({".parquet"})))) == 14
    after = read_manifest(store)
    assert after.num_rows == 25 and sorted(after.column("relpath").to_pylist()) == sorted(
        before.column("relpath").to_pylist()
    )
    assert compact_manifest(store, min_parts=5) == 0  # one part to read: the leftovers are only removed
    assert len(list(store.list_files(frozenset({".parquet"})))) == 1
    [part] = list(store.list_files(frozenset({".parquet"})))
    merged = pq.read_table(tmp_path / "manifest" / part.relpath)
    assert merged.num_rows == 25 and "seconds_models" in merged.column_names  # old columns kept
    assert read_manifest(store).column("relpath").to_pylist().count("old.jpg") == 1


# ---------------------------------------------------------------------------- the lease


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path):
    if request.param == "local":
        return Storage(str(tmp_path / "out"))
    return Storage(request.getfixturevalue("s3_bucket") + "/out")


def test_a_live_lease_refuses_a_second_job_naming_the_first(output):
    clock = Clock()
    first = Lease(output, "run-one", clock=clock).acquire()
    with pytest.raises(OutputBusyError, match=r"another job is writing here: run run-one \(host .*, pid \d+, since"):
        Lease(output, "run-two", clock=clock).acquire()
    clock.now += 45
    first.renew()  # renewed: still refused a minute after the start
    clock.now += 45
    with pytest.raises(OutputBusyError):
        Lease(output, "run-two", clock=clock).acquire()
    first.release()
    assert not output.exists(LEASE_FILE)
    Lease(output, "run-two", clock=clock).acquire()


def test_an_expired_lease_is_taken_over_and_its_holder_stops_at_its_next_renewal(output):
    clock = Clock()
    stale = Lease(output, "run-one", clock=clock).acquire()
    clock.now += 61  # not renewed for more than a minute
    taker = Lease(output, "run-two", clock=clock).acquire()
    assert json.loads(output.read_bytes(LEASE_FILE))["run_id"] == "run-two"
    with pytest.raises(OutputBusyError, match="taken over by run run-two"):
        stale.renew()
    stale.release()  # not its lease any more: left alone
    assert json.loads(output.read_bytes(LEASE_FILE))["run_id"] == "run-two"
    taker.release()


def test_a_lease_whose_process_is_gone_is_taken_over_at_once(tmp_path):
    import subprocess
    import sys

    output = Storage(str(tmp_path / "out"))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lease = Lease(output, "killed-run")
    lease_record = json.loads(lease._encode())
    lease_record["pid"] = int(dead.stdout)
    output.write_atomic(LEASE_FILE, json.dumps(lease_record).encode())
    Lease(output, "rerun").acquire()  # no wait for the minute to pass
    assert json.loads(output.read_bytes(LEASE_FILE))["run_id"] == "rerun"


def test_only_one_of_many_simultaneous_starts_gets_the_lease(output):
    winners, errors = [], []

    def start(i: int) -> None:
        try:
            winners.append(Lease(output, f"run-{i}").acquire().run_id)
        except OutputBusyError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(winners) == 1 and len(errors) == 7
    assert json.loads(output.read_bytes(LEASE_FILE))["run_id"] == winners[0]


def test_run_refuses_at_once_while_another_job_holds_output(tmp_path, capsys):
    inputs, output = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    Lease(Storage(str(output)), "the-running-one").acquire()
    code = main(["run", str(inputs), str(output), "--saliency-model", "trivial-saliency"])
    err = capsys.readouterr().err
    assert code == 2 and "another job is writing here: run the-running-one" in err, err


# ---------------------------------------------------------------------------- status


def test_status_shows_reasons_apart_from_errors_and_time_by_stage(tmp_path, capsys):
    store = Storage(str(tmp_path / "out" / "manifest"))
    writer = ManifestWriter(store, "r1")
    timings = {f"seconds_{stage}": 0.1 for stage in STAGES} | {"seconds_saliency": 0.5, "seconds_depth": 0.2}
    writer.add(row("a.jpg", **timings))
    writer.add(row("b.jpg", "skipped", error_kind="background-already-soft", reason="left as it is: soft", **timings))
    writer.add(row("c.jpg", "failed", error_kind="corrupt-image", error="c.jpg: truncated", **timings))
    writer.flush()
    old = pa.table(  # a part from before the reason had its own column: the reason is in error
        {"relpath": ["d.jpg"], "status": ["skipped"], "error_kind": ["not-an-image"], "error": ["d.jpg: not an image"]}
    )
    pq.write_table(old, tmp_path / "out" / "manifest" / "part-old.parquet")

    assert main(["status", str(tmp_path / "out")]) == 1
    out = capsys.readouterr().out
    assert "4 inputs (4 attempts): failed 1, ok 2, skipped 1" not in out  # d.jpg is skipped too
    assert "4 inputs (4 attempts): failed 1, ok 1, skipped 2" in out
    assert "corrupt-image  e.g. c.jpg: truncated" in out
    assert (
        "background-already-soft  e.g. left as it is: soft" in out and "not-an-image  e.g. d.jpg: not an image" in out
    )
    report = manifest_report(store)
    assert report.timed_rows == 3
    shares = {stage: seconds / sum(report.stage_seconds.values()) for stage, seconds in report.stage_seconds.items()}
    assert shares["saliency"] == pytest.approx(0.5 / 1.2) and shares["depth"] == pytest.approx(0.2 / 1.2)
    assert "time by stage (1.20 s per photo, all workers): read 8%  decode 8%  saliency 42%  depth 17%" in out
    assert latest_rows(read_manifest(store)).num_rows == 4
    assert SCHEMA.field("reason").type == pa.string()


def test_status_merges_many_parts_only_while_no_job_runs(tmp_path, capsys):
    store = Storage(str(tmp_path / "out" / "manifest"))
    for part in range(70):
        writer = ManifestWriter(store, f"more{part:02d}")
        writer.add(row(f"more{part}.jpg"))
        writer.flush()
    running = Lease(Storage(str(tmp_path / "out")), "a-running-job").acquire()
    main(["status", str(tmp_path / "out")])
    assert len(list(store.list_files(frozenset({".parquet"})))) == 70  # a job holds OUTPUT: untouched
    running.release()
    main(["status", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert "merged 70 manifest parts into one" in out and "70 inputs (70 attempts): ok 70" in out
    assert len(list(store.list_files(frozenset({".parquet"})))) == 1
    assert not (tmp_path / "out" / "manifest" / "lease.json").exists()


def test_verbose_is_taken_before_or_after_the_subcommand():
    from pipeline.cli import parse_args

    assert parse_args(["run", "in", "out"]).verbose is False
    assert parse_args(["-v", "run", "in", "out"]).verbose is True
    assert parse_args(["run", "in", "out", "--verbose"]).verbose is True
