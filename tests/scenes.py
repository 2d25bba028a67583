"""Generated scenes for the salient-object model: a striped subject (a body and a head) in front
of a soft gradient background with small clutter, different for every seed. Used where the
masks of two runtimes are compared on photos no runtime was calibrated on."""

from __future__ import annotations

import cv2
import numpy as np


def scene(seed: int, height: int = 768, width: int = 1024) -> np.ndarray:
    """An RGB uint8 scene, the same for the same seed."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    near, far = rng.uniform(30, 220, 3), rng.uniform(30, 220, 3)
    ramp = (xx / width * rng.uniform(-1, 1) + yy / height * rng.uniform(-1, 1))[..., None]
    image = near + (far - near) * (ramp - ramp.min()) / (np.ptp(ramp) + 1e-6)
    image = image + cv2.GaussianBlur(rng.normal(0, 25, (height, width, 3)).astype(np.float32), (0, 0), 3.0)
    for _ in range(int(rng.integers(3, 8))):  # small clutter, softened with the background
        x0, y0 = int(rng.uniform(0, width)), int(rng.uniform(0, height))
        x1, y1 = x0 + int(rng.uniform(0.03, 0.15) * width), y0 + int(rng.uniform(0.03, 0.15) * height)
        cv2.rectangle(image, (x0, y0), (x1, y1), rng.uniform(0, 255, 3).tolist(), -1)
    image = cv2.GaussianBlur(image, (0, 0), 3.0)
    colour = rng.uniform(0, 255, 3).tolist()
    subject = np.zeros((height, width), np.uint8)
    cx, cy = int(width * rng.uniform(0.35, 0.65)), int(height * rng.uniform(0.4, 0.6))
    axes = (int(width * rng.uniform(0.1, 0.2)), int(height * rng.uniform(0.2, 0.35)))
    cv2.ellipse(subject, (cx, cy), axes, rng.uniform(0, 180), 0, 360, 1, -1)
    cv2.circle(subject, (cx, cy - int(height * 0.3)), int(height * 0.08), 1, -1)
    stripes = np.float32(colour) + (np.sin(xx / rng.uniform(4, 12)) * 20)[..., None]
    image = np.where(subject[..., None] > 0, stripes, image)
    return np.clip(image, 0, 255).astype(np.uint8)
