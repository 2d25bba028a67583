"""A library as cameras and phones leave it, with real Ray: RAWs, RAW + JPEG pairs, JPEGs, and
files that are no photos (videos, sidecars, notes), hidden ones among them."""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import ray
from PIL import Image
from raw_files import CAMERA, dng_bytes, scene, srgb, stored

from pipeline.cli import main
from pipeline.job import JobConfig, run_job
from pipeline.job.plan import OtherFile, PlanItem, check_locations, make_plan
from pipeline.manifest import latest_rows, read_manifest
from pipeline.storage import Storage

TRIVIAL = dict(saliency_model="trivial-saliency", depth_model="trivial-depth")
SCENE = scene(120, 180)
OTHERS = {".mov": 1, ".xmp": 1, ".aae": 1, ".txt": 1, "(none)": 1}


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def jpeg(colour: tuple[int, int, int]) -> bytes:
    rng = np.random.default_rng(1)
    pixels = np.clip(np.array(colour) + rng.integers(-20, 20, (120, 180, 1)), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=92)
    return out.getvalue()


def camera_library(root: Path) -> Path:
    files = {
        "cam/IMG_0001.DNG": dng_bytes(SCENE, preview=srgb(SCENE)),
        "cam/IMG_0001.JPG": jpeg((90, 120, 150)),  # its pair, as the camera wrote it
        "cam/IMG_0002.dng": dng_bytes(stored(SCENE, 6), 14, "BGGR", orientation=6),  # alone, shot upright
        "cam/IMG_0002.xmp": b"<x:xmpmeta/>",  # a sidecar
        "cam/broken.dng": dng_bytes(SCENE)[:5000],
        "cam/CLIP0003.MOV": b"\x00\x00\x00\x14ftypqt  ",
        "phone/a.jpg": jpeg((150, 120, 90)),
        "phone/a.AAE": b"<plist/>",
        "notes.txt": b"shopping list",
        "README": b"no extension",
        ".thumbs/IMG_0001.jpg": jpeg((0, 0, 0)),  # hidden folder: not even counted
        "cam/.DS_Store": b"\x00\x00\x00\x01Bud1",
    }
    for relpath, data in files.items():
        (root / relpath).parent.mkdir(parents=True, exist_ok=True)
        (root / relpath).write_bytes(data)
    return root


def latest(output: Path) -> dict[str, dict]:
    rows = latest_rows(read_manifest(Storage(f"{output}/manifest"))).to_pylist()
    return {row["relpath"]: row for row in rows}


def exif_make(path: Path) -> str | None:
    with Image.open(path) as im:
        return im.getexif().get(0x010F)


def test_camera_library_pairs_raws_and_counts_the_rest(tmp_path, capsys):
    inputs, output = camera_library(tmp_path / "in"), tmp_path / "out"
    config = JobConfig(input=str(inputs), output=str(output), **TRIVIAL)

    summary = run_job(config)
    assert summary.counts == {"ok": 3, "skipped": 1, "failed": 1}
    assert summary.others == OTHERS
    assert any("not photos, not processed: " in line and "1 .mov" in line for line in summary.lines())
    rows = latest(output)
    assert {r: (row["status"], row["error_kind"]) for r, row in rows.items()} == {
        "cam/IMG_0001.DNG": ("skipped", "raw-jpeg-pair"),
        "cam/IMG_0001.JPG": ("ok", ""),
        "cam/IMG_0002.dng": ("ok", ""),
        "cam/broken.dng": ("failed", "corrupt-image"),
        "phone/a.jpg": ("ok", ""),
    }
    assert "IMG_0001.JPG is processed" in rows["cam/IMG_0001.DNG"]["reason"]
    assert "--prefer-raw" in rows["cam/IMG_0001.DNG"]["reason"]
    images = output / "images"
    assert sorted(p.relative_to(images).as_posix() for p in images.rglob("*") if p.is_file()) == [
        "cam/IMG_0001.jpg",
        "cam/IMG_0002.jpg",
        "phone/a.jpg",
    ]
    with Image.open(images / "cam/IMG_0002.jpg") as out:
        assert out.size == (180, 120)  # stored on its side, made upright by the RAW's orientation
        assert out.getexif()[0x0110] == CAMERA[1]
    assert (rows["cam/IMG_0002.dng"]["width"], rows["cam/IMG_0002.dng"]["height"]) == (180, 120)
    assert exif_make(images / "cam/IMG_0001.jpg") is None  # made from the JPEG

    # status lists what is no photo, as the run found it.
    capsys.readouterr()
    assert main(["status", str(output), "--other-files"]) == 0
    listed = capsys.readouterr().out
    assert listed.splitlines()[0].startswith("5 files that are no photos, not processed: ")
    for relpath in ("cam/CLIP0003.MOV", "cam/IMG_0002.xmp", "phone/a.AAE", "notes.txt", "README"):
        assert f"  {relpath}\n" in listed
    assert ".thumbs" not in listed and ".DS_Store" not in listed

    # A rerun has nothing to do: the pair's RAW stays settled, no new rows.
    again = run_job(config)
    assert again.counts == {} and again.planned == 0
    assert again.skipped == {
        "done": 3,
        "skipped before (the other half of a RAW + JPEG pair)": 1,
        "failed before (use --retry-failed)": 1,
    }
    assert again.others == OTHERS

    # --prefer-raw: the RAW of the pair is processed now, under the same output name, and the JPEG is left alone.
    raw_first = run_job(JobConfig(input=str(inputs), output=str(output), prefer_raw=True, **TRIVIAL))
    assert raw_first.counts == {"ok": 1, "skipped": 1}
    rows = latest(output)
    assert (rows["cam/IMG_0001.DNG"]["status"], rows["cam/IMG_0001.JPG"]["status"]) == ("ok", "skipped")
    assert "IMG_0001.DNG is processed" in rows["cam/IMG_0001.JPG"]["reason"]
    assert exif_make(images / "cam/IMG_0001.jpg") == CAMERA[0]  # made from the RAW this time
    assert rows["cam/IMG_0001.DNG"]["attempt"] == 2

    # And back: the dry run says why the JPEG is processed again.
    capsys.readouterr()
    run_job(JobConfig(input=str(inputs), output=str(output), dry_run=True, **TRIVIAL))
    assert "would process cam/IMG_0001.JPG -> images/cam/IMG_0001.jpg (no longer left alone for its pair)" in (
        capsys.readouterr().out
    )


def test_dry_run_counts_other_files_and_names_pair_halves(tmp_path, capsys):
    inputs, output = camera_library(tmp_path / "in"), tmp_path / "out"
    summary = run_job(JobConfig(input=str(inputs), output=str(output), dry_run=True, **TRIVIAL))
    printed = capsys.readouterr().out
    assert summary.others == OTHERS and summary.counts == {}
    assert "would record cam/IMG_0001.DNG as raw-jpeg-pair" in printed
    assert "would process cam/IMG_0002.dng -> images/cam/IMG_0002.jpg (new)" in printed
    assert not output.exists()  # a dry run writes nothing, not even the listing


def plan(inputs: Path, output: Path, **options) -> list:
    config = JobConfig(input=str(inputs), output=str(output), **TRIVIAL, **options)
    return list(make_plan(config, *check_locations(config)))


@pytest.mark.parametrize("prefer_raw", [False, True])
def test_pairs_are_same_name_same_folder_any_letter_case(tmp_path, prefer_raw):
    inputs = tmp_path / "in"
    for relpath in ("a/IMG_1.CR3", "a/img_1.jpg", "a/IMG_2.NEF", "b/IMG_2.JPG", "a/IMG_3.dng", "a/IMG_3.heic"):
        (inputs / relpath).parent.mkdir(parents=True, exist_ok=True)
        (inputs / relpath).write_bytes(b"x")
    items = [i for i in plan(inputs, tmp_path / "out", prefer_raw=prefer_raw) if isinstance(i, PlanItem)]
    left_alone = sorted(i.source.relpath for i in items if i.error is not None)
    processed = {i.source.relpath: i.output_relpath for i in items if i.error is None}
    if prefer_raw:
        assert left_alone == ["a/IMG_3.heic", "a/img_1.jpg"]
    else:
        assert left_alone == ["a/IMG_1.CR3", "a/IMG_3.dng"]
    assert "a/IMG_2.NEF" in processed and "b/IMG_2.JPG" in processed  # different folders: no pair
    outputs = [o.lower() for o in processed.values()]
    assert len(outputs) == len(set(outputs)) == 4  # never two inputs to one output


def test_other_files_are_every_non_photo_but_hidden(tmp_path):
    inputs = camera_library(tmp_path / "in")
    others = [i.source.relpath for i in plan(inputs, tmp_path / "out") if isinstance(i, OtherFile)]
    assert Counter(o.rsplit(".", 1)[-1].lower() if "." in o else "" for o in others) == Counter(
        {"mov": 1, "xmp": 1, "aae": 1, "txt": 1, "": 1}
    )
