"""scripts/bench_gpu.py runs to its end on the CPU (small networks, a few small photos, no Ray), both
render backends' layouts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_gpu_runs_on_the_cpu(tmp_path):
    command = [
        sys.executable,
        str(ROOT / "scripts" / "bench_gpu.py"),
        "--device",
        "cpu",
        "--tiny-models",
        "--photos",
        "3",
        "--size",
        "320x240",
        "--batch-sizes",
        "1",
        "2",
        "--model-batch-size",
        "1",
        "--workers",
        "1",
        "--skip-job",
        "--workdir",
        str(tmp_path),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "device: CPU (no GPU)" in out
    assert "both in turn (the fused actor)" in out
    assert out.count("ok 3)") == 2  # every photo went through both layouts to the end
    assert "GPU busy n/a" in out
    assert "End to end with the GPU render path" in out and "render paths: torch:cpu 3" in out
    assert "overlap: 3 photos in 3 device batches, one call" in out and "models + effect" in out
    assert "subject decisions:" in out and "batch 1 at working size 320x240" in out
    for run in ("out-end-to-end", "out-device"):  # the numpy backend's layout, the GPU render path
        images = sorted(p.name for p in (tmp_path / run / "images").iterdir())
        assert images == ["photo_00000.jpg", "photo_00001.jpg", "photo_00002.jpg"]
    # the photos are kept for reruns
    assert len(list((tmp_path / "library-320x240-v1").glob("*.jpg"))) == 3
