"""Scheduling overhead, streaming, resume speed and memory of the library job (a benchmark).

    python scripts/bench_pipeline.py [--photos 1000] [--done 2000 20000] [--workdir DIR]

Uses the built-in trivial models ("trivial-saliency", "trivial-depth") so the figures are about
the job, not the models. Prints:
  - busy share: per-photo work (the job's stage functions timed alone, in this process) times the
    number of photos, over (processing time x CPUs) and over (wall time with start-up x CPUs);
  - streaming: when the first output was written, as a share of the run;
  - for each --done size: the object store's peak use during the run (backpressure keeps it
    bounded whatever the library's size), the driver's peak memory, and the wall time of a rerun
    over the photos then done, start-up included.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

CPUS = 2
RAY = str(Path(sys.executable).parent / "ray")


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


@dataclass
class Run:
    wall: float  # seconds, start-up included
    driver_peak_mib: int
    object_store_peak_mib: float
    first_output: float  # seconds from the start to the first output file
    out: str


def run_cli(inputs: Path, output: Path) -> Run:
    """One `dreamfocus run` against a Ray head of CPUS cores started for it, watched from here."""
    temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    port = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    subprocess.run(
        [
            RAY,
            "start",
            "--head",
            f"--port={port}",
            f"--num-cpus={CPUS}",
            "--num-gpus=0",
            "--node-ip-address=127.0.0.1",
            f"--temp-dir={temp}",
            "--include-dashboard=false",
        ],
        check=True,
        capture_output=True,
        env=env,
    )
    address = f"127.0.0.1:{port}"
    try:
        command = [
            sys.executable,
            "-m",
            "pipeline.cli",
            "run",
            str(inputs),
            str(output),
            "--address",
            address,
            "--saliency-model",
            "trivial-saliency",
            "--depth-model",
            "trivial-depth",
        ]
        started = time.perf_counter()
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        peak, store_peak, first = [0], [0.0], [float("nan")]
        images = output / "images"

        def watch() -> None:
            from ray._private.internal_api import memory_summary

            while proc.poll() is None:
                try:
                    for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                        if line.startswith("VmHWM:"):
                            peak[0] = max(peak[0], int(line.split()[1]) // 1024)
                except (FileNotFoundError, ProcessLookupError):
                    break
                if first[0] != first[0] and images.is_dir() and next(images.rglob("*.jpg"), None):
                    first[0] = time.perf_counter() - started
                found = re.search(r"Plasma memory usage ([\d.]+) MiB", memory_summary(address, stats_only=True))
                if found:
                    store_peak[0] = max(store_peak[0], float(found.group(1)))
                time.sleep(0.2)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        out, _ = proc.communicate()
        wall = time.perf_counter() - started
        watcher.join()
        if proc.returncode != 0:
            raise SystemExit(f"run failed ({proc.returncode}):\n{out}")
        return Run(wall, peak[0], store_peak[0], first[0], out)
    finally:
        subprocess.run([RAY, "stop", "--force"], capture_output=True, env=env)
        shutil.rmtree(temp, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def seconds_per_photo(inputs: Path, scratch: Path, count: int = 40) -> float:
    """The per-photo work alone: the job's own stage functions in this process, one photo at a
    time, no Ray, no other process competing for the core."""
    from pipeline.job import JobConfig
    from pipeline.job.stages import ModelStage, read_photos, render_and_write

    config = JobConfig(
        input=str(inputs), output=str(scratch), saliency_model="trivial-saliency", depth_model="trivial-depth"
    )
    models = ModelStage(config.saliency_model, config.depth_model, None, None, "cpu", 1)
    photos = sorted(p.relative_to(inputs).as_posix() for p in inputs.rglob("*.jpg"))[:count]
    started = time.perf_counter()
    for relpath in photos:
        batch = {"relpath": np.array([relpath], dtype=object), "output_relpath": np.array([relpath], dtype=object)}
        batch = read_photos(batch, str(inputs), {}, config.max_megapixels)
        batch = render_and_write(models.predict(batch), config)
        assert batch["status"][0] == "ok", batch["error"][0]
    return (time.perf_counter() - started) / len(photos)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=1000)
    parser.add_argument("--done", type=int, nargs="*", default=[2000, 20000])
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="dreamfocus-bench-"))
    print(f"work folder: {work}")

    small = make_library(work / f"in-{args.photos}-1024x768", args.photos, (1024, 768))
    shutil.rmtree(work / "out-small", ignore_errors=True)  # outputs of an earlier run would all be skipped
    run = run_cli(small, work / "out-small")
    line = summary_line(run.out)
    processing = float(re.search(r"\(([\d.]+) s processing\)", line).group(1))
    per_photo = seconds_per_photo(small, work / "scratch")
    work_seconds = per_photo * args.photos
    print(line)
    print(
        f"{args.photos} photos (1024x768): per-photo work {per_photo * 1000:.0f} ms each when run alone, "
        f"{work_seconds:.1f} CPU-s in all"
    )
    print(
        f"busy share: {work_seconds / (processing * CPUS):.0%} of {CPUS} CPUs over the {processing:.1f} s "
        f"of processing, {work_seconds / (run.wall * CPUS):.0%} over the {run.wall:.1f} s wall time with start-up"
    )
    print(f"first output after {run.first_output:.1f} s of {run.wall:.1f} s ({run.first_output / run.wall:.0%})")

    for count in args.done:
        inputs, output = make_library(work / f"in-{count}", count, (256, 192)), work / f"out-{count}"
        shutil.rmtree(output, ignore_errors=True)
        run = run_cli(inputs, output)
        print(summary_line(run.out))
        rerun = run_cli(inputs, output)
        print(
            f"{count} photos (256x192): object store peak {run.object_store_peak_mib:.0f} MiB, "
            f"driver peak {run.driver_peak_mib} MiB, first output after {run.first_output:.1f} s of "
            f"{run.wall:.1f} s; rerun over them {rerun.wall:.1f} s including start-up"
        )


if __name__ == "__main__":
    main()
