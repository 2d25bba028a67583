"""Time a camera RAW through the job's steps beside a JPEG of the same size, on one CPU core.

    python scripts/bench_raw.py [--megapixels 20] [--preview 1620] [--repeat 3]

A DNG is written (pidng, as the tests write theirs) from the bundled motorcycle photo scaled to
the requested size and mosaicked as a 14-bit RGGB sensor would record it, with an embedded JPEG
preview of the given long side, as cameras store one. The JPEG is the same picture at quality 92.

- model copy: `photo.prepare`, what the read stage does: the DNG's preview (or, for the DNG
  without one, LibRaw's half-size image), the JPEG's DCT-scaled decode.
- full picture: `decode_photo`, what the finish stage decodes: the DNG demosaiced at 16 bits.
- effect: `effect.render` on the decoded picture (16 bits for the DNG, 8 for the JPEG).
- finish: `photo.render_on_host` whole (decode, the effect, encode to JPEG) with model-size maps.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # LibRaw's OpenMP too: one core, as a job's task has

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from raw_files import dng_bytes  # noqa: E402

from pipeline.effect import render  # noqa: E402
from pipeline.params import effect_params  # noqa: E402
from pipeline.photo import RenderSettings, SceneMaps, prepare, render_on_host  # noqa: E402
from pipeline.photo_io import decode_photo  # noqa: E402


def cpu_seconds(fn, repeat: int) -> float:
    """The least CPU time of `repeat` calls: on a shared machine, other processes' load inflates
    wall time but hardly the CPU time of a single-threaded call."""
    times = []
    for _ in range(repeat):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return min(times)


def linear(srgb: np.ndarray) -> np.ndarray:
    v = srgb.astype(np.float32) / 255
    return np.where(v <= 0.04045, v / 12.92, ((v + 0.055) / 1.055) ** 2.4).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megapixels", type=float, default=20.0)
    parser.add_argument("--preview", type=int, default=1620, help="long side of the DNG's embedded preview")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    cv2.setNumThreads(1)

    photo = np.asarray(Image.open(ROOT / "examples" / "motorcycle_left.jpg").convert("RGB"))
    scale = (args.megapixels * 1e6 / (photo.shape[0] * photo.shape[1])) ** 0.5
    width, height = round(photo.shape[1] * scale) // 2 * 2, round(photo.shape[0] * scale) // 2 * 2
    photo = cv2.resize(photo, (width, height), interpolation=cv2.INTER_CUBIC)
    small = args.preview / max(width, height)
    preview = cv2.resize(photo, None, fx=small, fy=small, interpolation=cv2.INTER_AREA)

    scene = linear(photo)
    dng = dng_bytes(scene, bits=14, pattern="RGGB", preview=preview)
    dng_bare = dng_bytes(scene, bits=14, pattern="RGGB")
    buffer = io.BytesIO()
    Image.fromarray(photo).save(buffer, "JPEG", quality=92)
    jpeg = buffer.getvalue()
    print(
        f"{width}x{height} = {width * height / 1e6:.1f} MP; DNG {len(dng) / 1e6:.1f} MB (14-bit, preview "
        f"{preview.shape[1]}x{preview.shape[0]}), JPEG {len(jpeg) / 1e6:.1f} MB; "
        f"CPU seconds on one core, least of {args.repeat}"
    )

    maps = np.zeros((683, 1024), np.float32)
    cv2.ellipse(maps, (512, 341), (170, 228), 0, 0, 360, 1.0, -1)
    depth = np.maximum(np.repeat(np.linspace(0, 1, 683, dtype=np.float32)[:, None], 1024, axis=1), maps * 0.9)
    params = effect_params("default")
    settings, scene = RenderSettings(params), SceneMaps(maps, depth)
    cases = (("DNG", dng, "x.dng"), ("DNG, no preview", dng_bare, "x.dng"), ("JPEG", jpeg, "x.jpg"))
    print(f"{'':16s} {'model copy':>11s} {'full picture':>13s} {'effect':>8s} {'finish':>8s}")
    for label, data, name in cases:
        copy = cpu_seconds(lambda d=data, n=name: prepare(d, n, 200.0), args.repeat)
        full = cpu_seconds(lambda d=data, n=name: decode_photo(d, n), args.repeat)
        pixels = decode_photo(data, name).pixels
        effect = cpu_seconds(lambda p=pixels: render(p, maps, depth, params), args.repeat)
        done = cpu_seconds(lambda d=data, n=name: render_on_host(d, n, scene, settings), args.repeat)
        shape = prepare(data, name, 200.0).shape
        print(
            f"{label:16s} {copy:10.3f}s {full:12.3f}s {effect:7.2f}s {done:7.2f}s   "
            f"(model copy {shape[1]}x{shape[0]}, {pixels.dtype})"
        )


if __name__ == "__main__":
    main()
