"""A library job against rembg's folder mode on the same photos and the same IS-Net graph (a
benchmark of the standing target: on a CPU machine, `dreamfocus run` of 36 photos takes at most
half as long as `rembg p`, one process, one photo at a time, although it also runs depth and the
effect; of 5 photos, no longer).

    python scripts/bench_vs_rembg.py [--rembg PATH] [--photos 36] [--size 800] [--rounds 1]
                                     [--runtimes auto onnxruntime ...] [--runners local ray]

rembg is not a dependency of dreamfocus: install it into a separate environment, e.g.
    python -m venv .rembg && .rembg/bin/pip install "rembg[cli]" onnxruntime
and pass --rembg .rembg/bin/rembg. It runs the very graph dreamfocus runs on the CPU (IS-Net's
weights widened to fp32, see pipeline/models/isnet.py) through its `dis_custom` session, whose
normalisation is IS-Net's. The photos are variants (crops, flips) of examples/, long side --size.
Prints the wall time of each, start-up included, and their ratio (the machine may be noisy:
rounds alternate the two). With --runtimes and --runners, dreamfocus runs once per IS-Net
runtime and runner each round (`dreamfocus run --runtime NAME --runner local|ray`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2

ROOT = Path(__file__).resolve().parent.parent


def make_photos(folder: Path, count: int, size: int) -> Path:
    """count different photos made from the examples: crops at several offsets, some mirrored."""
    folder.mkdir(parents=True, exist_ok=True)
    examples = sorted((ROOT / "examples").glob("*.jpg"))
    for i in range(count):
        target = folder / f"photo_{i:03d}.jpg"
        if target.exists():
            continue
        image = cv2.imread(str(examples[i % len(examples)]))
        h, w = image.shape[:2]
        k = i // len(examples)
        crop = 1 - 0.05 * (k % 4)  # 100%, 95%, 90%, 85% of the frame
        ch, cw = int(h * crop), int(w * crop)
        y0, x0 = (h - ch) * (k % 3) // 2, (w - cw) * ((k + 1) % 3) // 2
        image = image[y0 : y0 + ch, x0 : x0 + cw]
        if k % 2:
            image = image[:, ::-1]
        scale = size / max(image.shape[:2])
        image = cv2.resize(
            image,
            (round(image.shape[1] * scale), round(image.shape[0] * scale)),
            interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC,
        )
        cv2.imwrite(str(target), image, [cv2.IMWRITE_JPEG_QUALITY, 90])
    return folder


def cpu_graph() -> Path:
    """The IS-Net graph dreamfocus runs with onnxruntime on the CPU."""
    from pipeline.models.isnet import ISNet, derived_model
    from pipeline.models.weights import resolve_weights, weights_digest

    weights = Path(resolve_weights(ISNet, None))
    return derived_model(weights, weights_digest(weights), "fp32")


def timed(command: list[str], outputs: Path, count: int, env: dict | None = None) -> float:
    """Wall seconds of a command that must write count images under outputs."""
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - started
    written = sum(1 for p in outputs.rglob("*") if p.suffix in (".png", ".jpg")) if outputs.is_dir() else 0
    if done.returncode != 0 or written != count:
        raise SystemExit(
            f"{' '.join(command)}: exit {done.returncode}, {written} of {count} images written\n"
            f"{done.stdout[-2000:]}{done.stderr[-2000:]}"
        )
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rembg", default=shutil.which("rembg"), help="the rembg command")
    parser.add_argument("--photos", type=int, default=36)
    parser.add_argument("--size", type=int, default=800, help="long side of the photos, px")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--runtimes", nargs="+", default=["auto"], help="IS-Net runtimes for dreamfocus run")
    parser.add_argument("--runners", nargs="+", default=["auto"], help="dreamfocus run --runner: auto, local, ray")
    args = parser.parse_args()
    if not args.rembg:
        raise SystemExit("rembg not found: install it into its own environment and pass --rembg (see --help)")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="dreamfocus-vs-rembg-"))
    photos = make_photos(work / "photos", args.photos, args.size)
    graph = cpu_graph()
    print(f"{args.photos} photos, long side {args.size} px, in {photos}; IS-Net graph {graph.name}")

    rembg_command = [
        args.rembg,
        "p",
        "-m",
        "dis_custom",
        "-x",
        json.dumps({"model_path": str(graph)}),
        str(photos),
        str(work / "out-rembg"),
    ]
    dreamfocus_command = [sys.executable, "-m", "pipeline.cli", "run", str(photos), str(work / "out-dreamfocus")]
    for round_ in range(1, args.rounds + 1):
        shutil.rmtree(work / "out-rembg", ignore_errors=True)
        # rembg loads custom models only from its home folder: point it at the graph's.
        rembg = timed(rembg_command, work / "out-rembg", args.photos, {**os.environ, "U2NET_HOME": str(graph.parent)})
        line = f"round {round_}: rembg p {rembg:.1f} s"
        for runtime in args.runtimes:
            for runner in args.runners:
                shutil.rmtree(work / "out-dreamfocus", ignore_errors=True)  # a rerun would skip what is done
                options = ["--runtime", runtime, "--runner", runner]
                seconds = timed([*dreamfocus_command, *options], work / "out-dreamfocus" / "images", args.photos)
                line += f", dreamfocus run {' '.join(options)} {seconds:.1f} s (ratio {seconds / rembg:.2f})"
        print(line, flush=True)


if __name__ == "__main__":
    main()
