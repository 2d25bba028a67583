"""Scheduling overhead, resume speed and driver memory of the library job (a benchmark).

    python scripts/bench_pipeline.py [--photos 1000] [--done 10000] [--workdir DIR]

Uses the built-in trivial models ("trivial-saliency", "trivial-depth") so the figures are about
the job, not the models. Prints:
  - busy share: per-photo work (sum of the manifest's per-stage seconds) / (wall x CPUs);
  - the wall time of a rerun over --done already-processed photos, start-up included;
  - the driver's peak memory for --photos and for --done photos, and their ratio.
"""

from __future__ import annotations

import argparse
import os
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


def busy_seconds(output: Path) -> float:
    from pipeline.manifest import STAGES, read_manifest
    from pipeline.storage import Storage

    table = read_manifest(Storage(f"{output}/manifest"))
    return float(sum(np.nansum(table.column(f"seconds_{s}").to_numpy(zero_copy_only=False)) for s in STAGES))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=1000)
    parser.add_argument("--done", type=int, default=10000)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="dreamfocus-bench-"))
    print(f"work folder: {work}")

    small = make_library(work / "in-small", args.photos, (1024, 768))
    wall, peak_small, out = run_cli(small, work / "out-small")
    busy = busy_seconds(work / "out-small")
    print(out.strip().splitlines()[0])
    print(f"{args.photos} photos (1024x768): wall {wall:.1f} s with start-up, per-photo work {busy:.1f} CPU-s, "
          f"busy share {busy / (wall * CPUS):.0%} of {CPUS} CPUs")

    big = make_library(work / "in-big", args.done, (256, 192))
    _, peak_big, out = run_cli(big, work / "out-big")
    print(out.strip().splitlines()[0])
    rerun, _, out = run_cli(big, work / "out-big")
    print(out.strip().splitlines()[0])
    print(f"rerun over {args.done} done photos: {rerun:.1f} s including start-up")
    print(f"driver peak memory: {peak_small} MiB for {args.photos} photos, {peak_big} MiB for {args.done}, "
          f"ratio {peak_big / max(1, peak_small):.2f}")


if __name__ == "__main__":
    main()
