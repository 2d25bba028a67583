"""Two job outputs of the same photos, photo by photo: the decision each run made (edited, left
alone and why, failed) and how far apart their results are, e.g. the job under two IS-Net
runtimes, to see what an int8 graph's mask differences change in what a user gets.

    dreamfocus run PHOTOS OUT_A --runtime openvino-int8
    dreamfocus run PHOTOS OUT_B --runtime onnxruntime
    python scripts/compare_runs.py OUT_A OUT_B

Per photo: each run's status and kind (its `error_kind`, the reason's kind for a photo left
alone) and, where both edited the photo, the mean absolute difference of the two results' pixels
(0 to 255), its 99th percentile, the share of pixels more than 32 levels apart in any channel,
and the share of the frame each run kept sharp (the manifest's `fg_fraction`: the subject as the
effect extended it), which tells a changed mask from a changed extension of it.
Then the number of photos decided alike and the worst of each figure. Exit status 0.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.errors import BadInputError  # noqa: E402
from pipeline.manifest import MANIFEST_DIR, latest_rows, read_manifest  # noqa: E402
from pipeline.storage import Storage, read_file  # noqa: E402

FAR_APART = 32  # levels in a channel: a difference anyone sees


def rows_of(output: str) -> dict[str, dict]:
    table = latest_rows(read_manifest(Storage(f"{Storage(output).uri}/{MANIFEST_DIR}")))
    return {row["relpath"]: row for row in table.to_pylist()}


def result(row: dict) -> np.ndarray:
    with Image.open(io.BytesIO(read_file(row["output_uri"]))) as image:
        return np.asarray(image.convert("RGB")).astype(np.int16)


def decision(row: dict) -> str:
    return f"{row['status']} {row['error_kind'] or ''}".strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", help="the first run's OUTPUT")
    parser.add_argument("b", help="the second run's OUTPUT")
    args = parser.parse_args()
    a, b = rows_of(args.a), rows_of(args.b)
    runtimes = [sorted({r["saliency_runtime"] for r in rows.values() if r["saliency_runtime"]}) for rows in (a, b)]
    print(f"A {args.a} (saliency runtime {', '.join(runtimes[0]) or '-'}), {len(a)} photos")
    print(f"B {args.b} (saliency runtime {', '.join(runtimes[1]) or '-'}), {len(b)} photos")
    both = sorted(set(a) & set(b))
    alike, means, p99s, shares = 0, [], [], []
    width = max((len(p) for p in both), default=5)
    header = f"{'mean':>6s} {'p99':>5s} {'>' + str(FAR_APART):>8s} {'sharp A':>7s} {'sharp B':>7s}"
    print(f"{'photo':{width}s}  {'A':32s} {'B (where not the same)':32s} {header}")
    for relpath in both:
        ra, rb = a[relpath], b[relpath]
        da, db = decision(ra), decision(rb)
        alike += da == db
        figures = ""
        if ra["output_uri"] and rb["output_uri"] and ra["status"] == rb["status"] == "ok":
            try:
                image_a, image_b = result(ra), result(rb)
            except BadInputError as exc:  # a result moved or deleted since its run: say so, go on
                figures = f"not compared: {exc}"
            else:
                if image_a.shape == image_b.shape:
                    diff = np.abs(image_a - image_b)
                    means.append(float(diff.mean()))
                    p99s.append(float(np.percentile(diff, 99)))
                    shares.append(float(np.mean(diff.max(axis=-1) > FAR_APART)))
                    figures = f"{means[-1]:6.2f} {p99s[-1]:5.1f} {shares[-1]:8.4f}"
                    figures += f" {ra['fg_fraction']:7.3f} {rb['fg_fraction']:7.3f}"
                else:
                    figures = f"sizes differ: {image_a.shape[:2]} against {image_b.shape[:2]}"
        print(f"{relpath:{width}s}  {da:32s} {'' if da == db else db:32s} {figures}")
    only = sorted(set(a) ^ set(b))
    if only:
        print(f"in one run only: {len(only)} ({', '.join(only[:5])}{' ...' if len(only) > 5 else ''})")
    print(f"decided alike: {alike} of {len(both)}")
    if means:
        print(
            f"edited by both: {len(means)}; worst mean difference {max(means):.2f} of 255, worst 99th percentile "
            f"{max(p99s):.1f}, worst share of pixels more than {FAR_APART} apart {max(shares):.4f}"
        )


if __name__ == "__main__":
    main()
