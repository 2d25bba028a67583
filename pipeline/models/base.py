"""The one interface every model implements, and the resize policy they share."""

from __future__ import annotations

import os
import sys
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import cv2
import numpy as np

from ..effect import resize_map
from ..errors import BadInputError, WeightsUnavailableError
from .weights import cache_dir, fetch_to_cache, replace_cache_entry, resolve_weights

if TYPE_CHECKING:
    import torch

SALIENCY = "saliency"
DEPTH = "depth"


class MapModel(ABC):
    """A model that turns photos into one float32 map each.

    Load once in ``__init__``; ``predict`` takes a batch of HxWx3 uint8 RGB photos of mixed sizes
    and returns float32 maps at each photo's own size: saliency in 0..1, depth as relative
    inverse depth (larger is nearer, any scale). Subclasses set the class attributes, implement
    ``_predict_batch`` on photos already brought to the model's input size, and are listed in
    ``pipeline.models`` (the registry) under their ``name``.

    Every instance says what runs: ``name``, ``task``, ``version`` (a weights digest, or what the
    built-in model is), ``runtime`` ("torch", "onnxruntime", "openvino", "openvino-int8" or
    "numpy") and ``device`` (where it actually runs: "cpu", "cuda", "cuda:1", ...). Models that run
    torch also have a device path, ``predict_tensors`` (``accepts_tensors`` says whether a model
    has it).

    Weights: ``weights`` (a path or URI, else None) goes through the one resolver,
    ``pipeline.models.weights.resolve_weights``; the class attributes and hooks below say where a
    model keeps its weights and how it copies or fetches them.
    """

    name: ClassVar[str]
    task: ClassVar[str]  # SALIENCY or DEPTH
    licence: ClassVar[str] = ""
    source: ClassVar[str] = ""
    needs_weights: ClassVar[bool] = True
    # A depth model that measures the scene (False: a prior that assumes it, as the ground
    # prior does); the effect trusts only measured depth to tell what belongs to the subject.
    measures_depth: ClassVar[bool] = True

    # Where the weights live: an environment variable naming them (a path or URI), the name of
    # the model's own entry in the cache (None: the model has none, its weights are always
    # supplied), and their sha256 where it is known (then every copy is checked against it).
    weights_env: ClassVar[str | None] = None
    cache_name: ClassVar[str | None] = None
    sha256: ClassVar[str | None] = None

    runtime: str = "numpy"
    device: str = "cpu"

    def __init__(self, weights: str | None = None, device: str | None = None, batch_size: int = 4) -> None:
        # Once loaded: where the weights came from (a local file or folder, or a hub id).
        self.weights = weights
        self.device = device or default_device()
        self.batch_size = batch_size

    @property
    def version(self) -> str:
        """What was actually loaded (a weights digest, or a description); goes into the manifest."""
        return "builtin"

    @property
    def accepts_tensors(self) -> bool:
        """Whether this model has the device path, ``predict_tensors`` (models that run torch)."""
        return False

    @classmethod
    def runtime_for(cls, device: str | None, requested: str | None) -> str | None:
        """The runtime ``requested`` for this model on ``device`` (None: the default device; None
        or "auto" requested: the model's own choice, said as None); a BadInputError where the
        model cannot run in it. Models with one runtime take no request."""
        if (requested or "auto").strip().lower() == "auto":
            return None
        raise BadInputError(f"runtime {requested!r}: {cls.name} has no choice of runtime (only isnet-general-use has)")

    def describe(self) -> str:
        """One line saying what runs, e.g. ``isnet-general-use b6e8497ba978 (torch, cuda)``."""
        return f"{self.name} {self.version} ({self.runtime}, {self.device})"

    # ----------------------------------------------------------------------------- prediction

    def predict(self, photos: Sequence[np.ndarray], saliency: Sequence[np.ndarray] | None = None) -> list[np.ndarray]:
        """One float32 map per photo, at that photo's size.

        ``saliency``, when given, holds one saliency map (0..1, any size with the photo's aspect)
        per photo; depth models that can use it do (the ground prior places each subject at the
        depth of its lowest point), all others ignore it. Models with a device path on a GPU
        upload the photos and run it.
        """
        if saliency is not None and len(saliency) != len(photos):
            raise ValueError(f"{len(saliency)} saliency maps for {len(photos)} photos")
        if self.accepts_tensors and self.device != "cpu":
            from .tensors import download, upload

            return download(
                self.predict_tensors(
                    upload(photos, self.device), None if saliency is None else upload(saliency, self.device)
                )
            )
        step = max(1, self.batch_size)
        maps: list[np.ndarray] = []
        for i in range(0, len(photos), step):
            chunk = list(photos[i : i + step])
            sal = None if saliency is None else list(saliency[i : i + step])
            for photo, raw in zip(chunk, self._predict_chunk(chunk, sal)):
                maps.append(resize_map(raw, photo.shape[0], photo.shape[1]))
        return maps

    def _predict_chunk(self, photos: list[np.ndarray], saliency: list[np.ndarray] | None) -> list[np.ndarray]:
        """Maps for one batch; models that use saliency maps override this, the others ignore them."""
        return self._predict_batch(photos)

    @abstractmethod
    def _predict_batch(self, photos: list[np.ndarray]) -> list[np.ndarray]:
        """Maps for a batch, each at any size with the photo's aspect ratio."""

    def predict_tensors(
        self, photos: Sequence[torch.Tensor], saliency: Sequence[torch.Tensor] | None = None
    ) -> list[torch.Tensor]:
        """The device path: ``predict`` on tensors already on ``device``, results left there.

        ``photos``: HxWx3 uint8 tensors (sizes may differ); ``saliency``: HxW float tensors or
        None. Returns one HxW float32 tensor per photo at its size. Runs in batches of
        ``batch_size`` under ``torch.inference_mode`` (so the results are inference tensors:
        clone one before changing it in place outside that mode); all pre- and post-processing
        happens on the device.
        """
        if not self.accepts_tensors:
            raise NotImplementedError(f"{self.describe()} has no device path; use predict()")
        if saliency is not None and len(saliency) != len(photos):
            raise ValueError(f"{len(saliency)} saliency maps for {len(photos)} photos")
        import torch

        step = max(1, self.batch_size)
        maps: list[torch.Tensor] = []
        with torch.inference_mode():
            for i in range(0, len(photos), step):
                sal = None if saliency is None else list(saliency[i : i + step])
                maps.extend(self._predict_tensor_batch(list(photos[i : i + step]), sal))
        return maps

    def _predict_tensor_batch(
        self, photos: list[torch.Tensor], saliency: list[torch.Tensor] | None
    ) -> list[torch.Tensor]:
        """Maps at each photo's size for one batch; models with a device path implement it."""
        raise NotImplementedError

    # ----------------------------------------------------------------------------- weights

    @classmethod
    def local_weights(cls) -> Path | None:
        """The model's own cache entry (file or folder) when it holds weights, else None."""
        if cls.cache_name is None:
            return None
        path = cache_dir() / cls.cache_name
        try:
            cls.check_weights(path)
        except Exception:  # noqa: BLE001 - incomplete or foreign: not usable
            return None
        return path

    @classmethod
    def cache_paths(cls) -> list[Path]:
        """Everything this model keeps in the cache (weights and anything derived from them)."""
        path = cls.local_weights()
        return [] if path is None else [path]

    @classmethod
    def check_weights(cls, path: Path) -> None:
        """Raise WeightsUnavailableError unless ``path`` looks like this model's weights."""
        if not path.is_file():
            raise WeightsUnavailableError(f"{path}: no weights file for {cls.name}")

    @classmethod
    def copy_weights(cls, source: str, name: str, sha256: str | None = None) -> Path:
        """The weights at ``source`` (a path or URI) copied into ``cache_dir()/name``, checked
        against ``sha256`` when given."""
        return fetch_to_cache(source, name, sha256=sha256)

    @classmethod
    def fill_cache(cls, source: str) -> Path:
        """The weights at ``source`` copied into the model's own cache entry, replacing it."""
        return replace_cache_entry(cls, source)

    @classmethod
    def hub_weights(cls) -> str:
        """The last resort when no copy of the weights is at hand: an id that the model's own
        library loads (from a model hub), or WeightsUnavailableError saying how to supply them."""
        raise WeightsUnavailableError(f"no weights for {cls.name} in {cache_dir()}; {cls.how_to_fetch()}")

    @classmethod
    def fetch_from_registry(cls) -> Path:
        """Fetch the weights from where they are published into the model's cache entry."""
        raise WeightsUnavailableError(f"cannot fetch {cls.name}: {cls.how_to_fetch()}")

    @classmethod
    def how_to_fetch(cls) -> str:
        env = f", or set {cls.weights_env} to its path or URI" if cls.weights_env else ""
        return f"{cls.name} weights cannot be fetched automatically; pass a weights file or URI{env}"

    @classmethod
    def runtime_note(cls) -> str | None:
        """A line on the runtime this machine runs the model in, measured when it was fetched
        (`models fetch` and `models list` print it); None where nothing was measured."""
        return None

    @classmethod
    def fetch(cls, source: str | None = None) -> Path | None:
        """The weights in the cache (from ``source`` when given); their path. See
        ``pipeline.models.weights.resolve_weights`` (``fetch``). Models without weights return None."""
        return resolve_weights(cls, source, fetch=True)


CPU_STREAMS = 2  # photos a CPU model runs at once, each on its share of the cores (isnet.py)
GPU_DRIVERS = ("/proc/driver/nvidia", "/dev/kfd")  # what CUDA and ROCm need on Linux


def default_device() -> str:
    """cuda where torch sees a GPU, else cpu. On a Linux machine with no GPU driver at all
    (NVIDIA's or ROCm's), torch is not imported to ask: its import alone is seconds of a small
    job's start-up on a laptop."""
    if sys.platform == "darwin" or (sys.platform == "linux" and not any(map(os.path.exists, GPU_DRIVERS))):
        return "cpu"
    try:
        import torch

        if torch.cuda.is_available():
            return "cuda"
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return "cpu"


def cpu_threads() -> int:
    """Threads for CPU inference: the cores this process may use, as Ray also restricts them."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def squash(photo: np.ndarray, size: int) -> np.ndarray:
    """The photo stretched to size x size, as salient-object models were trained (no padding)."""
    shrinking = photo.shape[0] > size and photo.shape[1] > size
    return cv2.resize(photo, (size, size), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


def unsquash(values: np.ndarray, photo: np.ndarray) -> np.ndarray:
    """A square model output brought back to the photo's aspect ratio."""
    return resize_map(values, photo.shape[0], photo.shape[1])
