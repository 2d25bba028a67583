"""Model latency per photo on this CPU, and GPU throughput across batch sizes where there is one.

    python scripts/bench_models.py [--models NAME ...] [--repeat 3] [--runtimes] [--graphs]
                                   [--batches 1 2 4 8 16] [--no-cpu]

isnet-general-use runs its real weights from the cache (`dreamfocus models fetch isnet-general-use`);
without them its GPU figures come from the same network with random weights. The transformers
depth models are built from their real default configurations with random weights: same
architecture, same shapes, same arithmetic, so the same time as the hub weights (which this
machine may not be able to fetch); their maps are meaningless. The photo is a bundled example;
models see it at their own input size, so the photo size barely matters.

CPU: one photo at a time with the model's thread count (pipeline.models.base.cpu_threads()),
median of --repeat runs after a warm-up, each model in the runtime it picks on the CPU.
--runtimes times IS-Net in both its runtimes (onnxruntime, torch) on the CPU, interleaved so that
load from elsewhere on the machine hits both alike, and how far apart their maps are.
--graphs times IS-Net's ONNX graph as shipped (fp16), as derived (fp32, the one onnxruntime runs
on the CPU) and as derived fp16, on identical input.
GPU (when torch sees CUDA): photos per second for each batch size (predict: numpy photos in,
maps out, uploads and downloads included); IS-Net runs in torch there, fp16 autocast.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.errors import WeightsUnavailableError  # noqa: E402
from pipeline.models import create_model, model_class  # noqa: E402
from pipeline.models.base import cpu_threads  # noqa: E402
from pipeline.models.isnet import ISNet  # noqa: E402

DEFAULT_MODELS = ("isnet-general-use", "depth-anything-v2-small", "dpt-large")


def build(name: str, device: str, batch_size: int = 1):
    cls = model_class(name)
    if hasattr(cls, "from_config"):
        return cls.from_config(device=device, batch_size=batch_size), "random weights, real architecture"
    try:
        return create_model(name, device=device, batch_size=batch_size), "real weights"
    except WeightsUnavailableError:
        if name != ISNet.name or device == "cpu":
            raise
        from pipeline.models.rsu import ISNetNetwork

        return ISNet.from_network(ISNetNetwork(), device, batch_size), "random weights, real architecture"


def timed(fn, repeat: int) -> list[float]:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def cpu_latency(names, photo, repeat: int) -> None:
    print(f"CPU: {cpu_threads()} threads, photo {photo.shape[1]}x{photo.shape[0]}, median of {repeat} after a warm-up")
    for name in names:
        try:
            t0 = time.perf_counter()
            model, what = build(name, "cpu")
            load = time.perf_counter() - t0
        except WeightsUnavailableError as exc:
            print(f"  {name:26s} skipped: {exc}")
            continue
        times = timed(lambda m=model: m.predict([photo]), repeat)
        print(
            f"  {name:26s} {statistics.median(times):6.2f} s/photo  (min {min(times):.2f}, "
            f"load {load:.1f} s; {what}; {model.runtime})",
            flush=True,
        )
        model = None  # free it before the next one


def isnet_runtimes(photo, repeat: int) -> None:
    """IS-Net's real weights in onnxruntime and in torch on the CPU, interleaved."""
    try:
        models = {
            runtime: create_model(ISNet.name, device="cpu", batch_size=1, runtime=runtime)
            for runtime in ("onnxruntime", "torch")
        }
    except WeightsUnavailableError as exc:
        print(f"IS-Net runtimes skipped: {exc}")
        return
    maps = {k: m.predict([photo])[0] for k, m in models.items()}  # also the warm-up
    times: dict[str, list[float]] = {k: [] for k in models}
    cpu: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(repeat):
        for k, m in models.items():
            t0, c0 = time.perf_counter(), time.process_time()
            m.predict([photo])
            times[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
    a, b = maps["onnxruntime"], maps["torch"]
    iou = ((a >= 0.5) & (b >= 0.5)).sum() / max(1, ((a >= 0.5) | (b >= 0.5)).sum())
    print(
        f"IS-Net runtimes on the CPU ({cpu_threads()} threads, photo {photo.shape[1]}x{photo.shape[0]}, "
        f"{repeat} interleaved runs):"
    )
    for k, m in models.items():
        print(
            f"  {m.describe():52s} wall median {statistics.median(times[k]):5.2f} s/photo "
            f"(min {min(times[k]):.2f})  cpu median {statistics.median(cpu[k]):5.2f} s",
            flush=True,
        )
    print(f"  maps: max |onnxruntime - torch| {np.abs(a - b).max():.1e}, mask IoU at 0.5 {iou:.5f}")


def isnet_graphs(photo, repeat: int) -> None:
    import onnxruntime as ort

    from pipeline.models.isnet import derived_model
    from pipeline.models.weights import weights_digest

    src = ISNet.local_weights()
    if src is None:
        print("  IS-Net runtimes skipped: no weights cached")
        return
    digest = weights_digest(src)
    graphs = {
        "fp16 as shipped": src,
        "fp32 derived (used on CPU)": derived_model(src, digest, "fp32"),
        "fp16 derived (used on GPU)": derived_model(src, digest, "fp16"),
    }
    x = ((cv2.resize(photo, (1024, 1024)).astype(np.float32) - 128) / 256).transpose(2, 0, 1)[None]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = cpu_threads()
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    sessions = {k: ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"]) for k, p in graphs.items()}
    outs = {k: s.run(["output"], {"input": x})[0] for k, s in sessions.items()}
    times: dict[str, list[float]] = {k: [] for k in sessions}
    cpu: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(repeat):  # interleaved, so load from elsewhere on the machine hits all alike
        for k, s in sessions.items():
            t0, c0 = time.perf_counter(), time.process_time()
            s.run(["output"], {"input": x})
            times[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
    ref = outs["fp16 as shipped"]
    print(f"IS-Net onnxruntime CPU graphs ({cpu_threads()} threads, 1024x1024, {repeat} interleaved runs):")
    for k in sessions:
        diff = float(np.abs(outs[k] - ref).max())
        print(
            f"  {k:28s} wall median {statistics.median(times[k]):5.2f} s (min {min(times[k]):.2f})  "
            f"cpu median {statistics.median(cpu[k]):5.2f} s  max|diff| vs shipped {diff:.1e}",
            flush=True,
        )


def gpu_throughput(names, photo, batches, repeat: int) -> None:
    import torch

    print(f"GPU: {torch.cuda.get_device_name(0)}, fp16, photos/s by batch size")
    for name in names:
        cells = []
        for b in batches:
            try:
                model, _ = build(name, "cuda", b)
            except WeightsUnavailableError as exc:
                cells.append(f"skipped ({exc})")
                break
            if model.device == "cpu":
                cells.append(f"runs on the CPU ({model.describe()})")
                break
            photos = [photo] * b

            def run(m=model, ps=photos):
                m.predict(ps)
                torch.cuda.synchronize()

            try:
                times = timed(run, repeat)
            except torch.cuda.OutOfMemoryError:
                cells.append(f"b{b}: out of memory")
                break
            cells.append(f"b{b}: {b / statistics.median(times):6.1f}")
            model = None
            torch.cuda.empty_cache()
        print(f"  {name:26s} " + "  ".join(cells), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    parser.add_argument("--photo", default=str(ROOT / "examples" / "motorcycle_left.jpg"))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--runtimes", action="store_true", help="time IS-Net in onnxruntime and in torch on the CPU")
    parser.add_argument("--graphs", action="store_true", help="compare IS-Net's ONNX graphs on the CPU")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    parser.add_argument("--no-cpu", action="store_true", help="only the GPU part")
    args = parser.parse_args()

    photo = cv2.cvtColor(cv2.imread(args.photo), cv2.COLOR_BGR2RGB)
    print(
        "Depth models use random weights on their real architectures: the same latency as the "
        "published weights, meaningless maps."
    )
    if not args.no_cpu:
        cpu_latency(args.models, photo, args.repeat)
    if args.runtimes:
        isnet_runtimes(photo, args.repeat)
    if args.graphs:
        isnet_graphs(photo, args.repeat)
    try:
        import torch

        cuda = torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        cuda = False
    if cuda:
        gpu_throughput(args.models, photo, args.batches, args.repeat)
    else:
        print("GPU: none here; throughput across batch sizes needs a CUDA machine")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
