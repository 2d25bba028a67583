"""Image work on torch tensors, on whatever device they live: moving photos and maps between host
and device, and the resizes the models' numpy paths do with OpenCV, done the same way.

Photos are HxWx3 uint8 tensors, maps HxW float tensors. Resizes follow OpenCV's definitions, so a
model's device path and its numpy path feed the network the same values (up to OpenCV's
fixed-point rounding on uint8 images, at most one level of 255):

- area (cv2.INTER_AREA, for shrinking): each output pixel is the mean of the input it covers,
  partial pixels weighted by the part covered;
- bilinear (cv2.INTER_LINEAR) and bicubic (cv2.INTER_CUBIC, a = -0.75): pixel centres at
  half-integers, edge pixels replicated, no antialiasing;
- results on uint8 images are rounded and clipped to 0..255, as OpenCV does when it writes uint8.

This module imports torch at the top: the models import it only when they run torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

# --------------------------------------------------------------------------------- host <-> device


def upload(arrays: Sequence[np.ndarray], device: str | torch.device) -> list[torch.Tensor]:
    """The arrays as tensors on ``device`` (same dtype and shape each).

    To a GPU they travel in one copy from one pinned staging buffer, asynchronously: the
    device's stream orders them before any work queued after. On the CPU they share memory
    with the arrays.
    """
    device = torch.device(device)
    # Arrays arriving from Arrow are read-only views: torch wants memory it may write.
    arrays = [np.require(a, requirements=["C_CONTIGUOUS", "WRITEABLE"]) for a in arrays]
    if device.type != "cuda" or not arrays:
        return [torch.from_numpy(a).to(device) for a in arrays]
    if len({a.dtype for a in arrays}) != 1:
        return [t for a in arrays for t in upload([a], device)]
    dtype = torch.from_numpy(arrays[0][:0]).dtype
    sizes = [a.size for a in arrays]
    staging = torch.empty(sum(sizes), dtype=dtype, pin_memory=True)
    flat = staging.numpy()
    offset = 0
    for a, n in zip(arrays, sizes):
        flat[offset : offset + n] = a.reshape(-1)
        offset += n
    on_device = staging.to(device, non_blocking=True)
    return [t.view(a.shape) for t, a in zip(torch.split(on_device, sizes), arrays)]


def download(tensors: Sequence[torch.Tensor]) -> list[np.ndarray]:
    """The tensors as numpy arrays in host memory (one copy from a GPU, through pinned memory)."""
    if not tensors:
        return []
    if any(t.device.type != "cuda" for t in tensors):
        return [t.detach().cpu().numpy() for t in tensors]
    flat = torch.cat([t.detach().reshape(-1) for t in tensors])
    host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
    host.copy_(flat, non_blocking=True)
    torch.cuda.current_stream(flat.device).synchronize()
    # Copied out of the pinned buffer, so pinned memory is given back as soon as we return.
    return [
        chunk.numpy().reshape(t.shape).copy()
        for chunk, t in zip(torch.split(host, [t.numel() for t in tensors]), tensors)
    ]


# ------------------------------------------------------------------------------------- resizing


def _area_axis(x: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """``x`` shrunk to ``size`` along ``dim`` by area averaging (OpenCV's INTER_AREA).

    Output pixel i covers input [i * s, (i + 1) * s) with s = n / size; its value is the
    integral of the piecewise-constant input over that span divided by s. The integral at a
    fractional position comes from a running sum, in float64 so that long rows lose nothing.
    """
    n = x.shape[dim]
    if n == size:
        return x
    scale = n / size
    bounds = torch.arange(size + 1, dtype=torch.float64, device=x.device) * scale
    left = bounds.floor().long().clamp_(max=n - 1)
    frac = (bounds - left).to(torch.float64)
    x64 = x.to(torch.float64)
    running = torch.cumsum(x64, dim=dim)
    running = torch.cat([torch.zeros_like(running.narrow(dim, 0, 1)), running], dim=dim)
    shape = [1] * x.ndim
    shape[dim] = size + 1
    integral = running.index_select(dim, left) + frac.view(shape) * x64.index_select(dim, left)
    out = (integral.narrow(dim, 1, size) - integral.narrow(dim, 0, size)) / scale
    return out.to(x.dtype)


def resize_area(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A float ...xHxW tensor shrunk by area averaging (both sides no larger than before)."""
    return _area_axis(_area_axis(x, width, x.ndim - 1), height, x.ndim - 2)


def resize_interpolate(x: torch.Tensor, height: int, width: int, mode: str) -> torch.Tensor:
    """A float ...xHxW tensor resized with ``mode`` 'bilinear' or 'bicubic'."""
    batch = x.reshape(1, -1, *x.shape[-2:])
    out = F.interpolate(batch, size=(height, width), mode=mode, align_corners=False)
    return out.reshape(*x.shape[:-2], height, width)


def as_uint8_values(x: torch.Tensor) -> torch.Tensor:
    """Rounded and clipped to 0..255, as OpenCV writes a resized uint8 image (kept as float)."""
    return x.round_().clamp_(0.0, 255.0)


def photo_to_chw(photo: torch.Tensor) -> torch.Tensor:
    """An HxWx3 uint8 photo as a 3xHxW float32 tensor of its values 0..255."""
    return photo.permute(2, 0, 1).to(torch.float32)


def squash(photo: torch.Tensor, size: int) -> torch.Tensor:
    """3 x size x size float32 values 0..255: the photo stretched to a square as
    ``pipeline.models.base.squash`` does (area when both sides shrink, else bilinear)."""
    x = photo_to_chw(photo)
    if x.shape[1] > size and x.shape[2] > size:
        return as_uint8_values(resize_area(x, size, size))
    return as_uint8_values(resize_interpolate(x, size, size, "bilinear"))


def resize_photo(photo: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """3 x height x width float32 values 0..255: area when both sides shrink, else bicubic
    (the depth models' resize, see hf_depth.py)."""
    x = photo_to_chw(photo)
    if height < x.shape[1] and width < x.shape[2]:
        return as_uint8_values(resize_area(x, height, width))
    return as_uint8_values(resize_interpolate(x, height, width, "bicubic"))


def resize_map(values: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """An HxW float32 map (or an NxHxW batch of them) at height x width, as
    ``pipeline.effect.resize_map`` resizes one (bilinear; area when shrinking more than twofold
    both ways)."""
    values = values.to(torch.float32)
    if tuple(values.shape[-2:]) == (height, width):
        return values
    if values.shape[-2] > 2 * height and values.shape[-1] > 2 * width:
        return resize_area(values, height, width)
    return resize_interpolate(values, height, width, "bilinear")


# ------------------------------------------------------------------------------- running networks


def torch_device(device: str) -> torch.device:
    """``device`` as a torch device, with the settings inference runs best under there."""
    from .base import cpu_threads

    dev = torch.device(device)
    if dev.type == "cpu":
        torch.set_num_threads(cpu_threads())
    elif dev.type == "cuda":
        # Inputs come in a few fixed shapes: let cuDNN time its kernels once per shape.
        torch.backends.cudnn.benchmark = True
    return dev


def convolutional(network: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """A convolutional network in eval mode on ``device``, in the channels-last layout (feed it
    :func:`channels_last` inputs): 2 to 4 times faster on CPUs (oneDNN), and the layout GPU
    tensor cores take."""
    # memory_format is a keyword Module.to takes, though its type stubs leave it out
    return network.eval().to(device, memory_format=torch.channels_last)  # type: ignore[call-overload]


def channels_last(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """An N x C x H x W batch on ``device`` in the channels-last layout."""
    return batch.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)


def inference(device: torch.device, autocast_fp16: bool = False):
    """The context a forward pass runs in: no autograd, and fp16 autocast on a GPU when asked."""
    import contextlib

    stack = contextlib.ExitStack()
    stack.enter_context(torch.inference_mode())
    if autocast_fp16 and device.type == "cuda":
        stack.enter_context(torch.autocast("cuda", dtype=torch.float16))
    return stack


def min_max(values: torch.Tensor) -> torch.Tensor:
    """A map scaled so its minimum is 0 and its maximum 1; a flat map becomes 0, non-finite
    values 0 (as ``pipeline.effect.normalize_depth``)."""
    values = torch.nan_to_num(values.to(torch.float32), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = values.min(), values.max()
    span = hi - lo
    return torch.where(
        span > 0, (values - lo) / span.clamp(min=torch.finfo(torch.float32).tiny), torch.zeros_like(values)
    )
