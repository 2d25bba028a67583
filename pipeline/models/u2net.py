"""U2Net salient-object detection (Qin et al. 2020, "U^2-Net: Going Deeper with Nested U-Structure
for Salient Object Detection"), the model the original photo write-up used.

Two variants: ``u2net`` (full, ~44M parameters) and ``u2netp`` (small, ~1.1M). The user supplies
the weights: a PyTorch state dict (``.pth``/``.pt``, the authors' public checkpoints load as is)
or an ONNX export (``.onnx``, run with onnxruntime), as a path or URI (remote ones are copied
once into the cache), or in the model's environment variable. The network is ``rsu.U2NetNetwork``,
whose names follow the reference checkpoints' state-dict keys so that those load with
``strict=True``. State dicts run with torch, which also gives the model its device path
(``predict_tensors``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ..effect import normalize_depth
from ..errors import WeightsUnavailableError
from . import register
from .base import SALIENCY, MapModel, cpu_threads, squash
from .weights import resolve_weights, weights_digest

INPUT_SIZE = 320
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def build_u2net(in_ch: int = 3, out_ch: int = 1):
    """The full U2Net (~44M parameters), randomly initialised."""
    from .rsu import FULL, U2NetNetwork

    return U2NetNetwork(FULL, in_ch, out_ch)


def build_u2netp(in_ch: int = 3, out_ch: int = 1):
    """The small U2Net-P (~1.1M parameters), randomly initialised."""
    from .rsu import SMALL, U2NetNetwork

    return U2NetNetwork(SMALL, in_ch, out_ch)


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
    fused = np.asarray(fused, dtype=np.float32)
    return [normalize_depth(m) for m in fused.reshape(fused.shape[0], fused.shape[-2], fused.shape[-1])]


def _unwrap_state_dict(obj, path: str) -> dict:
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj:
        raise WeightsUnavailableError(f"{path}: not a PyTorch state dict")
    return {(k[len("module.") :] if isinstance(k, str) and k.startswith("module.") else k): v for k, v in obj.items()}


# ---------------------------------------------------------------------------------------------
# The models
# ---------------------------------------------------------------------------------------------


@register
class U2Net(MapModel):
    """U2Net salient-object maps; weights from a ``.pth``/``.pt`` state dict or an ``.onnx`` file."""

    name: ClassVar[str] = "u2net"
    task: ClassVar[str] = SALIENCY
    licence: ClassVar[str] = "Apache-2.0"
    source: ClassVar[str] = (
        "U2Net (Qin et al. 2020, github.com/xuebinqin/U-2-Net); the user supplies "
        "the weights file (u2net.pth state dict or an ONNX export)"
    )
    weights_env: ClassVar[str | None] = "DREAMFOCUS_U2NET_WEIGHTS"

    def __init__(self, weights: str | None = None, device: str | None = None, batch_size: int = 4) -> None:
        super().__init__(weights=weights, device=device, batch_size=batch_size)
        path = Path(resolve_weights(type(self), weights))
        self.weights = str(path)
        self._session: Any = None  # onnxruntime.InferenceSession for ONNX weights
        self._module: Any = None  # the torch network for state dicts
        if path.suffix.lower() == ".onnx":
            self._load_onnx(str(path))
        else:
            self._load_torch(str(path))
        self._version = weights_digest(path)[:12]

    @classmethod
    def how_to_fetch(cls) -> str:
        return (
            f"model {cls.name!r} needs a weights file that you supply: pass its path with "
            f"--saliency-weights PATH or set the environment variable {cls.weights_env} "
            f"(a PyTorch state dict {cls.name}.pth or an ONNX export {cls.name}.onnx)"
        )

    @staticmethod
    def _build():
        return build_u2net()

    @property
    def version(self) -> str:
        return self._version

    @property
    def accepts_tensors(self) -> bool:
        return self._module is not None

    # -- loading ---------------------------------------------------------------------------------

    def _load_onnx(self, path: str) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = cpu_threads()
        providers = ["CPUExecutionProvider"]
        cuda = str(self.device).startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers()
        if cuda:
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self._session = ort.InferenceSession(path, sess_options=options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise WeightsUnavailableError(f"{path}: cannot load as an ONNX model: {exc}") from exc
        self.runtime = "onnxruntime"
        self.device = self.device if cuda else "cpu"
        first = self._session.get_inputs()[0]
        self._input_name = first.name
        self._input_dtype = np.float16 if first.type == "tensor(float16)" else np.float32
        batch_dim = first.shape[0] if first.shape else None
        self._fixed_batch = batch_dim if isinstance(batch_dim, int) and batch_dim > 0 else None
        self._output_name = self._session.get_outputs()[0].name

    def _load_torch(self, path: str) -> None:
        import torch

        from .tensors import convolutional, torch_device

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
                f"({detail[0] if detail else type(exc).__name__} ...)"
            ) from exc
        self._torch_device = torch_device(self.device)
        self._module = convolutional(module, self._torch_device)
        self.runtime = "torch"

    # -- inference -------------------------------------------------------------------------------

    def _predict_batch(self, photos: list[np.ndarray]) -> list[np.ndarray]:
        if not photos:
            return []
        batch = preprocess(photos)
        fused = self._run_onnx(batch) if self._session is not None else self._run_torch(batch)
        return normalise(fused)

    def _predict_tensor_batch(self, photos, saliency=None):
        import torch

        from .tensors import min_max, resize_map
        from .tensors import squash as squash_tensor

        mean = torch.as_tensor(MEAN, device=self._torch_device).view(3, 1, 1)
        std = torch.as_tensor(STD, device=self._torch_device).view(3, 1, 1)
        inputs = []
        for photo in photos:
            image = squash_tensor(photo, INPUT_SIZE)
            image = image / image.max().clamp(min=1.0)  # a black photo stays black
            inputs.append((image - mean) / std)
        fused = self._forward(torch.stack(inputs))
        return [resize_map(min_max(m), *p.shape[:2]) for m, p in zip(fused, photos)]

    def _run_onnx(self, batch: np.ndarray) -> np.ndarray:
        batch = batch.astype(self._input_dtype, copy=False)
        step = self._fixed_batch
        if step is None:
            return np.asarray(self._session.run([self._output_name], {self._input_name: batch})[0], dtype=np.float32)
        outs = []
        for i in range(0, len(batch), step):
            chunk = batch[i : i + step]
            n = len(chunk)
            if n < step:  # a model exported with a fixed batch: pad the last chunk
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], step - n, axis=0)])
            out = self._session.run([self._output_name], {self._input_name: chunk})[0]
            outs.append(np.asarray(out, dtype=np.float32)[:n])
        return np.concatenate(outs)

    def _run_torch(self, batch: np.ndarray) -> np.ndarray:
        import torch

        return self._forward(torch.from_numpy(batch)).cpu().numpy()

    def _forward(self, batch):
        """The fused map d0 (N x 320 x 320, float32, on the device) of a normalised batch."""
        from .tensors import channels_last, inference

        with inference(self._torch_device, autocast_fp16=True):
            return self._module(channels_last(batch, self._torch_device))[0][:, 0].float()


@register
class U2NetP(U2Net):
    """The small U2Net (u2netp, ~1.1M parameters)."""

    name: ClassVar[str] = "u2netp"
    source: ClassVar[str] = (
        "U2Net-P, the small U2Net (Qin et al. 2020, github.com/xuebinqin/U-2-Net); "
        "the user supplies the weights file (u2netp.pth state dict or an ONNX export)"
    )
    weights_env: ClassVar[str | None] = "DREAMFOCUS_U2NETP_WEIGHTS"

    @staticmethod
    def _build():
        return build_u2netp()
