"""The default depth model (depth-anything-v2-small, its real architecture with random weights) in
each CPU runtime at hand, side by side: ms per photo, the ratio to torch fp32 (what it ran in so
far), and how far each one's depth maps are from torch fp32's, on the examples and on generated
scenes.

    python scripts/bench_depth_runtimes.py [--rounds 2] [--scenes 3] [--weights he|init] [--only NAME ...]
                                           [--workdir DIR]

--weights he (the default) draws every weight He-scaled (tests/random_weights.py), so that the maps
vary as much as real ones; --weights init keeps transformers' own initialisation, whose maps are
nearly constant (and agree trivially). Either takes the time the published weights take.

Runtimes: torch fp32 (the baseline); OpenVINO fp32 from the torch module directly
(openvino.convert_model), as dreamfocus runs it, and from an
ONNX export; onnxruntime on the ONNX export (torch.onnx.export, fixed 1 x 3 x 518 x 518). Every
photo is the model's padded 518 x 518 input (pipeline/models/hf_depth.py), so one fixed shape
serves all. The machine may be shared: every round runs each runtime on each photo in turn, and
the ratios are of sums over the same photos in the same rounds.

Agreement, over the part of each map that shows the photo: the worst relative error
max|a - b| / (max - min of torch's map) and the worst Pearson and Spearman correlations. A
runtime qualifies where, on every photo, the error is at most 1% of the range and both
correlations are at least 0.999 (pipeline/models/hf_depth.py, AGREEMENT): the normalised depth the
effect blends by then moves by at most about 1% anywhere, and near and far keep their order.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

sys.path.insert(0, str(ROOT / "scripts"))

from bench_runtimes import built, timed_rounds  # noqa: E402
from random_weights import scramble  # noqa: E402
from scenes import scene  # noqa: E402

from pipeline.models.base import cpu_threads  # noqa: E402
from pipeline.models.depth_anything import DepthAnythingV2Small  # noqa: E402
from pipeline.models.hf_depth import AGREEMENT, map_agreement  # noqa: E402

Run = Callable[[np.ndarray], np.ndarray]  # 1 x 3 x size x size input -> size x size map


def torch_run(model: DepthAnythingV2Small) -> Run:
    import torch

    return lambda x: model._forward(torch.from_numpy(x)).numpy()[0]


def dreamfocus_openvino(model: DepthAnythingV2Small) -> Run:
    """The depth model as dreamfocus runs it in OpenVINO (converted from the torch module)."""
    from pipeline.models.openvino_cpu import CpuGraph

    graph = CpuGraph(model.openvino_model(), 1, model.size)
    return lambda x: graph.run([x[0]])[0]


@functools.cache
def onnx_export(model: DepthAnythingV2Small, workdir: Path) -> Path:
    """The model's ONNX graph (the TorchScript exporter: the dynamo one needs onnxscript), made
    once per run: a file left by an earlier run may hold other random weights."""
    import torch

    from pipeline.models.hf_depth import depth_only

    dest = workdir / "depth-anything-v2-small.random.onnx"
    example = torch.zeros(1, 3, model.size, model.size)
    torch.onnx.export(
        depth_only(model.model), (example,), str(dest), input_names=["pixel_values"], opset_version=17, dynamo=False
    )
    return dest


def ort_run(path: Path) -> Run:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = cpu_threads()
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0][0]


def openvino_onnx_run(path: Path) -> Run:
    import openvino as ov

    from pipeline.models.openvino_cpu import CpuGraph

    graph = CpuGraph(ov.Core().read_model(str(path)))
    return lambda x: graph.run([x[0]])[0]


def candidates(model: DepthAnythingV2Small, workdir: Path) -> dict[str, Callable[[], Run]]:
    """Name -> how to build it (built only when asked for and its packages are here)."""
    return {
        "torch fp32 (baseline)": lambda: torch_run(model),
        "openvino fp32 (from torch)": lambda: dreamfocus_openvino(model),
        "openvino fp32 (from ONNX)": lambda: openvino_onnx_run(onnx_export(model, workdir)),
        "onnxruntime fp32": lambda: ort_run(onnx_export(model, workdir)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--scenes", type=int, default=3, help="generated scenes beside the examples")
    parser.add_argument(
        "--weights", choices=("he", "init"), default="he", help="random weights: He-scaled or as initialised"
    )
    parser.add_argument("--only", nargs="*", help="runtimes whose name contains one of these (the baseline always)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "dreamfocus-bench-depth")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)

    model = DepthAnythingV2Small.from_config(device="cpu", batch_size=1, runtime="torch")
    if args.weights == "he":
        scramble(model.model, 0)
    examples = {
        p.name: cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in sorted(ROOT.glob("examples/*.jpg"))
    }
    scenes = {f"scene {seed}": scene(seed) for seed in range(args.scenes)}
    photos, regions = {}, {}
    for name, photo in {**examples, **scenes}.items():
        x, shape = model._prepare(photo)
        photos[name] = np.ascontiguousarray(x[None])
        regions[name] = model._region(shape, (model.size, model.size))

    runs = built(candidates(model, args.workdir), args.only)
    baseline = next(iter(runs))
    outputs, seconds = timed_rounds(runs, photos, args.rounds)
    maps = {
        name: {p: np.asarray(out, np.float32)[regions[p]] for p, out in by_photo.items()}
        for name, by_photo in outputs.items()
    }

    print(
        f"\ndepth-anything-v2-small (random weights ({args.weights}), real architecture, {model.size} x {model.size}), "
        f"{len(examples)} examples + {len(scenes)} generated scenes, {args.rounds} rounds, {cpu_threads()} threads; "
        "ratio: sum of times over the sum of torch fp32's, same photos, same rounds"
    )
    print(f"{'runtime':28s} {'ms/photo':>9s} {'ratio':>6s} {'max err':>9s} {'pearson':>9s} {'spearman':>9s}  verdict")
    base_total = sum(seconds[baseline])
    for name in runs:
        agreement = {p: map_agreement(maps[baseline][p], maps[name][p]) for p in photos}
        worst_error = max(a.error for a in agreement.values())
        worst_pearson = min(a.pearson for a in agreement.values())
        worst_spearman = min(a.spearman for a in agreement.values())
        verdict = "qualifies" if all(a.agrees for a in agreement.values()) else "maps differ"
        print(
            f"{name:28s} {1000 * statistics.median(seconds[name]):9.0f} {sum(seconds[name]) / base_total:6.2f} "
            f"{worst_error:9.1e} {worst_pearson:9.6f} {worst_spearman:9.6f}  {verdict}"
        )
        if verdict != "qualifies":
            print("    " + ", ".join(f"{p}: {a}" for p, a in agreement.items() if not a.agrees))
    print(f"max err: max|a - b| over the range of torch's map, worst photo; qualifies: on every photo {AGREEMENT}")


if __name__ == "__main__":
    main()
