"""Two tiny models without weights, for tests and benchmarks of the job: fast and deterministic."""

from __future__ import annotations

import cv2
import numpy as np

from . import register
from .base import DEPTH, SALIENCY, MapModel


@register
class TrivialSaliency(MapModel):
    """A centred ellipse covering the middle of the frame."""

    name = "trivial-saliency"
    task = SALIENCY
    licence = "Apache-2.0"
    source = "built in"
    needs_weights = False

    def _predict_batch(self, photos):
        maps = []
        for photo in photos:
            h, w = photo.shape[:2]
            values = np.zeros((h, w), np.float32)
            cv2.ellipse(values, (w // 2, h // 2), (max(1, w // 5), max(1, h // 3)), 0, 0, 360, 1.0, -1)
            maps.append(values)
        return maps


@register
class TrivialDepth(MapModel):
    """A vertical ramp: the bottom row nearest."""

    name = "trivial-depth"
    task = DEPTH
    licence = "Apache-2.0"
    source = "built in"
    needs_weights = False

    def _predict_batch(self, photos):
        return [np.repeat(np.linspace(0.0, 1.0, p.shape[0], dtype=np.float32)[:, None], p.shape[1], axis=1)
                for p in photos]
