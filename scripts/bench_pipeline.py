"""Scheduling overhead, resume speed and driver memory of the library job (a benchmark).

    python scripts/bench_pipeline.py [--photos 1000] [--done 10000] [--workdir DIR]

Uses the built-in trivial models ("trivial-saliency", "trivial-depth") so the figures are about
the job, not the models. Prints:
  - busy share: per-photo work (the job's stage functions timed alone, in this process) times the
    number of photos, over (processing time x CPUs) and over (wall time with start-up x CPUs);
  - the wall time of a rerun over --done already-processed photos, start-up included;
  - the driver's peak memory for --photos and for --done photos, and their ratio.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

CPUS = 2


def make_library(root: Path, count: int, size: tuple[int, int]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    for i in range(count):
        folder = root / f"{i // 500:03d}"
        folder.mkdir(exist_ok=True)
        path = folder / f"photo_{i:06d}.jpg"
        if not path.exists():
            Image.fromarray(np.roll(base, i, axis=1)).save(path, quality=85)
    return root


def summary_line(out: str) -> str:
    return next(line for line in out.splitlines() if line.startswith("run "))


def run_cli(inputs: Path, output: Path) -> tuple[float, int, str]:
    """(wall seconds, peak RSS of the driver in MiB, output) of one `dreamfocus run`."""
    command = [sys.executable, "-m", "pipeline.cli", "run", str(inputs), str(output),
               "--saliency-model", "trivial-saliency", "--depth-model", "trivial-depth",
               "--cpu-workers", str(CPUS), "--model-batch-size", "16"]
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = [0]

    def watch() -> None:
        while proc.poll() is None:
            try:
                for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        peak[0] = max(peak[0], int(line.split()[1]) // 1024)
            except (FileNotFoundError, ProcessLookupError):
                break
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    out, _ = proc.communicate()
    wall = time.perf_counter() - started
    watcher.join()
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({proc.returncode}):\n{out}")
    return wall, peak[0], out


def seconds_per_photo(inputs: Path, scratch: Path, count: int = 40) -> float:
    """The per-photo work alone: the job's own stage functions in this process, one photo at a
    time, no Ray, no other process competing for the core."""
    from pipeline.job import JobConfig, ModelStage, finish_photos, read_photos
    from pipeline.models import DEPTH, SALIENCY

    config = JobConfig(input=str(inputs), output=str(scratch), saliency_model="trivial-saliency",
                       depth_model="trivial-depth")
    saliency = ModelStage(SALIENCY, config.saliency_model, None, "cpu", 1)
    depth = ModelStage(DEPTH, config.depth_model, None, "cpu", 1)
    photos = sorted(p.relative_to(inputs).as_posix() for p in inputs.rglob("*.jpg"))[:count]
    started = time.perf_counter()
    for relpath in photos:
        batch = {"relpath": np.array([relpath], dtype=object),
                 "output_relpath": np.array([relpath], dtype=object)}
        batch = read_photos(batch, str(inputs), {}, config.max_megapixels)
        batch = finish_photos(depth.predict(saliency.predict(batch)), config)
        assert batch["status"][0] == "ok", batch["error"][0]
    return (time.perf_counter() - started) / len(photos)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=1000)
    parser.add_argument("--done", type=int, default=10000)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="dreamfocus-bench-"))
    print(f"work folder: {work}")

    small = make_library(work / "in-small", args.photos, (1024, 768))
    for old_output in ("out-small", "out-big"):  # outputs of an earlier bench run would all be skipped
        shutil.rmtree(work / old_output, ignore_errors=True)
    wall, peak_small, out = run_cli(small, work / "out-small")
    line = summary_line(out)
    processing = float(re.search(r"\(([\d.]+) s processing\)", line).group(1))
    per_photo = seconds_per_photo(small, work / "scratch")
    work_seconds = per_photo * args.photos
    print(line)
    print(f"{args.photos} photos (1024x768): per-photo work {per_photo * 1000:.0f} ms each when run alone, "
          f"{work_seconds:.1f} CPU-s in all")
    print(f"busy share: {work_seconds / (processing * CPUS):.0%} of {CPUS} CPUs over the {processing:.1f} s "
          f"of processing, {work_seconds / (wall * CPUS):.0%} over the {wall:.1f} s wall time with start-up")

    big = make_library(work / "in-big", args.done, (256, 192))
    _, peak_big, out = run_cli(big, work / "out-big")
    print(summary_line(out))
    rerun, _, out = run_cli(big, work / "out-big")
    print(summary_line(out))
    print(f"rerun over {args.done} done photos: {rerun:.1f} s including start-up")
    print(f"driver peak memory: {peak_small} MiB for {args.photos} photos, {peak_big} MiB for {args.done}, "
          f"ratio {peak_big / max(1, peak_small):.2f}")


if __name__ == "__main__":
    main()
