"""The library job end to end with real Ray: local disk, S3 (moto on loopback), resume, kill -9."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import ray
from PIL import Image

from pipeline.errors import BadInputError
from pipeline.job import JobConfig, driver, run_job
from pipeline.job.lease import LEASE_FILE
from pipeline.job.plan import OtherFile, PlanItem, check_locations, make_plan
from pipeline.manifest import COLUMNS, latest_rows, read_manifest
from pipeline.params import effect_params
from pipeline.storage import Storage

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.jpg"))
TRIVIAL = dict(saliency_model="trivial-saliency", depth_model="trivial-depth")
RUNNERS = ("ray", "local")  # the job's main paths on both runners


@pytest.fixture(scope="module", autouse=True)
def local_ray(s3_server):  # the S3 endpoint first: Ray workers inherit the environment
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def library(root: Path) -> Path:
    """The example photos, one of them nested under a folder with a space and a non-ASCII name."""
    (root / "trip" / "día 2").mkdir(parents=True)
    for i, photo in enumerate(EXAMPLES):
        target = root / photo.name if i % 2 else root / "trip" / "día 2" / photo.name.upper()
        shutil.copy(photo, target)
    (root / "notes.txt").write_text("not a photo")
    (root / ".hidden.jpg").write_bytes(EXAMPLES[0].read_bytes())
    return root


def manifest(output) -> pa.Table:
    return read_manifest(Storage(f"{output}/manifest"))


@pytest.mark.parametrize("runner", RUNNERS)
def test_local_end_to_end_then_resume(runner, tmp_path, monkeypatch):
    inputs, output = library(tmp_path / "in"), tmp_path / "out"
    config = JobConfig(runner=runner, input=str(inputs), output=str(output), **TRIVIAL)
    summary = run_job(config)
    assert summary.counts == {"ok": len(EXAMPLES)}

    rows = manifest(output)
    assert rows.num_rows == len(EXAMPLES) and rows.column_names == list(COLUMNS)
    for row in rows.to_pylist():
        assert row["status"] == "ok" and row["error"] == "" and row["attempt"] == 1
        assert row["saliency_model"] == "trivial-saliency" and row["depth_model"] == "trivial-depth"
        assert row["job_hash"] and row["preset"] == "default"
        result = Image.open(row["output_uri"])
        source = Image.open(inputs / row["relpath"])
        assert result.size == source.size == (row["width"], row["height"])
        assert row["output_uri"].startswith(str(output / "images"))
        assert row["output_uri"].endswith(".jpg") and row["seconds_effect"] > 0
    assert {r["relpath"] for r in rows.to_pylist()} >= {"trip/día 2/" + EXAMPLES[0].name.upper()}

    # The same command again: nothing to do, and not one image byte read.
    reads = []
    original = Storage.read_bytes
    monkeypatch.setattr(Storage, "read_bytes", lambda self, rel: reads.append(rel) or original(self, rel))
    again = run_job(config)
    assert again.planned == 0 and again.skipped == {"done": len(EXAMPLES)}
    assert not [r for r in reads if not r.endswith(".parquet") and r != LEASE_FILE]
    assert manifest(output).num_rows == len(EXAMPLES)


def test_changed_photo_or_parameters_reprocess_exactly_what_changed(tmp_path):
    inputs, output = library(tmp_path / "in"), tmp_path / "out"
    config = JobConfig(input=str(inputs), output=str(output), **TRIVIAL)
    run_job(config)

    changed = inputs / EXAMPLES[1].name
    Image.open(changed).transpose(Image.FLIP_LEFT_RIGHT).save(changed, quality=90)
    os.utime(changed, (time.time() + 5, time.time() + 5))
    summary = run_job(config)
    assert summary.planned == 1 and summary.counts == {"ok": 1}
    latest = latest_rows(manifest(output)).to_pylist()
    assert {r["relpath"]: r["attempt"] for r in latest}[EXAMPLES[1].name] == 2

    new_look = JobConfig(
        input=str(inputs), output=str(output), params=effect_params("default", kernel_size=5), **TRIVIAL
    )
    assert run_job(new_look).counts == {"ok": len(EXAMPLES)}
    assert run_job(new_look).planned == 0

    # An output deleted by hand is made again; --dry-run only reports.
    (output / "images" / (EXAMPLES[3].stem + ".jpg")).unlink()
    dry = JobConfig(input=str(inputs), output=str(output), params=new_look.params, dry_run=True, **TRIVIAL)
    assert run_job(dry).planned == 1
    assert run_job(new_look).counts == {"ok": 1}


@pytest.mark.parametrize("runner", RUNNERS)
def test_bad_photo_fails_alone_and_is_retried_on_request(runner, tmp_path):
    inputs, output = library(tmp_path / "in"), tmp_path / "out"
    (inputs / "broken.jpg").write_bytes(EXAMPLES[0].read_bytes()[:3000])
    (inputs / "text.png").write_text("hello")
    config = JobConfig(runner=runner, input=str(inputs), output=str(output), **TRIVIAL)
    summary = run_job(config)
    assert summary.counts == {"ok": len(EXAMPLES), "failed": 1, "skipped": 1}
    rows = {r["relpath"]: r for r in manifest(output).to_pylist()}
    assert rows["broken.jpg"]["error_kind"] == "corrupt-image" and "broken.jpg" in rows["broken.jpg"]["error"]
    assert rows["text.png"]["status"] == "skipped" and rows["text.png"]["error_kind"] == "not-an-image"
    assert "not an image" in rows["text.png"]["reason"] and rows["text.png"]["error"] == ""
    assert not (output / "images" / "broken.jpg").exists()

    assert run_job(config).planned == 0
    retry = JobConfig(runner=runner, input=str(inputs), output=str(output), retry_failed=True, **TRIVIAL)
    assert run_job(retry).counts == {"failed": 1}


def test_a_run_shows_its_progress_not_rays_and_commits_in_time(tmp_path, capfd):
    inputs, output = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    for i in range(40):  # three groups of 16 or fewer
        shutil.copy(EXAMPLES[i % len(EXAMPLES)], inputs / f"p{i:02d}.jpg")
    # commits every 10 ms of waiting rows, never by count: each group arrives as its own part(s)
    config = JobConfig(input=str(inputs), output=str(output), commit_every=10_000, commit_seconds=0.01, **TRIVIAL)
    summary = run_job(config)
    assert summary.counts == {"ok": 40}
    parts = list((output / "manifest").glob("part-*.parquet"))
    assert len(parts) >= 3, parts  # without time commits: one part at the end
    assert manifest(output).num_rows == 40
    assert not (output / "manifest" / "lease.json").exists()  # released
    err = capfd.readouterr().err
    assert "40/40 photos · 0 failed · 0 left alone" in err and "done" in err.splitlines()[-1], err
    for noise in ("Running Dataset", "core_worker.cc", "MapBatches(ModelStage)", "Progress bars"):
        assert noise not in err, err


def test_output_inside_input_is_refused(tmp_path):
    inputs = library(tmp_path / "in")
    for output in (inputs, inputs / "out"):
        with pytest.raises(BadInputError, match="must not be INPUT or inside it"):
            run_job(JobConfig(input=str(inputs), output=str(output), **TRIVIAL))


@pytest.mark.parametrize("runner", RUNNERS)
def test_s3_end_to_end_and_resume(runner, s3_bucket, tmp_path):
    import boto3

    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    bucket = s3_bucket.removeprefix("s3://")
    for photo in EXAMPLES:
        s3.put_object(Bucket=bucket, Key=f"photos/2024/{photo.name}", Body=photo.read_bytes())
    config = JobConfig(runner=runner, input=f"{s3_bucket}/photos", output=f"{s3_bucket}/edited", **TRIVIAL)
    assert run_job(config).counts == {"ok": len(EXAMPLES)}
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="edited/")["Contents"]}
    assert {f"edited/images/2024/{p.stem}.jpg" for p in EXAMPLES} <= keys
    assert any(k.startswith("edited/manifest/part-") for k in keys)
    rows = manifest(f"{s3_bucket}/edited").to_pylist()
    assert all(r["source_fingerprint"].startswith("etag:") for r in rows)
    assert run_job(config).planned == 0


def run_cli(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", *args],
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


N_KILLED = 30


@pytest.mark.parametrize("runner", RUNNERS)
def test_killed_run_is_completed_by_rerunning(runner, tmp_path):
    inputs, output = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (750, 1000, 3), dtype=np.uint8)
    for i in range(N_KILLED):  # large enough that the run is still going when the first part lands
        Image.fromarray(np.roll(base, i, axis=0)).save(inputs / f"p{i:02d}.jpg")
    command = [
        "run",
        str(inputs),
        str(output),
        "--saliency-model",
        "trivial-saliency",
        "--depth-model",
        "trivial-depth",
        "--commit-every",
        "3",
        "--cpu-workers",
        "2",
        "--runner",
        runner,
    ]
    first = run_cli(*command)
    deadline = time.time() + 180
    while time.time() < deadline and not list((output / "manifest").glob("part-*.parquet")):
        assert first.poll() is None, first.stdout.read()
        time.sleep(0.02)
    os.killpg(first.pid, signal.SIGKILL)  # the driver and the Ray processes it started
    first.wait()
    committed = manifest(output).num_rows
    assert 0 < committed < N_KILLED

    second = run_cli(*command)
    out, _ = second.communicate(timeout=300)
    assert second.returncode == 0, out
    rows = manifest(output).to_pylist()
    ok = [r["relpath"] for r in rows if r["status"] == "ok"]
    assert sorted(ok) == sorted(set(ok)) and len(ok) == N_KILLED  # each photo exactly once
    for i in range(N_KILLED):
        with Image.open(output / "images" / f"p{i:02d}.jpg") as result:
            result.load()  # complete files only under final names
    assert not [p for p in (output / "images").iterdir() if not p.name.endswith(".jpg") and not p.name.startswith(".")]


def test_inputs_differing_only_in_extension_get_their_own_outputs(tmp_path):
    inputs, output = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    photo = Image.open(EXAMPLES[0])
    photo.save(inputs / "shot.jpg")
    photo.transpose(Image.FLIP_LEFT_RIGHT).save(inputs / "shot.png")
    config = JobConfig(input=str(inputs), output=str(output), **TRIVIAL)
    assert run_job(config).counts == {"ok": 2}
    outputs = {r["relpath"]: r["output_uri"] for r in manifest(output).to_pylist()}
    assert outputs == {
        "shot.jpg": str(output / "images" / "shot.jpg"),
        "shot.png": str(output / "images" / "shot.png.jpg"),
    }
    assert run_job(config).planned == 0  # the same names again on a rerun


def test_a_failed_write_is_retried_by_a_plain_rerun(tmp_path):
    inputs, output = library(tmp_path / "in"), tmp_path / "out"
    config = JobConfig(input=str(inputs), output=str(output), **TRIVIAL)
    blocked = output / "images" / (EXAMPLES[1].stem + ".jpg")
    blocked.mkdir(parents=True)  # a folder where the output file goes: that write fails
    summary = run_job(config)
    assert summary.counts == {"ok": len(EXAMPLES) - 1, "failed": 1}
    row = next(r for r in manifest(output).to_pylist() if r["status"] == "failed")
    assert row["error_kind"] == "write-error" and EXAMPLES[1].stem in row["error"]
    blocked.rmdir()
    again = run_job(config)
    assert again.planned == 1 and again.counts == {"ok": 1}


@pytest.mark.parametrize("runner", RUNNERS)
def test_linked_photos_and_folders_are_processed_once_and_a_dangling_link_is_a_failed_row(runner, tmp_path, caplog):
    inputs, output, elsewhere = tmp_path / "in", tmp_path / "out", tmp_path / "elsewhere"
    (inputs / "archive").mkdir(parents=True)
    (inputs / "favourites").mkdir()
    elsewhere.mkdir()
    shutil.copy(EXAMPLES[0], inputs / "archive" / "a.jpg")
    shutil.copy(EXAMPLES[1], elsewhere / "b.jpg")
    (inputs / "favourites" / "best.jpg").symlink_to("../archive/a.jpg")
    (inputs / "favourites" / "gone.jpg").symlink_to("../archive/deleted.jpg")
    (inputs / "favourites" / "clip.mov").symlink_to("../archive/clip.mov")  # no photo: named, not a row
    (inputs / "phone").symlink_to(elsewhere)  # a folder outside INPUT, reached by two links
    (inputs / "phone-again").symlink_to(elsewhere)
    (elsewhere / "loop").symlink_to(inputs)
    config = JobConfig(runner=runner, input=str(inputs), output=str(output), **TRIVIAL)
    with caplog.at_level("WARNING"):
        summary = run_job(config)
    assert summary.counts == {"ok": 3, "failed": 1} and summary.others == {".mov": 1}
    rows = {r["relpath"]: r for r in manifest(output).to_pylist()}
    assert set(rows) == {"archive/a.jpg", "favourites/best.jpg", "favourites/gone.jpg", "phone/b.jpg"}
    assert rows["favourites/best.jpg"]["output_uri"] == str(output / "images" / "favourites" / "best.jpg")
    assert Image.open(output / "images" / "favourites" / "best.jpg").size == Image.open(EXAMPLES[0]).size
    gone = rows["favourites/gone.jpg"]
    assert (gone["status"], gone["error_kind"]) == ("failed", "broken-link")
    assert gone["error"] == "favourites/gone.jpg: dangling symbolic link -> ../archive/deleted.jpg"
    links = sorted(r.getMessage() for r in caplog.records if "symbolic link" in r.getMessage())
    assert links == sorted(
        [
            f"{inputs}/favourites/clip.mov: dangling symbolic link -> ../archive/clip.mov",
            f"symbolic link loop: {inputs}/phone/loop -> {inputs} leads back into a folder it is in; not followed",
        ]
    )

    (inputs / "results").symlink_to(output)  # a link into OUTPUT: not followed, or each run takes the last one's in
    with caplog.at_level("WARNING"):
        assert run_job(config).planned == 0  # nothing twice, the dangling link included
    assert f"{inputs}/results leads into {output}, which is left out of the listing; not followed" in caplog.messages
    shutil.copy(EXAMPLES[2], inputs / "archive" / "deleted.jpg")  # the link leads to a photo again
    again = run_job(config)
    assert again.counts == {"ok": 2}  # the link, and the photo it leads to


def test_a_photo_left_alone_names_the_unchanged_file_it_wrote(tmp_path):
    inputs, output = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    shutil.copy(EXAMPLES[0], inputs / "meadow.jpg")
    no_subject = effect_params("default", min_subject_area=0.99)  # the models' subject is far smaller
    summary = run_job(JobConfig(input=str(inputs), output=str(output), params=no_subject, **TRIVIAL))
    assert summary.counts == {"skipped": 1}
    (row,) = manifest(output).to_pylist()
    assert (row["status"], row["error_kind"]) == ("skipped", "no-clear-subject")
    assert row["output_uri"] == str(output / "images" / "meadow.jpg")
    assert Image.open(row["output_uri"]).size == Image.open(EXAMPLES[0]).size


# ------------------------------------------------------------------------------ the plan streamed

RUN_TIMEOUT = 300  # seconds a run may take on a slow, shared machine before the test fails
FOLDERS = 20  # more than the 16 folders the plan lists ahead: the first ones are planned before the last is listed


def folders_of_photos(root: Path, folders: int = FOLDERS) -> list[str]:
    """Two small photos in each folder f00, f01, ...: the listing goes on a folder at a time, and
    the first three folders hold more than a model batch on CPUs (4)."""
    names = []
    for f in range(folders):
        (root / f"f{f:02d}").mkdir(parents=True)
        for name in ("p.jpg", "q.jpg"):
            noise = np.random.default_rng([f, len(names)]).integers(0, 255, (48, 64, 3), dtype=np.uint8)
            Image.fromarray(noise).save(root / f"f{f:02d}" / name)
            names.append(f"f{f:02d}/{name}")
    return names


def listing_held_at(monkeypatch, inputs: Path, folder: str, then=None) -> threading.Event:
    """The listing of INPUT/folder waits until the run has counted a row (the event), then does
    `then` (say, fails); a run that counts no row while the listing goes on fails the test."""
    counted = threading.Event()
    listed, tallied = Storage._list_folder, driver.RowTally.add

    def _list_folder(self, path):
        if path.rstrip("/") == f"{inputs}/{folder}":
            assert counted.wait(RUN_TIMEOUT), "no row was counted while the listing went on"
            if then is not None:
                then()
        return listed(self, path)

    def add(self, rows):
        tallied(self, rows)
        counted.set()

    monkeypatch.setattr(Storage, "_list_folder", _list_folder)
    monkeypatch.setattr(driver.RowTally, "add", add)
    return counted


@pytest.mark.parametrize("runner", RUNNERS)
def test_the_first_photos_are_done_while_the_listing_goes_on(runner, tmp_path, monkeypatch, capfd):
    inputs, output = tmp_path / "in", tmp_path / "out"
    names = folders_of_photos(inputs)
    listing_held_at(monkeypatch, inputs, f"f{FOLDERS - 1:02d}")
    # commits by time: the first group's rows reach the manifest while the last folder waits
    config = JobConfig(runner=runner, input=str(inputs), output=str(output), commit_seconds=0.01, **TRIVIAL)
    summary = run_job(config)
    assert summary.counts == {"ok": len(names)} and summary.planned == len(names)
    assert sorted(r["relpath"] for r in manifest(output).to_pylist()) == names
    assert len(list((output / "manifest").glob("part-*.parquet"))) >= 2  # one before the listing went on
    err = capfd.readouterr().err
    assert f"{len(names)}/{len(names)} photos · 0 failed" in err and "done" in err.splitlines()[-1], err


def plan_of(config: JobConfig) -> tuple[list[str], Counter, Counter]:
    """What the plan says of each input: the items to record (in order), the skipped, the others."""
    items, skipped, others = [], Counter(), Counter()
    for item in make_plan(config, *check_locations(config)):
        if isinstance(item, PlanItem):
            items.append(item.source.relpath)
        elif isinstance(item, OtherFile):
            others[item.extension] += 1
        else:
            skipped[item] += 1
    return items, skipped, others


@pytest.mark.parametrize("runner", RUNNERS)
def test_the_plan_streamed_records_what_the_plan_says(runner, tmp_path, monkeypatch):
    inputs, output = tmp_path / "in", tmp_path / "out"
    names = folders_of_photos(inputs)
    (inputs / "f03" / "p.dng").write_bytes(b"raw")  # the other half of f03/p.jpg: left alone
    (inputs / "f05" / "gone.jpg").symlink_to("nowhere.jpg")  # a failed row the listing decides
    (inputs / "f07" / "broken.jpg").write_bytes(EXAMPLES[0].read_bytes()[:3000])  # fails when read
    (inputs / "f09" / "notes.txt").write_text("not a photo")
    monkeypatch.setattr(driver, "PLAN_CHUNK", 2)  # many chunks, many pulls, rows the listing decides in between
    config = JobConfig(runner=runner, input=str(inputs), output=str(output), **TRIVIAL)
    items, skipped, others = plan_of(config)
    summary = run_job(config)
    rows = {r["relpath"]: r for r in manifest(output).to_pylist()}
    assert sorted(rows) == sorted(items) and len(items) == len(names) + 3
    assert summary.planned == len(items) and summary.skipped == skipped == {} and summary.others == others
    assert summary.counts == {"ok": len(names), "failed": 2, "skipped": 1}
    assert (rows["f03/p.dng"]["status"], rows["f03/p.dng"]["error_kind"]) == ("skipped", "raw-jpeg-pair")
    assert (rows["f05/gone.jpg"]["status"], rows["f05/gone.jpg"]["error_kind"]) == ("failed", "broken-link")
    assert (rows["f07/broken.jpg"]["status"], rows["f07/broken.jpg"]["error_kind"]) == ("failed", "corrupt-image")
    assert all(rows[name]["status"] == "ok" for name in names)

    # A rerun with new photos and --limit: the first of the plan's items are done, the rest over the limit.
    for f in (2, 11, 17):
        shutil.copy(inputs / "f00" / "p.jpg", inputs / f"f{f:02d}" / "new.jpg")
    limited = JobConfig(runner=runner, input=str(inputs), output=str(output), limit=2, **TRIVIAL)
    items, skipped, others = plan_of(limited)
    assert items == ["f02/new.jpg", "f11/new.jpg", "f17/new.jpg"]
    summary = run_job(limited)
    assert summary.planned == 2 and summary.counts == {"ok": 2}
    assert Counter(summary.skipped) == skipped + Counter({"over --limit": 1}) and summary.others == others
    assert skipped == {
        "done": len(names),
        "failed before (use --retry-failed)": 2,
        "skipped before (the other half of a RAW + JPEG pair)": 1,
    }
    new_rows = [r["relpath"] for r in manifest(output).to_pylist() if r["run_id"] == summary.run_id]
    assert sorted(new_rows) == ["f02/new.jpg", "f11/new.jpg"]


@pytest.mark.parametrize("runner", RUNNERS)
def test_a_listing_that_fails_mid_plan_stops_the_run_and_loses_nothing_done(runner, tmp_path, monkeypatch):
    inputs, output = tmp_path / "in", tmp_path / "out"
    names = folders_of_photos(inputs)

    def fail() -> None:
        raise PermissionError(13, "Permission denied", f"{inputs}/f{FOLDERS - 1:02d}")

    listing_held_at(monkeypatch, inputs, f"f{FOLDERS - 1:02d}", then=fail)
    config = JobConfig(runner=runner, input=str(inputs), output=str(output), **TRIVIAL)
    with pytest.raises(PermissionError, match="Permission denied"):
        run_job(config)
    committed = manifest(output).to_pylist()
    assert committed and all(r["status"] == "ok" and Path(r["output_uri"]).is_file() for r in committed)
    assert len(committed) < len(names)  # the last folder was never listed
    assert not (output / LEASE_FILE).exists()  # released

    monkeypatch.undo()
    again = run_job(config)
    assert again.planned == len(names) - len(committed) and again.counts == {"ok": again.planned}
    assert Counter(r["relpath"] for r in manifest(output).to_pylist()) == Counter(names)  # each photo once
