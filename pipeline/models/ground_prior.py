"""A depth prior that needs no weights, used when no depth model's weights can be had.

Most everyday photos are taken standing on the ground looking roughly level: the ground recedes
from the bottom edge to a horizon, and things stand on it. So:

1. Ground: depth (relative inverse depth, larger is nearer) ramps linearly from 0 at the horizon
   row to 1 at the bottom row; every row above the horizon (sky, far walls, treetops) is 0. The
   horizon sits at ``horizon`` (a fraction of the height from the top, 1/3 by default).
2. Subjects: when a saliency map is given (``predict(photos, saliency=maps)``), each subject,
   a connected component of saliency >= 0.5 (8-connected), is stood upright on the ground: all
   its pixels get the ground depth of its lowest row, where it touches the ground. A person's
   head is then exactly as near as their feet, instead of as far as the trees behind them.

Without saliency maps it is the ground ramp alone. Deterministic, instant, and honest about
what it is: ``version`` names the horizon.
"""

from __future__ import annotations

import cv2
import numpy as np

from ..effect import resize_map
from . import register
from .base import DEPTH, MapModel


def ground_ramp(height: int, width: int, horizon: float = 1 / 3) -> np.ndarray:
    """Depth 0 down to the horizon row, then linear to 1 at the bottom row."""
    rows = np.arange(height, dtype=np.float32)
    start = horizon * (height - 1)
    span = max((height - 1) - start, 1e-6)
    col = np.clip((rows - start) / span, 0.0, 1.0).astype(np.float32)
    return np.repeat(col[:, None], width, axis=1)


def stand_subjects(depth: np.ndarray, saliency: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Each connected subject of ``saliency >= threshold`` set to the depth of its lowest row."""
    mask = (resize_map(saliency, *depth.shape[:2]) >= threshold).astype(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if count <= 1:
        return depth
    out = depth.copy()
    col = depth[:, 0]  # the ramp is constant along a row
    bottoms = stats[1:, cv2.CC_STAT_TOP] + stats[1:, cv2.CC_STAT_HEIGHT] - 1
    per_label = np.concatenate([[0.0], col[bottoms]]).astype(np.float32)
    subject = labels > 0
    out[subject] = per_label[labels[subject]]
    return out


@register
class GroundPrior(MapModel):
    """Lower rows nearer, above a horizon flat and far; subjects at the depth of their lowest point."""

    name = "ground-prior"
    task = DEPTH
    licence = "Apache-2.0 (this project)"
    source = "builtin (no weights)"
    needs_weights = False
    measures_depth = False

    def __init__(
        self, weights: str | None = None, device: str | None = None, batch_size: int = 16, horizon: float = 1 / 3
    ) -> None:
        super().__init__(None, "cpu", batch_size)
        self.horizon = float(horizon)

    @property
    def version(self) -> str:
        return f"builtin-horizon{self.horizon:.2f}"

    def _predict_chunk(self, photos, saliency):
        maps = []
        for i, photo in enumerate(photos):
            depth = ground_ramp(photo.shape[0], photo.shape[1], self.horizon)
            if saliency is not None and saliency[i] is not None:
                depth = stand_subjects(depth, saliency[i])
            maps.append(depth)
        return maps

    def _predict_batch(self, photos):
        return self._predict_chunk(photos, None)
