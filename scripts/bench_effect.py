"""Time the effect against JPEG decode + encode of the same photo, on one CPU core.

    python scripts/bench_effect.py [PHOTO] [--megapixels 8]

Without PHOTO the bundled motorcycle photo is upscaled to the requested size, with its measured
disparity as depth and its nearest 30% as the subject: a real scene's share of transition.
A second, harsher case puts the subject on a depth ramp across the whole frame. The models are
not timed: maps arrive at model resolution, as in the job.
Times are CPU time of this process (one thread), so other work on the machine does not count.
Then the torch render backend's effect (pipeline/effect_torch.py) on the same core, with its
PSNR against the NumPy/OpenCV picture: on CPUs it is the slower of the two (auto picks numpy).
Last line: `effect/codec ratio: seed=R1 default=R2` for the real scene (target: at most 0.5).
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
    """CPU seconds of one call (median of `repeat`): on a shared machine wall time would count
    the other processes' turns too."""
    times = []
    for _ in range(repeat):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return min(times) if repeat < 3 else statistics.median(times)


def motorcycle_maps() -> tuple[np.ndarray, np.ndarray]:
    disparity = cv2.imread(str(ROOT / "tests" / "data" / "motorcycle_disp.png"), cv2.IMREAD_UNCHANGED)
    depth = disparity.astype(np.float32) / 65535
    depth = cv2.resize(depth, (1024, round(1024 * depth.shape[0] / depth.shape[1])), interpolation=cv2.INTER_AREA)
    fg = (depth >= np.percentile(depth, 70)).astype(np.float32)
    return fg, depth


def ramp_maps(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """An ellipse subject on a near-to-far ramp: 40% of the frame between start and stop."""
    fg = np.zeros((height, width), np.float32)
    cv2.ellipse(fg, (width // 2, height // 2), (width // 6, height // 3), 0, 0, 360, 1.0, -1)
    depth = np.repeat(np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None], width, axis=1)
    return fg, np.maximum(depth, fg * 0.9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("photo", nargs="?", type=Path)
    parser.add_argument("--megapixels", type=float, default=8.0)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--skip-torch", action="store_true", help="no torch render backend figures")
    args = parser.parse_args()
    cv2.setNumThreads(1)

    name = args.photo or ROOT / "examples" / "motorcycle_left.jpg"
    photo = np.asarray(Image.open(name).convert("RGB"))
    if not args.photo:
        scale = (args.megapixels * 1e6 / (photo.shape[0] * photo.shape[1])) ** 0.5
        photo = cv2.resize(photo, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
    height, width = photo.shape[:2]
    jpeg = io.BytesIO()
    Image.fromarray(photo).save(jpeg, "JPEG", quality=92)
    data = jpeg.getvalue()

    def codec() -> None:
        decoded = Image.open(io.BytesIO(data)).convert("RGB")
        decoded.save(io.BytesIO(), "JPEG", quality=92)

    model_h, model_w = 1024 * height // max(height, width), 1024 * width // max(height, width)
    cases = {"ramp": ramp_maps(model_h, model_w)}
    if not args.photo:
        cases = {"scene": motorcycle_maps(), **cases}
    codec_s = best_of(codec, args.repeat)
    print(f"photo {width}x{height} ({width * height / 1e6:.1f} MP), one core")
    print(f"decode+encode JPEG: {codec_s * 1000:.0f} ms")
    ratios = {}
    for case, (fg, depth) in cases.items():
        for preset in ("seed", "default"):
            effect_s = best_of(
                lambda fg=fg, depth=depth, preset=preset: render(photo, fg, depth, PRESETS[preset]), args.repeat
            )
            ratios.setdefault(case, {})[preset] = effect_s / codec_s
            print(f"{case:5s} {preset:7s}: effect {effect_s * 1000:4.0f} ms, ratio {effect_s / codec_s:.2f}")
    if not args.skip_torch:
        compare_torch(photo, cases, args.repeat)
    main_case = ratios[next(iter(cases))]
    print("effect/codec ratio: " + " ".join(f"{k}={v:.2f}" for k, v in main_case.items()))


def compare_torch(photo: np.ndarray, cases: dict, repeat: int) -> None:
    """The torch render backend's effect (pipeline/effect_torch.py) on the same core, and how
    close its picture is (PSNR against the NumPy/OpenCV one)."""
    import torch

    from pipeline import effect_torch

    torch.set_num_threads(1)
    batch = torch.from_numpy(np.ascontiguousarray(photo.transpose(2, 0, 1)))[None]
    for case, (fg, depth) in cases.items():
        maps = torch.from_numpy(fg)[None], torch.from_numpy(np.ascontiguousarray(depth))[None]
        for preset in ("seed", "default"):
            numpy_s = best_of(
                lambda fg=fg, depth=depth, preset=preset: render(photo, fg, depth, PRESETS[preset]), repeat
            )
            torch_s = best_of(
                lambda maps=maps, preset=preset: effect_torch.render(batch, *maps, PRESETS[preset]), repeat
            )
            got = effect_torch.render(batch, *maps, PRESETS[preset]).image[0].permute(1, 2, 0).numpy()
            want = render(photo, fg, depth, PRESETS[preset]).image
            mse = float(np.mean((got.astype(np.float64) - want) ** 2))
            psnr = f"{10 * np.log10(255**2 / mse):.1f} dB" if mse else "identical"
            print(
                f"{case:5s} {preset:7s}: torch backend on the CPU {torch_s * 1000:4.0f} ms vs numpy "
                f"{numpy_s * 1000:4.0f} ms (x{torch_s / numpy_s:.1f}); PSNR vs numpy {psnr}"
            )


if __name__ == "__main__":
    main()
