"""`dreamfocus review`: the page's data from old and new manifest parts, thumbnails made once,
local and S3 (moto on loopback). The page in a real browser is tests/test_review_browser.py."""

from __future__ import annotations

import io
import json
import re
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import unquote

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from raw_files import dng_bytes, scene, srgb

from pipeline.cli import main
from pipeline.errors import BadInputError
from pipeline.manifest import COLUMNS, SCHEMA, STAGES, ManifestWriter, image_id, read_manifest
from pipeline.review import THUMB_SIZE, build_review, note_of, thumbnail_jpeg
from pipeline.storage import Storage

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
OK_PHOTOS = {  # relpath -> (colour, (width, height))
    "a/ok-0.jpg": ((200, 40, 40), (800, 600)),
    "a/ok-1.jpg": ((40, 200, 40), (300, 400)),
    "ok-2.png": ((40, 40, 200), (500, 300)),
    "100% odd #1?.jpg": ((200, 200, 40), (320, 240)),  # names a link must escape
}
LEFT_ALONE = "left alone.jpg"
BROKEN = "broken.jpg"
SOFT_REASON = "left as it is: the background has little fine detail"
NO_SUBJECT, NO_SUBJECT_REASON = "meadow.jpg", "left as it is: no subject to lead the eye to"
PAIRED, PAIRED_REASON = "IMG_2.jpg", "IMG_2.jpg: left alone, its pair IMG_2.dng is processed (--prefer-raw)"
STAGE_SECONDS = {stage: 0.1 * (i + 1) for i, stage in enumerate(STAGES)}


def jpeg(colour: tuple[int, int, int], size: tuple[int, int]) -> bytes:
    pixels = np.zeros((size[1], size[0], 3), np.uint8)
    pixels[:] = colour
    pixels[: size[1] // 2, : size[0] // 2] = 255 - np.array(colour)  # a corner of its own, so not flat
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=95)
    return out.getvalue()


def png(values: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(values).save(out, format="PNG")
    return out.getvalue()


def write_finished_job(inputs: Storage, output: Storage) -> list[dict]:
    """A library as a job leaves it: inputs, outputs, one photo's intermediates, and a manifest of
    an older part (left-alone reason in `error`, seconds_models) and a part of today's schema.
    Returns the latest row of each input as written."""
    images = Storage(f"{output.uri}/images", output.storage_options)
    manifest = Storage(f"{output.uri}/manifest", output.storage_options)
    for relpath, (colour, size) in OK_PHOTOS.items():
        inputs.write_atomic(relpath, jpeg(colour, size))
        images.write_atomic(relpath.rsplit(".", 1)[0] + ".jpg", jpeg(tuple(c // 2 for c in colour), size))
    inputs.write_atomic(LEFT_ALONE, jpeg((90, 90, 90), (400, 300)))
    images.write_atomic(LEFT_ALONE, jpeg((90, 90, 90), (400, 300)))
    inputs.write_atomic(NO_SUBJECT, jpeg((30, 120, 60), (400, 300)))
    images.write_atomic(NO_SUBJECT, jpeg((30, 120, 60), (400, 300)))
    inputs.write_atomic(PAIRED, jpeg((150, 60, 150), (300, 200)))
    images.write_atomic(PAIRED, jpeg((0, 0, 0), (300, 200)))  # the output of its pair, IMG_2.dng
    inputs.write_atomic(BROKEN, b"\xff\xd8\xff not really a jpeg")
    images.write_atomic(BROKEN, jpeg((0, 0, 0), (300, 200)))  # from before the file was broken
    intermediates = Storage(f"{output.uri}/intermediates", output.storage_options)
    ramp = np.linspace(0, 65535, 800 * 600).reshape(600, 800).astype(np.uint16)
    for name, values in {
        "saliency": np.full((600, 800), 200, np.uint8),
        "subject": np.full((600, 800), 255, np.uint8),
        "depth16": ramp,
        "alpha": np.full((600, 800), 128, np.uint8),
        "background": np.full((600, 800, 3), 70, np.uint8),
    }.items():
        intermediates.write_atomic(f"a/ok-0.{name}.png", png(values))

    def row(relpath: str, run: int, status: str, **extra) -> dict:
        info = inputs.stat(relpath)
        started = T0 + timedelta(minutes=10 * run, seconds=len(relpath))
        return {
            "image_id": image_id(relpath),
            "relpath": relpath,
            "source_uri": inputs.uri_of(relpath),
            "source_size": info.size,
            "source_fingerprint": info.fingerprint,
            "status": status,
            "attempt": 1,
            "run_id": f"run-{run}",
            "started_at": started,
            "finished_at": started + timedelta(seconds=2),
            **extra,
        }

    # An older part: the columns of its day, written as they were.
    old = [
        row("a/ok-0.jpg", 0, "failed", error_kind="model-error", error="boom", seconds_read=0.5),
        row(LEFT_ALONE, 0, "skipped", error_kind="background-already-soft", error=SOFT_REASON, seconds_read=0.25),
    ]
    old[1].update(seconds_models=2.0, width=400, height=300)
    old_columns = sorted({k for r in old for k in r} | {"seconds_models"})
    schema = pa.schema([SCHEMA.field(c) if c in COLUMNS else pa.field(c, pa.float32()) for c in old_columns])
    table = pa.Table.from_pylist([{c: r.get(c) for c in old_columns} for r in old], schema=schema)
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    manifest.write_atomic("part-run-0-00000.parquet", buffer.getvalue())

    # Today's part: every stage timed (0.1 s, 0.2 s, ...), the reason in a column of its own.
    stages = {f"seconds_{stage}": STAGE_SECONDS[stage] for stage in STAGES}
    new = []
    for relpath, (_, size) in OK_PHOTOS.items():
        stem = relpath.rsplit(".", 1)[0]
        new.append(
            row(relpath, 1, "ok", output_uri=images.uri_of(stem + ".jpg"), width=size[0], height=size[1], **stages)
        )
    new[0]["attempt"] = 2
    new.append(row(BROKEN, 1, "failed", error_kind="corrupt-image", error="broken.jpg: truncated", **stages))
    new.append(row(NO_SUBJECT, 1, "skipped", error_kind="no-subject", error="", reason=NO_SUBJECT_REASON, **stages))
    new.append(row(PAIRED, 1, "skipped", error_kind="raw-jpeg-pair", error="", reason=PAIRED_REASON))
    writer = ManifestWriter(manifest, "run-1")
    for r in new:
        writer.add(r)
    writer.flush()
    return [old[1], *new]


@pytest.fixture
def local_job(tmp_path) -> tuple[Storage, Storage, list[dict]]:
    inputs, output = Storage(str(tmp_path / "in")), Storage(str(tmp_path / "out"))
    return inputs, output, write_finished_job(inputs, output)


def rows_of(review: Storage) -> list[dict]:
    script = review.read_bytes("rows.js").decode()
    assert script.startswith("window.REVIEW_ROWS = ") and script.endswith(";\n")
    return json.loads(script[len("window.REVIEW_ROWS = ") : -2])


def test_page_rows_say_what_happened_to_each_photo(local_job):
    inputs, output, latest = local_job
    summary = build_review(output.uri)
    review = Storage(f"{output.uri}/review")
    rows = {r["path"]: r for r in rows_of(review)}

    assert sorted(rows) == sorted(r["relpath"] for r in latest)
    assert summary.rows == len(latest) and summary.page == review.uri_of("index.html")
    for relpath in OK_PHOTOS:
        row = rows[relpath]
        assert row["status"] == "ok" and row["note"] == "" and row["size"] == list(OK_PHOTOS[relpath][1])
        assert row["before"] and row["after"] and row["before"] != row["after"]
    assert rows["a/ok-0.jpg"]["output"] == "../images/a/ok-0.jpg"
    assert rows["100% odd #1?.jpg"]["output"] == "../images/100%25%20odd%20%231%3F.jpg"
    shown = ["saliency", "subject", "depth16", "alpha", "background"]  # the model's map first, then the subject's
    assert [i[0] for i in rows["a/ok-0.jpg"]["intermediates"]] == shown
    assert rows["a/ok-1.jpg"]["intermediates"] == []
    # Left alone in an older part: the reason was in `error`; its output has no output_uri there.
    soft = rows[LEFT_ALONE]
    assert (soft["status"], soft["kind"], soft["note"]) == ("skipped", "background-already-soft", SOFT_REASON)
    assert soft["output"] == "../images/left%20alone.jpg" and soft["after"] and soft["before"]
    broken = rows[BROKEN]
    assert (broken["status"], broken["note"]) == ("failed", "broken.jpg: truncated")
    assert broken["before"] is None and broken["after"] is None  # not decodable: not even tried
    meadow = rows[NO_SUBJECT]  # left alone in today's part: the reason in its own column
    assert (meadow["status"], meadow["kind"], meadow["note"]) == ("skipped", "no-subject", NO_SUBJECT_REASON)
    assert meadow["before"] and meadow["after"]  # written unchanged: found by name
    paired = rows[PAIRED]  # its output's name holds its pair's output
    assert (paired["note"], paired["output"], paired["after"]) == (PAIRED_REASON, None, None) and paired["before"]
    assert summary.thumbs_failed == 0

    # Every file the page names is there, relative to the page.
    folder = Path(review.uri)
    for row in rows.values():
        names = [row["before"], row["after"], row["output"]] + [n for i in row["intermediates"] for n in i[1:]]
        for name in filter(None, names):
            assert (folder / unquote(name)).resolve().is_file(), name


def test_note_reads_the_reason_column_and_falls_back_to_error():
    assert note_of("skipped", error=None, reason="no subject") == "no subject"
    assert note_of("skipped", error="old reason", reason=None) == "old reason"
    assert note_of("failed", error="decode failed", reason=None) == "decode failed"
    assert note_of("ok", error="", reason=None) == ""


def test_header_counts_throughput_and_stage_times(local_job):
    _, output, _ = local_job
    build_review(output.uri)
    text = (Path(output.uri) / "review" / "index.html").read_text()

    assert "<h1>8 photos</h1>" in text
    assert '<span class="count ok">4 ok</span>' in text and "3 left alone</span>" in text and "1 failed</span>" in text
    spans: dict[str, tuple] = {}
    for r in read_manifest(Storage(f"{output.uri}/manifest")).to_pylist():
        first, last, n = spans.get(r["run_id"], (r["started_at"], r["finished_at"], 0))
        spans[r["run_id"]] = (min(first, r["started_at"]), max(last, r["finished_at"]), n + 1)
    seconds = sum((last - first).total_seconds() for first, last, _ in spans.values())
    assert f"{9 / seconds:.2f} photos/s · 2 runs, 9 attempts" in text
    # Mean seconds per photo of the rows with per-stage times (the older part has none per model).
    per_photo = sum(STAGE_SECONDS.values())
    assert text.count('class="stage"') == len(STAGES)
    for stage, value in STAGE_SECONDS.items():
        assert f'<span class="name">{stage}</span>' in text
        assert f"{value * 1000:.0f} ms · {value / per_photo:.0%}</span>" in text
    assert f"{per_photo:.2f} s</span>" in text


def test_rerun_makes_only_missing_thumbnails_and_drops_stale_ones(local_job):
    inputs, output, _ = local_job
    first = build_review(output.uri)
    assert (first.thumbs_made, first.thumbs_kept) == (18, 0)  # 7 before, 6 after, 5 intermediates
    page = Path(output.uri) / "review" / "index.html"
    rows_js = re.search(r'<script src="(rows\.js\?v=\w+)">', page.read_text())
    assert rows_js

    again = build_review(output.uri)
    assert (again.thumbs_made, again.thumbs_kept, again.stale_removed) == (0, 18, 0)

    thumbs = Path(output.uri) / "review" / "thumbs"
    victim = sorted(thumbs.glob("*.after.jpg"))[0]
    victim.unlink()
    assert build_review(output.uri).thumbs_made == 1 and victim.is_file()

    # A photo processed again (new fingerprint and output): its two thumbnails are made anew.
    relpath = "a/ok-1.jpg"
    inputs.write_atomic(relpath, jpeg((10, 10, 250), (300, 400)))
    manifest = Storage(f"{output.uri}/manifest")
    row = next(r for r in read_manifest(manifest).to_pylist() if r["relpath"] == relpath)
    row.update(attempt=2, source_fingerprint=inputs.stat(relpath).fingerprint, finished_at=T0 + timedelta(hours=1))
    writer = ManifestWriter(manifest, "run-2")
    writer.add(row)
    writer.flush()
    changed = build_review(output.uri)
    assert (changed.thumbs_made, changed.stale_removed) == (2, 2)
    assert rows_js.group(1) not in page.read_text()  # a new name for the new rows: no stale cache
    assert len(list(thumbs.glob("*.jpg"))) == 18


def test_thumbnail_is_upright_small_and_eight_bit():
    wide = thumbnail_jpeg(jpeg((200, 40, 40), (1600, 400)), "wide.jpg")
    with Image.open(io.BytesIO(wide)) as im:
        assert im.format == "JPEG" and im.size == (THUMB_SIZE, THUMB_SIZE // 4)
        assert np.abs(np.asarray(im)[-5:, -5:].mean(axis=(0, 1)) - (200, 40, 40)).max() < 8
    depth = np.full((100, 200), 65535, np.uint16)
    depth[:, :100] = 0
    with Image.open(io.BytesIO(thumbnail_jpeg(png(depth), "d.depth16.png"))) as im:
        values = np.asarray(im.convert("L"))
        assert im.size == (200, 100) and values[:, :90].max() < 8 and values[:, 110:].min() > 247


@pytest.mark.parametrize("preview", [True, False], ids=["embedded preview", "half-size image"])
def test_thumbnail_of_a_camera_raw(preview):
    linear = scene()  # 360x240: a red patch left of centre, a green one right of it
    data = dng_bytes(linear, preview=srgb(linear) if preview else None)
    with Image.open(io.BytesIO(thumbnail_jpeg(data, "IMG_0001.DNG"))) as im:
        pixels = np.asarray(im.convert("RGB")).astype(int)
    height, width = pixels.shape[:2]
    assert (width, height) == ((360, 240) if preview else (180, 120))
    red, green = pixels[height // 2, width * 3 // 8], pixels[height // 2, width * 5 // 8]
    assert red[0] > 150 > 100 > max(red[1:]) and green[1] > 150 > 100 > max(green[0], green[2])


def test_input_moved_since_the_run(local_job, tmp_path):
    inputs, output, _ = local_job
    moved = tmp_path / "moved"
    Path(inputs.uri).rename(moved)
    assert build_review(output.uri).thumbs_failed == 7  # every "before" is gone from where it was
    review = Storage(f"{output.uri}/review")
    assert all(r["before"] is None for r in rows_of(review))
    assert sum(r["after"] is not None for r in rows_of(review)) == 6  # the outputs are where they were
    summary = build_review(output.uri, inputs_uri=str(moved))
    assert (summary.thumbs_made, summary.thumbs_failed) == (7, 0)
    assert sum(r["before"] is not None for r in rows_of(review)) == 7


def test_output_copied_elsewhere(local_job, tmp_path):
    """OUTPUT copied (to a bucket's folder, say): the manifest's output_uri names the old place."""
    _, output, _ = local_job
    copy = tmp_path / "copy"
    shutil.copytree(output.uri, copy)
    summary = build_review(str(copy))
    assert (summary.thumbs_made, summary.thumbs_failed) == (18, 0)
    rows = {r["path"]: r for r in rows_of(Storage(f"{copy}/review"))}
    assert rows["a/ok-0.jpg"]["output"] == "../images/a/ok-0.jpg" and rows["a/ok-0.jpg"]["after"]
    assert rows[BROKEN]["after"] is None


def test_cli(local_job, capsys):
    _, output, latest = local_job
    assert main(["review", output.uri, "--workers", "2"]) == 0
    out, err = capsys.readouterr()
    # What is to be done, then what was done: two lines, in order, on one stream (none glued to the other).
    to_make, made = out.splitlines()
    assert to_make == f"{len(latest)} photos, 18 thumbnails to make (0 kept)" and err == ""
    assert made.startswith(f"review: {output.uri}/review/index.html ({len(latest)} photos; thumbnails: 18 made")


def test_cli_on_an_output_without_manifest_says_so(tmp_path, capsys):
    assert main(["review", str(tmp_path)]) == 2
    assert "no manifest rows" in capsys.readouterr().err
    with pytest.raises(BadInputError, match="dreamfocus run INPUT"):
        build_review(str(tmp_path))


def test_s3(s3_bucket):
    inputs, output = Storage(f"{s3_bucket}/photos"), Storage(f"{s3_bucket}/edited")
    latest = write_finished_job(inputs, output)
    summary = build_review(output.uri, workers=4)
    assert (summary.thumbs_made, summary.thumbs_failed) == (18, 0)
    review = Storage(f"{output.uri}/review")
    assert review.read_bytes("index.html").startswith(b"<!doctype html>")
    rows = rows_of(review)
    assert len(rows) == len(latest)
    for row in rows:
        for name in filter(None, [row["before"], row["after"]]):
            with Image.open(io.BytesIO(review.read_bytes(name))) as im:
                assert max(im.size) <= THUMB_SIZE
    assert build_review(output.uri, workers=4).thumbs_made == 0
    # Served as what they are, so the page shows from the bucket's static website hosting.
    s3, bucket = boto3.client("s3"), s3_bucket.removeprefix("s3://")
    for key, kind in (("index.html", "text/html"), ("rows.js", "text/javascript"), (rows[0]["after"], "image/jpeg")):
        assert s3.head_object(Bucket=bucket, Key=f"edited/review/{key}")["ContentType"] == kind
