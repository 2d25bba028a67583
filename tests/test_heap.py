"""glibc's malloc as pipeline/heap.py sets it: a network's second pass reuses the memory of its
first without page faults, and settings given in the environment are kept."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from pipeline import heap

needs_glibc = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only"
)

# A thread other than the main one runs a small IS-Net (the real structure, few channels) at
# 1024 x 1024 three times, as a stream of the nnpack runtime does: the page faults of each pass.
CHILD = """
import json, resource, threading
from pipeline import heap  # first, as the job's processes do: before any thread has an arena
import torch
from pipeline.models import winograd
from pipeline.models.rsu import SMALL, ISNetNetwork

network = winograd.winograd_network(ISNetNetwork(SMALL)) if winograd.available() else ISNetNetwork(SMALL).eval()
x = torch.randn(1, 3, 1024, 1024)
faults = []
def passes():
    torch.set_num_threads(1)
    with torch.inference_mode():
        for _ in range(3):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            network(x)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
thread = threading.Thread(target=passes)
thread.start()
thread.join()
print(json.dumps(faults))
"""


def _child(env_extra: dict[str, str], code: str = CHILD):
    env = {k: v for k, v in os.environ.items() if k not in heap.SETTINGS} | env_extra
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@needs_glibc
def test_a_network_run_again_faults_in_no_memory():
    ours = _child({})
    # glibc as it comes: blocks above 32 MB mapped afresh each time, a fault a 4 KiB page
    theirs = _child({"MALLOC_ARENA_MAX": "8", "MALLOC_MMAP_THRESHOLD_": str(32 << 20)})
    assert ours[0] > 100_000 and theirs[0] > 100_000  # the first pass grows the heap
    assert max(ours[1:]) < 1_000
    assert min(theirs[1:]) > 100_000


@needs_glibc
def test_settings_given_in_the_environment_are_kept():
    code = "import json; from pipeline import heap; print(json.dumps(heap.keep_freed_memory()))"
    assert set(_child({}, code)) == set(heap.SETTINGS)
    assert _child({"MALLOC_ARENA_MAX": "4", "MALLOC_TRIM_THRESHOLD_": "1000000"}, code) == ["MALLOC_MMAP_THRESHOLD_"]
