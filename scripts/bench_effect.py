"""Time the effect against JPEG decode + encode of the same photo, on one CPU core.

    python scripts/bench_effect.py [PHOTO] [--megapixels 8]

Without PHOTO a bundled example is upscaled to the requested size. The mask and depth are
synthetic (an ellipse subject on a near-to-far ramp): the effect, not the models, is timed.
Last line: `effect/codec ratio: seed=R1 default=R2` (target: both at most 0.5 at 8 MP).
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from pipeline.effect import render  # noqa: E402
from pipeline.params import PRESETS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) if repeat < 3 else statistics.median(times)


def synthetic_maps(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    fg = np.zeros((height, width), np.float32)
    cv2.ellipse(fg, (width // 2, height // 2), (width // 6, height // 3), 0, 0, 360, 1.0, -1)
    depth = np.repeat(np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None], width, axis=1)
    return fg, np.maximum(depth, fg * 0.9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("photo", nargs="?", type=Path)
    parser.add_argument("--megapixels", type=float, default=8.0)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    cv2.setNumThreads(1)

    if args.photo:
        photo = np.asarray(Image.open(args.photo).convert("RGB"))
    else:
        photo = np.asarray(Image.open(ROOT / "examples" / "astronaut.jpg").convert("RGB"))
        scale = (args.megapixels * 1e6 / (photo.shape[0] * photo.shape[1])) ** 0.5
        photo = cv2.resize(photo, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
    height, width = photo.shape[:2]
    jpeg = io.BytesIO()
    Image.fromarray(photo).save(jpeg, "JPEG", quality=92)
    data = jpeg.getvalue()

    def codec() -> None:
        decoded = Image.open(io.BytesIO(data)).convert("RGB")
        decoded.save(io.BytesIO(), "JPEG", quality=92)

    # Model maps arrive at model resolution, as they do in the job.
    fg, depth = synthetic_maps(1024 * height // max(height, width), 1024 * width // max(height, width))
    codec_s = best_of(codec, args.repeat)
    print(f"photo {width}x{height} ({width * height / 1e6:.1f} MP), one core")
    print(f"decode+encode JPEG: {codec_s * 1000:.0f} ms")
    ratios = {}
    for name in ("seed", "default"):
        params = PRESETS[name]
        effect_s = best_of(lambda: render(photo, fg, depth, params), args.repeat)
        ratios[name] = effect_s / codec_s
        print(f"effect {name}: {effect_s * 1000:.0f} ms")
    print("effect/codec ratio: " + " ".join(f"{k}={v:.2f}" for k, v in ratios.items()))


if __name__ == "__main__":
    main()
