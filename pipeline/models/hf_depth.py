"""The transformers depth models' shared code: weights resolution, resize/pad policy, batching.

Only a base class lives here; each registered depth model (depth_anything.py, dpt.py) is a
subclass that names its transformers class, hub id, input size and normalisation.

Resize/aspect policy. Each photo is resized keeping its aspect ratio so that its long side is
the model size (518 for Depth Anything V2, 384 for DPT) and both sides are multiples of the
patch grid (14, 32), normalised, then padded on the bottom and right to a size x size square
by replicating its edge pixels. Every photo thus becomes the same square input whatever else is
in its batch, so a batch gives the same maps as one photo at a time. The model's output is
cropped to the photo's own region before it is resized back to the photo's size: no padded
pixel ever reaches a map.

Weights are a folder with config.json and model.safetensors (or a .tar.gz/.tgz/.zip of one;
local, file://, s3://, gs://, https://, ...). They resolve as every model's do
(``pipeline.models.weights.resolve_weights``): an explicit path or URI -> ``<cache>/<model
name>/`` -> the model's ``*_URL`` environment variable, fetched once into that folder -> the
model hub (only when HF_HUB_OFFLINE is not set and the hub answers within seconds, or its own
cache has the model) -> WeightsUnavailableError.

Device path (``predict_tensors``): the same resize (OpenCV's area and bicubic, done in torch),
normalisation, edge padding and crop, on the device, batched.

Runtimes: torch on a GPU; on the CPU a model with ``openvino_on_cpu`` (Depth Anything V2) runs in
OpenVINO where it is installed, else in torch; $DREAMFOCUS_DEPTH_RUNTIME (torch or openvino)
names one. The OpenVINO graph is the torch module converted once (``openvino.convert_model``,
about 30 s for Depth Anything V2 Small on 2 cores), checked against torch's map on a test input
(``map_agreement``) and cached in the weights cache as ``<name>.<weights digest>.openvino.v<N>.xml``
(and .bin); a cached graph that cannot be read is converted again, and a conversion that fails
or disagrees leaves the model in torch, with a warning. A model with random weights converts
without caching. It runs as IS-Net's OpenVINO graph does (openvino_cpu.CpuGraph: a fixed
1 x 3 x size x size, two photos of a batch at once, fp32 whatever the CPU).
scripts/bench_depth_runtimes.py measured it against torch fp32 and onnxruntime on a shared
2-core CPU (see depth_anything.py); DPT and the hub's models were not measured and stay in torch.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar
from urllib.parse import urlparse

import cv2
import numpy as np

from ..errors import BadInputError, WeightsUnavailableError
from .base import DEPTH, MapModel
from .openvino_cpu import CpuGraph
from .weights import (
    cache_dir,
    fetch_dir_to_cache,
    read_json,
    replaced_atomically,
    save_openvino_model,
    weights_digest,
    writable_cache_dir,
)

log = logging.getLogger(__name__)

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
RUNTIME_ENV = "DREAMFOCUS_DEPTH_RUNTIME"
RUNTIMES = ("openvino", "torch")
OPENVINO_VERSION = 1  # of openvino_model(): bump to re-convert cached graphs
# A map agrees with torch fp32's when it is off by at most this fraction of torch's depth range
# anywhere and correlates with it at least this well (Pearson and Spearman): the normalised depth
# the effect blends by (effect.normalize_depth) then moves by at most about 1% anywhere, and what
# is nearer than what stays so.
MAX_ERROR = 0.01
MIN_CORRELATION = 0.999
AGREEMENT = f"max|a - b| <= {MAX_ERROR:.0%} of torch's range, Pearson and Spearman >= {MIN_CORRELATION}"


@dataclass(frozen=True)
class Agreement:
    """How far a depth map is from the reference's (see map_agreement)."""

    error: float  # max |a - b| over the reference's range
    pearson: float
    spearman: float

    @property
    def agrees(self) -> bool:
        return self.error <= MAX_ERROR and min(self.pearson, self.spearman) >= MIN_CORRELATION

    def __str__(self) -> str:
        return f"error {self.error:.2%}, pearson {self.pearson:.5f}, spearman {self.spearman:.5f}"


def map_agreement(reference: np.ndarray, other: np.ndarray) -> Agreement:
    """The worst error of ``other`` relative to ``reference``'s range, and their correlations."""
    a, b = reference.astype(np.float64).ravel(), other.astype(np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"maps of {reference.shape} and {other.shape} cannot be compared")
    span = float(np.ptp(a))
    worst = float(np.abs(a - b).max())
    error = worst / span if span > 0 else (0.0 if worst == 0 else float("inf"))
    return Agreement(error, _correlation(a, b), _correlation(_ranks(a), _ranks(b)))


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    scale = float(np.sqrt((a * a).sum() * (b * b).sum()))
    if scale == 0:  # a constant map correlates only with an equally constant one
        return 1.0 if not a.any() and not b.any() else 0.0
    return float((a * b).sum() / scale)


def _ranks(x: np.ndarray) -> np.ndarray:
    """Each value's rank, ties given their mean rank (as Spearman's correlation takes them)."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    return (np.cumsum(counts) - (counts - 1) / 2.0)[inverse]


def choose_runtime(cls: type[HFDepthModel], device: str, requested: str | None = None) -> str:
    """The runtime ``cls`` runs in on ``device``: ``requested``, else $DREAMFOCUS_DEPTH_RUNTIME, else
    OpenVINO on the CPU for a model that has it (``openvino_on_cpu``) where it is installed, else
    torch. One that is unknown, not installed, or OpenVINO on a GPU is a BadInputError."""
    from .isnet import missing_packages

    asked, where = (requested or "").strip().lower(), "runtime"
    if asked in ("", "auto"):
        asked, where = (os.environ.get(RUNTIME_ENV) or "").strip().lower(), RUNTIME_ENV
    if asked in ("", "auto"):
        return "openvino" if device == "cpu" and cls.openvino_on_cpu and not missing_packages("openvino") else "torch"
    if asked not in RUNTIMES:
        raise BadInputError(f"{where} {asked!r}: expected auto, {' or '.join(RUNTIMES)}")
    if asked == "openvino":
        if device != "cpu":
            raise BadInputError(f"{where} {asked!r}: {cls.name} runs OpenVINO on the CPU only, not on {device}")
        if missing_packages("openvino"):
            raise BadInputError(f"{where} {asked!r}: the openvino package is not installed here; choose torch")
    return asked


def depth_only(model):
    """The transformers model as a torch module of one tensor in, its predicted depth out (N x H x W):
    what openvino.convert_model and torch.onnx.export take."""
    import torch

    class DepthOnly(torch.nn.Module):
        def __init__(self, inner) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, pixel_values):
            return self.inner(pixel_values=pixel_values).predicted_depth

    return DepthOnly(model).eval()


class HFDepthModel(MapModel):
    """A transformers depth-estimation model (relative inverse depth: larger is nearer)."""

    task = DEPTH
    hub_id: ClassVar[str]
    model_type: ClassVar[str]  # config.json's model_type
    weights_env: ClassVar[str]
    # The input policy (a model may set its own from its configuration: see _configure)
    size: int  # long side of the model input
    multiple: int  # both input sides are multiples of this
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    cache_name: ClassVar[str]  # the weights folder, <cache>/<cache_name>/
    # Whether the CPU runs it in OpenVINO where that is installed (measured faster at the same maps).
    openvino_on_cpu: ClassVar[bool] = False
    runtime = "torch"

    def __init__(
        self,
        weights: str | None = None,
        device: str | None = None,
        batch_size: int = 4,
        config=None,
        runtime: str | None = None,
    ) -> None:
        super().__init__(weights, device, batch_size)
        import torch

        from .tensors import torch_device
        from .weights import resolve_weights

        self._torch = torch
        chosen = choose_runtime(type(self), self.device, runtime)  # a runtime that cannot be is refused first
        self._weights_digest: str | None = None  # of the weights file; keys the cached OpenVINO graph
        if config is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model = self.build(config)
            self._version = "random-init"
            self.weights_path: Path | None = None
            self.weights = None
        else:
            where = resolve_weights(type(self), weights)
            self.weights = str(where)
            model = self._load(where)
        self._configure(model.config)
        self._device = torch_device(self.device)
        self.fp16 = self._device.type == "cuda"
        model = model.eval().to(self._device)
        self.model = model.half() if self.fp16 else model.float()
        self._mean = np.array(self.mean, np.float32)
        self._std = np.array(self.std, np.float32)
        self._mean_t = torch.tensor(self.mean, dtype=torch.float32, device=self._device).view(3, 1, 1)
        self._std_t = torch.tensor(self.std, dtype=torch.float32, device=self._device).view(3, 1, 1)
        if chosen == "openvino":
            self._open_openvino()

    # ----------------------------------------------------------------------------- building

    @classmethod
    def model_class(cls):
        raise NotImplementedError

    @classmethod
    def build(cls, config):
        """The architecture with random weights for a transformers configuration."""
        return cls.model_class()(config)

    def _configure(self, config) -> None:
        """Hook: set the input policy from the loaded model's configuration (the class's by default)."""

    @classmethod
    def default_config(cls):
        """The architecture's real configuration (that of the hub weights), for benchmarks."""
        raise NotImplementedError

    @classmethod
    def from_config(cls, config=None, device: str | None = None, batch_size: int = 4, runtime: str | None = None):
        """The real architecture with random (seeded) weights; ``config`` defaults to the real one."""
        config = config if config is not None else cls.default_config()
        return cls(device=device, batch_size=batch_size, config=config, runtime=runtime)

    @property
    def version(self) -> str:
        return self._version

    @property
    def accepts_tensors(self) -> bool:
        return self.runtime == "torch"

    def _load(self, where: str | Path):
        cls = self.model_class()
        with contextlib.suppress(Exception):  # no per-tensor progress bar on every load
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        if isinstance(where, Path):
            self.weights_path = where
            weights_file = next(where / f for f in WEIGHT_FILES if (where / f).is_file())
            self._weights_digest = weights_digest(weights_file)
            self._version = self._weights_digest[:12]
            return cls.from_pretrained(str(where))
        self.weights_path = None
        # the hub id: already known to be cached or reachable; cached needs no network at all
        model = cls.from_pretrained(where, local_files_only=not hub_reachable())
        revision = _hub_revision(where)
        self._weights_digest = None if revision == "unknown" else revision
        self._version = f"hub:{where}@{revision}"
        return model

    # ----------------------------------------------------------------------------- weights

    @classmethod
    def check_weights(cls, path: Path) -> None:
        if not (path / "config.json").is_file():
            raise WeightsUnavailableError(f"{path} holds no config.json for {cls.name}")
        if not any((path / f).is_file() for f in WEIGHT_FILES):
            raise WeightsUnavailableError(f"{path} holds no {' or '.join(WEIGHT_FILES)} for {cls.name}")
        try:
            model_type = read_json(path / "config.json").get("model_type")
        except ValueError as exc:
            raise WeightsUnavailableError(f"{path}/config.json is not valid JSON: {exc}") from exc
        if not cls.runs_model_type(model_type):
            raise WeightsUnavailableError(f"{path} holds a {model_type!r} model, not {cls.name} ({cls.model_type!r})")

    @classmethod
    def runs_model_type(cls, model_type: str | None) -> bool:
        """Whether weights whose config.json says this model_type are this model's."""
        return model_type == cls.model_type

    @classmethod
    def cache_paths(cls) -> list[Path]:
        """The weights folder and the OpenVINO graphs converted from those weights."""
        path = cls.local_weights()
        if path is None:
            return []
        weights_file = next((path / f for f in WEIGHT_FILES if (path / f).is_file()), None)
        if weights_file is None:
            return [path]
        derived = cache_dir().glob(f"{cls.cache_name}.{weights_digest(weights_file)[:16]}.openvino.v*")
        return [path] + sorted(derived)

    @classmethod
    def fetch(cls, source: str | None = None) -> Path | None:
        """The weights in the cache, and, where the CPU runs the model in OpenVINO, its graph
        converted now (half a minute), so that no job waits for it later."""
        from .base import default_device

        path = super().fetch(source)
        try:
            if path is not None and choose_runtime(cls, default_device()) == "openvino":
                cls(weights=str(path), device="cpu", batch_size=1, runtime="openvino")
        except Exception as exc:  # noqa: BLE001 - the weights are fetched; a job's load says it again
            log.warning("could not make %s's OpenVINO graph now (%s)", cls.name, exc)
        return path

    @classmethod
    def copy_weights(cls, source: str, name: str, sha256: str | None = None) -> Path:
        """A weights folder or archive copied into ``<cache>/<name>``; removed again if it is not ours."""
        folder = fetch_dir_to_cache(source, name, required=("config.json",))
        try:
            cls.check_weights(folder)
        except WeightsUnavailableError:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return folder

    @classmethod
    def how_to_fetch(cls) -> str:
        return (
            f"supply the weights instead: `dreamfocus models fetch {cls.name} --from DIR_OR_URI` "
            "(a folder, or a .tar.gz/.zip of one, holding config.json and model.safetensors as "
            f"published at {cls.hub_id}; local, s3://, gs:// or https://), or set "
            f"{cls.weights_env} to such a URI, or pass it as the model's weights"
        )

    @classmethod
    def hub_weights(cls) -> str:
        if _hub_cached(cls.hub_id) or hub_reachable():
            return cls.hub_id
        raise WeightsUnavailableError(f"no weights for {cls.name} ({_offline_reason()}); {cls.how_to_fetch()}")

    @classmethod
    def fetch_from_registry(cls) -> Path:
        """The hub's published weights into ``<cache>/<name>/``."""
        online = hub_reachable()
        if not online and not _hub_cached(cls.hub_id):
            raise WeightsUnavailableError(f"cannot fetch {cls.name}: {_offline_reason()}; {cls.how_to_fetch()}")
        from huggingface_hub import snapshot_download

        dest = writable_cache_dir() / cls.cache_name
        try:
            with replaced_atomically(dest) as tmp:
                snapshot_download(
                    cls.hub_id,
                    local_dir=str(tmp),
                    local_files_only=not online,
                    allow_patterns=["config.json", "*.safetensors", "*.json"],
                )
                cls.check_weights(tmp)
                shutil.rmtree(tmp / ".cache", ignore_errors=True)
        except WeightsUnavailableError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise WeightsUnavailableError(f"cannot fetch {cls.name} from the hub: {exc}; {cls.how_to_fetch()}") from exc
        return dest

    # ----------------------------------------------------------------------------- inference

    def input_shape(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) a photo is resized to: long side ``size``, multiples of ``multiple``."""
        scale = self.size / max(height, width)
        m = self.multiple

        def side(n: int) -> int:
            return int(min(self.size, max(m, round(n * scale / m) * m)))

        return side(height), side(width)

    def _prepare(self, photo: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
        h, w = photo.shape[:2]
        nh, nw = self.input_shape(h, w)
        shrinking = nh < h and nw < w
        x = cv2.resize(photo, (nw, nh), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC)
        x = (x.astype(np.float32) * np.float32(1 / 255.0) - self._mean) / self._std
        x = cv2.copyMakeBorder(x, 0, self.size - nh, 0, self.size - nw, cv2.BORDER_REPLICATE)
        return x.transpose(2, 0, 1), (nh, nw)

    def _predict_batch(self, photos: list[np.ndarray]) -> list[np.ndarray]:
        prepared = [self._prepare(p) for p in photos]
        if self.runtime == "openvino":
            depth = np.stack(self._graph.run([x for x, _ in prepared]))
        else:
            depth = self._forward(self._torch.from_numpy(np.stack([x for x, _ in prepared]))).cpu().numpy()
        return [
            np.ascontiguousarray(d[self._region((nh, nw), depth.shape[-2:])])
            for d, (_, (nh, nw)) in zip(depth, prepared)
        ]

    def _predict_tensor_batch(self, photos, saliency=None):
        import torch.nn.functional as F

        from .tensors import resize_map, resize_photo

        inputs, shapes = [], []
        for photo in photos:
            nh, nw = self.input_shape(*photo.shape[:2])
            x = (resize_photo(photo, nh, nw) * (1 / 255.0) - self._mean_t) / self._std_t
            inputs.append(F.pad(x[None], (0, self.size - nw, 0, self.size - nh), mode="replicate")[0])
            shapes.append((nh, nw))
        depth = self._forward(self._torch.stack(inputs))
        return [
            resize_map(d[self._region(shape, depth.shape[-2:])], *photo.shape[:2])
            for d, shape, photo in zip(depth, shapes, photos)
        ]

    def _forward(self, batch):
        """N x size x size predicted depth (float32, on the device) of a normalised, padded batch."""
        batch = batch.to(self._device, non_blocking=True)
        with self._torch.inference_mode():
            depth = self.model(pixel_values=batch.half() if self.fp16 else batch).predicted_depth
        return (depth[:, 0] if depth.ndim == 4 else depth).float()

    # ----------------------------------------------------------------------------- OpenVINO

    def _open_openvino(self) -> None:
        """Run in OpenVINO from now on; where its graph cannot be had, stay in torch (a warning)."""
        try:
            self._graph = CpuGraph(self.openvino_model(), self.batch_size, self.size)
        except Exception as exc:  # noqa: BLE001 - torch gives the same maps, only slower
            log.warning("%s cannot run in OpenVINO (%s); running it in torch", self.name, exc)
            return
        self.runtime = "openvino"

    def openvino_path(self) -> Path | None:
        """Where the OpenVINO graph of these weights is cached (its .xml; the .bin beside it);
        None for weights with no digest (random ones), whose graph is not cached."""
        if self._weights_digest is None:
            return None
        name = f"{self.cache_name}.{self._weights_digest[:16]}.openvino.v{OPENVINO_VERSION}.xml"
        return writable_cache_dir() / name

    def openvino_model(self):
        """The network as an OpenVINO model: the cached graph where it reads, else the torch
        module converted, checked against torch's map and cached (see the module's notes)."""
        import openvino as ov

        dest = self.openvino_path()
        if dest is not None and dest.is_file():
            try:
                return ov.Core().read_model(str(dest))
            except Exception as exc:  # noqa: BLE001 - a damaged or partial cache entry
                log.warning(
                    "the cached OpenVINO graph %s cannot be read (%s); converting %s again", dest, exc, self.name
                )
        log.warning("converting %s to OpenVINO, once (about half a minute on a laptop)", self.name)
        model = self._converted()
        if dest is not None:
            save_openvino_model(model, dest)
        return model

    def _converted(self):
        """The torch module converted by OpenVINO at 1 x 3 x size x size, refused (ValueError)
        unless its map of a test input agrees with torch's (map_agreement)."""
        import openvino as ov

        torch = self._torch
        probe = torch.from_numpy(self._probe_input())
        with torch.inference_mode():
            expected = self._forward(probe).cpu().numpy()[0]
        with warnings.catch_warnings():  # the trace fixes the input shape: so is the graph meant
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            model = ov.convert_model(depth_only(self.model), example_input=probe)
        found = CpuGraph(model, 1, self.size).run([probe.numpy()[0]])[0]
        agreement = map_agreement(expected, found)
        if not agreement.agrees:
            raise ValueError(f"its OpenVINO graph's map differs from torch's ({agreement}; needs {AGREEMENT})")
        return model

    def _probe_input(self) -> np.ndarray:
        """A normalised 1 x 3 x size x size photo with structure at every scale (gradients and
        edges, seeded noise) for the conversion's check."""
        y, x = np.mgrid[0 : self.size, 0 : self.size].astype(np.float32) / self.size
        rng = np.random.default_rng(0)
        photo = np.stack([x, y, ((x * 7).astype(int) + (y * 5).astype(int)) % 2 * 0.8], axis=-1)
        photo = np.clip(photo + rng.normal(0, 0.05, photo.shape), 0, 1).astype(np.float32)
        return np.ascontiguousarray(((photo - self._mean) / self._std).transpose(2, 0, 1)[None])

    def _region(self, input_hw: tuple[int, int], output_hw) -> tuple[slice, slice]:
        """The part of the model's output that shows the photo (not the padding)."""
        out_h, out_w = output_hw
        rows = max(1, round(input_hw[0] * out_h / self.size))
        cols = max(1, round(input_hw[1] * out_w / self.size))
        return slice(0, rows), slice(0, cols)


# --------------------------------------------------------------------------------- the hub


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _hub_host() -> tuple[str, int]:
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    return endpoint.hostname or "huggingface.co", endpoint.port or (80 if endpoint.scheme == "http" else 443)


_REACHABLE: dict[tuple[str, int], bool] = {}


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the model hub answers a TCP connection within ``timeout`` (and is allowed)."""
    if _hub_offline():
        return False
    host = _hub_host()
    if host not in _REACHABLE:
        try:
            with socket.create_connection(host, timeout=timeout):
                _REACHABLE[host] = True
        except OSError:
            _REACHABLE[host] = False
    return _REACHABLE[host]


def _offline_reason() -> str:
    if _hub_offline():
        return "HF_HUB_OFFLINE is set and nothing is cached"
    return f"nothing cached and the model hub {_hub_host()[0]} is unreachable"


def _hub_cached(hub_id: str) -> bool:
    """Whether the hub's own cache already holds the model (then no network is needed)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return all(isinstance(try_to_load_from_cache(hub_id, f), str) for f in ("config.json", "model.safetensors"))
    except Exception:  # noqa: BLE001
        return False


def _hub_revision(hub_id: str) -> str:
    with contextlib.suppress(Exception):
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(hub_id, "model.safetensors")
        if isinstance(path, str):
            return weights_digest(path)[:12]
    return "unknown"
