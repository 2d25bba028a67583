"""Photos from bytes to bytes on a torch device: the GPU render path.

    takes(data)             -> the JPEG's header facts, or why the device path cannot take it
    render_on_device(...)   -> per photo: photo.Finished, or why it goes to the CPU path

A batch is decoded on the device (nvJPEG through torchvision.io.decode_jpeg on CUDA), turned
upright there (EXIF orientation), shrunk there to the models' copy, run through both models,
rendered by effect_torch and encoded there (encode_jpeg); only its bytes and a few numbers come
back. Metadata never visits the device: the EXIF block (orientation reset) and the sRGB profile
are spliced into the encoded JPEG on the host, as photo_io.encode_photo writes them.

What the device path does not take as it is goes to the CPU path (photo.render_on_host), one photo at a
time: anything but an 8-bit RGB or gray JPEG (PNG, HEIC, WebP, TIFF, CMYK), an ICC profile other
than sRGB, a photo over the megapixel limit (the CPU path says so in its own words), and what
the device decoder refuses.

Without torchvision (this package does not require it) the codec steps run through Pillow on the
host, so the rest of the path runs and is tested on any machine.
"""

from __future__ import annotations

import io
import struct
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageCms

from . import effect_torch
from .effect import Rendering
from .models.tensors import resize_map
from .params import EffectParams
from .photo import (
    MODEL_INPUT_SIZE,
    Finished,
    RenderSettings,
    SceneMaps,
    SceneModels,
    intermediate_pngs,
    left_alone_reason,
)
from .photo_io import SRGB_ICC, encode_photo, is_srgb, reset_orientation

_ORIENTATION = 0x0112


@dataclass(frozen=True)
class JpegHeader:
    width: int
    height: int
    orientation: int  # EXIF orientation, 1..8 (1: upright already)
    exif: bytes | None  # the EXIF block to write back, orientation reset to 1


def takes(data: bytes, max_megapixels: float) -> JpegHeader | str:
    """The header facts of a JPEG the device path can take as it is, else why not (in words).
    Reads the header only."""
    if not data.startswith(b"\xff\xd8\xff"):
        return "not a JPEG"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=("JPEG",))
        width, height = im.size
        if width * height > max_megapixels * 1e6:
            return "over the megapixel limit"
        if im.mode not in ("RGB", "L"):
            return f"{im.mode} JPEG"
        icc = im.info.get("icc_profile")
        if icc and not is_srgb(ImageCms.ImageCmsProfile(io.BytesIO(icc))):
            return "ICC profile other than sRGB"
        raw = im.info.get("exif")
        orientation = int(im.getexif().get(_ORIENTATION, 1)) if raw else 1
    except Exception as exc:  # noqa: BLE001 - the CPU path names the problem in its own words
        return f"unreadable header ({type(exc).__name__})"
    return JpegHeader(
        width, height, orientation if 1 <= orientation <= 8 else 1, reset_orientation(raw) if raw else None
    )


# ---------------------------------------------------------------------------------- codec


def _torchvision_io():
    try:
        import torchvision.io

        return torchvision.io
    except (ImportError, RuntimeError, OSError):  # absent, or built for another torch
        return None


def decode_jpegs(datas: Sequence[bytes], device: torch.device) -> list[torch.Tensor | Exception]:
    """3 x H x W uint8 RGB tensors on ``device``, as stored (orientation not applied); one
    batched call, then one by one where the batch fails, so a refused photo fails alone."""
    tvio = _torchvision_io()
    if tvio is None:
        return [_decode_with_pillow(d, device) for d in datas]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # bytes are read-only; the decoder only reads them
        tensors = [torch.frombuffer(d, dtype=torch.uint8) for d in datas]
    try:
        return list(tvio.decode_jpeg(tensors, mode=tvio.ImageReadMode.RGB, device=device))
    except Exception:  # noqa: BLE001 - find the photo(s) the decoder refuses
        out: list[torch.Tensor | Exception] = []
        for t in tensors:
            try:
                out.append(tvio.decode_jpeg(t, mode=tvio.ImageReadMode.RGB, device=device))
            except Exception as exc:  # noqa: BLE001
                out.append(exc)
        return out


def _decode_with_pillow(data: bytes, device: torch.device) -> torch.Tensor | Exception:
    try:
        with Image.open(io.BytesIO(data)) as im:
            pixels = np.asarray(im.convert("RGB"))
    except Exception as exc:  # noqa: BLE001
        return exc
    return torch.from_numpy(pixels.transpose(2, 0, 1).copy()).to(device)


def upright(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """A 3 x H x W image turned as EXIF orientation 1..8 says (as ImageOps.exif_transpose)."""
    if orientation in (5, 6, 7, 8):
        image = image.transpose(1, 2)  # the diagonal mirror; the flips below finish the turn
    flips = {2: (2,), 3: (1, 2), 4: (1,), 5: (), 6: (2,), 7: (1, 2), 8: (1,)}.get(orientation, ())
    return image.flip(flips) if flips else image


def encode_jpegs(images: Sequence[torch.Tensor], quality: int) -> list[bytes]:
    """JPEG bytes of 3 x H x W uint8 images, encoded where they are; one copy back to the host."""
    tvio = _torchvision_io()
    if tvio is None:
        out = []
        for image in images:
            buffer = io.BytesIO()
            Image.fromarray(image.permute(1, 2, 0).contiguous().cpu().numpy()).save(buffer, "JPEG", quality=quality)
            out.append(buffer.getvalue())
        return out
    encoded = tvio.encode_jpeg([image.contiguous() for image in images], quality=quality)
    host = torch.cat([e.reshape(-1) for e in encoded]).cpu().numpy()
    bounds = np.cumsum([0] + [e.numel() for e in encoded])
    return [host[a:b].tobytes() for a, b in zip(bounds[:-1], bounds[1:])]


def with_metadata(jpeg: bytes, exif: bytes | None) -> bytes:
    """The JPEG with an EXIF block (APP1) and the sRGB profile (APP2) after its JFIF header, as
    photo_io.encode_photo writes them. An EXIF block too long for one segment is left out."""
    at = 2
    if jpeg[2:4] == b"\xff\xe0":  # JFIF's APP0 stays first
        at = 4 + struct.unpack(">H", jpeg[4:6])[0]
    segments = []
    if exif and len(exif) + 2 <= 0xFFFF:
        segments.append(b"\xff\xe1" + struct.pack(">H", len(exif) + 2) + exif)
    icc = b"ICC_PROFILE\x00\x01\x01" + SRGB_ICC  # one chunk: the sRGB profile is small
    segments.append(b"\xff\xe2" + struct.pack(">H", len(icc) + 2) + icc)
    return jpeg[:at] + b"".join(segments) + jpeg[at:]


def model_copy(image: torch.Tensor) -> torch.Tensor:
    """H x W x 3 uint8 on the device: the photo with its long side at most MODEL_INPUT_SIZE, by
    antialiased bilinear shrinking (one kernel; the host's copy is a draft decode shrunk by area
    averaging, so the models see the same scene through a slightly different low-pass)."""
    height, width = image.shape[-2:]
    scale = MODEL_INPUT_SIZE / max(height, width)
    if scale < 1:
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        shrunk = F.interpolate(image[None].to(torch.float32), size=size, mode="bilinear", antialias=True)
        image = shrunk[0].round_().clamp_(0, 255).to(torch.uint8)
    return image.permute(1, 2, 0)


# ------------------------------------------------------------------------------ the batch


class _Clock:
    """Seconds spent in each step of a batch on the device, read once at the end: CUDA events
    where the work is queued on a GPU (no wait between steps), else the wall clock."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[str, object]] = []
        self.mark("")

    def mark(self, step: str) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append((step, event))
        else:
            self.marks.append((step, time.perf_counter()))

    def seconds(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for (_, before), (step, after) in zip(self.marks[:-1], self.marks[1:]):
            if self.cuda:
                after.synchronize()  # type: ignore[attr-defined]
                spent = before.elapsed_time(after) / 1000  # type: ignore[attr-defined]
            else:
                spent = after - before  # type: ignore[operator]
            out[step] = out.get(step, 0.0) + spent
        return out


def render_on_device(
    datas: Sequence[bytes],
    settings: RenderSettings,
    device: str | torch.device,
    models: SceneModels | None = None,
    maps: Sequence[SceneMaps] | None = None,
) -> list[Finished | str]:
    """The device path: each photo decoded, run through ``models`` (or given ``maps``), rendered
    and encoded on ``device``: its Finished, or the reason it goes to the CPU path instead.

    The photos go to the device in batches of at most ``settings.device_batch_bytes`` decoded
    pixel bytes (default: what the device's free memory holds, see device_budget), in their order.

    Finished.seconds holds the photo's share of the batch's decode, saliency, depth, effect and encode;
    Finished.rendering carries the numbers, and the maps only with ``settings.intermediates``.
    """
    if (models is None) == (maps is None):
        raise ValueError("give models or maps")
    dev = torch.device(device)
    results: list[Finished | str] = []
    headers: dict[int, JpegHeader] = {}
    for i, data in enumerate(datas):
        found = takes(data, settings.max_megapixels)
        results.append(found if isinstance(found, str) else "")
        if isinstance(found, JpegHeader):
            headers[i] = found
    budget = device_budget(dev, settings.params, settings.device_batch_bytes)
    for group in device_batches({i: decoded_bytes(h) for i, h in headers.items()}, budget.batch_bytes):
        _render_group(datas, {i: headers[i] for i in group}, results, settings, dev, budget, models, maps)
    return results


def _render_group(
    datas: Sequence[bytes],
    headers: dict[int, JpegHeader],
    results: list[Finished | str],
    settings: RenderSettings,
    dev: torch.device,
    budget: DeviceBudget,
    models: SceneModels | None,
    maps: Sequence[SceneMaps] | None,
) -> None:
    """render_on_device for one device batch (photos ``headers``): its results set in place."""
    params = settings.params
    with torch.inference_mode():
        clock = _Clock(dev)
        photos: dict[int, torch.Tensor] = {}
        for i, decoded in zip(headers, decode_jpegs([datas[i] for i in headers], dev)):
            if isinstance(decoded, Exception):
                results[i] = f"the device decoder refused it ({type(decoded).__name__})"
            else:
                photos[i] = upright(decoded, headers[i].orientation)
        clock.mark("decode")
        if not photos:
            return
        live = list(photos)
        if maps is not None:
            saliency = [torch.from_numpy(np.ascontiguousarray(maps[i].saliency, np.float32)).to(dev) for i in live]
            depth = [torch.from_numpy(np.ascontiguousarray(maps[i].depth, np.float32)).to(dev) for i in live]
            depth_measured = all(maps[i].depth_measured for i in live)
            clock.mark("saliency")
            clock.mark("depth")
        else:
            assert models is not None
            depth_measured = models.depth.measures_depth
            copies = [model_copy(photos[i]) for i in live]
            clock.mark("decode")  # the model copy, as in the CPU path's reading
            saliency, depth = models.predict_on_device(copies, mark=clock.mark)

        by_size: dict[tuple[int, int], list[int]] = {}
        for k, i in enumerate(live):
            height, width = photos[i].shape[-2:]
            by_size.setdefault((height, width), []).append(k)
        rendered: dict[int, tuple[effect_torch.TorchRendering, int]] = {}
        for (height, width), same_size in by_size.items():
            per_call = max(1, int(budget.effect_pixels // (height * width)))
            for start in range(0, len(same_size), per_call):
                members = same_size[start : start + per_call]
                done = effect_torch.render(
                    torch.stack([photos[live[k]] for k in members]),
                    _stack_maps([saliency[k] for k in members]),
                    _stack_maps([depth[k] for k in members]),
                    params,
                    depth_measured,
                )
                for j, k in enumerate(members):
                    rendered[live[k]] = (done, j)
        del photos
        clock.mark("effect")

        images = [rendered[i][0].image[rendered[i][1]] for i in live]
        if settings.format == "jpeg":
            jpegs = encode_jpegs(images, settings.quality)
            encoded = [with_metadata(e, headers[i].exif) for i, e in zip(live, jpegs)]
        else:
            encoded = [
                encode_photo(image.permute(1, 2, 0).cpu().numpy(), settings.format, settings.quality, headers[i].exif)
                for i, image in zip(live, images)
            ]
        clock.mark("encode")
        numbers = _numbers(rendered, live)
        seconds = {step: spent / len(live) for step, spent in clock.seconds().items()}

    for i, blob in zip(live, encoded):
        batch, j = rendered[i]
        height, width = images[live.index(i)].shape[-2:]
        rendering = batch.host(j, with_image=False) if settings.intermediates else numbers[i]
        kind, reason = left_alone_reason(rendering, params)
        results[i] = Finished(
            blob,
            rendering,
            width,
            height,
            kind,
            reason,
            intermediate_pngs(rendering, height, width) if settings.intermediates else {},
            dict(seconds),
        )


# ------------------------------------------------------------------------- memory budget

# A device batch holds each photo decoded, turned upright and rendered (3 bytes a pixel each)
# until its encode; a share of the free memory is left for the models' and the encoder's work.
HELD_PER_DECODED_BYTE = 3
USABLE_SHARE = 0.8


@dataclass(frozen=True)
class DeviceBudget:
    """How much of a batch the device takes at once."""

    batch_bytes: int  # decoded pixel bytes of one device batch (a larger photo goes alone)
    effect_pixels: float  # photo pixels per effect_torch.render call


def free_device_memory(device: torch.device) -> int | None:
    """Bytes the device can still hand out (free, plus what torch's allocator holds unused);
    None where no limit is known (the CPU: the host's memory, as for the CPU path)."""
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def device_budget(device: torch.device, params: EffectParams, batch_bytes: int | None = None) -> DeviceBudget:
    """``batch_bytes`` where given, else half the usable free memory for the batch's photos and
    half for one effect call, so photos of any size (24 MP, 50 MP) and any mix of sizes fit."""
    free = free_device_memory(device)
    if free is None:
        return DeviceBudget(batch_bytes or sys.maxsize, _effect_pixels(params))
    half = USABLE_SHARE * free / 2
    return DeviceBudget(
        batch_bytes or int(half / HELD_PER_DECODED_BYTE),
        min(_effect_pixels(params), half / _effect_bytes_per_pixel(params)),
    )


def decoded_bytes(header: JpegHeader) -> int:
    """Bytes of the photo decoded to 8-bit RGB (gray JPEGs too are decoded to RGB)."""
    return header.width * header.height * 3


def device_batches(sizes: dict[int, int], budget: int) -> list[list[int]]:
    """The photos (index -> decoded bytes) in order, cut into batches of at most ``budget``
    bytes; a photo over the budget makes a batch of its own."""
    batches: list[list[int]] = []
    held = budget  # so the first photo opens a batch
    for i, size in sizes.items():
        if held + size > budget:
            batches.append([])
            held = 0
        batches[-1].append(i)
        held += size
    return batches


def _effect_bytes_per_pixel(params: EffectParams) -> float:
    return 12 if params.work_size else 200  # see _effect_pixels


def _effect_pixels(params: EffectParams) -> float:
    """Photo pixels per effect_torch.render call. The effect's float copies of a batch take about
    12 bytes per photo pixel at a working size, and some 200 at full resolution (the seed preset's
    opening on the whole photo): 16 12-MP photos then peak near 37 GiB, so such batches go in parts."""
    return 256e6 if params.work_size else 50e6


def _stack_maps(maps: list[torch.Tensor]) -> torch.Tensor:
    """One N x h x w tensor of maps; maps of photos of one size share a size, but maps given from
    files may not: those are brought to the first one's size (bilinear, as the effect would)."""
    h, w = maps[0].shape[-2:]
    return torch.stack([resize_map(m, h, w) for m in maps])


def _numbers(rendered: dict[int, tuple[effect_torch.TorchRendering, int]], live: list[int]) -> dict[int, Rendering]:
    """The per-photo numbers of every rendering, brought to the host in one copy."""
    return dict(zip(live, effect_torch.host_numbers([rendered[i] for i in live])))
