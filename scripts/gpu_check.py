"""The steps of scripts/gpu_check.sh that are Python: the photos, and the report of a run.

    python scripts/gpu_check.py photos FOLDER --count 300 --size 4000x3000
    python scripts/gpu_check.py report OUTPUT --log RUN_LOG [--gpu-samples FILE]

``report`` prints photos/s (the run's own processing time, from its summary line), the GPU's
busy share (nvidia-smi's samples while the photos were processed, "n/a" without them), and
the device milliseconds per photo by stage, read from the manifest rows of the latest run.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SUMMARY = re.compile(r"run (\S+): (\d+) to process: (.*) in ([\d.]+) s \(([\d.]+) s processing\)")


def make_photos(folder: Path, count: int, width: int, height: int) -> None:
    import os

    from bench_gpu import make_library  # the same synthetic photos as the benchmark's

    make_library(folder, count, width, height, workers=max(1, min(8, os.cpu_count() or 1)))
    print(f"photos: {count} JPEGs of {width}x{height} in {folder}")


def busy_share(samples: list[float]) -> str:
    """Mean utilisation from the first busy sample to the last: start-up and shut-down idle
    around the processing, which the run's photos/s leaves out as well."""
    busy = [k for k, s in enumerate(samples) if s > 0]
    if not busy:
        return "0 %" if samples else "n/a (no samples)"
    during = samples[busy[0] : busy[-1] + 1]
    return f"{statistics.mean(during):.0f} % ({len(during)} samples; {statistics.mean(samples):.0f} % with start-up)"


def report(output: Path, log: Path, gpu_samples: Path | None) -> int:
    from pipeline.manifest import MANIFEST_DIR, STAGES, read_manifest
    from pipeline.storage import Storage

    found = SUMMARY.search(log.read_text())
    if found is None:
        print(f"no run summary in {log}: the run did not finish (see the log)")
        return 1
    run_id, seconds, processing = found[1], float(found[4]), float(found[5])
    columns = ["run_id", "status", "render_path", "saliency_model", "depth_model"]
    rows = read_manifest(Storage(f"{output}/{MANIFEST_DIR}"), columns + [f"seconds_{s}" for s in STAGES])
    rows = rows.filter(rows["run_id"].to_numpy(zero_copy_only=False) == run_id).to_pydict()
    done = len(rows["status"])
    print(f"photos/s: {done / processing:.1f} ({done} photos in {processing:.1f} s processing; {seconds:.1f} s in all)")
    print(f"statuses: {dict(Counter(rows['status']))}; render paths: {dict(Counter(rows['render_path']))}")
    print(f"models: {sorted(set(rows['saliency_model']))} + {sorted(set(rows['depth_model']))}")
    if gpu_samples is None or not gpu_samples.is_file():
        print("GPU busy: n/a (no nvidia-smi)")
    else:
        samples = [float(line) for line in gpu_samples.read_text().split() if line.replace(".", "", 1).isdigit()]
        print(f"GPU busy: {busy_share(samples)}")
    on_device = [k for k, path in enumerate(rows["render_path"]) if str(path).startswith("torch:")]
    if on_device:
        print(f"ms per photo on the device path ({len(on_device)} photos), mean by stage:")
        for stage in STAGES:
            values = [rows[f"seconds_{stage}"][k] or 0.0 for k in on_device]
            print(f"  {stage:9s} {1000 * statistics.mean(values):8.1f}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="step", required=True)
    photos = sub.add_parser("photos")
    photos.add_argument("folder", type=Path)
    photos.add_argument("--count", type=int, default=300)
    photos.add_argument("--size", default="4000x3000")
    summary = sub.add_parser("report")
    summary.add_argument("output", type=Path)
    summary.add_argument("--log", type=Path, required=True)
    summary.add_argument("--gpu-samples", type=Path)
    args = parser.parse_args()
    if args.step == "photos":
        width, height = (int(v) for v in args.size.lower().split("x"))
        make_photos(args.folder, args.count, width, height)
        return 0
    return report(args.output, args.log, args.gpu_samples)


if __name__ == "__main__":
    sys.exit(main())
