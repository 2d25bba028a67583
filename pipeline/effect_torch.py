"""The effect of pipeline/effect.py on batches of torch tensors, on whatever device they live.

The same steps as effect.py, function by function and under the same names, so that a change
there has one obvious place to go here: painterly background, depth normalisation and bounds,
interpolation alpha, edge-aware refinement, gradient, composite. effect.py stays the reference
and the CPU path; this one keeps a photo on a GPU from decode to encode.

Shapes: photos N x 3 x H x W uint8 (RGB), maps N x h x w float32, per-photo scalars N. One batch
holds photos of one size (their maps share a size too). The decisions on the working-size maps
that need OpenCV's watershed and connected components (a clear subject, the whole subject:
effect.no_clear_subject, effect.whole_subject) are effect.py's own, taken on host copies of
those small maps, one copy per batch; everything at full resolution stays on the device. The
working size and the parameters scaled to it (effect.working_size), the decision to leave a
photo alone (effect.leaves_alone, on tensors here) and the Rendering a photo comes back as
(effect.Rendering.of) are effect.py's too; what is decided per pixel is taken with torch.where.

Arithmetic follows OpenCV's where effect.py uses it (bilinear with pixel centres at
half-integers, BORDER_REFLECT box filters, the fixed-point RGB to gray), so results agree to
within a grey level of rounding.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, replace

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from . import effect
from .effect import RENDERING_NUMBERS, Rendering, gradient_floor, leaves_alone, working_size
from .models.tensors import resize_map
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
    fg: torch.Tensor  # N x h x w float32, the subject extended to the whole object
    depth: torch.Tensor  # N x h x w float32
    factor: int
    start: torch.Tensor  # N float64
    stop: torch.Tensor  # N float64
    fg_fraction: torch.Tensor  # N float32
    background_detail: torch.Tensor  # N float32, nan where not measured
    left_alone: torch.Tensor  # N bool
    saliency: torch.Tensor  # N x h x w float32, the model's mask at working size
    subject_confidence: torch.Tensor  # N float32
    no_subject: torch.Tensor  # N bool

    def numbers(self, i: int) -> torch.Tensor:
        """Photo i's numbers (effect.RENDERING_NUMBERS) as one float64 tensor on the device."""
        return torch.stack([getattr(self, name)[i].double() for name in RENDERING_NUMBERS])

    def host(self, i: int, with_image: bool = True) -> Rendering:
        """Photo i as effect.Rendering, in host memory (waits for the device)."""

        def hwc(x: torch.Tensor) -> np.ndarray:
            return x.permute(1, 2, 0).contiguous().cpu().numpy()

        return replace(
            host_numbers([(self, i)])[0],
            image=hwc(self.image[i]) if with_image else np.empty((0, 0, 3), np.uint8),
            background=hwc(self.background[i]),
            alpha=self.alpha[i].cpu().numpy(),
            fg=self.fg[i].cpu().numpy(),
            depth=self.depth[i].cpu().numpy(),
            saliency=self.saliency[i].cpu().numpy(),
        )


def host_numbers(photos: Sequence[tuple[TorchRendering, int]]) -> list[Rendering]:
    """The numbers of each (batch, index) photo as an effect.Rendering without maps, brought to
    the host in one copy."""
    rows = torch.stack([batch.numbers(i) for batch, i in photos]).cpu().tolist()
    return [
        Rendering.of(factor=batch.factor, **dict(zip(RENDERING_NUMBERS, row))) for (batch, _), row in zip(photos, rows)
    ]


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
    guide: torch.Tensor, src: torch.Tensor, radius: int, eps: float, edge_level: float = 0.25, snap: float = 0.01
) -> tuple[torch.Tensor, torch.Tensor]:
    """Coefficients (a, b) of the guided filter, a * guide + b; a * guide folded into b where it
    moves the output by under half a grey level or where src has no edge of its own within the
    filter's reach, b there clamped to 0..1 and snapped to 0 or 1 within ``snap`` of them (see
    effect.guided_filter_coefficients)."""
    mean_i, mean_p = _box(guide, radius), _box(src, radius)
    var_i = _box(guide * guide, radius) - mean_i * mean_i
    cov_ip = _box(guide * src, radius) - mean_i * mean_p
    a = cov_ip / (var_i + eps)
    b = mean_p - a * mean_i
    a, b = _box(a, radius), _box(b, radius)
    # cv2.dilate minus cv2.erode by a square of side 4 * radius + 1 (a is two box filters wide);
    # max-pooling's padding is ignored, as OpenCV's default border for both is.
    reach, pad = 4 * radius + 1, 2 * radius
    spread = F.max_pool2d(src[:, None], reach, stride=1, padding=pad) + F.max_pool2d(
        -src[:, None], reach, stride=1, padding=pad
    )
    flat = spread[:, 0] < edge_level
    negligible = flat | (a.abs() * var_i.clamp(min=0.0).sqrt() < _HALF_LEVEL)
    plain = (b + a * mean_i).clamp_(0.0, 1.0)
    plain = torch.where(plain <= snap, 0.0, torch.where(plain >= 1.0 - snap, 1.0, plain))
    b = torch.where(negligible, plain, b)
    a = torch.where(negligible, 0.0, a)
    return a, b


def gray8(photos: torch.Tensor) -> torch.Tensor:
    """N x H x W float32 0..255 gray levels, OpenCV's fixed-point RGB to gray exactly (integers in float32)."""
    x = photos.to(torch.float32)
    return torch.floor((x[:, 0] * 4899 + x[:, 1] * 9617 + x[:, 2] * 1868 + 8192) * (1 / 16384))


def luminance(photos: torch.Tensor) -> torch.Tensor:
    """N x H x W float32 0..1 gray, the refinement's guide (as effect.luminance)."""
    return gray8(photos) * _PER_LEVEL


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
    if factor == 2:  # OpenCV's INTER_AREA rounds halves up here ((sum + 2) >> 2), to even elsewhere
        return F.avg_pool2d(photos.to(torch.float32), 2).add_(0.5).floor_().to(torch.uint8)
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
    """The full-size composite, alpha = clamp(up(a / 255) * gray(photo) + up(b), 0, 1), gray the
    photo's 8-bit luminance, on the whole frame at once (a GPU gains nothing from skipping tiles);
    photo by photo, so that only one full-size float image is alive at a time. floor: an H x W
    floor on alpha (the gradient)."""
    height, width = photos.shape[-2:]
    per_level = coef_a * _PER_LEVEL  # a per grey level, as effect.compose_full_size has it
    out = torch.empty_like(photos)
    for i in range(photos.shape[0]):
        one = photos[i : i + 1]
        alpha = upscale(per_level[i : i + 1], factor, height, width) * gray8(one)
        alpha = alpha.add_(upscale(coef_b[i : i + 1], factor, height, width)).clamp_(0.0, 1.0)
        if floor is not None:
            alpha = torch.maximum(alpha, floor)
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


def background_detail(
    photos: torch.Tensor, fg: torch.Tensor, fg_threshold: float = 0.5, whole: torch.Tensor | None = None
) -> torch.Tensor:
    """Per photo, mean Laplacian magnitude over the background relative to that over the subject
    (see effect.background_detail: with ``whole``, the background is what lies outside the whole
    subject, where that is at least a tenth of the photo); nan when there is no subject or no
    background."""
    gray = _gaussian_sigma1(luminance(photos))
    laplacian = _filters(gray.device)[1]
    detail = F.conv2d(F.pad(gray[:, None], (1, 1, 1, 1), mode="reflect"), laplacian.view(1, 1, 3, 3))[:, 0].abs()
    subject = fg >= fg_threshold
    background = _away_from(subject)
    if whole is not None:
        outside = _away_from(whole >= fg_threshold)
        wide = outside.sum(dim=(1, 2)) >= 0.1 * outside[0].numel()
        background = torch.where(wide[:, None, None], outside, background)
    n_subject = subject.sum(dim=(1, 2))
    n_background = background.sum(dim=(1, 2))
    mean_bg = (detail * background).sum(dim=(1, 2)) / n_background.clamp(min=1)
    mean_fg = (detail * subject).sum(dim=(1, 2)) / n_subject.clamp(min=1)
    ratio = mean_bg / mean_fg.clamp(min=1e-6)
    return torch.where((n_subject > 0) & (n_background > 0), ratio, float("nan"))


def _away_from(subject: torch.Tensor) -> torch.Tensor:
    """cv2.erode of ~subject by a 9x9 square: what lies within 4 px of the subject is not
    background; outside the image counts as background, as max-pooling's padding ignores it."""
    return F.max_pool2d(subject[:, None].to(torch.float32), 9, stride=1, padding=4)[:, 0] <= 0


def subject_decisions(
    work_photo: torch.Tensor,
    fg: torch.Tensor,
    depth: torch.Tensor,
    params: EffectParams,
    depth_measured: Sequence[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(no subject N bool, confidence N float32, the whole subject N x h x w or None when it is
    the mask itself) of a batch, as effect.render decides them.

    effect.py's own functions decide, on a host copy (one for the batch) of the working-size
    photo and of the maps as given (the models' size): OpenCV's watershed and connected
    components have no torch counterpart, and a watershed's outcome turns on the last bit of
    its inputs, so the maps are brought to working size there by effect.resize_map, as the
    reference does. Photos with no clear subject keep their mask."""
    n = fg.shape[0]
    device = work_photo.device
    checks = params.min_subject_area > 0 or params.min_subject_confidence > 0
    if not checks and not params.extend_subject:  # nothing to decide: no copy, no wait
        return torch.zeros(n, dtype=torch.bool, device=device), torch.full((n,), float("nan"), device=device), None
    work_h, work_w = work_photo.shape[-2:]
    parts = [fg.to(torch.float32).flatten(1), depth.to(torch.float32).flatten(1)]
    if params.extend_subject:
        parts.append(work_photo.to(torch.float32).permute(0, 2, 3, 1).flatten(1))
    host = torch.cat(parts, dim=1).cpu().numpy()
    map_size = fg.shape[-2] * fg.shape[-1]
    no_subject, confidence, whole = [], [], []
    for i in range(n):
        saliency = np.clip(effect.resize_map(host[i, :map_size].reshape(fg.shape[-2:]), work_h, work_w), 0.0, 1.0)
        alone, sure = effect.no_clear_subject(saliency, params)
        no_subject.append(alone)
        confidence.append(sure)
        if params.extend_subject and not alone:
            depth_i = host[i, map_size : 2 * map_size].reshape(depth.shape[-2:])
            depth_work = effect.normalize_depth(effect.resize_map(depth_i, work_h, work_w))
            photo = host[i, 2 * map_size :].reshape(work_h, work_w, 3).astype(np.uint8)
            saliency = effect.whole_subject(photo, saliency, depth_work, bool(depth_measured[i]), params)
        whole.append(saliency)
    return (
        torch.tensor(no_subject, dtype=torch.bool, device=device),
        torch.tensor(confidence, dtype=torch.float32, device=device),
        torch.from_numpy(np.stack(whole)).to(device) if params.extend_subject else None,
    )


@torch.inference_mode()
def render(
    photos: torch.Tensor,
    fg: torch.Tensor,
    depth: torch.Tensor,
    params: EffectParams,
    depth_measured: bool | Sequence[bool] = True,
) -> TorchRendering:
    """The whole effect on a batch of same-size photos with the given parameters.

    depth_measured: per photo (or one for all), False where depth is the weight-free ground
    prior (see effect.render)."""
    height, width = photos.shape[-2:]
    n = photos.shape[0]
    measured = [depth_measured] * n if isinstance(depth_measured, bool) else list(depth_measured)
    size = working_size(height, width, params)
    work_photo = downscale(photos, size.factor)

    fg, depth = fg.to(photos.device), depth.to(photos.device)
    saliency = resize_map(fg, size.height, size.width).clamp_(0.0, 1.0)
    depth_work = normalize_depth(resize_map(depth, size.height, size.width))
    no_subject, confidence, whole = subject_decisions(work_photo, fg, depth, params, measured)
    fg_work = saliency if whole is None else whole
    start, stop = depth_bounds(
        fg_work, depth_work, params.fg_threshold, params.start_percentile, params.stop_percentile
    )
    alpha = interpolation_alpha(fg_work, depth_work, start, stop)
    background = painterly_background(work_photo, size.kernel_size, params.brightness_min, params.brightness_max)

    if size.refine_radius > 0:
        guide = luminance(work_photo)
        coef_a, coef_b = guided_filter_coefficients(guide, alpha, size.refine_radius, params.refine_eps)
        alpha = (coef_a * guide + coef_b).clamp_(0.0, 1.0)
    else:
        coef_a, coef_b = torch.zeros_like(alpha), alpha

    nan = torch.full((n,), float("nan"), device=photos.device)
    detail = (
        background_detail(work_photo, saliency, params.fg_threshold, whole=fg_work)
        if params.min_background_detail > 0
        else nan
    )
    # No clear subject: the photo as it is, its working copy as background, alpha all 1 (as effect.render).
    detail = torch.where(no_subject, nan, detail)
    left_alone = leaves_alone(no_subject, detail, params)
    floor = _gradient_floor(height, width, params.gradient, params.gradient_strength, photos.device)
    composed = compose_full_size(photos, background, coef_a, coef_b, size.factor, floor)
    image = torch.where(left_alone[:, None, None, None], photos, composed)
    unset = no_subject[:, None, None]
    return TorchRendering(
        image=image,
        background=torch.where(unset[:, None], work_photo, background),
        alpha=torch.where(unset, 1.0, alpha),
        fg=fg_work,
        depth=depth_work,
        factor=size.factor,
        start=start,
        stop=stop,
        fg_fraction=(fg_work >= params.fg_threshold).sum(dim=(1, 2)).float() / (size.height * size.width),
        background_detail=detail,
        left_alone=left_alone,
        saliency=saliency,
        subject_confidence=confidence,
        no_subject=no_subject,
    )
