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
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
from pathlib import Path
from typing import ClassVar
from urllib.parse import urlparse

import cv2
import numpy as np

from ..errors import WeightsUnavailableError
from .base import DEPTH, MapModel
from .weights import fetch_dir_to_cache, read_json, replaced_atomically, weights_digest, writable_cache_dir

log = logging.getLogger(__name__)

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


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
    runtime = "torch"

    def __init__(self, weights: str | None = None, device: str | None = None, batch_size: int = 4, config=None) -> None:
        super().__init__(weights, device, batch_size)
        import torch

        from .tensors import torch_device
        from .weights import resolve_weights

        self._torch = torch
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
    def from_config(cls, config=None, device: str | None = None, batch_size: int = 4):
        """The real architecture with random (seeded) weights; ``config`` defaults to the real one."""
        return cls(device=device, batch_size=batch_size, config=config if config is not None else cls.default_config())

    @property
    def version(self) -> str:
        return self._version

    @property
    def accepts_tensors(self) -> bool:
        return True

    def _load(self, where: str | Path):
        cls = self.model_class()
        with contextlib.suppress(Exception):  # no per-tensor progress bar on every load
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        if isinstance(where, Path):
            self.weights_path = where
            weights_file = next(where / f for f in WEIGHT_FILES if (where / f).is_file())
            self._version = weights_digest(weights_file)[:12]
            return cls.from_pretrained(str(where))
        self.weights_path = None
        # the hub id: already known to be cached or reachable; cached needs no network at all
        model = cls.from_pretrained(where, local_files_only=not hub_reachable())
        self._version = f"hub:{where}@{_hub_revision(where)}"
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
        batch = self._torch.from_numpy(np.stack([x for x, _ in prepared]))
        depth = self._forward(batch).cpu().numpy()
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
