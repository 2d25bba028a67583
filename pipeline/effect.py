"""The effect on one photo, as pure functions on numpy arrays.

photo: HxWx3 uint8 RGB. fg (salient-object mask): float32 0..1. depth: float32, larger is nearer.
Maps may come at any size; they are resized to the size the effect works at.

The steps, in order: painterly background, interpolation mask (alpha), edge-aware refinement,
optional directional gradient, composite. ``render`` composes them for a preset.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from .params import EffectParams


@dataclass
class Rendering:
    image: np.ndarray  # uint8 HxWx3, the result
    background: np.ndarray  # uint8 HxWx3, the painterly background at full size
    alpha: np.ndarray  # float32 HxW at full size: 1 keeps the photo, 0 shows the background
    fg: np.ndarray  # float32 mask at working size
    depth: np.ndarray  # float32 normalised depth at working size (nearest = 1)
    start: float  # depth at and in front of which the photo stays crisp
    stop: float  # depth at and behind which only the background shows
    fg_fraction: float  # share of working-size pixels that are foreground


def resize_map(values: np.ndarray, height: int, width: int) -> np.ndarray:
    """A float32 map resized to height x width (bilinear; area when shrinking a lot)."""
    values = np.asarray(values, dtype=np.float32)
    if values.shape[:2] == (height, width):
        return values
    shrinking = values.shape[0] > 2 * height and values.shape[1] > 2 * width
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(values, (width, height), interpolation=interpolation)


def normalize_depth(depth: np.ndarray) -> np.ndarray:
    """Min-max normalise so the nearest pixel is 1 and the farthest 0; a flat map becomes 0."""
    depth = np.asarray(depth, dtype=np.float32)
    lo, hi = float(depth.min()), float(depth.max())
    if not np.isfinite(lo) or not np.isfinite(hi):
        depth = np.nan_to_num(depth, nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(depth.min()), float(depth.max())
    if hi <= lo:
        return np.zeros_like(depth)
    return (depth - lo) * np.float32(1.0 / (hi - lo))


def painterly_background(photo: np.ndarray, kernel_size: int, brightness_min: int = 40,
                         brightness_max: int = 255) -> np.ndarray:
    """Morphological opening with an elliptical kernel, then min-max into the brightness range.

    Opening removes bright detail smaller than the kernel and leaves flat colour patches; the
    normalisation spans all channels jointly, as cv2.normalize with NORM_MINMAX does.
    """
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (kernel_size, kernel_size))
    opened = cv2.morphologyEx(photo, cv2.MORPH_OPEN, kernel)
    return cv2.normalize(opened, None, brightness_min, brightness_max, cv2.NORM_MINMAX)


def depth_bounds(fg: np.ndarray, depth: np.ndarray, fg_threshold: float = 0.5,
                 start_percentile: float = 50.0, stop_percentile: float = 50.0) -> tuple[float, float]:
    """(start, stop): a percentile of depth over foreground pixels, and over background pixels.

    stop never exceeds start. With no foreground pixel, start is the nearest depth (1); with no
    background pixel, stop equals start.
    """
    is_fg = fg >= fg_threshold
    fg_depth = depth[is_fg]
    start = float(np.percentile(fg_depth, start_percentile)) if fg_depth.size else 1.0
    bg_depth = depth[~is_fg]
    stop = float(np.percentile(bg_depth, stop_percentile)) if bg_depth.size else start
    return start, min(start, stop)


def interpolation_alpha(fg: np.ndarray, depth: np.ndarray, start: float, stop: float) -> np.ndarray:
    """alpha = clamp((fg + depth - stop) / (start - stop), 0, 1).

    Adding fg keeps every subject pixel crisp where mask and depth disagree. When start == stop
    the ramp has no width and becomes a step at start.
    """
    level = fg + depth
    if start <= stop:
        return (level >= start).astype(np.float32)
    alpha = (level - np.float32(stop)) * np.float32(1.0 / (start - stop))
    return np.clip(alpha, 0.0, 1.0, out=alpha)


def guided_filter_coefficients(guide: np.ndarray, src: np.ndarray, radius: int,
                               eps: float) -> tuple[np.ndarray, np.ndarray]:
    """Coefficients (a, b) of the guided filter (He et al.): the output is a * guide + b.

    Kept separate so they can be computed on a small image and applied, upsampled, to the
    full-size guide: edges follow the full-resolution photo at the cost of the small one.
    """
    size = (2 * radius + 1, 2 * radius + 1)

    def box(x: np.ndarray) -> np.ndarray:
        return cv2.boxFilter(x, cv2.CV_32F, size, borderType=cv2.BORDER_REFLECT)

    mean_i, mean_p = box(guide), box(src)
    var_i = box(guide * guide) - mean_i * mean_i
    cov_ip = box(guide * src) - mean_i * mean_p
    a = cov_ip / (var_i + np.float32(eps))
    b = mean_p - a * mean_i
    return box(a), box(b)


def luminance(photo: np.ndarray) -> np.ndarray:
    """float32 0..1 gray of an RGB photo, the guide of the refinement."""
    gray = cv2.cvtColor(photo, cv2.COLOR_RGB2GRAY)
    return gray.astype(np.float32) * np.float32(1 / 255)


def directional_gradient(height: int, width: int, direction: str, strength: float) -> np.ndarray | None:
    """A ramp from `strength` at the named edge to 0 at the opposite one, or None for "none".

    Used as a floor on alpha: the named side keeps some of the photo, the far side is all
    background, which reads as a soft fall-off of focus across the frame.
    """
    if direction == "none" or strength <= 0:
        return None
    along_x = direction in ("left", "right")
    n = width if along_x else height
    ramp = np.linspace(strength, 0.0, n, dtype=np.float32)
    if direction in ("right", "bottom"):
        ramp = ramp[::-1]
    return np.broadcast_to(ramp[None, :] if along_x else ramp[:, None], (height, width))


def composite(photo: np.ndarray, background: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """photo * alpha + background * (1 - alpha), rounded to uint8."""
    p = photo.astype(np.float32)
    b = background.astype(np.float32)
    a = cv2.merge([alpha, alpha, alpha]) if alpha.ndim == 2 else alpha
    cv2.subtract(p, b, dst=p)
    cv2.multiply(p, a, dst=p)
    cv2.add(p, b, dst=p)
    return cv2.convertScaleAbs(p)


def working_size(height: int, width: int, work_size: int) -> tuple[int, int]:
    """(h, w) with the long side at most work_size; (height, width) when work_size is 0."""
    long_side = max(height, width)
    if work_size == 0 or long_side <= work_size:
        return height, width
    scale = work_size / long_side
    return max(1, round(height * scale)), max(1, round(width * scale))


def render(photo: np.ndarray, fg: np.ndarray, depth: np.ndarray, params: EffectParams) -> Rendering:
    """The whole effect on one photo with the given parameters."""
    height, width = photo.shape[:2]
    work_h, work_w = working_size(height, width, params.work_size)
    full_size = (work_h, work_w) == (height, width)
    work_photo = photo if full_size else cv2.resize(photo, (work_w, work_h), interpolation=cv2.INTER_AREA)

    fg_work = np.clip(resize_map(fg, work_h, work_w), 0.0, 1.0)
    depth_work = normalize_depth(resize_map(depth, work_h, work_w))
    start, stop = depth_bounds(fg_work, depth_work, params.fg_threshold,
                               params.start_percentile, params.stop_percentile)
    alpha = interpolation_alpha(fg_work, depth_work, start, stop)

    background = painterly_background(work_photo, params.kernel_size,
                                      params.brightness_min, params.brightness_max)
    if not full_size:
        background = cv2.resize(background, (width, height), interpolation=cv2.INTER_LINEAR)

    if params.refine_radius > 0:
        a, b = guided_filter_coefficients(luminance(work_photo), alpha, params.refine_radius,
                                          params.refine_eps)
        guide = luminance(photo)
        alpha = resize_map(a, height, width) * guide + resize_map(b, height, width)
        np.clip(alpha, 0.0, 1.0, out=alpha)
    elif not full_size:
        alpha = resize_map(alpha, height, width)

    ramp = directional_gradient(height, width, params.gradient, params.gradient_strength)
    if ramp is not None:
        alpha = np.maximum(alpha, ramp)

    return Rendering(
        image=composite(photo, background, alpha),
        background=background,
        alpha=alpha,
        fg=fg_work,
        depth=depth_work,
        start=start,
        stop=stop,
        fg_fraction=float(np.count_nonzero(fg_work >= params.fg_threshold)) / fg_work.size,
    )
