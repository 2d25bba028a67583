"""Residual U-blocks (RSU) and the two salient-object networks built of them: U2Net and IS-Net.

U2Net (Qin et al. 2020) and IS-Net (DIS, Qin et al. 2022, "ISNetDIS") share their encoder and
decoder: six RSU stages down, five back up, a 3x3 side convolution on each decoder stage. U2Net
fuses the six side maps with a 1x1 convolution; IS-Net first halves the photo with a strided
convolution (``conv_in``) and its main output is the first side map brought back to the
input's size. Module and attribute names follow the authors' code, so their state dicts load as
they are and the names in IS-Net's ONNX export map onto these modules one to one.

This module imports torch at the top: the model modules import it only when they build a network.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def upsample_like(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=like.shape[2:], mode="bilinear", align_corners=False)


class MaxPool2x2(nn.MaxPool2d):
    """The 2x2 max-pool of stride 2 rounding up (``ceil_mode``) of the authors' code. On the CPU a
    map of even height and width takes the maximum of its four strided views instead: five times
    faster there than ``max_pool2d``, which also computes the indices of the maxima. A graph
    being traced or exported keeps the max-pool, whose shape does not depend on the input's."""

    def __init__(self) -> None:
        super().__init__(2, stride=2, ceil_mode=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tracing = torch.jit.is_tracing() or torch.compiler.is_compiling()
        if tracing or x.device.type != "cpu" or x.shape[-2] % 2 or x.shape[-1] % 2:
            return super().forward(x)
        top = torch.maximum(x[..., ::2, ::2], x[..., ::2, 1::2])
        return torch.maximum(top, torch.maximum(x[..., 1::2, ::2], x[..., 1::2, 1::2]))


class REBNCONV(nn.Module):
    """3x3 convolution (dilated) + batch norm + ReLU.

    ``batch_norm=False`` leaves the batch norm out, for weights whose export folded it into the
    convolution (IS-Net's ONNX graph)."""

    def __init__(self, in_ch: int, out_ch: int, dilation: int = 1, batch_norm: bool = True) -> None:
        super().__init__()
        self.conv_s1 = nn.Conv2d(in_ch, out_ch, 3, padding=dilation, dilation=dilation)
        self.bn_s1 = nn.BatchNorm2d(out_ch) if batch_norm else nn.Identity()
        self.relu_s1 = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu_s1(self.bn_s1(self.conv_s1(x)))


class RSU(nn.Module):
    """Residual U-block of height ``height`` (RSU-7/6/5/4): an encoder with ``height - 2``
    poolings, a dilated bottom layer, a decoder with upsampling, and a residual connection."""

    def __init__(self, height: int, in_ch: int, mid_ch: int, out_ch: int, batch_norm: bool = True) -> None:
        super().__init__()
        self.height = height
        self.rebnconvin = REBNCONV(in_ch, out_ch, batch_norm=batch_norm)
        # encoder: rebnconv1 .. rebnconv{height-1}, pool1 .. pool{height-2}
        for i in range(1, height):
            setattr(self, f"rebnconv{i}", REBNCONV(out_ch if i == 1 else mid_ch, mid_ch, batch_norm=batch_norm))
            if i < height - 1:
                setattr(self, f"pool{i}", MaxPool2x2())
        setattr(self, f"rebnconv{height}", REBNCONV(mid_ch, mid_ch, dilation=2, batch_norm=batch_norm))
        # decoder: rebnconv{height-1}d .. rebnconv1d
        for i in range(height - 1, 0, -1):
            setattr(self, f"rebnconv{i}d", REBNCONV(2 * mid_ch, out_ch if i == 1 else mid_ch, batch_norm=batch_norm))

    def forward(self, x):
        hxin = self.rebnconvin(x)
        skips = []
        hx = hxin
        for i in range(1, self.height):
            hx = getattr(self, f"rebnconv{i}")(hx)
            skips.append(hx)
            if i < self.height - 1:
                hx = getattr(self, f"pool{i}")(hx)
        hx = getattr(self, f"rebnconv{self.height}")(hx)
        for i in range(self.height - 1, 0, -1):
            skip = skips[i - 1]
            if i < self.height - 1:  # the dilated bottom layer kept the resolution
                hx = upsample_like(hx, skip)
            hx = getattr(self, f"rebnconv{i}d")(torch.cat((hx, skip), 1))
        return hx.add_(hxin)  # in place: these networks only infer


class RSU4F(nn.Module):
    """RSU-4F: dilations 1, 2, 4, 8 instead of pooling, so the resolution stays the same."""

    def __init__(self, in_ch: int, mid_ch: int, out_ch: int, batch_norm: bool = True) -> None:
        super().__init__()
        self.rebnconvin = REBNCONV(in_ch, out_ch, batch_norm=batch_norm)
        self.rebnconv1 = REBNCONV(out_ch, mid_ch, dilation=1, batch_norm=batch_norm)
        self.rebnconv2 = REBNCONV(mid_ch, mid_ch, dilation=2, batch_norm=batch_norm)
        self.rebnconv3 = REBNCONV(mid_ch, mid_ch, dilation=4, batch_norm=batch_norm)
        self.rebnconv4 = REBNCONV(mid_ch, mid_ch, dilation=8, batch_norm=batch_norm)
        self.rebnconv3d = REBNCONV(2 * mid_ch, mid_ch, dilation=4, batch_norm=batch_norm)
        self.rebnconv2d = REBNCONV(2 * mid_ch, mid_ch, dilation=2, batch_norm=batch_norm)
        self.rebnconv1d = REBNCONV(2 * mid_ch, out_ch, dilation=1, batch_norm=batch_norm)

    def forward(self, x):
        hxin = self.rebnconvin(x)
        hx1 = self.rebnconv1(hxin)
        hx2 = self.rebnconv2(hx1)
        hx3 = self.rebnconv3(hx2)
        hx4 = self.rebnconv4(hx3)
        hx3d = self.rebnconv3d(torch.cat((hx4, hx3), 1))
        hx2d = self.rebnconv2d(torch.cat((hx3d, hx2), 1))
        hx1d = self.rebnconv1d(torch.cat((hx2d, hx1), 1))
        return hx1d.add_(hxin)


def rsu_block(kind: str, in_ch: int, mid_ch: int, out_ch: int, batch_norm: bool = True) -> nn.Module:
    if kind == "4F":
        return RSU4F(in_ch, mid_ch, out_ch, batch_norm)
    return RSU(int(kind), in_ch, mid_ch, out_ch, batch_norm)


# (RSU kind, in, mid, out) per stage, as in the authors' code. IS-Net uses FULL with 64 input
# channels in stage1 (the output of its conv_in).
FULL = {
    "stage1": ("7", 3, 32, 64),
    "stage2": ("6", 64, 32, 128),
    "stage3": ("5", 128, 64, 256),
    "stage4": ("4", 256, 128, 512),
    "stage5": ("4F", 512, 256, 512),
    "stage6": ("4F", 512, 256, 512),
    "stage5d": ("4F", 1024, 256, 512),
    "stage4d": ("4", 1024, 128, 256),
    "stage3d": ("5", 512, 64, 128),
    "stage2d": ("6", 256, 32, 64),
    "stage1d": ("7", 128, 16, 64),
}
SMALL = {
    "stage1": ("7", 3, 16, 64),
    "stage2": ("6", 64, 16, 64),
    "stage3": ("5", 64, 16, 64),
    "stage4": ("4", 64, 16, 64),
    "stage5": ("4F", 64, 16, 64),
    "stage6": ("4F", 64, 16, 64),
    "stage5d": ("4F", 128, 16, 64),
    "stage4d": ("4", 128, 16, 64),
    "stage3d": ("5", 128, 16, 64),
    "stage2d": ("6", 128, 16, 64),
    "stage1d": ("7", 128, 16, 64),
}
_ENCODER = ("stage1", "stage2", "stage3", "stage4", "stage5", "stage6")
_DECODER = ("stage5d", "stage4d", "stage3d", "stage2d", "stage1d")


class RSUEncoderDecoder(nn.Module):
    """Six encoder stages, five decoder stages and a side convolution on the first ``sides`` of
    the six decoder outputs (finest first)."""

    stage6: nn.Module  # set by name in __init__, like every stage

    def __init__(
        self,
        stages: dict[str, tuple[str, int, int, int]],
        in_ch: int,
        out_ch: int = 1,
        batch_norm: bool = True,
        sides: int = 6,
    ) -> None:
        super().__init__()
        first = stages["stage1"]
        stages = dict(stages, stage1=(first[0], in_ch, first[2], first[3]))
        for name in _ENCODER:
            setattr(self, name, rsu_block(*stages[name], batch_norm=batch_norm))
        for a, b in ((1, 2), (2, 3), (3, 4), (4, 5), (5, 6)):
            setattr(self, f"pool{a}{b}", MaxPool2x2())
        for name in _DECODER:
            setattr(self, name, rsu_block(*stages[name], batch_norm=batch_norm))
        side_in = [stages[f"stage{i}d"][3] for i in range(1, 6)] + [stages["stage6"][3]]
        for i, ch in enumerate(side_in[:sides], start=1):
            setattr(self, f"side{i}", nn.Conv2d(ch, out_ch, 3, padding=1))

    def decode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The decoder's features [hx1d, hx2d, hx3d, hx4d, hx5d, hx6], finest first."""
        enc = []
        hx = x
        for i in range(1, 6):
            hx = getattr(self, f"stage{i}")(hx)
            enc.append(hx)
            hx = getattr(self, f"pool{i}{i + 1}")(hx)
        hx = self.stage6(hx)
        dec = [hx]
        for i in range(5, 0, -1):
            skip = enc[i - 1]
            hx = getattr(self, f"stage{i}d")(torch.cat((upsample_like(hx, skip), skip), 1))
            dec.append(hx)
        return dec[::-1]


class U2NetNetwork(RSUEncoderDecoder):
    """U2Net: ``forward`` returns (d0, d1, ..., d6) after the sigmoid, each N x 1 x H x W; d0 is
    the 1x1 fusion of the six side maps."""

    def __init__(self, stages: dict[str, tuple[str, int, int, int]], in_ch: int = 3, out_ch: int = 1) -> None:
        super().__init__(stages, in_ch, out_ch)
        self.outconv = nn.Conv2d(6 * out_ch, out_ch, 1)

    def forward(self, x):
        features = self.decode(x)
        d1 = self.side1(features[0])
        sides = [d1] + [upsample_like(getattr(self, f"side{i}")(features[i - 1]), d1) for i in range(2, 7)]
        d0 = self.outconv(torch.cat(sides, 1))
        return tuple(torch.sigmoid(d) for d in [d0, *sides])


class ISNetNetwork(RSUEncoderDecoder):
    """IS-Net (ISNetDIS) with only its main output: ``forward`` returns the first side map at the
    input's size after the sigmoid, N x 1 x H x W. ``stages`` other than FULL (say SMALL) give
    small networks of the same structure, for tests.

    The authors' code defines a max-pool after ``conv_in`` but leaves it unused, so stage1 sees
    the input at half resolution; their export has no pool there either. Side outputs 2 to 6
    only supervise training: the network here has no side2 .. side6."""

    def __init__(
        self,
        stages: dict[str, tuple[str, int, int, int]] = FULL,
        in_ch: int = 3,
        out_ch: int = 1,
        batch_norm: bool = False,
    ) -> None:
        super().__init__(stages, 64, out_ch, batch_norm, sides=1)
        self.conv_in = nn.Conv2d(in_ch, 64, 3, stride=2, padding=1)

    def forward(self, x):
        hx1d = self.decode(self.conv_in(x))[0]
        return torch.sigmoid(upsample_like(self.side1(hx1d), x))
