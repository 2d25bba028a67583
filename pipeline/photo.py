"""One photo end to end, without Ray: what `dreamfocus render` does, and what the library
job's stages do for each photo of a group.

    prepare(bytes)                      -> the model copy (reduced, upright, sRGB)
    SceneModels.predict(copies)         -> SceneMaps: saliency and depth, both models on one batch
    render_on_host(bytes, maps, settings) -> Finished: the encoded result, why it was left alone,
                                           intermediates (the CPU path; device_render.py is the other)

Nothing here knows about columns, stages or the manifest.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import cv2
import numpy as np

from .effect import Rendering, render, upscale
from .models import DEPTH, SALIENCY, MapModel, load_model
from .params import EffectParams
from .photo_io import decode_photo, encode_photo

if TYPE_CHECKING:
    import torch

# Models never need more than this many pixels on the long side (IS-Net's input is 1024).
MODEL_INPUT_SIZE = 1024

# Kinds of "left alone" (a `skipped` row whose output is the photo unchanged).
BACKGROUND_ALREADY_SOFT = "background-already-soft"
NO_CLEAR_SUBJECT = "no-clear-subject"


def model_copy(pixels: np.ndarray) -> np.ndarray:
    """A copy with the long side at most MODEL_INPUT_SIZE: full-resolution pixels stay with the
    CPU stages."""
    height, width = pixels.shape[:2]
    scale = MODEL_INPUT_SIZE / max(height, width)
    if scale >= 1:
        return pixels
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(pixels, size, interpolation=cv2.INTER_AREA)


def prepare(data: bytes, source: str, max_megapixels: float) -> np.ndarray:
    """The model copy of a photo's bytes (a JPEG is decoded at a reduced scale directly, a camera
    RAW gives its embedded preview or half-size image: no demosaic here)."""
    photo = decode_photo(data, source, max_megapixels, draft_size=MODEL_INPUT_SIZE)
    return model_copy(photo.pixels)


@dataclass
class SceneMaps:
    saliency: np.ndarray  # float32 0..1 at the model copy's size
    depth: np.ndarray  # float32 relative inverse depth (larger is nearer) at the same size
    depth_measured: bool = True  # False when depth is the weight-free ground prior (see effect.render)


@dataclass(frozen=True)
class RenderSettings:
    """How a photo is rendered and written, whichever path renders it."""

    params: EffectParams = field(default_factory=EffectParams)
    format: str = "jpeg"
    quality: int = 92
    max_megapixels: float = 200.0
    intermediates: bool = False  # also the PNGs of the steps (INTERMEDIATE_NAMES)
    device_batch_bytes: int | None = None  # decoded pixel bytes per device batch (None: from free memory)


class SceneModels:
    """The salient-object model and the depth model, each loaded once on first use, run on the
    same batch on the same device. Where both run in torch, the batch crosses to the device once."""

    def __init__(
        self,
        saliency: str | None = None,
        depth: str | None = None,
        saliency_weights: str | None = None,
        depth_weights: str | None = None,
        device: str | None = None,
        batch_size: int = 4,
        runtime: str | None = None,
    ) -> None:
        self._choice = {SALIENCY: (saliency, saliency_weights), DEPTH: (depth, depth_weights)}
        self.device = device
        self.batch_size = batch_size
        self.runtime = runtime  # the salient-object model's (see models.create_model)
        self.seconds: dict[str, float] = {}  # each model's time on the last batch

    @classmethod
    def from_models(cls, saliency: MapModel, depth: MapModel) -> SceneModels:
        """Models already built (say with random weights, for benchmarks and tests)."""
        models = cls(device=saliency.device, batch_size=saliency.batch_size)
        models.__dict__.update(saliency=saliency, depth=depth)  # where cached_property keeps them
        return models

    def _load(self, task: str) -> MapModel:
        name, weights = self._choice[task]
        runtime = self.runtime if task == SALIENCY else None
        return load_model(task, name, weights, self.device, self.batch_size, runtime=runtime)

    @functools.cached_property
    def saliency(self) -> MapModel:
        return self._load(SALIENCY)

    @functools.cached_property
    def depth(self) -> MapModel:
        return self._load(DEPTH)

    def load(self) -> SceneModels:
        """Load both now (an actor fails at its start, not at its first photo)."""
        self.saliency, self.depth  # noqa: B018 - reading them loads them
        return self

    def predict(
        self,
        copies: Sequence[np.ndarray],
        saliency: Sequence[np.ndarray] | None = None,
        depth: Sequence[np.ndarray] | None = None,
    ) -> list[SceneMaps]:
        """Saliency, then depth (which may use the saliency maps), for every photo of the batch;
        maps given are used as they are, and their model is not even loaded. ``self.seconds``
        holds each model's time for the batch."""
        given_depth = depth
        self.seconds = {"saliency": 0.0, "depth": 0.0}
        if saliency is None and depth is None and self.on_device:
            saliency, depth = self._predict_on_device(copies)
        started = time.perf_counter()
        if saliency is None:
            saliency = self.saliency.predict(copies)
            self.seconds["saliency"] = time.perf_counter() - started
        started = time.perf_counter()
        if depth is None:
            depth = self.depth.predict(copies, saliency=saliency)
            self.seconds["depth"] = time.perf_counter() - started
        measured = self.depth.measures_depth if given_depth is None else True
        return [SceneMaps(s, d, measured) for s, d in zip(saliency, depth)]

    @property
    def on_device(self) -> bool:
        """Whether both models run on tensors on their device (torch models): then a batch
        crosses to the device once, and the device render path keeps their maps there."""
        return self.saliency.accepts_tensors and self.depth.accepts_tensors

    def _predict_on_device(self, copies: Sequence[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        import torch

        from .models.tensors import download, upload

        with torch.inference_mode():
            started = time.perf_counter()
            tensors = upload(copies, self.saliency.device)  # one pinned, non-blocking copy to a GPU
            saliency_tensors = self.saliency.predict_tensors(tensors)
            saliency = download(saliency_tensors)  # waits for the GPU: the clock reads saliency's time
            middle = time.perf_counter()
            depth = download(self.depth.predict_tensors(tensors, saliency=saliency_tensors))
            self.seconds = {"saliency": middle - started, "depth": time.perf_counter() - middle}
            return saliency, depth

    def predict_on_device(
        self, copies: Sequence[torch.Tensor], mark: Callable[[str], None] = lambda step: None
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Both models on model copies already on a torch device (H x W x 3 uint8 tensors); the
        maps stay there. Models without a device path get the copies on the host, and their maps
        go back to the device. ``mark(task)`` is called as each model's work is queued."""
        if self.on_device:
            saliency = self.saliency.predict_tensors(copies)
            mark("saliency")
            depth = self.depth.predict_tensors(copies, saliency=saliency)
            mark("depth")
            return saliency, depth
        from .models.tensors import download, upload

        on_host = download(copies)
        saliency_maps = self.saliency.predict(on_host)
        mark("saliency")
        depth_maps = self.depth.predict(on_host, saliency=saliency_maps)
        device = copies[0].device
        on_device = upload(saliency_maps, device), upload(depth_maps, device)
        mark("depth")
        return on_device

    def describe(self) -> list[str]:
        """What ran: name, version, runtime and device of each model loaded."""
        loaded = self.__dict__  # where cached_property keeps the models loaded so far
        return [loaded[name].describe() for name in ("saliency", "depth") if name in loaded]


@dataclass
class Finished:
    """A photo's result, ready to write."""

    encoded: bytes
    rendering: Rendering
    width: int
    height: int
    left_alone: str = ""  # kind of reason the photo was written unchanged ("" when it was not)
    reason: str = ""  # that reason in words
    intermediates: dict[str, bytes] = field(default_factory=dict)  # name -> PNG bytes
    seconds: dict[str, float] = field(default_factory=dict)  # decode, effect, encode


def render_on_host(data: bytes, source: str, maps: SceneMaps, settings: RenderSettings) -> Finished:
    """The CPU path: decode at full resolution (a camera RAW demosaiced, at 16 bits until
    encoded), apply the effect (effect.py), encode (EXIF kept, orientation applied)."""
    t0 = time.perf_counter()
    photo = decode_photo(data, source, settings.max_megapixels)
    t1 = time.perf_counter()
    result = render(photo.pixels, maps.saliency, maps.depth, settings.params, maps.depth_measured)
    t2 = time.perf_counter()
    encoded = encode_photo(result.image, settings.format, settings.quality, photo.exif)
    t3 = time.perf_counter()
    height, width = photo.pixels.shape[:2]
    kind, reason = left_alone_reason(result, settings.params)
    return Finished(
        encoded,
        result,
        width,
        height,
        kind,
        reason,
        intermediate_pngs(result, height, width) if settings.intermediates else {},
        {"decode": t1 - t0, "effect": t2 - t1, "encode": t3 - t2},
    )


def left_alone_reason(result: Rendering, params: EffectParams) -> tuple[str, str]:
    """(kind, reason in words) of a photo the effect left as it is; ("", "") when it did not."""
    if result.no_subject:
        return NO_CLEAR_SUBJECT, no_subject_reason(result, params)
    if result.left_alone:
        return BACKGROUND_ALREADY_SOFT, soft_background_reason(result, params)
    return "", ""


def no_subject_reason(result: Rendering, params: EffectParams) -> str:
    if result.fg_fraction < params.min_subject_area:
        return (
            f"left as it is: no clear subject (the salient-object mask covers {result.fg_fraction:.2%} "
            f"of the photo, below min_subject_area {params.min_subject_area:g})"
        )
    return (
        f"left as it is: no clear subject (the salient-object mask's mean level is "
        f"{result.subject_confidence:.2f}, below min_subject_confidence {params.min_subject_confidence:g})"
    )


def soft_background_reason(result: Rendering, params: EffectParams) -> str:
    return (
        f"left as it is: the background has little fine detail, already soft or plain "
        f"({result.background_detail:.2f} of the subject's, below min_background_detail "
        f"{params.min_background_detail:g})"
    )


# The intermediates a photo can be saved with (intermediate_pngs' keys), as <stem>.<name>.png:
# saliency is what the salient-object model found, subject the mask kept crisp (the model's
# mask extended to the whole object), depth16 the normalised depth, alpha the blend of photo
# and background.
INTERMEDIATE_NAMES = ("background", "saliency", "subject", "depth16", "alpha")


def intermediate_pngs(rendering: Rendering, height: int, width: int) -> dict[str, bytes]:
    """Viewable PNGs at the photo's size, named for what they show (INTERMEDIATE_NAMES)."""
    if rendering.saliency is None:  # a rendering's numbers only (device_render without intermediates)
        raise ValueError("intermediates need a rendering that carries its maps")

    def full(values: np.ndarray) -> np.ndarray:
        return upscale(values, rendering.factor, height, width)

    def gray(values: np.ndarray, peak: int, dtype: type) -> bytes:
        return png(np.round(np.clip(full(values), 0, 1) * peak).astype(dtype))

    return {
        "background": png(cv2.cvtColor(full(rendering.background), cv2.COLOR_RGB2BGR)),
        "saliency": gray(rendering.saliency, 255, np.uint8),
        "subject": gray(rendering.fg, 255, np.uint8),
        "depth16": gray(rendering.depth, 65535, np.uint16),
        "alpha": gray(rendering.alpha, 255, np.uint8),
    }


def png(values: np.ndarray) -> bytes:
    """PNG bytes of an 8- or 16-bit gray or BGR array."""
    ok, data = cv2.imencode(".png", values)
    if not ok:  # pragma: no cover - cv2 encodes any such array
        raise ValueError("PNG encoding failed")
    return data.tobytes()
