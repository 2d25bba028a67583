"""One photo end to end, without Ray: the steps the CLI and the library job share."""

from __future__ import annotations

import cv2
import numpy as np

from .effect import Rendering, upscale

# Models never need more than this many pixels on the long side (IS-Net's input is 1024).
MODEL_INPUT_SIZE = 1024


def model_copy(photo: np.ndarray) -> np.ndarray:
    """A copy with the long side at most MODEL_INPUT_SIZE: full-resolution pixels stay with the
    CPU stages."""
    height, width = photo.shape[:2]
    scale = MODEL_INPUT_SIZE / max(height, width)
    if scale >= 1:
        return photo
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(photo, size, interpolation=cv2.INTER_AREA)


def intermediate_pngs(rendering: Rendering, height: int, width: int) -> dict[str, bytes]:
    """Viewable PNGs at the photo's size, named for what they show."""

    def full(values: np.ndarray) -> np.ndarray:
        return upscale(values, rendering.factor, height, width)

    def gray(values: np.ndarray, peak: int, dtype: type) -> bytes:
        return png(np.round(np.clip(full(values), 0, 1) * peak).astype(dtype))

    return {
        "background": png(cv2.cvtColor(full(rendering.background), cv2.COLOR_RGB2BGR)),
        "mask": gray(rendering.fg, 255, np.uint8),
        "depth16": gray(rendering.depth, 65535, np.uint16),
        "alpha": gray(rendering.alpha, 255, np.uint8),
    }


def png(values: np.ndarray) -> bytes:
    """PNG bytes of an 8- or 16-bit gray or BGR array."""
    ok, data = cv2.imencode(".png", values)
    if not ok:  # pragma: no cover - cv2 encodes any such array
        raise ValueError("PNG encoding failed")
    return data.tobytes()
