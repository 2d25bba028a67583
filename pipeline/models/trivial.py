"""Two tiny models with no weights, for tests and benchmarks of the library job.

``trivial-saliency``: a filled ellipse centred in the photo, half its width and 70% of its
height, 1 inside and 0 outside. ``trivial-depth``: a vertical ramp, 0 at the top row to 1 at the
bottom row. Both are deterministic and take microseconds; their maps are made small and
stretched to each photo's size.
"""

from __future__ import annotations

import cv2
import numpy as np

from . import register
from .base import DEPTH, SALIENCY, MapModel

_GRID = 128  # maps are drawn at most this large on the long side; predict() resizes them


def _grid(photo: np.ndarray) -> tuple[int, int]:
    h, w = photo.shape[:2]
    scale = min(1.0, _GRID / max(h, w))
    return max(1, round(h * scale)), max(1, round(w * scale))


class _Builtin(MapModel):
    licence = "Apache-2.0 (this project)"
    source = "builtin (no weights)"
    needs_weights = False

    def __init__(self, weights: str | None = None, device: str | None = None, batch_size: int = 64) -> None:
        super().__init__(None, "cpu", batch_size)


@register
class TrivialSaliency(_Builtin):
    """A centred ellipse: 1 inside, 0 outside."""

    name = "trivial-saliency"
    task = SALIENCY

    def _predict_batch(self, photos):
        maps = []
        for photo in photos:
            h, w = _grid(photo)
            m = np.zeros((h, w), np.float32)
            cv2.ellipse(m, (((w - 1) / 2, (h - 1) / 2), (w * 0.5, h * 0.7), 0.0), 1.0, -1)
            maps.append(m)
        return maps


@register
class TrivialDepth(_Builtin):
    """A vertical ramp: 0 (far) at the top row, 1 (near) at the bottom row."""

    name = "trivial-depth"
    task = DEPTH
    measures_depth = False

    def _predict_batch(self, photos):
        maps = []
        for photo in photos:
            h, w = _grid(photo)
            col = np.linspace(0.0, 1.0, h, dtype=np.float32)
            maps.append(np.repeat(col[:, None], w, axis=1))
        return maps
