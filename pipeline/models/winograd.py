"""IS-Net's 3x3 convolutions through NNPACK's Winograd kernels: the ``nnpack`` CPU runtime.

A Winograd convolution computes a 3x3 convolution with a fraction of the multiply-adds of a
direct one (NNPACK's F(6x6, 3x3) tiles: 64 instead of 324 per tile and channel pair), at the
cost of transforming inputs, kernels and outputs. torch's CPU builds for x86-64 carry NNPACK
(it runs where the CPU has AVX2; ARM builds may carry it for NEON), but torch only calls it for
batches of 16 or more, so the network here calls it itself. On a 2-core AVX2 CPU that runs
OpenVINO's int8 convolutions no faster than its fp32 ones, IS-Net's 3x3 convolutions take 2.0 s
this way against 3.7 s in oneDNN (channels-last), and its output stays within 1e-5 of
onnxruntime's (scripts/bench_runtimes.py has the whole network's times and masks).

NNPACK needs NCHW tensors and a stride and dilation of 1; the strided ``conv_in`` and the
dilated convolutions go on through oneDNN, as do the small ones, where transforming the kernel
costs more than it saves.

On two cores the runtime runs two photos at once, each on one thread (``streams``): NNPACK and
oneDNN gain only 1.5 times from a second thread on this network, so two single-threaded photos
side by side take about 0.8 of the time of the same two one after the other on both threads
(scripts/bench_runtimes.py: 0.58 of onnxruntime's time, against 0.68 one photo at a time).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Below this many multiply-adds (kernel size x output pixels) a convolution runs as fast or
# faster in oneDNN: the kernel transform is then most of NNPACK's work.
MIN_MULTIPLY_ADDS = 100_000_000
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
        if x.device.type == "cpu" and x.dtype == torch.float32 and self.multiply_adds(x) >= MIN_MULTIPLY_ADDS:
            return torch._nnpack_spatial_convolution(x.contiguous(), self.weight, self.bias, self.padding, (1, 1))
        return F.conv2d(x, self.weight, self.bias, padding=self.padding)

    def multiply_adds(self, x: torch.Tensor) -> int:
        return self.weight.numel() * x.shape[-2] * x.shape[-1]


def eligible(conv: nn.Module) -> bool:
    """A convolution NNPACK computes: 2-D, 3x3, stride and dilation 1, one group, a padding
    smaller than the kernel."""
    return (
        isinstance(conv, nn.Conv2d)
        and conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and isinstance(conv.padding, tuple)
        and all(p < 3 for p in conv.padding)
        and conv.padding_mode == "zeros"
    )


def winograd_network(network: nn.Module) -> nn.Module:
    """``network`` in eval mode on the CPU, in the NCHW layout NNPACK reads, each eligible
    convolution replaced by a WinogradConv2d sharing its weights (the state dict is unchanged)."""
    if not available():
        raise RuntimeError(UNAVAILABLE)
    for parent in list(network.modules()):
        for name, child in list(parent.named_children()):
            if eligible(child):
                setattr(parent, name, WinogradConv2d(child))  # type: ignore[arg-type]
    return network.eval().to("cpu", memory_format=torch.contiguous_format)  # type: ignore[call-overload]
