"""GPU figures for the README: the models alone, then the GPU actor's work fed as the job feeds it.

    python scripts/bench_gpu.py [--device cuda] [--photos 500] [--size 4000x3000]
                                [--batch-sizes 1 8 16 32] [--workdir DIR] [--models-only] [--skip-job]
                                [--render-backends numpy torch]

1. Models alone: photos/s of IS-Net (1024x1024, torch, fp16 autocast on CUDA) and Depth Anything
   V2 Small (518 px), each and both in turn (the fused actor: saliency, then depth on the same
   batch), for each batch size. ``predict_tensors`` on photos already on the device, at the size
   of a model copy of --size; warm-up runs first, CUDA synchronised before the clock is read.
2. End to end without Ray: N synthetic JPEGs of --size (made once, kept under --workdir); a pool
   of CPU processes reads and prepares them in groups of 16 (the job's read stage), this process
   runs the job's model stage on each group as it arrives, a second pool finishes them (full
   decode, effect, encode, write to a local folder). Photos/s local disk to local disk, and how
   busy the GPU was (sampled through NVML or nvidia-smi).
   This is the numpy render backend's layout.
3. The same library with the GPU render path (the torch render backend), still without Ray: a
   pool of reader threads reads the bytes (in the job, Ray's object store hands them over in
   shared memory), this process does what the job's model actor then does (decode, both models,
   effect, encode, all on the device, ``ModelStage.render``), and a pool of writer threads writes
   the encoded bytes (the job's finishing tasks). Photos/s local disk to local disk, GPU busy share,
   and the device's seconds per photo by step. Then one call of the device path over four groups
   in four device batches: the share of the wall time each step was busy, from the batches' spans
   (over 100 % together: a batch decoded while the one before is in the models).
4. With Ray importable, and real IS-Net weights (the job loads models by name): the same library
   through ``pipeline.job.run_job``.

Weights are random on the real architectures (the same arithmetic, so the same time, as the
published weights) unless real ones are in the dreamfocus cache; the output says which. With
random weights the maps handed to the effect in steps 2 and 3 are those of the trivial models (a
centred subject, a depth ramp), so the CPU stages do the work that a real photo costs.

Needs torch, transformers, OpenCV, Pillow, PyArrow and fsspec; Ray only for step 4.
Targets (printed next to the figures, never enforced): models at least 150 photos/s on one H100;
the whole job at least 40 photos/s with 16 CPU cores, and at least 150 photos/s with the GPU
render path (one H100, 16 CPU cores).
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import statistics
import sys
import threading
import time
import types
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, ThreadPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Self

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _allow_missing_heif() -> bool:
    """pipeline.photo_io imports pillow_heif for HEIC input; a bare GPU image may lack it. The
    benchmark reads JPEGs only, so an empty stand-in lets it run (True when one was needed)."""
    try:
        import pillow_heif  # noqa: F401

        return False
    except ImportError:
        sys.modules["pillow_heif"] = types.SimpleNamespace(register_heif_opener=lambda: None)
        return True


HEIF_STUBBED = _allow_missing_heif()  # at import: worker processes import this module too

from pipeline.batches import pack_depth, pack_saliency, unpack_map
from pipeline.job.driver import GROUP_SIZE, model_call_rows, model_layout  # no Ray until run_job
from pipeline.job.plan import JobConfig
from pipeline.job.stages import ModelStage, read_photos, render_and_write
from pipeline.models import create_model
from pipeline.photo import MODEL_INPUT_SIZE, RenderSettings, SceneModels
from pipeline.storage import Storage

TARGET_MODELS = "150 photos/s (both models, one H100)"
TARGET_JOB = "40 photos/s (16 CPU cores)"
TARGET_DEVICE_JOB = "150 photos/s (GPU render path, one H100, 16 CPU cores)"
LIBRARY_VERSION = 1  # of synthetic_photo(): bump to make the cached photos again
RANDOM = "random-init"  # the version of a model built with random weights


# ------------------------------------------------------------------------------------ models


@dataclass
class Models:
    saliency: object
    depth: object
    weights: str  # which weights, in words


def build_models(device: str, batch_size: int, random_weights: bool, tiny: bool, isnet_runtime: str | None) -> Models:
    """IS-Net and Depth Anything V2 Small: the cached weights when found (and not refused),
    else random weights on the real architectures; ``tiny``: small networks, for tests."""
    import torch

    from pipeline.models.depth_anything import DepthAnythingV2Small
    from pipeline.models.isnet import ISNet
    from pipeline.models.rsu import FULL, SMALL, ISNetNetwork

    torch.manual_seed(0)
    words = []
    isnet_file = None if random_weights or tiny else ISNet.local_weights()
    if isnet_file is not None:
        saliency = ISNet(weights=str(isnet_file), device=device, batch_size=batch_size, runtime=isnet_runtime)
        words.append(f"IS-Net real ({isnet_file})")
    else:
        saliency = ISNet.from_network(
            ISNetNetwork(SMALL if tiny else FULL), device=device, batch_size=batch_size, size=256 if tiny else None
        )
        words.append("IS-Net random" + (" (small network)" if tiny else ""))
    depth_dir = None if random_weights or tiny else DepthAnythingV2Small.local_weights()
    # torch where the device path is measured, and for the small networks, whose input size is
    # set after loading (an OpenVINO graph is compiled for one size); else the job's own choice.
    depth_runtime = "torch" if tiny or isnet_runtime == "torch" else None
    if depth_dir is not None:
        depth = DepthAnythingV2Small(
            weights=str(depth_dir), device=device, batch_size=batch_size, runtime=depth_runtime
        )
        words.append(f"Depth Anything V2 Small real ({depth_dir})")
    else:
        depth = DepthAnythingV2Small.from_config(
            DepthAnythingV2Small.small_config() if tiny else None,
            device=device,
            batch_size=batch_size,
            runtime=depth_runtime,
        )
        words.append("Depth Anything V2 Small random" + (" (small network)" if tiny else ""))
    if tiny:  # a small input too: the same code paths in a fraction of the time
        depth.size = 126
    return Models(saliency, depth, "; ".join(words))


def model_copy_shape(width: int, height: int) -> tuple[int, int]:
    """(height, width) of the model copy that pipeline.photo.prepare makes of such a photo."""
    scale = min(1.0, MODEL_INPUT_SIZE / max(width, height))
    return max(1, round(height * scale)), max(1, round(width * scale))


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


def seconds_per_call(fn, device: str, warmup: int, repeat: int, min_seconds: float) -> float:
    """Median seconds of ``fn`` after ``warmup`` calls: at least ``repeat`` timed calls, more
    until ``min_seconds`` have passed (short GPU calls need many to be read reliably)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < repeat or time.perf_counter() - started < min_seconds:
        t0 = time.perf_counter()
        fn()
        synchronize(device)  # the GPU runs asynchronously: wait for it before reading the clock
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_models_alone(
    models: Models,
    device: str,
    batch_sizes: list[int],
    photo_hw: tuple[int, int],
    warmup: int,
    repeat: int,
    min_seconds: float,
) -> dict[str, dict[int, str]]:
    """Photos/s of saliency, depth and both in turn, per batch size, on device tensors."""
    import torch

    torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick its kernels once
    sal, dep = models.saliency, models.depth
    if not getattr(sal, "accepts_tensors", False):
        raise SystemExit(f"{sal.describe()} has no device path; the model benchmark needs the torch runtime")
    rows: dict[str, dict[int, str]] = {"saliency": {}, "depth": {}, "both": {}}
    generator = torch.Generator().manual_seed(0)
    for b in batch_sizes:
        sal.batch_size = dep.batch_size = b
        photos = [
            torch.randint(0, 256, (*photo_hw, 3), dtype=torch.uint8, generator=generator).to(device) for _ in range(b)
        ]
        runs = {
            "saliency": lambda x=photos: sal.predict_tensors(x),
            "depth": lambda x=photos: dep.predict_tensors(x),
            # the fused actor: both models on one batch, depth given the saliency maps
            "both": lambda x=photos: dep.predict_tensors(x, saliency=sal.predict_tensors(x)),
        }
        for name, fn in runs.items():
            try:
                rows[name][b] = f"{b / seconds_per_call(fn, device, warmup, repeat, min_seconds):.1f}"
            except torch.cuda.OutOfMemoryError:
                rows[name][b] = "OOM"
                torch.cuda.empty_cache()
        print(f"  batch {b:3d}: " + ", ".join(f"{k} {v[b]}" for k, v in rows.items()), flush=True)
    return rows


# ---------------------------------------------------------------------------- the library


def synthetic_photo(width: int, height: int, seed: int) -> np.ndarray:
    """Coloured shapes with texture and grain, so a 12-MP JPEG is a few MB, as a phone's is."""
    rng = np.random.default_rng(seed)
    # large shapes (sky, ground, things): a coarse colour field, smoothly enlarged
    coarse = rng.integers(0, 256, (max(2, height // 300), max(2, width // 300), 3), dtype=np.uint8)
    image = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    # texture (foliage, fabric) and sensor grain, in brightness
    texture = cv2.resize(
        rng.integers(0, 61, (max(1, height // 6), max(1, width // 6)), dtype=np.uint8),
        (width, height),
        interpolation=cv2.INTER_LINEAR,
    )
    texture += rng.integers(0, 13, (height, width), dtype=np.uint8)
    image = cv2.add(image, cv2.merge([texture] * 3))
    return cv2.subtract(image, (36, 36, 36, 0))


def write_photo(path: str, width: int, height: int, seed: int) -> int:
    image = synthetic_photo(width, height, seed)
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])
    if not ok:  # pragma: no cover
        raise RuntimeError(f"could not encode {path}")
    tmp = f"{path}.partial"
    with open(tmp, "wb") as f:
        f.write(data.tobytes())
    os.replace(tmp, path)  # a run stopped midway leaves no truncated photo under the final name
    return len(data)


def make_library(folder: Path, count: int, width: int, height: int, workers: int) -> list[str]:
    """``count`` JPEGs under ``folder`` (those already there are kept); their relative paths."""
    folder.mkdir(parents=True, exist_ok=True)
    relpaths = [f"photo_{i:05d}.jpg" for i in range(count)]
    missing = [(i, r) for i, r in enumerate(relpaths) if not (folder / r).is_file()]
    if missing:
        t0 = time.perf_counter()
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            list(
                pool.map(
                    write_photo,
                    [str(folder / r) for _, r in missing],
                    [width] * len(missing),
                    [height] * len(missing),
                    [i for i, _ in missing],
                )
            )
        print(f"  made {len(missing)} photos in {time.perf_counter() - t0:.1f} s", flush=True)
    return relpaths


# --------------------------------------------------------------------- GPU busy sampling


class GpuBusy:
    """The GPU's utilisation (% of time a kernel ran), sampled in a thread while running."""

    def __init__(self, device: str) -> None:
        self.samples: list[float] = []
        self.missed = 0
        self._stop = threading.Event()
        self._read, self._interval = self._reader(device)
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _reader(device: str):
        """A function reading the utilisation now and how often to call it; (None, 0) on a CPU."""
        if not device.startswith("cuda"):
            return None, 0.0
        index = int(device.split(":", 1)[1]) if ":" in device else 0
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
        if visible[0].strip().isdigit():  # CUDA's numbering counts the visible GPUs only
            index = int(visible[min(index, len(visible) - 1)])
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            return lambda: float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu), 0.2
        except Exception:  # noqa: BLE001 - no pynvml, or no NVML library: ask nvidia-smi
            import subprocess

            if shutil.which("nvidia-smi") is None:
                return None, 0.0
            command = ["nvidia-smi", f"--id={index}", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]
            return lambda: float(
                subprocess.run(command, capture_output=True, text=True, timeout=5, check=True).stdout.split()[0]
            ), 0.5

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.samples.append(self._read())
            except Exception:  # noqa: BLE001 - a missed sample is no reason to stop the benchmark
                self.missed += 1

    def __enter__(self) -> Self:
        if self._read is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def share(self) -> str:
        if self._read is None:
            return "n/a"
        return f"{statistics.mean(self.samples):.0f} %" if self.samples else "no samples"


# ------------------------------------------------------------------- end to end, no Ray


def read_group(relpaths: list[str], input_dir: str, max_megapixels: float) -> dict:
    """The job's read stage on one group, in a worker process."""
    batch = {"relpath": np.array(relpaths, dtype=object), "output_relpath": np.array(relpaths, dtype=object)}
    batch = read_photos(batch, input_dir, {}, max_megapixels)
    # The bytes do not pass through the model process: Ray's object store would hand them to the
    # finishing task in shared memory, here the finishing worker reads them again (page cache).
    del batch["data"]
    return batch


def finish_group(batch: dict, config: JobConfig, stand_ins: tuple[str, ...]) -> dict:
    """The job's finish stage on one group, in a worker process: decode, effect, encode, write."""
    inputs = Storage(config.input)
    batch["data"] = np.array(
        [inputs.read_bytes(r) if s == "ok" else b"" for r, s in zip(batch["relpath"], batch["status"])], dtype=object
    )
    if stand_ins:  # random weights give meaningless maps; the effect gets a plausible scene
        replace_maps(batch, stand_ins)
    batch = render_and_write(batch, config)
    for heavy in ("data", "saliency", "depth"):
        batch.pop(heavy, None)
    return batch


_STAND_INS: dict[str, object] = {}


def replace_maps(batch: dict, tasks: tuple[str, ...]) -> None:
    """The ``tasks``' maps ("saliency", "depth") replaced by the trivial models' (a centred
    subject, a depth ramp) at the same size."""
    if not _STAND_INS:
        _STAND_INS.update(
            saliency=(create_model("trivial-saliency"), pack_saliency),
            depth=(create_model("trivial-depth"), pack_depth),
        )
    for i, status in enumerate(batch["status"]):
        if status != "ok":
            continue
        blank = np.zeros((*unpack_map(batch["saliency"][i]).shape, 3), np.uint8)
        for task in tasks:
            model, pack = _STAND_INS[task]
            batch[task][i] = pack(model.predict([blank])[0])


def _ready(_) -> int:
    return os.getpid()


class StandInScene(SceneModels):
    """On the device path: the models run (for their time), and the effect gets the trivial
    models' maps (a centred subject, a depth ramp) for the tasks in ``stand_ins``. Random weights
    give no clear subject: every photo would be left alone and the effect never measured."""

    stand_ins: tuple[str, ...] = ()

    def predict_on_device(self, copies, mark=lambda step: None):
        import torch

        maps = dict(zip(("saliency", "depth"), super().predict_on_device(copies, mark)))
        for task in self.stand_ins:
            model = create_model(f"trivial-{task}")
            blanks = [np.zeros((c.shape[0], c.shape[1], 3), np.uint8) for c in copies]
            maps[task] = [torch.from_numpy(m).to(c.device) for m, c in zip(model.predict(blanks), copies)]
        return maps["saliency"], maps["depth"]


class BenchModelStage(ModelStage):
    """The job's model stage around models built here (random weights cannot be named to
    ModelStage's own constructor); ``predict`` and ``render`` are the stage's own."""

    def __init__(
        self,
        models: Models,
        device: str,
        batch_size: int,
        on_device: RenderSettings | None = None,
        stand_ins: tuple[str, ...] = (),
    ) -> None:
        self.models = StandInScene.from_models(models.saliency, models.depth)
        self.models.stand_ins = stand_ins
        self.models.batch_size = batch_size
        self.on_device = on_device


@dataclass
class EndToEnd:
    photos: int
    seconds: float
    gpu_busy: str
    model_seconds: float  # in the model stage (this process)
    statuses: dict[str, int]
    cpu: dict[str, float]  # seconds per photo by step, summed over the workers
    first_error: str = ""
    render_paths: dict[str, int] | None = None  # photos per render path (the GPU render path's run)

    @property
    def rate(self) -> float:
        return self.photos / self.seconds


def run_end_to_end(
    stage: ModelStage,
    input_dir: Path,
    relpaths: list[str],
    output_dir: Path,
    device: str,
    workers: int,
    stand_ins: tuple[str, ...],
) -> EndToEnd:
    """Groups of GROUP_SIZE photos: read and prepared by one pool, through the model stage here,
    finished by a second pool, all at once as the job streams them."""
    shutil.rmtree(output_dir, ignore_errors=True)
    config = JobConfig(input=str(input_dir), output=str(output_dir), device=device)
    groups = [relpaths[i : i + GROUP_SIZE] for i in range(0, len(relpaths), GROUP_SIZE)]
    spawn = get_context("spawn")  # no fork of a process that holds CUDA and torch's threads
    with (
        ProcessPoolExecutor(workers, mp_context=spawn) as readers,
        ProcessPoolExecutor(workers, mp_context=spawn) as finishers,
    ):
        # Start every worker (imports included) and warm the model stage before the clock starts.
        for pool in (readers, finishers):
            list(pool.map(_ready, range(workers * 2)))
        first = read_group(groups[0], str(input_dir), config.max_megapixels)
        for _ in range(2):  # cuDNN and oneDNN pick and build their kernels on the first calls
            stage.predict(dict(first))
        synchronize(device)

        read_ahead, finish_backlog = 2 * workers, 2 * workers  # bounded, as Ray Data's backpressure
        pending = iter(groups)
        reading: set = set()
        finishing: set = set()
        results: list[dict] = []
        model_seconds = 0.0

        def refill() -> None:
            while len(reading) < read_ahead:
                group = next(pending, None)
                if group is None:
                    return
                reading.add(readers.submit(read_group, group, str(input_dir), config.max_megapixels))

        def collect(done) -> None:
            for fut in done:
                finishing.discard(fut)
                results.append(fut.result())

        with GpuBusy(device) as busy:
            started = time.perf_counter()
            refill()
            while reading:
                done, _ = wait(reading, return_when=FIRST_COMPLETED)
                for fut in done:
                    reading.discard(fut)
                    refill()
                    t0 = time.perf_counter()
                    batch = stage.predict(fut.result())
                    model_seconds += time.perf_counter() - t0
                    del batch["model_copy"]  # not needed after the models (the job drops it too)
                    while len(finishing) >= finish_backlog:
                        collect(wait(finishing, return_when=FIRST_COMPLETED)[0])
                    finishing.add(finishers.submit(finish_group, batch, config, stand_ins))
            collect(wait(finishing)[0])
            seconds = time.perf_counter() - started

    statuses, per_photo, first_error = tally(results, ("read", "decode", "effect", "encode", "write"))
    return EndToEnd(len(relpaths), seconds, busy.share(), model_seconds, statuses, per_photo, first_error)


def tally(results: list[dict], steps: tuple[str, ...]) -> tuple[dict[str, int], dict[str, float], str]:
    """Photos by status, seconds per photo of each step, and the first failure's error."""
    statuses: dict[str, int] = {}
    first_error = ""
    totals = dict.fromkeys(steps, 0.0)
    for batch in results:
        for i, status in enumerate(batch["status"]):
            statuses[status] = statuses.get(status, 0) + 1
            if status == "failed" and not first_error:
                first_error = str(batch["error"][i])
        for step in steps:
            totals[step] += float(np.sum(batch[f"seconds_{step}"]))
    n = sum(statuses.values())
    return statuses, {step: total / n for step, total in totals.items()}, first_error


def run_device_end_to_end(
    stage: ModelStage,
    input_dir: Path,
    relpaths: list[str],
    output_dir: Path,
    device: str,
    workers: int,
    call_rows: int,
) -> EndToEnd:
    """Calls of ``call_rows`` photos, as the job makes them: bytes read by reader threads,
    decoded, run through the models, rendered and encoded on the device here (the model actor's
    ``render``, its device batches overlapped), written by writer threads; all at once, as the
    job streams them."""
    shutil.rmtree(output_dir, ignore_errors=True)
    config = JobConfig(input=str(input_dir), output=str(output_dir), device=device, render_backend="torch")
    groups = [relpaths[i : i + call_rows] for i in range(0, len(relpaths), call_rows)]

    def read(group: list[str]) -> dict:
        batch = {"relpath": np.array(group, dtype=object), "output_relpath": np.array(group, dtype=object)}
        return read_photos(batch, str(input_dir), {}, config.max_megapixels, model_copy=False)

    def write(batch: dict) -> dict:
        batch = render_and_write(batch, config)
        for heavy in ("data", "encoded", "saliency", "depth"):
            batch.pop(heavy, None)
        return batch

    with ThreadPoolExecutor(workers) as readers, ThreadPoolExecutor(workers) as writers:
        first = read(groups[0])
        for _ in range(2):  # nvJPEG, cuDNN and the allocator set themselves up on the first calls
            stage.render(dict(first))
        synchronize(device)
        read_ahead, write_backlog = 4, 2 * workers  # bounded, as Ray Data's backpressure
        pending = iter(groups)
        reading: list = []
        writing: set = set()
        results: list[dict] = []
        device_seconds = 0.0

        def collect(done) -> None:
            for fut in done:
                writing.discard(fut)
                results.append(fut.result())

        with GpuBusy(device) as busy:
            started = time.perf_counter()
            for group in itertools.islice(pending, read_ahead):
                reading.append(readers.submit(read, group))
            while reading:
                batch = reading.pop(0).result()  # in order: a group at a time, as the actor takes them
                group = next(pending, None)
                if group is not None:
                    reading.append(readers.submit(read, group))
                t0 = time.perf_counter()
                batch = stage.render(batch)
                device_seconds += time.perf_counter() - t0
                while len(writing) >= write_backlog:
                    collect(wait(writing, return_when=FIRST_COMPLETED)[0])
                writing.add(writers.submit(write, batch))
            collect(wait(writing)[0])
            seconds = time.perf_counter() - started

    statuses, per_photo, first_error = tally(
        results, ("read", "decode", "saliency", "depth", "effect", "encode", "write")
    )
    paths = dict(Counter(str(path or "none") for batch in results for path in batch["render_path"]))
    return EndToEnd(len(relpaths), seconds, busy.share(), device_seconds, statuses, per_photo, first_error, paths)


def measure_overlap(
    models: SceneModels, settings: RenderSettings, input_dir: Path, relpaths: list[str], device: str, call_rows: int
) -> str:
    """One render_on_device call of the job's size (device batches of a model batch each): how
    much of the wall time each step was busy (from the batches' spans); over 100 % together means
    steps of different batches ran at once (a batch decoded while the one before is in the models)."""
    from pipeline.device_render import busy_share, render_on_device

    datas = [(input_dir / relpath).read_bytes() for relpath in relpaths[:call_rows]]
    render_on_device(datas[: models.batch_size], settings, device, models=models)  # warm-up
    synchronize(device)
    trace: list = []
    started = time.perf_counter()
    render_on_device(datas, settings, device, models=models, trace=trace)
    seconds = time.perf_counter() - started
    shares = {
        "decode": busy_share(trace, ("decode",)),
        "models": busy_share(trace, ("saliency", "depth")),
        "effect": busy_share(trace, ("effect",)),
        "models + effect": busy_share(trace),
        "encode": busy_share(trace, ("encode",)),
    }
    busy = ", ".join(f"{step} {100 * share:.0f} %" for step, share in shares.items())
    return (
        f"{len(datas)} photos in {len(trace)} device batches, one call: {len(datas) / seconds:.1f} photos/s; "
        f"busy share of the wall time: {busy}"
    )


def measure_subject_decisions(
    settings: RenderSettings, input_dir: Path, relpaths: list[str], device: str, batch: int
) -> str:
    """What the subject decisions (a host copy of the working-size photo and maps, then OpenCV's
    watershed and connected components per photo) cost a device batch of ``batch`` photos, beside
    the whole effect on it: the time the effect's thread waits on them, which the overlap hides
    from the models as long as the effect keeps up with them."""
    import torch

    from pipeline import effect_torch
    from pipeline.device_render import decode_jpegs, model_copy

    dev = torch.device(device)
    params = settings.params
    photos = decode_jpegs([(input_dir / relpath).read_bytes() for relpath in relpaths[:batch]], dev)
    stack = torch.stack([p for p in photos if isinstance(p, torch.Tensor)])
    height, width = stack.shape[-2:]
    size = effect_torch.working_size(height, width, params)
    work_photo = effect_torch.downscale(stack, size.factor)
    copy_h, copy_w = model_copy(stack[0]).shape[:2]
    yy, xx = torch.meshgrid(
        torch.linspace(-1, 1, copy_h, device=dev), torch.linspace(-1, 1, copy_w, device=dev), indexing="ij"
    )
    fg = ((yy**2 + (xx / 0.6) ** 2) < 0.5).to(torch.float32).expand(len(stack), -1, -1).contiguous()
    depth = (yy + 1.0 + 0.3 * fg).contiguous()
    measured = [True] * len(stack)

    def decisions() -> None:
        effect_torch.subject_decisions(work_photo, fg, depth, params, measured)

    def whole_effect() -> None:
        effect_torch.render(stack, fg, depth, params, True)

    with torch.inference_mode():
        deciding = seconds_per_call(decisions, device, 1, 3, 0.0)
        rendering = seconds_per_call(whole_effect, device, 1, 3, 0.0)
    return (
        f"{1000 * deciding / len(stack):.1f} ms a photo ({100 * deciding / rendering:.0f} % of the effect's "
        f"{1000 * rendering / len(stack):.1f} ms), batch {len(stack)} at working size {size.width}x{size.height}"
    )


# ----------------------------------------------------------------------------- the job


def run_real_job(input_dir: Path, output_dir: Path, device: str) -> str:
    """The library through pipeline.job.run_job (Ray); a line of figures, or why it was skipped."""
    try:
        import ray
    except ImportError:
        return "skipped: Ray is not installed here"
    from pipeline.manifest import MANIFEST_DIR, read_manifest
    from pipeline.models.isnet import ISNet

    if ISNet.local_weights() is None:
        return "skipped: the job loads models by name and IS-Net's weights are not cached"
    from pipeline.job import run_job

    shutil.rmtree(output_dir, ignore_errors=True)
    config = JobConfig(
        input=str(input_dir), output=str(output_dir), force=True, device="cpu" if device == "cpu" else None
    )
    try:
        summary = run_job(config)
    finally:
        ray.shutdown()
    rows = read_manifest(Storage(f"{output_dir}/{MANIFEST_DIR}"), ["run_id", "saliency_model", "depth_model"])
    rows = rows.filter(rows["run_id"].to_numpy(zero_copy_only=False) == summary.run_id).to_pydict()
    used = sorted(set(rows["saliency_model"]) | set(rows["depth_model"]))
    done = sum(summary.counts.values())
    counts = ", ".join(f"{k} {v}" for k, v in sorted(summary.counts.items()))
    return (
        f"{done / summary.processing_seconds:.1f} photos/s processing, "
        f"{done / summary.seconds:.1f} with start-up ({counts}; models: {', '.join(used)})"
    )


# ------------------------------------------------------------------------------ report


def device_line(device: str, workers: int) -> str:
    import torch

    if device.startswith("cuda"):
        name = f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    else:
        name = "CPU (no GPU)"
    return f"device: {name} | torch {torch.__version__} | {workers} CPU workers"


def print_model_table(
    rows: dict[str, dict[int, str]], batch_sizes: list[int], models: Models, photo_hw: tuple[int, int]
) -> None:
    print(f"\nModels alone, photos/s (device tensors of {photo_hw[1]}x{photo_hw[0]}, the model copy of one photo):")
    sal, dep = models.saliency, models.depth
    labels = {
        "saliency": f"{sal.name} ({sal.runtime}, {sal.size}x{sal.size})",
        "depth": f"{dep.name} ({dep.runtime}, {dep.size} px)",
        "both": "both in turn (the fused actor)",
    }
    width = max(len(v) for v in labels.values())
    print(f"  {'':{width}s} " + "".join(f"{'b' + str(b):>9s}" for b in batch_sizes) + "   target")
    for key, label in labels.items():
        cells = "".join(f"{rows[key].get(b, '-'):>9s}" for b in batch_sizes)
        print(f"  {label:{width}s} {cells}   {'>= ' + TARGET_MODELS if key == 'both' else ''}")


def print_end_to_end(result: EndToEnd, width: int, height: int, workers: int) -> None:
    statuses = ", ".join(f"{k} {v}" for k, v in sorted(result.statuses.items()))
    print(
        f"\nEnd to end without Ray, local disk to local disk ({result.photos} photos of {width}x{height}, "
        f"{workers} read + {workers} finish processes, groups of {GROUP_SIZE}):"
    )
    print(f"  {result.rate:.1f} photos/s ({result.seconds:.1f} s; {statuses})   target >= {TARGET_JOB}")
    print(
        f"  GPU busy {result.gpu_busy}; model stage busy {100 * result.model_seconds / result.seconds:.0f} % "
        f"of the run ({result.photos / result.model_seconds:.1f} photos/s while running)"
    )
    cpu = result.cpu
    per_photo = sum(cpu.values())
    print(
        f"  CPU s/photo: read {cpu['read']:.3f}, decode {cpu['decode']:.3f} (model copy + full), "
        f"effect {cpu['effect']:.3f}, encode {cpu['encode']:.3f}, write {cpu['write']:.3f}; "
        f"total {per_photo:.3f} -> {per_photo * 40:.1f} busy cores for 40 photos/s"
    )
    if result.first_error:
        print(f"  first failure: {result.first_error}")


def print_device_end_to_end(
    result: EndToEnd, width: int, height: int, workers: int, device: str, call_rows: int
) -> None:
    statuses = ", ".join(f"{k} {v}" for k, v in sorted(result.statuses.items()))
    paths = ", ".join(f"{k} {v}" for k, v in sorted((result.render_paths or {}).items()))
    print(
        f"\nEnd to end with the GPU render path, without Ray, local disk to local disk ({result.photos} photos of "
        f"{width}x{height}; {workers} reader + {workers} writer threads; decode, models, effect, encode on {device} "
        f"in this process, calls of {call_rows}):"
    )
    print(f"  {result.rate:.1f} photos/s ({result.seconds:.1f} s; {statuses})   target >= {TARGET_DEVICE_JOB}")
    print(
        f"  GPU busy {result.gpu_busy}; device stage busy {100 * result.model_seconds / result.seconds:.0f} % "
        f"of the run ({result.photos / result.model_seconds:.1f} photos/s while running); render paths: {paths}"
    )
    s = result.cpu
    print(
        f"  device s/photo: decode {s['decode']:.4f}, saliency {s['saliency']:.4f}, depth {s['depth']:.4f}, "
        f"effect {s['effect']:.4f}, "
        f"encode {s['encode']:.4f}; host s/photo: read {s['read']:.4f}, write {s['write']:.4f}"
    )
    if result.first_error:
        print(f"  first failure: {result.first_error}")


# -------------------------------------------------------------------------------- main


def parse_size(text: str) -> tuple[int, int]:
    width, height = (int(v) for v in text.lower().split("x"))
    return width, height


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when there is one)")
    parser.add_argument("--photos", type=int, default=500, help="photos in the end-to-end library")
    parser.add_argument(
        "--size", type=parse_size, default=(4000, 3000), metavar="WxH", help="photo size (default 4000x3000, 12 MP)"
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 16, 32])
    parser.add_argument(
        "--workdir", type=Path, default=Path("/tmp/dreamfocus-bench-gpu"), help="photos (kept for reruns) and outputs"
    )
    parser.add_argument(
        "--model-batch-size", type=int, default=None, help="steps 2 and 3: photos a model batch (default: the job's)"
    )
    parser.add_argument("--workers", type=int, default=None, help="processes per CPU pool (default: CPU count)")
    parser.add_argument("--models-only", action="store_true", help="step 1 only")
    parser.add_argument("--skip-job", action="store_true", help="no step 4 (the Ray job)")
    parser.add_argument(
        "--render-backends",
        nargs="+",
        choices=("numpy", "torch"),
        default=["numpy", "torch"],
        help="end-to-end runs: numpy (step 2, CPU finishing) and/or torch (step 3, the GPU render path)",
    )
    parser.add_argument("--random-weights", action="store_true", help="random weights even where real ones are cached")
    parser.add_argument(
        "--tiny-models",
        action="store_true",
        help="small networks of the same structure, for tests (the figures mean nothing)",
    )
    parser.add_argument("--repeat", type=int, default=None, help="timed calls per figure (default: 5 GPU, 1 CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="calls before timing (default: 3 GPU, 2 CPU)")
    args = parser.parse_args(argv)

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.startswith("cuda")
    workers = args.workers or len(os.sched_getaffinity(0))
    width, height = args.size
    photo_hw = model_copy_shape(width, height)
    repeat = args.repeat or (5 if gpu else 1)
    warmup = args.warmup if args.warmup is not None else (3 if gpu else 2)

    print(device_line(device, workers))
    if HEIF_STUBBED:
        print("note: pillow_heif is not installed; HEIC decoding is off (the benchmark reads JPEGs only)")

    # 1. models alone: the IS-Net torch runtime is what has a device path
    models = build_models(device, max(args.batch_sizes), args.random_weights, args.tiny_models, "torch")
    print(f"weights: {models.weights}")
    print(f"\n1. models alone ({warmup} warm-up, median of >= {repeat} timed calls per figure)", flush=True)
    rows = measure_models_alone(models, device, args.batch_sizes, photo_hw, warmup, repeat, 1.0 if gpu else 0.0)
    print_model_table(rows, args.batch_sizes, models, photo_hw)
    if args.models_only:
        return 0
    del models
    if gpu:
        torch.cuda.empty_cache()

    # 2. end to end without Ray: the models as the job's actor holds them (its runtime choice)
    library = args.workdir / f"library-{width}x{height}-v{LIBRARY_VERSION}"
    print(f"\n2. end to end without Ray: library {library}", flush=True)
    relpaths = make_library(library, args.photos, width, height, workers)
    job = JobConfig(input=str(library), output=str(args.workdir), model_batch_size=args.model_batch_size)
    layout = model_layout(job, 1 if gpu else 0)
    models = build_models(device, layout.batch_size, args.random_weights, args.tiny_models, None)
    stand_ins = tuple(
        task for task, model in (("saliency", models.saliency), ("depth", models.depth)) if model.version == RANDOM
    )
    if "numpy" in args.render_backends:
        stage = BenchModelStage(models, device, layout.batch_size)
        print(f"  model stage: {'; '.join(stage.models.describe())}, batch {layout.batch_size}", flush=True)
        if stand_ins:
            print(f"  the effect gets the trivial models' {' and '.join(stand_ins)} maps (random weights)")
        result = run_end_to_end(stage, library, relpaths, args.workdir / "out-end-to-end", device, workers, stand_ins)
        print_end_to_end(result, width, height, workers)
        del stage

    # 3. the GPU render path: the model stage decodes, renders and encodes on the device
    if "torch" in args.render_backends:
        print("\n3. end to end with the GPU render path (torch render backend), without Ray", flush=True)
        config = JobConfig(input=str(library), output=str(args.workdir), render_backend="torch")
        stage = BenchModelStage(models, device, layout.batch_size, config.render_settings(), stand_ins)
        print(f"  model stage: {'; '.join(stage.models.describe())}, batch {layout.batch_size}", flush=True)
        if stand_ins:
            print(f"  the effect gets the trivial models' {' and '.join(stand_ins)} maps (random weights)")
        call_rows = model_call_rows(layout, on_device=True)
        result = run_device_end_to_end(
            stage, library, relpaths, args.workdir / "out-device", device, workers, call_rows
        )
        print_device_end_to_end(result, width, height, workers, device, call_rows)
        line = measure_overlap(stage.models, config.render_settings(), library, relpaths, device, call_rows)
        print(f"  overlap: {line}", flush=True)
        line = measure_subject_decisions(config.render_settings(), library, relpaths, device, layout.batch_size)
        print(f"  subject decisions: {line}", flush=True)
        del stage
    del models

    # 4. the real job, where Ray is
    if not args.skip_job:
        print("\n4. the job (pipeline.job.run_job, Ray)", flush=True)
        line = run_real_job(library, args.workdir / "out-job", device)
        print(f"  {line}   target >= {TARGET_JOB}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
