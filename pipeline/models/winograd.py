"""IS-Net's 3x3 convolutions through NNPACK's Winograd kernels: the ``nnpack`` CPU runtime.

A Winograd convolution computes a 3x3 convolution with a fraction of the multiply-adds of a
direct one (NNPACK's F(6x6, 3x3) tiles: 64 instead of 324 per tile and channel pair), at the
cost of transforming inputs, kernels and outputs. torch's CPU builds for x86-64 carry NNPACK
(it runs where the CPU has AVX2; ARM builds may carry it for NEON), but torch only calls it for
batches of 16 or more, so the network here calls it itself. On a 2-core AVX2 CPU that runs
OpenVINO's int8 convolutions no faster than its fp32 ones, IS-Net's 3x3 convolutions take 2.0 s
this way against 3.7 s in oneDNN (channels-last), and its output stays within 1e-5 of
onnxruntime's (scripts/bench_runtimes.py has the whole network's times and masks).

NNPACK needs NCHW tensors and a stride and dilation of 1. A dilated convolution is an ordinary
one on each of the maps of every d-th pixel, so it runs in NNPACK on those maps laid side by
side (MosaicConv2d): half the time of oneDNN's dilated kernels at 32 x 32. The strided
``conv_in`` goes on through oneDNN, as do, on more than one thread, the small convolutions,
where transforming the kernel costs more than it saves.

On two cores the runtime runs two photos at once, each on one thread (``streams``): NNPACK and
oneDNN gain only 1.5 times from a second thread on this network, so two single-threaded photos
side by side take about 0.8 of the time of the same two one after the other on both threads
(scripts/bench_runtimes.py: 0.58 of onnxruntime's time, against 0.68 one photo at a time;
0.48 with the mosaics and pipeline/heap.py's malloc settings).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# On more than one thread, below this many multiply-adds (kernel size x output pixels) a
# convolution runs as fast or faster in oneDNN: the kernel transform is then most of NNPACK's
# work. On one thread NNPACK is the faster at every size IS-Net has.
MIN_MULTIPLY_ADDS = 100_000_000
# A dilated convolution runs as a mosaic on maps this large a side, or whose sub-maps are at
# least MOSAIC_MIN_PART a side; below both, the mosaic's gutters cost more than it saves.
MOSAIC_MIN_SIDE = 32
MOSAIC_MIN_PART = 8
# A 3x3 convolution to this many maps or fewer runs as shifted sums (ShiftedSumConv2d).
FEW_OUTPUTS = 2
# Why the nnpack runtime cannot run where available() is False.
UNAVAILABLE = "NNPACK does not run on this CPU (torch's x86-64 builds carry it; it needs AVX2)"


def streams(photos_at_once: int, threads: int) -> int:
    """How many photos the nnpack runtime runs at once, each on a thread of its own, given a call
    of ``photos_at_once`` photos and ``threads`` cores: one a core where the call has a photo for
    each (and at most CPU_STREAMS), else one on every core. torch gives NNPACK one thread pool a
    process, which runs one convolution at a time; a pool of one thread runs each on its caller,
    so only single-threaded photos run side by side."""
    from .base import CPU_STREAMS

    return threads if 1 < threads <= min(photos_at_once, CPU_STREAMS) else 1


def available() -> bool:
    """Whether NNPACK runs on this CPU. The call also initialises NNPACK, without which its
    convolutions fail; torch makes it only from here."""
    return torch.backends.nnpack.is_available()


class WinogradConv2d(nn.Module):
    """A 3x3 convolution of stride 1 that runs in NNPACK on CPU float32 tensors large enough
    to gain from it, and through ``F.conv2d`` otherwise. Its parameters keep the names and
    shapes of the ``nn.Conv2d`` it replaces."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        if not eligible(conv):
            raise ValueError(f"not a plain 3x3 convolution of stride 1: {conv}")
        self.weight = conv.weight
        self.bias = conv.bias
        self.padding = (int(conv.padding[0]), int(conv.padding[1]))  # type: ignore[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if in_nnpack(x, self.weight, x.shape[-2] * x.shape[-1]):
            return torch._nnpack_spatial_convolution(x.contiguous(), self.weight, self.bias, self.padding, (1, 1))
        return F.conv2d(x, self.weight, self.bias, padding=self.padding)


class MosaicConv2d(nn.Module):
    """A 3x3 convolution of dilation d (and padding d, so of the input's size) as one NNPACK
    convolution: each output pixel sums the input's pixels d apart, so the output at the pixels
    (i*d + a, j*d + b) is an ordinary convolution of the map of input pixels (i*d + a, j*d + b).
    The d x d such maps are laid side by side in a mosaic with a row and a column of zeros after
    each, which pad each map as the dilated convolution's own padding does. Maps whose sides d
    does not divide, and small ones, go through ``F.conv2d``. Its parameters keep the names and
    shapes of the ``nn.Conv2d`` it replaces."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        if not mosaic_eligible(conv):
            raise ValueError(f"not a 3x3 convolution of dilation d and padding d: {conv}")
        self.weight = conv.weight
        self.bias = conv.bias
        self.dilation = int(conv.dilation[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.dilation
        n, c, height, width = x.shape
        h, w = height // d, width // d
        pays = min(height, width) >= MOSAIC_MIN_SIDE or min(h, w) >= MOSAIC_MIN_PART
        if height % d or width % d or not pays or not in_nnpack(x, self.weight, d * d * (h + 1) * (w + 1)):
            return F.conv2d(x, self.weight, self.bias, padding=d, dilation=d)
        mosaic = x.new_zeros(n, c, d * (h + 1), d * (w + 1))
        maps = x.reshape(n, c, h, d, w, d).permute(0, 1, 3, 2, 5, 4)  # n, c, d, h, d, w
        mosaic.view(n, c, d, h + 1, d, w + 1)[:, :, :, :h, :, :w] = maps
        out = torch._nnpack_spatial_convolution(mosaic, self.weight, self.bias, (1, 1), (1, 1))
        k = out.shape[1]
        out_maps = out.view(n, k, d, h + 1, d, w + 1)[:, :, :, :h, :, :w]
        return out_maps.permute(0, 1, 3, 2, 5, 4).reshape(n, k, height, width)


class ShiftedSumConv2d(nn.Module):
    """A 3x3 convolution of stride 1 and padding 1 to at most FEW_OUTPUTS maps (IS-Net's
    ``side1``: 64 channels to 1 at 512 x 512) as a 1x1 convolution to one map per output and
    kernel tap, the nine taps' maps then summed, each shifted by its offset: a third of the time
    NNPACK takes, whose transforms gain nothing with one output channel. Its parameters keep
    the names and shapes of the ``nn.Conv2d`` it replaces."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        if not shifted_sum_eligible(conv):
            raise ValueError(f"not a 3x3 convolution of padding 1 to at most {FEW_OUTPUTS} maps: {conv}")
        self.weight = conv.weight
        self.bias = conv.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        k = self.weight.shape[0]
        taps = self.weight.permute(2, 3, 0, 1).reshape(9 * k, -1, 1, 1)  # (row, column, output) x input
        maps = F.pad(F.conv2d(x, taps), (1, 1, 1, 1)).view(n, 3, 3, k, h + 2, w + 2)
        out = maps[:, 0, 0, :, :h, :w].clone()
        for row in range(3):
            for column in range(3):
                if row or column:
                    out += maps[:, row, column, :, row : row + h, column : column + w]
        return out if self.bias is None else out.add_(self.bias.view(1, k, 1, 1))


def in_nnpack(x: torch.Tensor, weight: torch.Tensor, pixels: int) -> bool:
    """Whether a convolution of ``weight`` over ``pixels`` output pixels of ``x`` runs faster
    in NNPACK than in oneDNN (MIN_MULTIPLY_ADDS); NNPACK takes CPU float32 tensors only."""
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return False
    return torch.get_num_threads() == 1 or weight.numel() * pixels >= MIN_MULTIPLY_ADDS


def _plain_3x3(conv: nn.Module) -> bool:
    return (
        isinstance(conv, nn.Conv2d)
        and conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and isinstance(conv.padding, tuple)
    )


def eligible(conv: nn.Module) -> bool:
    """A convolution NNPACK computes: 2-D, 3x3, stride and dilation 1, one group, a padding
    smaller than the kernel."""
    return _plain_3x3(conv) and conv.dilation == (1, 1) and all(p < 3 for p in conv.padding)  # type: ignore[union-attr]


def shifted_sum_eligible(conv: nn.Module) -> bool:
    """A convolution ShiftedSumConv2d computes: as ``eligible``, of padding 1, to at most
    FEW_OUTPUTS maps."""
    few = isinstance(conv, nn.Conv2d) and conv.out_channels <= FEW_OUTPUTS
    return few and eligible(conv) and conv.padding == (1, 1)


def mosaic_eligible(conv: nn.Module) -> bool:
    """A convolution MosaicConv2d computes: as ``eligible`` but of dilation d > 1 both ways and
    padding d (the output has the input's size)."""
    if not _plain_3x3(conv):
        return False
    d = conv.dilation[0]  # type: ignore[index]
    return bool(d > 1 and conv.dilation == (d, d) and conv.padding == (d, d))


def winograd_network(network: nn.Module) -> nn.Module:
    """``network`` in eval mode on the CPU, in the NCHW layout NNPACK reads, each eligible
    convolution replaced by a WinogradConv2d (or where it has few outputs a ShiftedSumConv2d)
    and each dilated one by a MosaicConv2d, sharing its weights (the state dict is unchanged)."""
    if not available():
        raise RuntimeError(UNAVAILABLE)
    for parent in list(network.modules()):
        for name, child in list(parent.named_children()):
            if shifted_sum_eligible(child):
                setattr(parent, name, ShiftedSumConv2d(child))  # type: ignore[arg-type]
            elif eligible(child):
                setattr(parent, name, WinogradConv2d(child))  # type: ignore[arg-type]
            elif mosaic_eligible(child):
                setattr(parent, name, MosaicConv2d(child))  # type: ignore[arg-type]
    return network.eval().to("cpu", memory_format=torch.contiguous_format)  # type: ignore[call-overload]
