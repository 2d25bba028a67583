"""The library job with the torch render backend, real Ray, on the CPU: the model actor decodes,
renders and encodes; the pictures are the numpy backend's; the manifest says which path each
photo took, and what the device path cannot take still gets done (or fails) as before."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import ray
from PIL import Image

from pipeline.job import JobConfig, run_job
from pipeline.manifest import read_manifest
from pipeline.storage import Storage

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.jpg"))
TRIVIAL = dict(saliency_model="trivial-saliency", depth_model="trivial-depth", device="cpu")


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def library(root: Path) -> Path:
    """The examples, plus a PNG and a CMYK JPEG (the CPU path's) and a file cut short (fails)."""
    root.mkdir(parents=True)
    for photo in EXAMPLES:
        shutil.copy(photo, root / photo.name)
    Image.open(EXAMPLES[0]).save(root / "as_png.png")
    Image.open(EXAMPLES[1]).convert("CMYK").save(root / "cmyk.jpg", quality=95)
    (root / "cut.jpg").write_bytes(EXAMPLES[2].read_bytes()[:2000])
    return root


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["default", "seed"])
def test_torch_backend_gives_the_numpy_backends_library(tmp_path, preset):
    assert_torch_gives_the_numpy_library(tmp_path, preset)


@pytest.mark.slow
def test_overlapped_device_batches_give_the_numpy_backends_library(tmp_path):
    """About a photo a device batch (the largest example is 1.1 MB decoded), four in flight: the
    actor's calls go through the overlap (a batch decoded while the one before is in the models),
    and the manifest rows are still the numpy backend's."""
    assert_torch_gives_the_numpy_library(tmp_path, "default", device_batch_bytes=1_200_000)


def assert_torch_gives_the_numpy_library(tmp_path: Path, preset: str, **torch_options) -> None:
    from pipeline.params import effect_params

    inputs = library(tmp_path / "in")
    rows = {}
    for backend in ("numpy", "torch"):
        config = JobConfig(
            input=str(inputs),
            output=str(tmp_path / backend),
            render_backend=backend,
            params=effect_params(preset),
            **TRIVIAL,
            **(torch_options if backend == "torch" else {}),
        )
        summary = run_job(config)
        assert summary.counts == {"ok": len(EXAMPLES) + 2, "failed": 1}, summary.counts
        table = read_manifest(Storage(str(tmp_path / backend / "manifest")))
        rows[backend] = {r["relpath"]: r for r in table.to_pylist()}

    cpu_only = {"as_png.png", "cmyk.jpg"}
    for relpath, row in rows["torch"].items():
        reference = rows["numpy"][relpath]
        assert row["status"] == reference["status"] and row["error_kind"] == reference["error_kind"]
        assert reference["render_path"] == ("numpy" if row["status"] == "ok" else None)
        if row["status"] != "ok":
            assert relpath == "cut.jpg" and row["render_path"] is None
            continue
        assert row["render_path"] == ("numpy" if relpath in cpu_only else "torch:cpu"), (relpath, row)
        assert (row["width"], row["height"]) == (reference["width"], reference["height"])
        assert row["interp_start"] == pytest.approx(reference["interp_start"], abs=1e-5)
        assert (
            row["seconds_saliency"] > 0
            and row["seconds_depth"] > 0
            and row["seconds_effect"] > 0
            and row["seconds_write"] > 0
        )
        ours = np.asarray(Image.open(io.BytesIO(Path(row["output_uri"]).read_bytes())).convert("RGB"))
        theirs = np.asarray(Image.open(reference["output_uri"]).convert("RGB"))
        assert psnr(ours, theirs) >= 45, relpath
