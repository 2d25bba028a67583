"""The local runner (job/local.py): the stages on threads in this process, without Ray."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pyarrow as pa
import pytest

from pipeline.errors import BadInputError
from pipeline.job import JobConfig, driver
from pipeline.job.local import LocalFeed, run_stages
from pipeline.manifest import read_manifest
from pipeline.models.base import GPU_DRIVERS
from pipeline.storage import Storage

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.jpg"))
WAIT = 20.0  # seconds a test waits for what must happen before it fails instead of hanging


def photos(*names: str) -> pa.Table:
    return pa.table({"relpath": list(names)})


def names(tables) -> list[str]:
    return [name for table in tables for name in table.column("relpath").to_pylist()]


def test_the_feed_gives_whole_groups_while_the_plan_is_made_and_the_rest_at_its_end():
    feed = LocalFeed()
    feed.add(photos("a", "b", "c"))
    assert names([feed.take(2, 0)]) == ["a", "b"]
    assert feed.take(2, 0) is None  # one photo: the group waits for the next
    feed.add(photos("d", "e", "f"))
    assert names([feed.take(2, 0), feed.take(2, 0)]) == ["c", "d", "e", "f"]
    feed.add(photos("g"))
    feed.end()
    assert names([feed.take(2, 0)]) == ["g"]
    assert feed.take(2, 0).num_rows == 0  # the end


def test_a_take_waiting_on_the_plan_returns_as_soon_as_the_group_is_there():
    feed = LocalFeed()
    threading.Timer(0.05, feed.add, [photos("a", "b")]).start()
    assert names([feed.take(2, WAIT)]) == ["a", "b"]


def stage(name: str, log: list[str], gate=None):
    """A stage that notes each group it starts (its first photo), optionally waiting on `gate`."""

    def run(table: pa.Table) -> pa.Table:
        first = table.column("relpath")[0].as_py()
        log.append(f"{name} {first}")
        if gate is not None:
            gate(first)
        return table

    return run


def all_planned(*groups: pa.Table) -> LocalFeed:
    feed = LocalFeed()
    for group in groups:
        feed.add(group)
    feed.end()
    return feed


def test_the_next_group_is_read_while_the_model_works_and_rows_come_in_the_plans_order():
    log: list[str] = []
    second_read = threading.Event()
    first_finish_may_end = threading.Event()

    def model_gate(first: str) -> None:
        if first == "a":  # a runner that reads only after the model would fail here, not hang
            assert second_read.wait(WAIT), "the second group was not read while the model worked on the first"

    def read_gate(first: str) -> None:
        if first == "c":
            second_read.set()

    def finish_gate(first: str) -> None:
        if first == "a":  # the first group finishes last: its rows still come first
            assert first_finish_may_end.wait(WAIT)

    read = stage("read", log, read_gate)
    model = stage("model", log, model_gate)
    finish = stage("finish", log, finish_gate)
    threading.Timer(0.2, first_finish_may_end.set).start()
    feed = all_planned(photos("a", "b"), photos("c", "d"), photos("e"))
    rows = list(run_stages(feed, 2, read, lambda: model, finish, finishers=2))
    assert names(rows) == ["a", "b", "c", "d", "e"]
    assert log.index("model a") < log.index("model c") < log.index("model e")  # one model, groups in order


def test_an_error_in_a_stage_reaches_the_caller_and_the_groups_after_it_do_not_run():
    log: list[str] = []

    def broken(first: str) -> None:
        if first == "c":
            raise RuntimeError("the model broke")

    feed = all_planned(*(photos(x) for x in "abcdefgh"))
    rows = run_stages(feed, 1, stage("read", log), lambda: stage("model", log, broken), stage("finish", log), 1)
    assert names([next(rows), next(rows)]) == ["a", "b"]
    with pytest.raises(RuntimeError, match="the model broke"):
        next(rows)
    assert "model h" not in log  # at most a few groups in flight: the rest never started


def test_a_model_that_fails_to_load_is_the_runs_error():
    def load():
        raise OSError("no weights here")

    feed = all_planned(photos("a"))
    with pytest.raises(OSError, match="no weights here"):
        list(run_stages(feed, 1, lambda t: t, load, lambda t: t, 1))


def test_a_run_stopped_early_ends_its_threads():
    log: list[str] = []
    feed = all_planned(*(photos(x) for x in "abcdefgh"))
    rows = run_stages(feed, 1, stage("read", log), lambda: stage("model", log), stage("finish", log), 1)
    assert names([next(rows)]) == ["a"]
    rows.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("dreamfocus-") and t.is_alive()]
    assert "finish h" not in log


@pytest.mark.parametrize(
    ("options", "runner"),
    [
        ({"device": "cpu"}, "local"),
        ({"runner": "ray", "device": "cpu"}, "ray"),
        ({"address": "127.0.0.1:6379"}, "ray"),
        ({"device": "cpu", "model_actors": 2}, "ray"),
        ({"device": "cuda"}, "ray"),
        ({"runner": "local", "device": "cuda"}, "local"),
    ],
)
def test_auto_runs_locally_a_job_on_this_machine_without_a_gpu(tmp_path, options, runner):
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()
    config = JobConfig(input=str(tmp_path), output=str(tmp_path / "out"), **options)
    assert driver.runner_for(config) == runner


def test_auto_joins_the_ray_named_in_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert driver.runner_for(JobConfig(input=str(tmp_path), output=str(tmp_path / "o"), device="cpu")) == "ray"


def test_the_local_runner_takes_no_cluster_address(tmp_path):
    with pytest.raises(BadInputError, match="takes no --address"):
        JobConfig(input=str(tmp_path), output=str(tmp_path / "o"), runner="local", address="auto")


@pytest.mark.skipif(any(map(os.path.exists, GPU_DRIVERS)), reason="a machine with a GPU driver runs on Ray")
def test_a_job_on_a_laptop_starts_neither_ray_nor_torch(tmp_path):
    """The fixed cost a small job waits on: no Ray to start, and no torch to import (seconds
    each) where the models need neither."""
    inputs, output = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    for photo in EXAMPLES[:2]:
        shutil.copy(photo, inputs / photo.name)
    code = (
        "import sys\n"
        "from pipeline.cli import main\n"
        "code = main(sys.argv[1:])\n"
        "print('imported:', sorted(m for m in ('ray', 'torch') if m in sys.modules))\n"
        "sys.exit(code)\n"
    )
    trivial = ("--saliency-model", "trivial-saliency", "--depth-model", "trivial-depth")
    done = subprocess.run(
        [sys.executable, "-c", code, "run", str(inputs), str(output), *trivial],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "imported: []" in done.stdout
    rows = read_manifest(Storage(f"{output}/manifest")).to_pylist()
    assert sorted((r["relpath"], r["status"]) for r in rows) == sorted((p.name, "ok") for p in EXAMPLES[:2])
