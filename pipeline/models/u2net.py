"""U2Net salient-object detection (Qin et al. 2020, "U^2-Net: Going Deeper with Nested U-Structure
for Salient Object Detection"), the model the original photo write-up used.

Two variants: ``u2net`` (full, ~44M parameters) and ``u2netp`` (small, ~1.1M). The user supplies
the weights: a PyTorch state dict (``.pth``/``.pt``, the authors' public checkpoints load as is)
or an ONNX export (``.onnx``, run with onnxruntime). Module and attribute names below follow the
reference checkpoints' state-dict keys so that those load with ``strict=True``.
"""

from __future__ import annotations

import hashlib
import os
from typing import ClassVar

import numpy as np

from ..errors import WeightsUnavailableError
from . import register
from .base import SALIENCY, MapModel, cpu_threads, squash

INPUT_SIZE = 320
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# Architecture (torch is imported lazily so that listing models stays cheap)
# ---------------------------------------------------------------------------------------------

def _architecture():
    """The torch modules, built on first use and cached."""
    global _ARCH
    if _ARCH is not None:
        return _ARCH

    import torch
    import torch.nn.functional as F
    from torch import nn

    def upsample_like(x, like):
        return F.interpolate(x, size=like.shape[2:], mode="bilinear", align_corners=False)

    class REBNCONV(nn.Module):
        """3x3 convolution (dilated) + batch norm + ReLU."""

        def __init__(self, in_ch: int, out_ch: int, dilation: int = 1) -> None:
            super().__init__()
            self.conv_s1 = nn.Conv2d(in_ch, out_ch, 3, padding=dilation, dilation=dilation)
            self.bn_s1 = nn.BatchNorm2d(out_ch)
            self.relu_s1 = nn.ReLU(inplace=True)

        def forward(self, x):
            return self.relu_s1(self.bn_s1(self.conv_s1(x)))

    class RSU(nn.Module):
        """Residual U-block of height ``height`` (RSU-7/6/5/4): an encoder with ``height - 2``
        poolings, a dilated bottom layer, a decoder with upsampling, and a residual connection."""

        def __init__(self, height: int, in_ch: int, mid_ch: int, out_ch: int) -> None:
            super().__init__()
            self.height = height
            self.rebnconvin = REBNCONV(in_ch, out_ch)
            # encoder: rebnconv1 .. rebnconv{height-1}, pool1 .. pool{height-2}
            for i in range(1, height):
                setattr(self, f"rebnconv{i}", REBNCONV(out_ch if i == 1 else mid_ch, mid_ch))
                if i < height - 1:
                    setattr(self, f"pool{i}", nn.MaxPool2d(2, stride=2, ceil_mode=True))
            setattr(self, f"rebnconv{height}", REBNCONV(mid_ch, mid_ch, dilation=2))
            # decoder: rebnconv{height-1}d .. rebnconv1d
            for i in range(height - 1, 0, -1):
                setattr(self, f"rebnconv{i}d", REBNCONV(2 * mid_ch, out_ch if i == 1 else mid_ch))

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
            return hx + hxin

    class RSU4F(nn.Module):
        """RSU-4F: dilations 1, 2, 4, 8 instead of pooling, so the resolution stays the same."""

        def __init__(self, in_ch: int, mid_ch: int, out_ch: int) -> None:
            super().__init__()
            self.rebnconvin = REBNCONV(in_ch, out_ch)
            self.rebnconv1 = REBNCONV(out_ch, mid_ch, dilation=1)
            self.rebnconv2 = REBNCONV(mid_ch, mid_ch, dilation=2)
            self.rebnconv3 = REBNCONV(mid_ch, mid_ch, dilation=4)
            self.rebnconv4 = REBNCONV(mid_ch, mid_ch, dilation=8)
            self.rebnconv3d = REBNCONV(2 * mid_ch, mid_ch, dilation=4)
            self.rebnconv2d = REBNCONV(2 * mid_ch, mid_ch, dilation=2)
            self.rebnconv1d = REBNCONV(2 * mid_ch, out_ch, dilation=1)

        def forward(self, x):
            hxin = self.rebnconvin(x)
            hx1 = self.rebnconv1(hxin)
            hx2 = self.rebnconv2(hx1)
            hx3 = self.rebnconv3(hx2)
            hx4 = self.rebnconv4(hx3)
            hx3d = self.rebnconv3d(torch.cat((hx4, hx3), 1))
            hx2d = self.rebnconv2d(torch.cat((hx3d, hx2), 1))
            hx1d = self.rebnconv1d(torch.cat((hx2d, hx1), 1))
            return hx1d + hxin

    def block(kind: str, in_ch: int, mid_ch: int, out_ch: int) -> nn.Module:
        if kind == "4F":
            return RSU4F(in_ch, mid_ch, out_ch)
        return RSU(int(kind), in_ch, mid_ch, out_ch)

    class U2NetModule(nn.Module):
        """Six encoder stages, five decoder stages, six side outputs and their 1x1 fusion.

        ``forward`` returns (d0, d1, ..., d6) after the sigmoid, each N x 1 x H x W; d0 is the
        fused map."""

        def __init__(self, stages: dict[str, tuple[str, int, int, int]], in_ch: int = 3,
                     out_ch: int = 1) -> None:
            super().__init__()
            first = stages["stage1"]
            stages = dict(stages, stage1=(first[0], in_ch, first[2], first[3]))
            for name in ("stage1", "stage2", "stage3", "stage4", "stage5", "stage6"):
                setattr(self, name, block(*stages[name]))
            for a, b in ((1, 2), (2, 3), (3, 4), (4, 5), (5, 6)):
                setattr(self, f"pool{a}{b}", nn.MaxPool2d(2, stride=2, ceil_mode=True))
            for name in ("stage5d", "stage4d", "stage3d", "stage2d", "stage1d"):
                setattr(self, name, block(*stages[name]))
            side_in = [stages[f"stage{i}d"][3] for i in range(1, 6)] + [stages["stage6"][3]]
            for i, ch in enumerate(side_in, start=1):
                setattr(self, f"side{i}", nn.Conv2d(ch, out_ch, 3, padding=1))
            self.outconv = nn.Conv2d(6 * out_ch, out_ch, 1)

        def forward(self, x):
            enc = []
            hx = x
            for i in range(1, 6):
                hx = getattr(self, f"stage{i}")(hx)
                enc.append(hx)
                hx = getattr(self, f"pool{i}{i + 1}")(hx)
            hx6 = self.stage6(hx)
            dec = {6: hx6}
            hx = hx6
            for i in range(5, 0, -1):
                skip = enc[i - 1]
                hx = getattr(self, f"stage{i}d")(torch.cat((upsample_like(hx, skip), skip), 1))
                dec[i] = hx
            d1 = self.side1(dec[1])
            sides = [d1]
            for i in range(2, 7):
                sides.append(upsample_like(getattr(self, f"side{i}")(dec[i]), d1))
            d0 = self.outconv(torch.cat(sides, 1))
            return tuple(torch.sigmoid(d) for d in [d0, *sides])

    _ARCH = U2NetModule
    return _ARCH


_ARCH = None

# (RSU kind, in, mid, out) per stage, as in the paper / reference code.
_FULL = {
    "stage1": ("7", 3, 32, 64), "stage2": ("6", 64, 32, 128), "stage3": ("5", 128, 64, 256),
    "stage4": ("4", 256, 128, 512), "stage5": ("4F", 512, 256, 512), "stage6": ("4F", 512, 256, 512),
    "stage5d": ("4F", 1024, 256, 512), "stage4d": ("4", 1024, 128, 256),
    "stage3d": ("5", 512, 64, 128), "stage2d": ("6", 256, 32, 64), "stage1d": ("7", 128, 16, 64),
}
_SMALL = {
    "stage1": ("7", 3, 16, 64), "stage2": ("6", 64, 16, 64), "stage3": ("5", 64, 16, 64),
    "stage4": ("4", 64, 16, 64), "stage5": ("4F", 64, 16, 64), "stage6": ("4F", 64, 16, 64),
    "stage5d": ("4F", 128, 16, 64), "stage4d": ("4", 128, 16, 64), "stage3d": ("5", 128, 16, 64),
    "stage2d": ("6", 128, 16, 64), "stage1d": ("7", 128, 16, 64),
}


def build_u2net(in_ch: int = 3, out_ch: int = 1):
    """The full U2Net (~44M parameters), randomly initialised."""
    return _architecture()(_FULL, in_ch, out_ch)


def build_u2netp(in_ch: int = 3, out_ch: int = 1):
    """The small U2Net-P (~1.1M parameters), randomly initialised."""
    return _architecture()(_SMALL, in_ch, out_ch)


# ---------------------------------------------------------------------------------------------
# Pre- and post-processing (as in the reference inference code)
# ---------------------------------------------------------------------------------------------

def preprocess(photos: list[np.ndarray]) -> np.ndarray:
    """N x 3 x 320 x 320 float32: squashed, divided by the image max, ImageNet-normalised."""
    batch = np.empty((len(photos), 3, INPUT_SIZE, INPUT_SIZE), dtype=np.float32)
    for i, photo in enumerate(photos):
        image = squash(photo, INPUT_SIZE).astype(np.float32)
        peak = float(image.max())
        if peak > 0:
            image /= peak
        image = (image - MEAN) / STD
        batch[i] = image.transpose(2, 0, 1)
    return batch


def normalise(fused: np.ndarray) -> list[np.ndarray]:
    """Per-image min-max into 0..1 of N x 1 x H x W (or N x H x W) maps; a flat map becomes 0."""
    fused = np.asarray(fused, dtype=np.float32).reshape(fused.shape[0], fused.shape[-2], fused.shape[-1])
    maps = []
    for m in fused:
        lo, hi = float(m.min()), float(m.max())
        if not np.isfinite(lo) or not np.isfinite(hi):
            m = np.nan_to_num(m, nan=0.0, posinf=1.0, neginf=0.0)
            lo, hi = float(m.min()), float(m.max())
        if hi <= lo:
            maps.append(np.zeros_like(m, dtype=np.float32))
        else:
            maps.append(((m - lo) / (hi - lo)).astype(np.float32))
    return maps


def _sha256_prefix(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:12]


def _unwrap_state_dict(obj, path: str) -> dict:
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj:
        raise WeightsUnavailableError(f"{path}: not a PyTorch state dict")
    return {(k[len("module."):] if isinstance(k, str) and k.startswith("module.") else k): v
            for k, v in obj.items()}


# ---------------------------------------------------------------------------------------------
# The models
# ---------------------------------------------------------------------------------------------

@register
class U2Net(MapModel):
    """U2Net salient-object maps; weights from a ``.pth``/``.pt`` state dict or an ``.onnx`` file."""

    name: ClassVar[str] = "u2net"
    task: ClassVar[str] = SALIENCY
    licence: ClassVar[str] = "Apache-2.0"
    source: ClassVar[str] = ("U2Net (Qin et al. 2020, github.com/xuebinqin/U-2-Net); the user supplies "
                             "the weights file (u2net.pth state dict or an ONNX export)")
    env_var: ClassVar[str] = "DREAMFOCUS_U2NET_WEIGHTS"

    def __init__(self, weights: str | None = None, device: str | None = None,
                 batch_size: int = 4) -> None:
        weights = weights or os.environ.get(self.env_var) or None
        if not weights:
            raise WeightsUnavailableError(
                f"model {self.name!r} needs a weights file that you supply: pass its path with "
                f"--saliency-weights PATH or set the environment variable {self.env_var} "
                f"(a PyTorch state dict {self.name}.pth or an ONNX export {self.name}.onnx)")
        weights = os.fspath(weights)
        super().__init__(weights=weights, device=device, batch_size=batch_size)
        if not os.path.isfile(weights):
            raise WeightsUnavailableError(f"{weights}: weights file for {self.name!r} not found")
        self._session = None
        self._module = None
        if weights.lower().endswith(".onnx"):
            self._load_onnx(weights)
        else:
            self._load_torch(weights)
        self._version = _sha256_prefix(weights)

    @staticmethod
    def _build():
        return build_u2net()

    @property
    def version(self) -> str:
        return self._version

    # -- loading ---------------------------------------------------------------------------------

    def _load_onnx(self, path: str) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = cpu_threads()
        providers = ["CPUExecutionProvider"]
        if (str(self.device).startswith("cuda")
                and "CUDAExecutionProvider" in ort.get_available_providers()):
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self._session = ort.InferenceSession(path, sess_options=options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise WeightsUnavailableError(f"{path}: cannot load as an ONNX model: {exc}") from exc
        first = self._session.get_inputs()[0]
        self._input_name = first.name
        self._input_dtype = np.float16 if first.type == "tensor(float16)" else np.float32
        batch_dim = first.shape[0] if first.shape else None
        self._fixed_batch = batch_dim if isinstance(batch_dim, int) and batch_dim > 0 else None
        self._output_name = self._session.get_outputs()[0].name

    def _load_torch(self, path: str) -> None:
        import torch

        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise WeightsUnavailableError(f"{path}: cannot load as a PyTorch state dict: {exc}") from exc
        state = _unwrap_state_dict(obj, path)
        module = self._build()
        try:
            module.load_state_dict(state, strict=True)
        except Exception as exc:
            detail = str(exc).strip().splitlines()
            raise WeightsUnavailableError(
                f"{path}: does not match the {self.name!r} architecture "
                f"({detail[0] if detail else type(exc).__name__} ...)") from exc
        module.eval()
        self._torch_device = torch.device(self.device)
        if self._torch_device.type == "cpu":
            torch.set_num_threads(cpu_threads())
        self._module = module.to(self._torch_device)

    # -- inference -------------------------------------------------------------------------------

    def _predict_batch(self, photos: list[np.ndarray]) -> list[np.ndarray]:
        if not photos:
            return []
        batch = preprocess(photos)
        fused = self._run_onnx(batch) if self._session is not None else self._run_torch(batch)
        return normalise(fused)

    def _run_onnx(self, batch: np.ndarray) -> np.ndarray:
        batch = batch.astype(self._input_dtype, copy=False)
        step = self._fixed_batch
        if step is None:
            return np.asarray(self._session.run([self._output_name], {self._input_name: batch})[0],
                              dtype=np.float32)
        outs = []
        for i in range(0, len(batch), step):
            chunk = batch[i:i + step]
            n = len(chunk)
            if n < step:  # a model exported with a fixed batch: pad the last chunk
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], step - n, axis=0)])
            out = self._session.run([self._output_name], {self._input_name: chunk})[0]
            outs.append(np.asarray(out, dtype=np.float32)[:n])
        return np.concatenate(outs)

    def _run_torch(self, batch: np.ndarray) -> np.ndarray:
        import torch

        x = torch.from_numpy(batch).to(self._torch_device)
        with torch.inference_mode():
            if self._torch_device.type == "cuda":
                with torch.autocast("cuda", dtype=torch.float16):
                    d0 = self._module(x)[0]
            else:
                d0 = self._module(x)[0]
        return d0.float().cpu().numpy()


@register
class U2NetP(U2Net):
    """The small U2Net (u2netp, ~1.1M parameters)."""

    name: ClassVar[str] = "u2netp"
    source: ClassVar[str] = ("U2Net-P, the small U2Net (Qin et al. 2020, github.com/xuebinqin/U-2-Net); "
                             "the user supplies the weights file (u2netp.pth state dict or an ONNX export)")
    env_var: ClassVar[str] = "DREAMFOCUS_U2NETP_WEIGHTS"

    @staticmethod
    def _build():
        return build_u2netp()
