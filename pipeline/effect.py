"""The effect on one photo, as pure functions on numpy arrays.

photo: HxWx3 uint8 RGB (or uint16, as camera RAWs come: kept at that depth throughout).
fg (salient-object mask): float32 0..1. depth: float32, larger is nearer.
Maps may come at any size; they are resized to the size the effect works at.

The steps, in order: painterly background, interpolation mask (alpha), edge-aware refinement,
optional directional gradient, composite. ``render`` composes them for a preset.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

import cv2
import numpy as np

from .params import EffectParams

# A per-photo flag: a bool here, an N bool tensor in effect_torch, which takes the same decisions.
Flag = TypeVar("Flag")


@dataclass
class Rendering:
    """The result and what led to it. Maps are at working size (the photo divided by `factor`)."""

    image: np.ndarray  # HxWx3, the result at full size, of the photo's dtype
    background: np.ndarray  # the painterly background at working size, of the photo's dtype
    alpha: np.ndarray  # float32 at working size: 1 keeps the photo, 0 shows the background
    fg: np.ndarray  # float32 the subject kept crisp at working size: the mask, extended to the whole object
    depth: np.ndarray  # float32 normalised depth at working size (nearest = 1)
    factor: int  # full size = working size * factor
    start: float  # depth at and in front of which the photo stays crisp
    stop: float  # depth at and behind which only the background shows
    fg_fraction: float  # share of pixels that are foreground
    background_detail: float  # background detail relative to the subject's (nan: not measured, or no
    # subject or no background)
    left_alone: bool = False  # True when no subject or an already soft background: image is the photo itself
    saliency: np.ndarray | None = None  # float32 the model's mask at working size (fg: extended from it)
    subject_confidence: float = float("nan")  # mean mask level over the model's foreground
    no_subject: bool = False  # True when left alone for want of a clear subject

    @classmethod
    def of(
        cls,
        *,
        factor: int,
        start: float,
        stop: float,
        fg_fraction: float,
        background_detail: float,
        left_alone: float,
        subject_confidence: float,
        no_subject: float,
        image: np.ndarray | None = None,
        background: np.ndarray | None = None,
        alpha: np.ndarray | None = None,
        fg: np.ndarray | None = None,
        depth: np.ndarray | None = None,
        saliency: np.ndarray | None = None,
    ) -> Rendering:
        """A photo's rendering from its numbers and decisions, each a Python, numpy or 0-d torch
        number (flags as bool or 0/1), and the maps it has: those not given are empty (the
        numbers alone, as the device path brings them back)."""
        empty = np.empty((0, 0), np.float32)
        return cls(
            image=np.empty((0, 0, 3), np.uint8) if image is None else image,
            background=np.empty((0, 0, 3), np.uint8) if background is None else background,
            alpha=empty if alpha is None else alpha,
            fg=empty if fg is None else fg,
            depth=empty if depth is None else depth,
            factor=factor,
            start=float(start),
            stop=float(stop),
            fg_fraction=float(fg_fraction),
            background_detail=float(background_detail),
            left_alone=bool(left_alone),
            saliency=saliency,
            subject_confidence=float(subject_confidence),
            no_subject=bool(no_subject),
        )


# The numbers of a Rendering besides its factor, as `Rendering.of` takes them.
RENDERING_NUMBERS = (
    "start",
    "stop",
    "fg_fraction",
    "background_detail",
    "left_alone",
    "subject_confidence",
    "no_subject",
)


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


def painterly_background(
    photo: np.ndarray, kernel_size: int, brightness_min: int = 40, brightness_max: int = 255
) -> np.ndarray:
    """Morphological opening with an elliptical kernel, then min-max into the brightness range.

    Opening removes bright detail smaller than the kernel and leaves flat colour patches; the
    normalisation spans all channels jointly, as cv2.normalize with NORM_MINMAX does. The
    brightness range is given on the 8-bit scale and scaled to a uint16 photo's.
    """
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (kernel_size, kernel_size))
    opened = cv2.morphologyEx(photo, cv2.MORPH_OPEN, kernel)
    scale = _peak(photo) / 255
    return cv2.normalize(opened, None, brightness_min * scale, brightness_max * scale, cv2.NORM_MINMAX)  # type: ignore[call-overload]


def depth_bounds(
    fg: np.ndarray,
    depth: np.ndarray,
    fg_threshold: float = 0.5,
    start_percentile: float = 50.0,
    stop_percentile: float = 50.0,
) -> tuple[float, float]:
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
    the ramp has no width: what is strictly nearer than start stays crisp, and otherwise the mask
    alone decides (so a flat depth map leaves exactly the subject crisp).
    """
    if start <= stop:
        return np.clip(fg + (depth > start), 0.0, 1.0).astype(np.float32)
    alpha = (fg + depth - np.float32(stop)) * np.float32(1.0 / (start - stop))
    return np.clip(alpha, 0.0, 1.0, out=alpha)


def guided_filter_coefficients(
    guide: np.ndarray, src: np.ndarray, radius: int, eps: float, edge_level: float = 0.25, snap: float = 0.01
) -> tuple[np.ndarray, np.ndarray]:
    """Coefficients (a, b) of the guided filter (He et al.): the output is a * guide + b.

    Kept separate so they can be computed on a small image and applied, upsampled, to the
    full-size guide: edges follow the full-resolution photo at the cost of the small one.
    Where a moves the output by under half a grey level (|a| * local std of the guide < 1/510),
    or where src has no edge of its own nearby (its range over the filter's reach is under
    `edge_level`: a gentle ramp of alpha as the scene recedes, into which the guide would only
    print the photo's texture), a * guide is folded into b, so stretches of alpha away from the
    subject's outline need no guide at all. There b is clamped to 0..1 and taken as 0 or 1
    within `snap` of them (a step of at most 1% of the blend), so more of the photo is a plain
    copy of the photo or of the background.
    """
    size = (2 * radius + 1, 2 * radius + 1)

    def box(x: np.ndarray) -> np.ndarray:
        return cv2.boxFilter(x, cv2.CV_32F, size, borderType=cv2.BORDER_REFLECT)

    mean_i, mean_p = box(guide), box(src)
    var_i = box(guide * guide) - mean_i * mean_i
    cov_ip = box(guide * src) - mean_i * mean_p
    a = cov_ip / (var_i + np.float32(eps))
    b = mean_p - a * mean_i
    a, b = box(a), box(b)
    reach = np.ones((4 * radius + 1, 4 * radius + 1), np.uint8)  # a is two box filters wide
    flat = cv2.dilate(src, reach) - cv2.erode(src, reach) < np.float32(edge_level)
    negligible = flat | (np.abs(a) * np.sqrt(np.maximum(var_i, 0.0)) < np.float32(1 / 510))
    plain = np.clip(b + a * mean_i, 0.0, 1.0)
    plain[plain <= snap] = 0.0
    plain[plain >= 1.0 - snap] = 1.0
    np.copyto(b, plain, where=negligible)
    np.copyto(a, np.float32(0.0), where=negligible)
    return a, b


def luminance(photo: np.ndarray) -> np.ndarray:
    """float32 0..1 gray of an RGB photo, the guide of the refinement."""
    gray = cv2.cvtColor(photo, cv2.COLOR_RGB2GRAY)
    return gray.astype(np.float32) * np.float32(1 / _peak(photo))


def _peak(photo: np.ndarray) -> int:
    """White of the photo's dtype: 255 for uint8, 65535 for uint16."""
    return int(np.iinfo(photo.dtype).max)


def composite(
    photo: np.ndarray, background: np.ndarray, alpha: np.ndarray, out: np.ndarray | None = None
) -> np.ndarray:
    """photo * alpha + background * (1 - alpha) in the photo's dtype; all at the same size, alpha
    float32. out: where to write the result (a view into a larger image works)."""
    if photo.dtype == np.uint8:
        return cv2.blendLinear(photo, background, alpha, 1.0 - alpha, dst=out)
    weight = alpha[..., None]  # cv2.blendLinear takes 8-bit or float only
    blended = np.rint(background + (photo.astype(np.float32) - background) * weight).astype(photo.dtype)
    if out is None:
        return blended
    out[...] = blended
    return out


@dataclass(frozen=True)
class WorkingSize:
    """The size the effect works at, and the spatial parameters scaled to it."""

    factor: int  # full size = working size * factor
    height: int
    width: int
    kernel_size: int  # of the painterly background's opening
    refine_radius: int  # of the guided filter (0: no refinement)


def working_size(height: int, width: int, params: EffectParams) -> WorkingSize:
    """The working size of a height x width photo (what `downscale` by its factor gives) and
    the parameters' kernel size and refinement radius scaled to it: they are given for a
    working image whose long side is params.work_size."""
    factor = working_factor(height, width, params.work_size)
    work_h, work_w = height // factor, width // factor
    scale = max(work_h, work_w) / params.work_size if params.work_size else 1.0
    return WorkingSize(
        factor, work_h, work_w, max(1, round(params.kernel_size * scale)), round(params.refine_radius * scale)
    )


def working_factor(height: int, width: int, work_size: int) -> int:
    """The integer factor that brings the long side to at most work_size (1: full resolution).

    An integer factor keeps downscaling exact and cheap, and lets the full-size result be
    assembled tile by tile with exactly the values a whole-image upscale would give.
    """
    if work_size == 0:
        return 1
    return max(1, -(-max(height, width) // work_size))


def downscale(photo: np.ndarray, factor: int) -> np.ndarray:
    """Area-average by an integer factor; the < factor leftover rows/columns are dropped."""
    if factor == 1:
        return photo
    h, w = photo.shape[0] // factor, photo.shape[1] // factor
    return cv2.resize(photo[: h * factor, : w * factor], (w, h), interpolation=cv2.INTER_AREA)


def upscale(values: np.ndarray, factor: int, height: int, width: int) -> np.ndarray:
    """A working-size map or image brought to height x width (bilinear, pixel centres aligned)."""
    return _upscale_block(values, factor, 0, height, 0, width)


def _upscale_block(values: np.ndarray, factor: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """Rows y0:y1, columns x0:x1 of the full-size bilinear upscale, computed from a margin only.

    With an integer factor, cv2.resize of a sub-block maps pixel centres exactly as the resize of
    the whole image does, so the blocks tile into the same result.
    """
    if factor == 1:
        return values[y0:y1, x0:x1].copy()
    h, w = values.shape[:2]
    r0, c0 = max(0, y0 // factor - 1), max(0, x0 // factor - 1)
    r1, c1 = -(-y1 // factor) + 1, -(-x1 // factor) + 1
    block = values[r0 : min(r1, h), c0 : min(c1, w)]
    # Past the working image's edge (the leftover rows of `downscale`) repeat its last row/column.
    pad_b, pad_r = max(0, r1 - h), max(0, c1 - w)
    if pad_b or pad_r:
        block = cv2.copyMakeBorder(block, 0, pad_b, 0, pad_r, cv2.BORDER_REPLICATE)
    up = cv2.resize(block, (block.shape[1] * factor, block.shape[0] * factor), interpolation=cv2.INTER_LINEAR)
    oy, ox = y0 - r0 * factor, x0 - c0 * factor
    return up[oy : oy + y1 - y0, ox : ox + x1 - x0]


def compose_full_size(
    photo: np.ndarray,
    background: np.ndarray,
    coef_a: np.ndarray,
    coef_b: np.ndarray,
    factor: int,
    floor: tuple[np.ndarray, np.ndarray] | None = None,
    tile_pixels: int = 192,
) -> np.ndarray:
    """The full-size composite, where alpha = clamp(up(a / 255) * gray(photo) + up(b), 0, 1), gray
    the photo's 8-bit luminance (a is per unit of luminance, as `guided_filter_coefficients` gives it).

    background, a and b are at working size. Tiles whose alpha is 1 everywhere keep the photo
    and tiles whose alpha is 0 everywhere take the upscaled background, so the blend runs only
    where the subject meets the background. Bilinear upscaling is a convex combination, so
    min(b, a + b) and max(b, a + b) over a tile and its one-pixel margin bound alpha in the tile.
    floor: optional (column ramp, row ramp) whose sum is a floor on alpha (the gradient).
    """
    height, width = photo.shape[:2]
    per_level = coef_a * np.float32(1 / 255)  # a per grey level: the 8-bit gray needs no scaling
    h, w = coef_b.shape
    tile = max(8, round(tile_pixels / factor))  # working pixels per tile: ~tile_pixels at full size
    # Per tile and its one-pixel margin: the bounds of alpha, and whether a (the guide) enters.
    margin = np.ones((3, 3), np.uint8)
    low = _tile_reduce(cv2.erode(np.minimum(coef_b, coef_a + coef_b), margin), tile, np.min)
    high = _tile_reduce(cv2.dilate(np.maximum(coef_b, coef_a + coef_b), margin), tile, np.max)
    guided = _tile_reduce(cv2.dilate((coef_a != 0).astype(np.uint8), margin), tile, np.max) > 0
    out = np.empty_like(photo)
    for i, r in enumerate(range(0, h, tile)):
        for j, c in enumerate(range(0, w, tile)):
            y0, x0 = r * factor, c * factor
            y1 = height if r + tile >= h else (r + tile) * factor
            x1 = width if c + tile >= w else (c + tile) * factor
            floor_block = None
            if floor is not None:
                floor_block = floor[0][x0:x1][None, :] + floor[1][y0:y1][:, None]
            photo_block = photo[y0:y1, x0:x1]
            if low[i, j] >= 1.0:
                out[y0:y1, x0:x1] = photo_block
                continue
            if high[i, j] <= 0.0 and (floor_block is None or floor_block.max() <= 0.0):
                out[y0:y1, x0:x1] = _upscale_block(background, factor, y0, y1, x0, x1)
                continue
            if guided[i, j]:  # edges of the subject: follow the full-resolution photo
                alpha = _upscale_block(per_level, factor, y0, y1, x0, x1) * cv2.cvtColor(
                    photo_block, cv2.COLOR_RGB2GRAY
                )
                alpha += _upscale_block(coef_b, factor, y0, y1, x0, x1)
                np.clip(alpha, 0.0, 1.0, out=alpha)
            else:
                alpha = _upscale_block(coef_b, factor, y0, y1, x0, x1)
                if not 0.0 <= low[i, j] <= high[i, j] <= 1.0:
                    np.clip(alpha, 0.0, 1.0, out=alpha)  # (where a is 0, b is already within 0..1)
            if floor_block is not None:
                np.maximum(alpha, floor_block, out=alpha)
            composite(photo_block, _upscale_block(background, factor, y0, y1, x0, x1), alpha, out=out[y0:y1, x0:x1])
    return out


def _tile_reduce(values: np.ndarray, tile: int, reduce) -> np.ndarray:
    """`reduce` (np.min, np.max) over each tile x tile block; partial blocks at the edges count."""
    h, w = values.shape
    rows, cols = -(-h // tile), -(-w // tile)
    padded = np.pad(values, ((0, rows * tile - h), (0, cols * tile - w)), mode="edge")
    return reduce(padded.reshape(rows, tile, cols, tile), axis=(1, 3))


def gradient_floor(height: int, width: int, direction: str, strength: float) -> tuple[np.ndarray, np.ndarray] | None:
    """(column ramp, row ramp) for the directional gradient, or None for "none".

    The ramp runs from `strength` at the named edge to 0 at the opposite one and is a floor on
    alpha: the named side keeps some of the photo, the far side is all background, which reads
    as a soft fall-off of focus across the frame.
    """
    if direction == "none" or strength <= 0:
        return None
    along_x = direction in ("left", "right")
    ramp = np.linspace(strength, 0.0, width if along_x else height, dtype=np.float32)
    if direction in ("right", "bottom"):
        ramp = ramp[::-1].copy()
    zeros = np.zeros(height if along_x else width, np.float32)
    return (ramp, zeros) if along_x else (zeros, ramp)


def background_detail(
    photo: np.ndarray, fg: np.ndarray, fg_threshold: float = 0.5, whole: np.ndarray | None = None
) -> float:
    """Mean Laplacian magnitude over the background relative to that over the subject.

    A photo whose background already has far less fine detail than its subject (a portrait
    shot with a fast lens, a macro) would look fake with a painted background; a low value
    says so. Measured on a lightly smoothed working-size image, away from the subject's edge.
    whole: the subject extended to the whole object (`extend_subject`): the background is what
    lies outside it (when that is at least a tenth of the photo), so petals the mask missed do
    not count as background detail, while the subject's detail is measured on the mask itself,
    where the model saw the subject.
    nan when there is no subject or no background.
    """
    gray = cv2.GaussianBlur(luminance(photo), (0, 0), 1.0)  # float: 8-bit steps would read as detail
    detail = np.abs(cv2.Laplacian(gray, cv2.CV_32F))
    subject = fg >= fg_threshold
    kernel = np.ones((9, 9), np.uint8)
    background = cv2.erode((~subject).astype(np.uint8), kernel) > 0
    if whole is not None:
        outside = cv2.erode((whole < fg_threshold).astype(np.uint8), kernel) > 0
        # A whole subject that leaves next to no background (colour tied the frame to it) says
        # nothing about the background: then the mask's own outside is measured.
        if np.count_nonzero(outside) >= 0.1 * outside.size:
            background = outside
    if not subject.any() or not background.any():
        return float("nan")
    return float(detail[background].mean() / max(float(detail[subject].mean()), 1e-6))


def subject_strength(fg: np.ndarray, fg_threshold: float = 0.5) -> tuple[float, float]:
    """(area, confidence) of the salient-object mask: the share of pixels at or above the
    threshold, and their mean mask level (1: the model is sure of every one; 0 when there are
    none). A meadow or a storm over an empty field gives a tiny or unsure foreground."""
    subject = fg >= fg_threshold
    count = int(np.count_nonzero(subject))
    if count == 0:
        return 0.0, 0.0
    return count / fg.size, float(fg[subject].mean())


def no_clear_subject(saliency: np.ndarray, params: EffectParams) -> tuple[bool, float]:
    """(whether the photo has no clear subject and is left alone, the mask's confidence): its
    foreground is under params.min_subject_area of the photo, or the model is unsure of it."""
    area, confidence = subject_strength(saliency, params.fg_threshold)
    return area < params.min_subject_area or confidence < params.min_subject_confidence, confidence


def whole_subject(
    work_photo: np.ndarray, saliency: np.ndarray, depth: np.ndarray, depth_measured: bool, params: EffectParams
) -> np.ndarray:
    """The subject kept crisp, at working size: the mask extended to the whole object
    (`extend_subject`) where params.extend_subject asks for it, else the mask itself."""
    if not params.extend_subject:
        return saliency
    # A flat depth map (normalised to all 0) measured nothing that could tell the object apart.
    measured = depth_measured and bool(depth.max() > 0)
    return extend_subject(work_photo, saliency, depth, measured, params.fg_threshold)


def leaves_alone(no_subject: Flag, detail: Flag | float, params: EffectParams) -> Flag:
    """Whether the photo is left as it is: no clear subject, or a background already softer
    than params.min_background_detail of the subject's detail (never where detail is nan: not
    measured). Per photo, on bools and floats or on torch tensors alike."""
    return no_subject | (detail < params.min_background_detail)  # type: ignore[operator]


# Colour and texture bins of the subject model: L in 8 steps, a and b in 16, detail in 2.
_TIE_SHAPE = (8, 16, 16, 2)


def appearance_bins(photo: np.ndarray) -> np.ndarray:
    """Each pixel's bin of colour (CIELAB, coarse) and texture (fine detail above or below the
    photo's mean): int32 indices into a histogram of np.prod(_TIE_SHAPE) bins."""
    lab = cv2.cvtColor(photo, cv2.COLOR_RGB2LAB)
    gray = lab[..., 0]
    detail = cv2.blur(cv2.absdiff(gray, cv2.blur(gray, (3, 3))), (5, 5))
    textured = (detail > cv2.mean(detail)[0]).astype(np.int32)
    lum, a, b = (np.right_shift(lab[..., i], shift).astype(np.int32) for i, shift in enumerate((5, 4, 4)))
    return ((lum * 16 + a) * 16 + b) * 2 + textured


def _histogram(bins: np.ndarray, where: np.ndarray) -> np.ndarray:
    """Normalised, lightly smoothed histogram of the bins where `where` holds."""
    counts = np.bincount(bins[where], minlength=int(np.prod(_TIE_SHAPE))).astype(np.float32)
    counts = counts.reshape(_TIE_SHAPE[0], _TIE_SHAPE[1], _TIE_SHAPE[2] * _TIE_SHAPE[3])
    # Neighbouring colours count a little: a subject's shades in the photo's unmasked parts.
    counts = np.stack([cv2.GaussianBlur(c, (3, 3), 0.8, borderType=cv2.BORDER_REPLICATE) for c in counts])
    counts[1:] += 0.25 * counts[:-1]
    counts[:-1] += 0.25 * counts[1:]
    return counts.ravel() / max(float(counts.sum()), 1.0)


def tied_to_core(
    photo: np.ndarray, fg: np.ndarray, core_level: float = 0.9, clear_level: float = 0.1, ratio: float = 1.0
) -> np.ndarray:
    """Pixels whose colour and texture are more typical of the mask's confident core than of
    what is clearly background (likelihood ratio above `ratio`), as a bool map.

    With no core, or nothing clearly background, nothing is tied."""
    core = fg >= core_level
    clear = fg < clear_level
    if not core.any() or not clear.any():
        return np.zeros(fg.shape, bool)
    bins = appearance_bins(photo)
    subject_like = _histogram(bins, core) > np.float32(ratio) * _histogram(bins, clear)
    return subject_like[bins]


def subject_depth_range(fg: np.ndarray, depth: np.ndarray, core_level: float = 0.9) -> tuple[float, float]:
    """The depth range of the mask's confident core (its 5th..95th percentile): where a depth
    model measured the subject to be. (1, 0), an empty range, when there is no core."""
    core = fg >= core_level
    if not core.any():
        return 1.0, 0.0
    lo, hi = np.percentile(depth[core], (5.0, 95.0))
    return float(lo), float(hi)


def connected_to_core(core: np.ndarray, grow: np.ndarray) -> np.ndarray:
    """The parts of core | grow that are 8-connected to the core (the core included)."""
    region = (core | grow).astype(np.uint8)
    count, labels = cv2.connectedComponents(region, connectivity=8)
    if count <= 1:
        return core.copy()
    keep = np.zeros(count, bool)
    keep[np.unique(labels[core])] = True
    keep[0] = False
    return keep[labels]


def extend_subject(
    photo: np.ndarray,
    fg: np.ndarray,
    depth: np.ndarray,
    depth_measured: bool,
    fg_threshold: float = 0.5,
    core_level: float = 0.9,
    clear_level: float = 0.1,
    max_side: int = 320,
) -> np.ndarray:
    """The mask grown to the whole object it belongs to (float32 0..1).

    A partial mask (the nose of a face, two petals of a flower) stops where the model stopped,
    often in the middle of a smooth stretch of the object; the object itself ends at an edge
    of the photo. So: what is clearly background is marked (a low mask level, and a colour and
    texture the mask's confident core does not have, `tied_to_core`), the mask is marked as
    subject, and a watershed on the photo's gradients shares what is left between them: a petal
    the mask missed is reached from the subject without crossing an edge, the wall behind it
    only across one. With measured depth, what lies clearly off the core's depth is background
    too, and the core's depth range connected to it is subject. With the weight-free ground
    prior, mask levels the model was unsure of count as subject, and a colour only half as
    typical of the core as of the background still keeps a region from being marked
    background: when in doubt, crisp.

    Decided on a copy whose long side is at most `max_side` (the object's extent needs no
    finer grain; the refinement brings the edges back to the photo's), kept where the model's
    own mask is higher.
    """
    core = fg >= core_level
    if not core.any():
        return fg
    height, width = fg.shape
    step = max(1, -(-max(height, width) // max_side))
    if step > 1:
        small = (width // step, height // step)
        photo = cv2.resize(photo[: small[1] * step, : small[0] * step], small, interpolation=cv2.INTER_AREA)
        fg_small = cv2.resize(fg[: small[1] * step, : small[0] * step], small, interpolation=cv2.INTER_AREA)
        depth = cv2.resize(depth[: small[1] * step, : small[0] * step], small, interpolation=cv2.INTER_AREA)
    else:
        fg_small = fg
    if photo.dtype != np.uint8:  # a camera RAW's 16 bits: colour bins and edges need no more than 8
        photo = cv2.convertScaleAbs(photo, alpha=255 / 65535)
    core = fg_small >= core_level
    if not core.any():
        core = fg_small >= fg_threshold
    subject = fg_small >= (fg_threshold if depth_measured else fg_threshold / 2)
    ratio = 1.0 if depth_measured else 0.5
    clear = (fg_small < clear_level) & ~tied_to_core(photo, fg_small, core_level, clear_level, ratio)
    if depth_measured:
        lo, hi = subject_depth_range(fg_small, depth, core_level)
        subject |= connected_to_core(core, (depth >= lo - 0.02) & (depth <= hi + 0.02))
        clear |= (depth < lo - 0.15) | (depth > hi + 0.15)
    markers = np.where(subject, 1, np.where(clear, 2, 0)).astype(np.int32)
    cv2.watershed(np.ascontiguousarray(photo[..., ::-1]), markers)
    # The watershed draws -1 on the frame's edge too: those pixels go with their inner neighbours.
    markers[0], markers[-1], markers[:, 0], markers[:, -1] = markers[1], markers[-2], markers[:, 1], markers[:, -2]
    whole = (markers != 2).astype(np.float32)  # the subject and the lines on its border: in doubt, crisp
    if step > 1:
        whole = cv2.resize(whole, (width, height), interpolation=cv2.INTER_LINEAR)
    return np.maximum(fg, whole)


def render(
    photo: np.ndarray, fg: np.ndarray, depth: np.ndarray, params: EffectParams, depth_measured: bool = True
) -> Rendering:
    """The whole effect on one photo with the given parameters.

    depth_measured: False when depth is the weight-free ground prior, not a depth model's
    measurement: the subject is then extended by colour and texture alone, generously.
    """
    height, width = photo.shape[:2]
    size = working_size(height, width, params)
    work_photo = downscale(photo, size.factor)
    saliency = np.clip(resize_map(fg, size.height, size.width), 0.0, 1.0)
    depth_work = normalize_depth(resize_map(depth, size.height, size.width))
    no_subject, confidence = no_clear_subject(saliency, params)
    fg_work = saliency if no_subject else whole_subject(work_photo, saliency, depth_work, depth_measured, params)
    start, stop = depth_bounds(
        fg_work, depth_work, params.fg_threshold, params.start_percentile, params.stop_percentile
    )
    if no_subject:  # the photo as it is, its working copy as background, alpha all 1
        image, background, alpha, detail = photo, work_photo, np.ones_like(saliency), float("nan")
    else:
        alpha = interpolation_alpha(fg_work, depth_work, start, stop)
        background = painterly_background(work_photo, size.kernel_size, params.brightness_min, params.brightness_max)
        if size.refine_radius > 0:
            guide = luminance(work_photo)
            coef_a, coef_b = guided_filter_coefficients(guide, alpha, size.refine_radius, params.refine_eps)
            alpha = np.clip(coef_a * guide + coef_b, 0.0, 1.0)
        else:
            coef_a, coef_b = np.zeros_like(alpha), alpha
        detail = (
            background_detail(work_photo, saliency, params.fg_threshold, whole=fg_work)
            if params.min_background_detail > 0
            else float("nan")
        )
        if leaves_alone(False, detail, params):
            image = photo
        else:
            floor = gradient_floor(height, width, params.gradient, params.gradient_strength)
            image = compose_full_size(photo, background, coef_a, coef_b, size.factor, floor)
    return Rendering.of(
        factor=size.factor,
        start=start,
        stop=stop,
        fg_fraction=float(np.count_nonzero(fg_work >= params.fg_threshold)) / fg_work.size,
        background_detail=detail,
        left_alone=leaves_alone(no_subject, detail, params),
        subject_confidence=confidence,
        no_subject=no_subject,
        image=image,
        background=background,
        alpha=alpha,
        fg=fg_work,
        depth=depth_work,
        saliency=saliency,
    )
