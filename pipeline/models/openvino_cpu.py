"""Both models' way of running an OpenVINO graph on the CPU (IS-Net's openvino and openvino-int8
runtimes, the depth model's openvino one).

A graph is compiled at a fixed 1 x 3 x size x size for up to CPU_STREAMS photos at once, each on
its share of the threads: on few cores one of IS-Net's photos does not keep every thread busy, so
two at once take less time each (0.92 of the time a photo on 2 cores, in a job 0.80: see
scripts/bench_startup.py); for Depth Anything V2 Small it makes no difference (766 to 840 ms a
photo against 801 to 806). A model of batch size 1 (`render`) gets one stream and every thread
for its photo. Threads are not pinned to cores (the job's CPU
stages share them), and the arithmetic stays fp32 where the CPU could do bf16: the masks and maps
are checked against fp32 (scripts/bench_runtimes.py, bench_depth_runtimes.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .base import CPU_STREAMS, cpu_threads


class CpuGraph:
    """An OpenVINO model compiled for this CPU, running ``photos_at_once`` inputs at a time."""

    def __init__(self, model, photos_at_once: int = 1, size: int | None = None, cache: Path | None = None) -> None:
        """``model``: an openvino.Model (read from a file or converted); ``size``: reshaped to
        1 x 3 x size x size where given; ``cache``: where OpenVINO keeps compiled blobs, so a
        later start compiles nothing."""
        import openvino as ov

        core = ov.Core()
        if cache is not None:
            core.set_property({"CACHE_DIR": str(cache)})
        if size is not None:
            model.reshape([1, 3, size, size])
        self.streams = max(1, min(CPU_STREAMS, photos_at_once, cpu_threads()))
        settings = {
            "PERFORMANCE_HINT": "THROUGHPUT" if self.streams > 1 else "LATENCY",
            "NUM_STREAMS": self.streams,
            "INFERENCE_NUM_THREADS": cpu_threads(),
            "ENABLE_CPU_PINNING": False,
            "INFERENCE_PRECISION_HINT": "f32",
        }
        self._requests = ov.AsyncInferQueue(core.compile_model(model, "CPU", settings), self.streams)

    def run(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """The first output of each C x H x W input, without its batch axis (a copy: a request's
        buffers are reused), as many at once as the graph has streams."""
        outs: list[np.ndarray] = [np.empty(0)] * len(inputs)

        def keep(request, i: int) -> None:
            outs[i] = request.get_output_tensor(0).data[0].copy()

        self._requests.set_callback(keep)
        for i, x in enumerate(inputs):
            self._requests.start_async({0: x[None]}, i)
        self._requests.wait_all()
        return outs
