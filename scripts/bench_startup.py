"""What a user waits on before the first photo is done: `dreamfocus run` on a few photos, timed
from the command's start to the first manifest row's finish, with the time the photos' own
stages took beside it (what is left is start-up: Python, Ray, the model actor, the weights).

    python scripts/bench_startup.py [--photos 5] [--size 800] [--rounds 1] [--others 0] [-- RUN OPTIONS ...]

The photos are those of scripts/bench_vs_rembg.py (variants of examples/). `--others N` adds N
files that are no photos (sidecars), 1,000 a folder in folders listed after the photos': a
listing that goes on past the first photos, as a large library's does. Options after `--` go
to `dreamfocus run` as they are (say `-- --runtime onnxruntime`).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_vs_rembg import make_photos  # noqa: E402

from pipeline.manifest import STAGES, read_manifest  # noqa: E402
from pipeline.storage import Storage  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=5)
    parser.add_argument("--size", type=int, default=800, help="long side of the photos, px")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--others", type=int, default=0, help="files that are no photos, listed after the photos")
    parser.add_argument("run_options", nargs="*", help="after --: options of `dreamfocus run`")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dreamfocus-startup-"))
    photos = make_photos(work / "photos", args.photos, args.size)
    for i in range(args.others):
        folder = photos / f"sidecars-{i // 1000:04d}"
        folder.mkdir(exist_ok=True)
        (folder / f"{i:07d}.xmp").write_bytes(b"")
    output = work / "out"
    command = [sys.executable, "-m", "pipeline.cli", "run", str(photos), str(output), *args.run_options]
    print(" ".join(command))
    for round_ in range(1, args.rounds + 1):
        shutil.rmtree(output, ignore_errors=True)
        started_at = datetime.now(UTC)
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(f"exit {done.returncode}\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
        rows = read_manifest(Storage(str(output / "manifest"))).to_pylist()
        first = min(r["finished_at"] for r in rows) - started_at
        stages = {s: sum(r[f"seconds_{s}"] or 0.0 for r in rows) for s in STAGES}
        work_seconds = sum(stages.values())
        print(
            f"round {round_}: {len(rows)} photos, first done after {first.total_seconds():.1f} s, all after "
            f"{wall:.1f} s; the photos' stages {work_seconds:.1f} s in all "
            f"({', '.join(f'{s} {v:.1f}' for s, v in stages.items() if v >= 0.05)}); "
            f"runtimes {sorted({r['saliency_runtime'] for r in rows})}"
        )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
