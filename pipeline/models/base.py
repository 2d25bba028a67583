"""The one interface every model implements, and the resize policy they share."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar, Sequence

import cv2
import numpy as np

from ..effect import resize_map

SALIENCY = "saliency"
DEPTH = "depth"


class MapModel(ABC):
    """A model that turns photos into one float32 map each.

    Load once in ``__init__``; ``predict`` takes a batch of HxWx3 uint8 RGB photos of mixed sizes
    and returns float32 maps at each photo's own size: saliency in 0..1, depth as relative
    inverse depth (larger is nearer, any scale). Subclasses set the class attributes, implement
    ``_predict_batch`` on photos already brought to the model's input size, and register
    themselves with ``pipeline.models.register``.
    """

    name: ClassVar[str]
    task: ClassVar[str]  # SALIENCY or DEPTH
    licence: ClassVar[str] = ""
    source: ClassVar[str] = ""
    needs_weights: ClassVar[bool] = True

    def __init__(self, weights: str | None = None, device: str | None = None,
                 batch_size: int = 4) -> None:
        self.weights = weights
        self.device = device or default_device()
        self.batch_size = batch_size

    @classmethod
    def local_weights(cls) -> Path | None:
        """The cached weights (file or folder) this model would load, or None when not cached."""
        return None

    @classmethod
    def cache_paths(cls) -> list[Path]:
        """Everything this model keeps in the cache (weights and anything derived from them)."""
        path = cls.local_weights()
        return [] if path is None else [path]

    @classmethod
    def fetch(cls, source: str | None = None) -> Path | None:
        """Fetch the weights into the cache (from ``source`` when given); their path.

        Models without weights return None; models that cannot fetch raise
        WeightsUnavailableError saying how to supply weights instead.
        """
        if not cls.needs_weights:
            return None
        from ..errors import WeightsUnavailableError
        raise WeightsUnavailableError(
            f"{cls.name} weights cannot be fetched automatically; pass a weights file or URI")

    @property
    def version(self) -> str:
        """What was actually loaded (a weights digest, or a description); goes into the manifest."""
        return "builtin"

    def predict(self, photos: Sequence[np.ndarray],
                saliency: Sequence[np.ndarray] | None = None) -> list[np.ndarray]:
        """One float32 map per photo, at that photo's size.

        ``saliency``, when given, holds one saliency map (0..1, any size with the photo's aspect)
        per photo; depth models that can use it do (the ground prior places each subject at the
        depth of its lowest point), all others ignore it.
        """
        if saliency is not None and len(saliency) != len(photos):
            raise ValueError(f"{len(saliency)} saliency maps for {len(photos)} photos")
        step = max(1, self.batch_size)
        maps: list[np.ndarray] = []
        for i in range(0, len(photos), step):
            chunk = list(photos[i:i + step])
            sal = None if saliency is None else list(saliency[i:i + step])
            for photo, raw in zip(chunk, self._predict_chunk(chunk, sal)):
                maps.append(resize_map(raw, photo.shape[0], photo.shape[1]))
        return maps

    def _predict_chunk(self, photos: list[np.ndarray],
                       saliency: list[np.ndarray] | None) -> list[np.ndarray]:
        """Maps for one batch; models that use saliency maps override this, the others ignore them."""
        return self._predict_batch(photos)

    @abstractmethod
    def _predict_batch(self, photos: list[np.ndarray]) -> list[np.ndarray]:
        """Maps for a batch, each at any size with the photo's aspect ratio."""


def default_device() -> str:
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
