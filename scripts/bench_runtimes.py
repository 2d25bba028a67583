"""IS-Net in every CPU runtime and setting at hand, side by side: ms per photo, the ratio to the
fp32 onnxruntime graph that dreamfocus ran on the CPU so far, and how far each one's masks are
from that graph's (IoU of the masks at 0.5, worst photo), on the examples and on generated scenes.

    python scripts/bench_runtimes.py [--rounds 2] [--scenes 4] [--only NAME ...] [--workdir DIR]

Runtimes whose package is missing here (openvino, nncf) are left out with a line saying so. The
int8 graphs are made once into --workdir (onnxruntime.quantization: dynamic, and static QDQ
calibrated on the examples and their mirror images; NNCF for OpenVINO on the same photos, in the
variants of NNCF_VARIANTS: every convolution in int8 with NNCF's settings varied, or some
convolutions left in fp32, with or without the convolutions of concatenations split), or into
the cache (`--runtime openvino-int8`: NNCF, split, three convolutions left in fp32, see
pipeline/models/isnet.py); the generated scenes
(tests/scenes.py) are photos none of them was calibrated on. The `--runtime openvino-int8`
graph is also timed with other OpenVINO compile settings (threads pinned, throughput hint, one
thread). The machine may be shared: every round runs each runtime on each photo in turn, so
load from elsewhere hits all alike, and the ratios are of sums over the same photos in the same
rounds. A runtime qualifies where its worst IoU is at least 0.98.

With --photos DIR (scripts/get_wallpapers.sh fetches 24 real photos from Debian's wallpaper
packages), the masks are also compared on real photos none of the graphs was calibrated on:
IoU over those whose fp32 mask covers at least 1% of the frame (on a photo without a subject, the
IoU of a few stray pixels says nothing), and the worst mean absolute difference of the soft maps,
which the effect blends by, over all of them.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from scenes import scene  # noqa: E402

from pipeline.models.base import CPU_STREAMS, cpu_threads  # noqa: E402
from pipeline.models.isnet import (  # noqa: E402
    ISNet,
    calibration_inputs,
    convolutions_in,
    derived_model,
    model_input,
    quantized_model,
    split_graph,
)
from pipeline.models.weights import resolve_weights, weights_digest  # noqa: E402

QUALIFYING_IOU = 0.98
MASK_LEVEL = 0.5  # a map is cut into a mask here
SUBJECT_SHARE = 0.01  # of the frame: a held-out photo's mask counts towards the IoU from this size
Run = Callable[[np.ndarray], np.ndarray]  # 1 x 3 x 1024 x 1024 input -> 1024 x 1024 map


def rgb(path: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


def ort_session(path: Path, level: str = "all", threads: int | None = None, parallel: bool = False) -> Run:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = {
        "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    opts.intra_op_num_threads = threads or cpu_threads()
    opts.inter_op_num_threads = 2 if parallel else 1
    opts.execution_mode = ort.ExecutionMode.ORT_PARALLEL if parallel else ort.ExecutionMode.ORT_SEQUENTIAL
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0][0, 0]


def openvino_model(model_or_path, threads: int | None = None, hint: str = "LATENCY", **properties) -> Run:
    """``properties``: more compile properties (ENABLE_CPU_PINNING=True, say), over these."""
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(model_or_path)) if isinstance(model_or_path, (str, Path)) else model_or_path
    model.reshape([1, 3, ISNet.size, ISNet.size])
    compiled = core.compile_model(
        model,
        "CPU",
        {"PERFORMANCE_HINT": hint, "INFERENCE_NUM_THREADS": threads or cpu_threads(), "NUM_STREAMS": 1, **properties},
    )
    request = compiled.create_infer_request()
    return lambda x: request.infer({0: x})[0][0, 0]


def quantized_ort(graph: Path, calibration: list[np.ndarray], workdir: Path, static: bool) -> Path:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    dest = workdir / f"isnet.ort-int8-{'static' if static else 'dynamic'}.onnx"
    if dest.is_file():
        return dest
    prepared = workdir / "isnet.preprocessed.onnx"
    if not prepared.is_file():
        quant_pre_process(str(graph), str(prepared))
    if not static:
        quantize_dynamic(str(prepared), str(dest), weight_type=QuantType.QInt8)
        return dest

    class Photos(CalibrationDataReader):
        def __init__(self) -> None:
            self.pending = iter(calibration)

        def get_next(self):
            x = next(self.pending, None)
            return None if x is None else {"input": x}

    quantize_static(
        str(prepared),
        str(dest),
        Photos(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    return dest


def quantized_openvino(
    graph: Path, calibration: list[np.ndarray], workdir: Path, tag: str = "every-conv", fp32_scopes=(), **options
) -> Path:
    """An NNCF int8 graph made into ``workdir`` (once per ``tag``): the convolutions whose names
    start with one of ``fp32_scopes`` left in fp32; ``options``: overflow_fix (an OverflowFix
    name), activations (a RangeEstimatorParametersSet name), fast_bias_correction, preset, and
    scenes (that many generated scenes calibrated on too, none of those the IoUs are taken on),
    crops (the examples' quarters calibrated on too), split (the convolutions of concatenations
    split first, as --runtime openvino-int8 does, their sums left fp32)."""
    import nncf
    import openvino as ov
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    dest = workdir / f"isnet.ov-int8.{tag}.xml"
    if not dest.is_file():
        model, sums = split_graph(graph) if options.get("split") else (ov.Core().read_model(str(graph)), [])
        model.reshape([1, 3, ISNet.size, ISNet.size])
        kept = convolutions_in(model, tuple(fp32_scopes))
        advanced = AdvancedQuantizationParameters(
            overflow_fix=OverflowFix[options.get("overflow_fix", "FIRST_LAYER")],
            activations_range_estimator_params=getattr(RangeEstimatorParametersSet, options["activations"])
            if "activations" in options
            else None,
        )
        extra = [model_input(scene(1000 + seed))[None] for seed in range(options.get("scenes", 0))]
        if options.get("crops"):  # each example's four quarters too, zoomed in: finer detail
            for path in sorted(ROOT.glob("examples/*.jpg")):
                photo = rgb(path)
                h, w = photo.shape[0] // 2, photo.shape[1] // 2
                extra += [model_input(photo[y : y + h, x : x + w])[None] for y in (0, h) for x in (0, w)]
        quantized = nncf.quantize(
            model,
            nncf.Dataset(calibration + extra),
            subset_size=len(calibration) + len(extra),
            preset=nncf.QuantizationPreset[options.get("preset", "MIXED")],
            fast_bias_correction=options.get("fast_bias_correction", True),
            ignored_scope=nncf.IgnoredScope(names=kept + sums) if kept or sums else None,
            advanced_parameters=advanced,
        )
        ov.save_model(quantized, str(dest), compress_to_fp16=False)
    return dest


# NNCF int8 variants: name -> (tag of the graph in --workdir, convolutions kept in fp32, options).
FULL_RES_DECODER = ("/stage1d/rebnconvin/", "/stage1d/rebnconv1/", "/stage1d/rebnconv1d/", "/side1/")
NNCF_VARIANTS: dict[str, tuple[str, tuple[str, ...], dict]] = {
    "openvino int8 NNCF, every conv": ("every-conv", (), {}),
    "openvino int8 NNCF, every conv, overflow fix": ("every-conv-overflow", (), {"overflow_fix": "ENABLE"}),
    "openvino int8 NNCF, every conv, minmax": ("every-conv-minmax", (), {"activations": "MINMAX"}),
    "openvino int8 NNCF, every conv, full bias corr.": ("every-conv-bc", (), {"fast_bias_correction": False}),
    "openvino int8 NNCF, every conv, performance": ("every-conv-perf", (), {"preset": "PERFORMANCE"}),
    "openvino int8 NNCF, every conv, +6 scenes": ("every-conv-scenes", (), {"scenes": 6}),
    "openvino int8 NNCF, fp32 stage1+stage1d": ("fp32-stage1", ("/conv_in/", "/stage1/", "/stage1d/", "/side1/"), {}),
    "openvino int8 NNCF, fp32 512px decoder": ("fp32-512-decoder", FULL_RES_DECODER, {}),
    "openvino int8 NNCF, fp32 conv_in+side1": ("fp32-ends", ("/conv_in/", "/side1/"), {}),
    "openvino int8 NNCF, fp32 stage1 in + 512px decoder": (
        "fp32-in-decoder",
        ("/stage1/rebnconvin/",) + FULL_RES_DECODER,
        {},
    ),
}
# Unsplit, the eight convolutions at 512x512 in fp32 (the job's graph v2), or all but the costliest
# (in multiply-adds); all but stage 1's last was graph v3. Split, the same and smaller fp32 sets.
EIGHT_512PX = (
    "/conv_in/",
    "/stage1/rebnconvin/",
    "/stage1/rebnconv1/",
    "/stage1/rebnconv1d/",
    "/stage1d/rebnconvin/",
    "/stage1d/rebnconv1/",
    "/stage1d/rebnconv1d/",
    "/side1/",
)
for _scopes, _tag, _options in (
    ((), "", {}),
    (("/stage1d/rebnconvin/",), "", {}),
    (("/stage1d/rebnconvin/",), ", full bias corr.", {"fast_bias_correction": False}),
    (("/stage1d/rebnconvin/",), ", minmax", {"activations": "MINMAX"}),
    (("/stage1/rebnconvin/",), "", {}),
    (("/stage1/rebnconv1d/",), " (graph v3)", {}),
    (("/stage1/rebnconvin/", "/stage1/rebnconv1d/"), "", {}),
    (("/stage1/rebnconvin/", "/stage1/rebnconv1d/"), ", +quarters", {"crops": True}),
    (("/stage1d/rebnconvin/",), ", +quarters", {"crops": True}),
    (("/stage1d/rebnconvin/",), ", split", {"split": True}),
):
    _name = "+".join(scope.strip("/").replace("/rebnconv", ".") for scope in _scopes) or "none (graph v2)"
    NNCF_VARIANTS[f"openvino int8 NNCF, 512px fp32 but {_name}{_tag}"] = (
        "fp32-512-but-" + "".join(c if c.isalnum() else "-" for c in _name + _tag),
        tuple(scope for scope in EIGHT_512PX if scope not in _scopes),
        _options,
    )


for _scopes in ((), ("/conv_in/", "/side1/"), ("/stage1/rebnconvin/",)):  # the job's: isnet.FP32_SCOPES
    _name = "+".join(scope.strip("/").replace("/rebnconv", ".") for scope in _scopes) or "none"
    NNCF_VARIANTS[f"openvino int8 NNCF, split, fp32 {_name}"] = (
        "split-fp32-" + "".join(c if c.isalnum() else "-" for c in _name),
        _scopes,
        {"split": True},
    )


def torch_model() -> Run:
    """IS-Net in torch as dreamfocus runs it with --runtime torch (channels-last, oneDNN)."""
    model = ISNet(device="cpu", runtime="torch", batch_size=1)
    import torch

    return lambda x: model._forward(torch.from_numpy(x)).numpy()[0]


class NnpackSideBySide:
    """IS-Net as a job runs it with --runtime nnpack (NCHW, NNPACK's Winograd convolutions):
    CPU_STREAMS copies of the photo at once, on a thread each where the cores allow
    (winograd.streams), timed per photo. It is the process's only NNPACK runtime, because the
    first NNPACK call sizes NNPACK's one thread pool for every later one."""

    photos_at_once = CPU_STREAMS

    def __init__(self) -> None:
        self.model = ISNet(device="cpu", runtime="nnpack", batch_size=CPU_STREAMS)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        import torch

        def forward(x: np.ndarray) -> np.ndarray:
            return self.model._forward(torch.from_numpy(x)).numpy()[0]

        copies = [x] * self.photos_at_once
        streams = self.model._streams
        return list(streams.map(forward, copies) if streams else map(forward, copies))[0]


def dreamfocus_int8_graph() -> Path:
    """The int8 graph --runtime openvino-int8 runs (made into the cache if it is not there)."""
    weights = Path(resolve_weights(ISNet, None))
    digest = weights_digest(weights)
    return quantized_model(derived_model(weights, digest, "fp32"), digest)


def dreamfocus_openvino(runtime: str) -> Run:
    """IS-Net as dreamfocus runs it with --runtime openvino or openvino-int8."""
    model = ISNet(device="cpu", runtime=runtime, batch_size=1)
    return lambda x: model._run_openvino([x[0]])[0]


def candidates(graph: Path, calibration: list[np.ndarray], workdir: Path) -> dict[str, Callable[[], Run]]:
    """Name -> how to build it (built only when asked for and its packages are here)."""
    made = {
        "onnxruntime fp32 (baseline)": lambda: ort_session(graph),
        "onnxruntime fp32 opt=basic": lambda: ort_session(graph, "basic"),
        "onnxruntime fp32 opt=extended": lambda: ort_session(graph, "extended"),
        "onnxruntime fp32 opt=disabled": lambda: ort_session(graph, "disabled"),
        "onnxruntime fp32 1 thread": lambda: ort_session(graph, threads=1),
        "onnxruntime fp32 parallel": lambda: ort_session(graph, parallel=True),
        "onnxruntime int8 dynamic": lambda: ort_session(quantized_ort(graph, calibration, workdir, static=False)),
        "onnxruntime int8 static QDQ": lambda: ort_session(quantized_ort(graph, calibration, workdir, static=True)),
        "openvino fp32 (--runtime openvino)": lambda: dreamfocus_openvino("openvino"),
        "openvino fp32 throughput hint": lambda: openvino_model(graph, hint="THROUGHPUT"),
        "openvino int8 static QDQ": lambda: openvino_model(quantized_ort(graph, calibration, workdir, static=True)),
        "openvino int8 (--runtime openvino-int8)": lambda: dreamfocus_openvino("openvino-int8"),
        "openvino int8 (--runtime openvino-int8) pinned": lambda: openvino_model(
            dreamfocus_int8_graph(), ENABLE_CPU_PINNING=True
        ),
        "openvino int8 (--runtime openvino-int8) throughput": lambda: openvino_model(
            dreamfocus_int8_graph(), hint="THROUGHPUT", ENABLE_CPU_PINNING=False
        ),
        "openvino int8 (--runtime openvino-int8) 1 thread": lambda: openvino_model(
            dreamfocus_int8_graph(), threads=1, ENABLE_CPU_PINNING=False
        ),
        "torch fp32 channels-last": torch_model,
        f"torch fp32 nnpack, {CPU_STREAMS} photos at once (--runtime nnpack)": NnpackSideBySide,
    }
    for name, (tag, scopes, options) in NNCF_VARIANTS.items():
        made[name] = functools.partial(
            lambda *a, **kw: openvino_model(quantized_openvino(*a, **kw)),
            graph,
            calibration,
            workdir,
            tag,
            scopes,
            **options,
        )
    return made


def iou(a: np.ndarray, b: np.ndarray) -> float:
    fa, fb = a >= MASK_LEVEL, b >= MASK_LEVEL
    return float((fa & fb).sum() / max(1, (fa | fb).sum()))


def built(candidates: dict[str, Callable[[], Run]], only: list[str] | None) -> dict[str, Run]:
    """The candidates made (those named by ``only`` and the baseline, the first), in order; one
    whose package is missing is left out with a line saying so."""
    runs: dict[str, Run] = {}
    for name, build in candidates.items():
        if only and "baseline" not in name and not any(word in name for word in only):
            continue
        started = time.perf_counter()
        try:
            runs[name] = build()
        except ImportError as exc:
            print(f"{name}: left out ({exc})")
            continue
        print(f"{name}: ready in {time.perf_counter() - started:.1f} s", flush=True)
    return runs


def timed_rounds(
    runs: dict[str, Run], photos: dict[str, np.ndarray], rounds: int
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, list[float]]]:
    """Each run on each photo in turn, ``rounds`` times (load from elsewhere hits all alike):
    run -> photo -> its output, and run -> seconds of each call per photo (a call may run several)."""
    maps: dict[str, dict[str, np.ndarray]] = {name: {} for name in runs}
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():
        run(photos[next(iter(photos))])  # warm-up
    for round_ in range(rounds):
        for photo_name, x in photos.items():
            for name, run in runs.items():
                started = time.perf_counter()
                out = run(x)
                seconds[name].append((time.perf_counter() - started) / getattr(run, "photos_at_once", 1))
                maps[name][photo_name] = out
        print(f"round {round_ + 1} of {rounds} done", flush=True)
    return maps, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--scenes", type=int, default=4, help="generated scenes beside the examples")
    parser.add_argument("--only", nargs="*", help="runtimes whose name contains one of these (the baseline always)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "dreamfocus-bench-runtimes")
    parser.add_argument("--photos", type=Path, help="a folder of real photos none of the graphs was calibrated on")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)

    weights = Path(resolve_weights(ISNet, None))
    graph = derived_model(weights, weights_digest(weights), "fp32")
    examples = {p.name: rgb(p) for p in sorted(ROOT.glob("examples/*.jpg"))}
    scenes = {f"scene {seed}": scene(seed) for seed in range(args.scenes)}
    held_out = {p.name: rgb(p) for p in sorted(args.photos.glob("*.jpg"))} if args.photos else {}
    photos = {name: model_input(photo)[None] for name, photo in {**examples, **scenes, **held_out}.items()}
    calibration = calibration_inputs()  # what --runtime openvino-int8 is calibrated on

    runs = built(candidates(graph, calibration, args.workdir), args.only)
    baseline = next(iter(runs))
    maps, seconds = timed_rounds(runs, photos, args.rounds)

    print(
        f"\nIS-Net, {len(examples)} examples + {len(scenes)} generated scenes + {len(held_out)} held-out photos, "
        f"{args.rounds} rounds, "
        f"{cpu_threads()} threads; ratio: sum of times over the sum of the baseline's, same photos, same rounds"
    )
    print(
        f"{'runtime':42s} {'ms/photo':>9s} {'ratio':>6s} {'IoU ex':>7s} {'IoU sc':>7s} {'IoU ho':>7s} "
        f"{'map ho':>7s}  verdict (examples and scenes)"
    )
    base_total = sum(seconds[baseline])
    with_subject = [p for p in held_out if np.mean(maps[baseline][p] >= MASK_LEVEL) >= SUBJECT_SHARE]
    for name in runs:
        ious = {p: iou(maps[baseline][p], maps[name][p]) for p in [*examples, *scenes, *with_subject]}
        worst_examples = min(ious[p] for p in examples)
        worst_scenes = min((ious[p] for p in scenes), default=1.0)
        worst_held_out = min((ious[p] for p in with_subject), default=1.0)
        map_difference = max((float(np.abs(maps[baseline][p] - maps[name][p]).mean()) for p in held_out), default=0)
        verdict = "qualifies" if min(worst_examples, worst_scenes) >= QUALIFYING_IOU else "masks differ"
        print(
            f"{name:42s} {1000 * statistics.median(seconds[name]):9.0f} {sum(seconds[name]) / base_total:6.2f} "
            f"{worst_examples:7.4f} {worst_scenes:7.4f} {worst_held_out:7.4f} {map_difference:7.4f}  {verdict}"
        )
        below = ", ".join(f"{p} {v:.4f}" for p, v in ious.items() if v < QUALIFYING_IOU)
        if below:
            print("    below the line: " + below)


if __name__ == "__main__":
    main()
