"""IS-Net on the nnpack runtime as a job on this CPU runs it (CPU_STREAMS photos at once where the
cores allow), with glibc's malloc as dreamfocus sets it (pipeline/heap.py) and as glibc leaves
it: seconds a photo, page faults and kernel time a photo, peak memory, and the ratio of the two.

    python scripts/bench_heap.py [--rounds 3] [--passes 2]

Each round runs both settings in turn, each in a fresh process (malloc's settings hold for a
process's life), on the real architecture with random weights at 1024 x 1024. "glibc's own" is
what its dynamic threshold settles at: blocks above 32 MB mapped and unmapped one by one, 8
arenas a core; given in the environment, which pipeline/heap.py then leaves as it is.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GLIBC_OWN = {
    "MALLOC_ARENA_MAX": str(8 * (os.cpu_count() or 1)),
    "MALLOC_MMAP_THRESHOLD_": str(32 << 20),
    "MALLOC_TRIM_THRESHOLD_": str(64 << 20),
}
CHILD = """
import json, resource, sys, time
import numpy as np, torch
from pipeline.heap import SETTINGS
from pipeline.models.base import CPU_STREAMS
from pipeline.models.isnet import ISNet
from pipeline.models.rsu import ISNetNetwork

torch.manual_seed(0)
model = ISNet.from_network(ISNetNetwork().eval(), device="cpu", batch_size=CPU_STREAMS, runtime="nnpack")
photos = [np.random.default_rng(i).integers(0, 255, (768, 1024, 3), dtype=np.uint8) for i in range(CPU_STREAMS)]
model.predict(photos)  # first pass: NNPACK's workspaces, the heap's first growth
passes = int(sys.argv[1])
before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
for _ in range(passes):
    model.predict(photos)
seconds, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
n = passes * len(photos)
print(json.dumps({"seconds": seconds / n, "faults": (after.ru_minflt - before.ru_minflt) / n,
                  "kernel": (after.ru_stime - before.ru_stime) / n, "peak_mib": after.ru_maxrss / 1024}))
"""


def run(passes: int, glibc_own: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in GLIBC_OWN} | (GLIBC_OWN if glibc_own else {})
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(passes)], env=env, cwd=ROOT, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--passes", type=int, default=2, help="passes of CPU_STREAMS photos a process, timed")
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {"dreamfocus's": [], "glibc's own": []}
    for round_ in range(args.rounds):
        for name in runs:
            runs[name].append(run(args.passes, glibc_own=name == "glibc's own"))
            r = runs[name][-1]
            print(
                f"round {round_ + 1}, malloc {name:13s}: {r['seconds']:.3f} s a photo, {r['faults']:9.0f} page "
                f"faults and {r['kernel']:.3f} s in the kernel a photo, peak {r['peak_mib']:.0f} MiB",
                flush=True,
            )
    ours, theirs = (sum(r["seconds"] for r in runs[name]) for name in runs)
    print(f"ratio, seconds a photo, dreamfocus's malloc settings to glibc's own: {ours / theirs:.2f}")


if __name__ == "__main__":
    main()
