"""How `dreamfocus review` scales: thumbnails per second, the page's data for a large library,
and how long Chromium takes to open the page.

    python scripts/bench_review.py [--rows 20000] [--workers 4] [--chromium PATH]

Builds OUTPUT under a temporary folder: ROWS processed photos (small JPEGs, so the figures are
review's own work), a manifest of them, then runs review twice (every thumbnail made, then all
kept) and opens the page in headless Chromium. Also times one thumbnail of a 12-MP JPEG.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.manifest import ManifestWriter, image_id  # noqa: E402
from pipeline.review import build_review, thumbnail_jpeg  # noqa: E402
from pipeline.storage import Storage  # noqa: E402


def jpeg(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
    pixels = np.asarray(Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR))
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=90)
    return out.getvalue()


def library(root: Path, rows: int) -> Path:
    inputs, output = root / "in", root / "out"
    photo = jpeg(160, 120, 0)
    writer = ManifestWriter(Storage(str(output / "manifest")), "bench", rows_per_part=5000)
    start = datetime.now(UTC)
    for i in range(rows):
        relpath = f"{i // 1000:03d}/photo-{i:06d}.jpg"
        for folder in (inputs, output / "images"):
            (folder / relpath).parent.mkdir(parents=True, exist_ok=True)
            (folder / relpath).write_bytes(photo)
        finished = start + timedelta(seconds=i / 8)
        writer.add(
            dict(
                relpath=relpath,
                image_id=image_id(relpath),
                source_uri=str(inputs / relpath),
                source_fingerprint=f"mtime:{i}",
                output_uri=str(output / "images" / relpath),
                status="ok" if i % 20 else "failed",
                error=None if i % 20 else "bench: a failed photo",
                width=160,
                height=120,
                seconds_read=0.01,
                seconds_decode=0.2,
                seconds_effect=0.15,
                seconds_encode=0.1,
                seconds_write=0.02,
                attempt=1,
                run_id="bench",
                started_at=finished - timedelta(seconds=1),
                finished_at=finished,
            )
        )
    writer.flush()
    return output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--chromium", default=str(Path(__file__).resolve().parents[1] / ".cache/chromium/chromium"))
    args = parser.parse_args()

    big = jpeg(4000, 3000, 1)
    t0 = time.perf_counter()
    for _ in range(3):
        thumbnail_jpeg(big, "12mp.jpg")
    print(f"one thumbnail of a 12-MP JPEG ({len(big) / 1e6:.1f} MB): {(time.perf_counter() - t0) / 3 * 1000:.0f} ms")

    root = Path(tempfile.mkdtemp(prefix="bench-review-"))
    try:
        t0 = time.perf_counter()
        output = library(root, args.rows)
        print(f"library of {args.rows:,} photos written in {time.perf_counter() - t0:.1f} s")

        t0 = time.perf_counter()
        first = build_review(str(output), workers=args.workers)
        seconds = time.perf_counter() - t0
        print(
            f"review, every thumbnail made: {seconds:.1f} s, {first.thumbs_made:,} thumbnails "
            f"({first.thumbs_made / seconds:.0f}/s with {args.workers} workers)"
        )
        t0 = time.perf_counter()
        again = build_review(str(output), workers=args.workers)
        print(f"review again, all {again.thumbs_kept:,} kept: {time.perf_counter() - t0:.1f} s")
        review = output / "review"
        print(
            f"rows.js {os.path.getsize(review / 'rows.js') / 1e6:.1f} MB, "
            f"index.html {os.path.getsize(review / 'index.html') / 1e3:.0f} kB"
        )

        if os.access(args.chromium, os.X_OK):
            command = [args.chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
            for url in ("about:blank", (review / "index.html").as_uri()):
                t0 = time.perf_counter()
                dom = subprocess.run([*command, "--dump-dom", url], capture_output=True, text=True, check=True).stdout
                print(
                    f"chromium --dump-dom {url.rsplit('/', 2)[-2:]}: {time.perf_counter() - t0:.2f} s, "
                    f"{dom.count('<article')} cards"
                )
        else:
            print(f"no Chromium at {args.chromium}: `make browser` unpacks one")
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
