"""The effect of pipeline/effect.py on batches of torch tensors, on whatever device they live.

The same steps as effect.py, function by function and under the same names, so that a change
there has one obvious place to go here: painterly background, depth normalisation and bounds,
interpolation alpha, edge-aware refinement, gradient, composite. effect.py stays the reference
and the CPU path; this one keeps a photo on a GPU from decode to encode.

Shapes: photos N x 3 x H x W uint8 (RGB), maps N x h x w float32, per-photo scalars N. One batch
holds photos of one size (their maps share a size too). Nothing here waits for the device: every
decision (no subject, flat depth, a soft background) is a tensor, taken with torch.where, so a
batch is queued whole and read back once (``TorchRendering.host``).

Arithmetic follows OpenCV's where effect.py uses it (bilinear with pixel centres at
half-integers, BORDER_REFLECT box filters, the fixed-point RGB to gray), so results agree to
within a grey level of rounding.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from .effect import Rendering, gradient_floor, working_factor
from .models.tensors import resize_area
from .params import EffectParams

# float32 constants as effect.py's numpy arithmetic has them (a Python float holding the float32 value)
_HALF_LEVEL = float(np.float32(1 / 510))
_PER_LEVEL = float(np.float32(1 / 255))
_BLEND_NORM = float(np.float32(1 / (1 + 1e-5)))


@dataclass
class TorchRendering:
    """effect.Rendering for a batch, as tensors on the device (see there for each field)."""

    image: torch.Tensor  # N x 3 x H x W uint8
    background: torch.Tensor  # N x 3 x h x w uint8, working size
    alpha: torch.Tensor  # N x h x w float32
    fg: torch.Tensor  # N x h x w float32
    depth: torch.Tensor  # N x h x w float32
    factor: int
    start: torch.Tensor  # N float64
    stop: torch.Tensor  # N float64
    fg_fraction: torch.Tensor  # N float32
    background_detail: torch.Tensor  # N float32, nan where not measured
    left_alone: torch.Tensor  # N bool

    def host(self, i: int, with_image: bool = True) -> Rendering:
        """Photo i as effect.Rendering, in host memory (waits for the device)."""

        def hwc(x: torch.Tensor) -> np.ndarray:
            return x.permute(1, 2, 0).contiguous().cpu().numpy()

        return Rendering(
            image=hwc(self.image[i]) if with_image else np.empty((0, 0, 3), np.uint8),
            background=hwc(self.background[i]),
            alpha=self.alpha[i].cpu().numpy(),
            fg=self.fg[i].cpu().numpy(),
            depth=self.depth[i].cpu().numpy(),
            factor=self.factor,
            start=float(self.start[i]),
            stop=float(self.stop[i]),
            fg_fraction=float(self.fg_fraction[i]),
            background_detail=float(self.background_detail[i]),
            left_alone=bool(self.left_alone[i]),
        )


def resize_map(values: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """N x h x w float32 maps resized to height x width (bilinear; area when shrinking a lot)."""
    values = values.to(torch.float32)
    if tuple(values.shape[-2:]) == (height, width):
        return values
    if values.shape[-2] > 2 * height and values.shape[-1] > 2 * width:
        return resize_area(values, height, width)
    return F.interpolate(values[:, None], size=(height, width), mode="bilinear", align_corners=False)[:, 0]


def normalize_depth(depth: torch.Tensor) -> torch.Tensor:
    """Each map min-max normalised so its nearest pixel is 1 and its farthest 0; flat maps become 0."""
    depth = torch.nan_to_num(depth.to(torch.float32), nan=0.0, posinf=0.0, neginf=0.0)
    lo = depth.amin(dim=(1, 2), keepdim=True)
    hi = depth.amax(dim=(1, 2), keepdim=True)
    span = hi - lo
    scale = torch.where(span > 0, 1.0 / torch.where(span > 0, span, 1.0).double(), 0.0).float()
    return (depth - lo) * scale


@functools.lru_cache(maxsize=16)
def _ellipse_rows(kernel_size: int) -> tuple[tuple[int, int, int], ...]:
    """(dy, dx_lo, dx_hi) of each row of OpenCV's elliptical kernel, relative to its anchor: an
    ellipse is convex, so each row is one run of columns."""
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (kernel_size, kernel_size))
    anchor = kernel_size // 2
    rows = []
    for i, row in enumerate(kernel):
        cols = np.flatnonzero(row)
        if cols.size:
            rows.append((i - anchor, int(cols[0]) - anchor, int(cols[-1]) - anchor))
    return tuple(rows)


def _running_max(x: torch.Tensor, rows: tuple[tuple[int, int, int], ...]) -> torch.Tensor:
    """max over the kernel's offsets of x (N x C x H x W float), what lies outside ignored.

    A run of L columns is the max of two overlapping runs of 2^k <= L, taken from a doubling
    pyramid of running maxima: about log2(L) + 2 passes per row of the kernel, whatever L is.
    """
    height, width = x.shape[-2:]
    pad = max(max(abs(dy), abs(lo), abs(hi)) for dy, lo, hi in rows)
    padded = F.pad(x, (pad, pad, pad, pad), value=float("-inf"))
    longest = max(hi - lo + 1 for _, lo, hi in rows)
    pyramid = {1: padded}  # pyramid[s][..., j] = max of padded[..., j : j + s]
    step = 1
    while 2 * step <= longest:
        prev = pyramid[step]
        pyramid[2 * step] = torch.maximum(prev[..., :-step], prev[..., step:])
        step *= 2
    runs: dict[tuple[int, int], torch.Tensor] = {}
    out = None
    for dy, lo, hi in rows:
        if (lo, hi) not in runs:
            span = 1 << ((hi - lo + 1).bit_length() - 1)
            level = pyramid[span]
            first = level[..., pad + lo : pad + lo + width]
            last = level[..., pad + hi - span + 1 : pad + hi - span + 1 + width]
            runs[(lo, hi)] = torch.maximum(first, last)
        shifted = runs[(lo, hi)][..., pad + dy : pad + dy + height, :]
        out = shifted.clone() if out is None else torch.maximum(out, shifted, out=out)
    assert out is not None
    return out


def painterly_background(
    photos: torch.Tensor, kernel_size: int, brightness_min: int = 40, brightness_max: int = 255
) -> torch.Tensor:
    """Morphological opening with an elliptical kernel, then min-max into the brightness range.

    As cv2.morphologyEx(MORPH_OPEN) and cv2.normalize(NORM_MINMAX) do: erosion then dilation with
    the same offsets, pixels outside the image ignored; the range spans all channels jointly.
    """
    rows = _ellipse_rows(kernel_size)
    x = photos.to(torch.float32)
    opened = _running_max(-_running_max(-x, rows), rows)
    lo = opened.amin(dim=(1, 2, 3), keepdim=True).double()
    hi = opened.amax(dim=(1, 2, 3), keepdim=True).double()
    span = hi - lo
    scale = torch.where(span > 0, (brightness_max - brightness_min) / torch.where(span > 0, span, 1.0), 0.0)
    shift = brightness_min - lo * scale
    return (opened * scale.float() + shift.float()).round_().clamp_(0, 255).to(torch.uint8)


def _masked_percentile(ordered: torch.Tensor, chosen: torch.Tensor, q: float, empty: torch.Tensor) -> torch.Tensor:
    """np.percentile (linear) of the values of each row of ``ordered`` (sorted) where ``chosen``;
    ``empty`` where a row chooses none."""
    count = chosen.sum(dim=1)
    rank = chosen.cumsum(dim=1)  # rank[j] = how many chosen values up to and including j
    position = (count - 1).clamp(min=0).double() * (q / 100.0)
    below = position.floor()
    above = torch.minimum(below + 1, (count - 1).clamp(min=0).double())
    last = ordered.shape[1] - 1

    def value(k: torch.Tensor) -> torch.Tensor:  # the k-th chosen value (0-based) of each row
        index = torch.searchsorted(rank, (k.long() + 1)[:, None]).clamp_(max=last)
        return ordered.gather(1, index)[:, 0].double()

    low = value(below)
    result = low + (value(above) - low) * (position - below)
    return torch.where(count > 0, result, empty)


def depth_bounds(
    fg: torch.Tensor,
    depth: torch.Tensor,
    fg_threshold: float = 0.5,
    start_percentile: float = 50.0,
    stop_percentile: float = 50.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(start, stop) per photo: a percentile of depth over foreground pixels, and over background
    pixels; stop never exceeds start. No foreground: start is 1; no background: stop is start.
    One sort per photo serves both percentiles."""
    n = fg.shape[0]
    ordered, order = torch.sort(depth.reshape(n, -1), dim=1)
    is_fg = (fg >= fg_threshold).reshape(n, -1).gather(1, order)
    nearest = torch.ones(n, dtype=torch.float64, device=fg.device)
    start = _masked_percentile(ordered, is_fg, start_percentile, nearest)
    stop = _masked_percentile(ordered, ~is_fg, stop_percentile, start)
    return start, torch.minimum(start, stop)


def interpolation_alpha(fg: torch.Tensor, depth: torch.Tensor, start: torch.Tensor, stop: torch.Tensor) -> torch.Tensor:
    """alpha = clamp((fg + depth - stop) / (start - stop), 0, 1); where start == stop, what is
    strictly nearer than start stays crisp and otherwise the mask alone decides."""
    start, stop = start[:, None, None], stop[:, None, None]
    ramp = start > stop
    inverse = (1.0 / torch.where(ramp, start - stop, 1.0)).float()
    sloped = ((fg + depth - stop.float()) * inverse).clamp_(0.0, 1.0)
    flat = (fg + (depth > start.float())).clamp_(0.0, 1.0)
    return torch.where(ramp, sloped, flat)


def _reflect_index(n: int, radius: int, device: torch.device) -> torch.Tensor:
    """Indices of a length-n axis padded by radius as OpenCV's BORDER_REFLECT does (fedcba|abcdef)."""
    index = torch.arange(-radius, n + radius, device=device)
    index = torch.where(index < 0, -index - 1, index)
    return torch.where(index >= n, 2 * n - 1 - index, index).clamp_(0, n - 1)


def _box(x: torch.Tensor, radius: int) -> torch.Tensor:
    """cv2.boxFilter (normalised, BORDER_REFLECT) of N x h x w maps, window 2 * radius + 1."""
    h, w = x.shape[-2:]
    padded = x.index_select(1, _reflect_index(h, radius, x.device)).index_select(2, _reflect_index(w, radius, x.device))
    size = 2 * radius + 1
    rows = F.avg_pool2d(padded[:, None], (1, size), stride=1)
    return F.avg_pool2d(rows, (size, 1), stride=1)[:, 0]


def guided_filter_coefficients(
    guide: torch.Tensor, src: torch.Tensor, radius: int, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Coefficients (a, b) of the guided filter, a * guide + b; a * guide folded into b where it
    moves the output by under half a grey level (see effect.guided_filter_coefficients)."""
    mean_i, mean_p = _box(guide, radius), _box(src, radius)
    var_i = _box(guide * guide, radius) - mean_i * mean_i
    cov_ip = _box(guide * src, radius) - mean_i * mean_p
    a = cov_ip / (var_i + eps)
    b = mean_p - a * mean_i
    a, b = _box(a, radius), _box(b, radius)
    negligible = a.abs() * var_i.clamp(min=0.0).sqrt() < _HALF_LEVEL
    b = torch.where(negligible, b + a * mean_i, b)
    a = torch.where(negligible, 0.0, a)
    return a, b


def luminance(photos: torch.Tensor) -> torch.Tensor:
    """N x H x W float32 0..1 gray, OpenCV's fixed-point RGB to gray exactly (integers in float32)."""
    x = photos.to(torch.float32)
    gray = torch.floor((x[:, 0] * 4899 + x[:, 1] * 9617 + x[:, 2] * 1868 + 8192) * (1 / 16384))
    return gray * _PER_LEVEL


def composite(photo: torch.Tensor, background: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """photo * alpha + background * (1 - alpha) as uint8, as cv2.blendLinear rounds it (its
    weights are divided by their sum plus 1e-5)."""
    alpha = alpha[:, None]
    blended = (photo.to(torch.float32) * alpha + background.to(torch.float32) * (1 - alpha)) * _BLEND_NORM
    return blended.round_().clamp_(0, 255).to(torch.uint8)


def downscale(photos: torch.Tensor, factor: int) -> torch.Tensor:
    """Area-average by an integer factor (uint8 in, uint8 out); leftover rows/columns dropped."""
    if factor == 1:
        return photos
    return F.avg_pool2d(photos.to(torch.float32), factor).round_().to(torch.uint8)


def upscale(values: torch.Tensor, factor: int, height: int, width: int) -> torch.Tensor:
    """Working-size N x C x h x w (or N x h x w) float brought to height x width: bilinear with
    pixel centres aligned, and past the working image's edge its last row/column repeated."""
    if factor == 1:
        return values
    planes = values.dim() == 3
    x = values[:, None] if planes else values
    h, w = x.shape[-2:]
    x = F.interpolate(x, size=(h * factor, w * factor), mode="bilinear", align_corners=False)
    if (h * factor, w * factor) != (height, width):
        x = F.pad(x, (0, width - w * factor, 0, height - h * factor), mode="replicate")
    return x[:, 0] if planes else x


def compose_full_size(
    photos: torch.Tensor,
    background: torch.Tensor,
    coef_a: torch.Tensor,
    coef_b: torch.Tensor,
    factor: int,
    floor: torch.Tensor | None = None,
) -> torch.Tensor:
    """The full-size composite, alpha = clamp(up(a) * luminance(photo) + up(b), 0, 1), on the whole
    frame at once (a GPU gains nothing from skipping tiles); photo by photo, so that only one
    full-size float image is alive at a time. floor: an H x W floor on alpha (the gradient)."""
    height, width = photos.shape[-2:]
    out = torch.empty_like(photos)
    for i in range(photos.shape[0]):
        one = photos[i : i + 1]
        alpha = upscale(coef_b[i : i + 1], factor, height, width) + upscale(
            coef_a[i : i + 1], factor, height, width
        ) * luminance(one)
        if floor is not None:
            alpha = torch.maximum(alpha, floor)
        alpha = alpha.clamp_(0.0, 1.0)
        back = upscale(background[i : i + 1].to(torch.float32), factor, height, width).round_()
        out[i : i + 1] = composite(one, back, alpha)
    return out


# Constants go to a device once: a copy from pageable host memory may wait for the GPU to drain.


@functools.lru_cache(maxsize=8)
def _gradient_floor(
    height: int, width: int, direction: str, strength: float, device: torch.device
) -> torch.Tensor | None:
    ramps = gradient_floor(height, width, direction, strength)
    if ramps is None:
        return None
    columns, rows = (torch.from_numpy(r).to(device) for r in ramps)
    return columns[None, :] + rows[:, None]


@functools.lru_cache(maxsize=8)
def _filters(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """OpenCV's 9-tap Gaussian of sigma 1 and its 3x3 Laplacian (ksize 1), on ``device``."""
    taps = torch.from_numpy(cv2.getGaussianKernel(9, 1.0, cv2.CV_32F)[:, 0].copy())
    laplacian = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])
    return taps.to(device), laplacian.to(device)


def _gaussian_sigma1(gray: torch.Tensor) -> torch.Tensor:
    """cv2.GaussianBlur(gray, (0, 0), 1.0) of float maps: a 9-tap kernel, BORDER_REFLECT_101."""
    taps = _filters(gray.device)[0]
    x = F.pad(gray[:, None], (4, 4, 4, 4), mode="reflect")
    x = F.conv2d(x, taps.view(1, 1, 1, 9))
    return F.conv2d(x, taps.view(1, 1, 9, 1))[:, 0]


def background_detail(photos: torch.Tensor, fg: torch.Tensor, fg_threshold: float = 0.5) -> torch.Tensor:
    """Per photo, mean Laplacian magnitude over the background relative to that over the subject
    (see effect.background_detail); nan when there is no subject or no background."""
    gray = _gaussian_sigma1(luminance(photos))
    laplacian = _filters(gray.device)[1]
    detail = F.conv2d(F.pad(gray[:, None], (1, 1, 1, 1), mode="reflect"), laplacian.view(1, 1, 3, 3))[:, 0].abs()
    subject = fg >= fg_threshold
    # cv2.erode of the background by a 9x9 square: what lies within 4 px of the subject is not
    # background; outside the image counts as background, as max-pooling's padding ignores it.
    near_subject = F.max_pool2d(subject[:, None].to(torch.float32), 9, stride=1, padding=4)[:, 0] > 0
    background = ~near_subject
    n_subject = subject.sum(dim=(1, 2))
    n_background = background.sum(dim=(1, 2))
    mean_bg = (detail * background).sum(dim=(1, 2)) / n_background.clamp(min=1)
    mean_fg = (detail * subject).sum(dim=(1, 2)) / n_subject.clamp(min=1)
    ratio = mean_bg / mean_fg.clamp(min=1e-6)
    return torch.where((n_subject > 0) & (n_background > 0), ratio, float("nan"))


@torch.inference_mode()
def render(photos: torch.Tensor, fg: torch.Tensor, depth: torch.Tensor, params: EffectParams) -> TorchRendering:
    """The whole effect on a batch of same-size photos with the given parameters."""
    height, width = photos.shape[-2:]
    n = photos.shape[0]
    factor = working_factor(height, width, params.work_size)
    work_photo = downscale(photos, factor)
    work_h, work_w = work_photo.shape[-2:]
    scale = max(work_h, work_w) / params.work_size if params.work_size else 1.0
    kernel_size = max(1, round(params.kernel_size * scale))
    refine_radius = round(params.refine_radius * scale)

    fg_work = resize_map(fg.to(photos.device), work_h, work_w).clamp_(0.0, 1.0)
    depth_work = normalize_depth(resize_map(depth.to(photos.device), work_h, work_w))
    start, stop = depth_bounds(
        fg_work, depth_work, params.fg_threshold, params.start_percentile, params.stop_percentile
    )
    alpha = interpolation_alpha(fg_work, depth_work, start, stop)
    background = painterly_background(work_photo, kernel_size, params.brightness_min, params.brightness_max)

    if refine_radius > 0:
        guide = luminance(work_photo)
        coef_a, coef_b = guided_filter_coefficients(guide, alpha, refine_radius, params.refine_eps)
        alpha = (coef_a * guide + coef_b).clamp_(0.0, 1.0)
    else:
        coef_a, coef_b = torch.zeros_like(alpha), alpha

    nan = torch.full((n,), float("nan"), device=photos.device)
    detail = background_detail(work_photo, fg_work, params.fg_threshold) if params.min_background_detail > 0 else nan
    left_alone = detail < params.min_background_detail  # False for nan
    floor = _gradient_floor(height, width, params.gradient, params.gradient_strength, photos.device)
    composed = compose_full_size(photos, background, coef_a, coef_b, factor, floor)
    image = torch.where(left_alone[:, None, None, None], photos, composed)
    return TorchRendering(
        image=image,
        background=background,
        alpha=alpha,
        fg=fg_work,
        depth=depth_work,
        factor=factor,
        start=start,
        stop=stop,
        fg_fraction=(fg_work >= params.fg_threshold).sum(dim=(1, 2)).float() / (work_h * work_w),
        background_detail=detail,
        left_alone=left_alone,
    )
