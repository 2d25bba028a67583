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

The batches of a call overlap (_overlapped), four at once: while one is in the models on the
calling thread, the next is decoded on a thread of its own, the one before goes through the effect
on another (its subject decisions included, whose host copy and watershed so wait for the device
on that thread alone, not on the models'), and the one before that is encoded on a fourth, which
also makes what the host needs of it (its numbers, the reason a photo was left alone, the
intermediates). A device batch holds at most the models' batch of photos, so a call of several
model batches overlaps. Each batch's steps are timed (BatchSpans, ``trace``), so the overlap can be
seen.

Without torchvision (this package does not require it) the codec steps run through Pillow on the
host, so the rest of the path runs and is tested on any machine.
"""

from __future__ import annotations

import io
import queue
import struct
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

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
    _drain(device)
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
    contiguous = [image.contiguous() for image in images]
    if contiguous:
        _drain(contiguous[0].device)
    encoded = tvio.encode_jpeg(contiguous, quality=quality)
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


@dataclass(frozen=True)
class Span:
    """When one step of a device batch ran, in seconds since its render_on_device call began
    (on CUDA, device time from events: when the work ran, not when it was queued)."""

    step: str
    start: float
    end: float


@dataclass(frozen=True)
class BatchSpans:
    """The steps of one device batch (photos: their indices in the call's ``datas``)."""

    photos: tuple[int, ...]
    spans: tuple[Span, ...]

    def seconds(self) -> dict[str, float]:
        """Seconds spent in each step (decode comes twice: the photos, then the model copies)."""
        out: dict[str, float] = {}
        for span in self.spans:
            out[span.step] = out.get(span.step, 0.0) + span.end - span.start
        return out


COMPUTE_STEPS = ("saliency", "depth", "effect")  # the models and the effect, on the calling thread


def busy_share(batches: Sequence[BatchSpans], steps: Sequence[str] = COMPUTE_STEPS) -> float:
    """The share of the wall time, first span to last, in which a batch was in one of ``steps``:
    1.0 when the models and the effect never wait for a decode or an encode."""
    spans = sorted((s.start, s.end) for b in batches for s in b.spans if s.step in steps)
    if not spans:
        return 0.0
    everything = [s for b in batches for s in b.spans]
    wall = max(s.end for s in everything) - min(s.start for s in everything)
    covered, reach = 0.0, -float("inf")
    for start, end in spans:  # the union of overlapping spans
        covered += max(0.0, end - max(start, reach))
        reach = max(reach, end)
    return covered / wall if wall > 0 else 1.0


class _Clock:
    """The call's one time origin. On a GPU a mark is a CUDA event on the stream the work is
    queued on (no wait between steps; read once, at the end), else the wall clock."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.origin = self.now()

    def now(self) -> object:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))  # the stream of the thread that marks
        return event

    def seconds_since_origin(self, mark: object) -> float:
        if not self.cuda:
            return mark - self.origin  # type: ignore[operator]
        mark.synchronize()  # type: ignore[attr-defined]
        return self.origin.elapsed_time(mark) / 1000  # type: ignore[attr-defined]


class _Steps:
    """One stage's steps of one batch: each runs from the previous mark to its own."""

    def __init__(self, clock: _Clock) -> None:
        self.clock = clock
        self.marks: list[tuple[str, object]] = [("", clock.now())]

    def mark(self, step: str) -> None:
        self.marks.append((step, self.clock.now()))

    def spans(self) -> list[Span]:
        times = [(step, self.clock.seconds_since_origin(mark)) for step, mark in self.marks]
        return [Span(step, start, end) for (_, start), (step, end) in zip(times[:-1], times[1:])]


def render_on_device(
    datas: Sequence[bytes],
    settings: RenderSettings,
    device: str | torch.device,
    models: SceneModels | None = None,
    maps: Sequence[SceneMaps] | None = None,
    trace: list[BatchSpans] | None = None,
) -> list[Finished | str]:
    """The device path: each photo decoded, run through ``models`` (or given ``maps``), rendered
    and encoded on ``device``: its Finished, or the reason it goes to the CPU path instead.

    The photos go to the device in batches of at most ``settings.device_batch_bytes`` decoded
    pixel bytes (default: what the device's free memory holds, see device_budget) and at most the
    models' batch size, in their order, overlapped: while one batch is in the models (on this
    thread), the next is decoded, the one before goes through the effect and the one before that
    is encoded (each on a thread of its own, see _overlapped).

    Finished.seconds holds the photo's share of its batch's decode, saliency, depth, effect and
    encode; Finished.rendering carries the numbers, and the maps only with ``settings.intermediates``.
    ``trace``, where given, gets the BatchSpans of each batch with a photo rendered, in order.
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
    sizes = {i: decoded_bytes(h) for i, h in headers.items()}
    batches = device_batches(sizes, budget.batch_bytes, models.batch_size if models is not None else None)
    clock = _Clock(dev)
    done: list[BatchSpans] = []
    _overlapped(
        [{i: headers[i] for i in batch} for batch in batches],
        [sum(sizes[i] for i in batch) for batch in batches],
        budget.in_flight_bytes,
        dev,
        [
            lambda batch: _decode_batch(datas, batch, results, dev, clock),
            lambda decoded: _model_batch(decoded, dev, models, maps),
            lambda modelled: _effect_batch(modelled, settings, dev, budget),
            lambda rendered: _encode_batch(rendered, settings, dev, results, done),
        ],
    )
    if trace is not None:
        trace.extend(done)
    return results


@dataclass
class _Decoded:
    """A device batch after its decode: the photos decoded, upright (those the decoder refused
    have their reason in the results already)."""

    headers: dict[int, JpegHeader]
    photos: dict[int, torch.Tensor]
    clock: _Clock
    steps: list[_Steps]  # read at the encode, so no stage waits for the device to read a clock
    ready: torch.cuda.Event | None  # on CUDA: the decode stream's work on the photos is queued before it


@dataclass(frozen=True)
class _Modelled:
    """A device batch after the models: the photos and their maps, on their way to the effect."""

    headers: dict[int, JpegHeader]
    photos: dict[int, torch.Tensor]
    live: list[int]  # the photos decoded, in order
    saliency: list[torch.Tensor]  # per live photo, at the model copy's size
    depth: list[torch.Tensor]
    depth_measured: bool
    clock: _Clock
    steps: list[_Steps]
    ready: torch.cuda.Event | None


@dataclass
class _Rendered:
    """A device batch after the effect, on its way to the encoder."""

    headers: dict[int, JpegHeader]
    live: list[int]  # the photos rendered, in order
    rendered: dict[int, tuple[effect_torch.TorchRendering, int]]  # photo -> (its effect call, index there)
    clock: _Clock
    steps: list[_Steps]
    ready: torch.cuda.Event | None


def _decode_batch(
    datas: Sequence[bytes],
    headers: dict[int, JpegHeader],
    results: list[Finished | str],
    dev: torch.device,
    clock: _Clock,
) -> _Decoded:
    """The decode stage of one batch (its thread's stream is current): photos decoded and upright."""
    steps = _Steps(clock)
    photos: dict[int, torch.Tensor] = {}
    for i, decoded in zip(headers, decode_jpegs([datas[i] for i in headers], dev)):
        if isinstance(decoded, Exception):
            results[i] = f"the device decoder refused it ({type(decoded).__name__})"
        else:
            photos[i] = upright(decoded, headers[i].orientation)
    steps.mark("decode")
    return _Decoded(headers, photos, clock, [steps], _handed_over(dev))


def _model_batch(
    decoded: _Decoded, dev: torch.device, models: SceneModels | None, maps: Sequence[SceneMaps] | None
) -> _Modelled:
    """The models on one decoded batch (or the given maps brought to the device), on the calling
    thread's stream, where the models are."""
    _take_over(dev, decoded.ready, list(decoded.photos.values()))
    photos = decoded.photos
    live = list(photos)
    steps = _Steps(decoded.clock)
    saliency: list[torch.Tensor] = []
    depth: list[torch.Tensor] = []
    depth_measured = True
    if live and maps is not None:
        saliency = [torch.from_numpy(np.ascontiguousarray(maps[i].saliency, np.float32)).to(dev) for i in live]
        depth = [torch.from_numpy(np.ascontiguousarray(maps[i].depth, np.float32)).to(dev) for i in live]
        depth_measured = all(maps[i].depth_measured for i in live)
        steps.mark("saliency")
        steps.mark("depth")
    elif live:
        assert models is not None
        depth_measured = models.depth.measures_depth
        copies = [model_copy(photos[i]) for i in live]
        steps.mark("decode")  # the model copy, as in the CPU path's reading
        saliency, depth = models.predict_on_device(copies, mark=steps.mark)
    return _Modelled(
        decoded.headers,
        photos,
        live,
        saliency,
        depth,
        depth_measured,
        decoded.clock,
        [*decoded.steps, steps],
        _handed_over(dev),
    )


def _effect_batch(modelled: _Modelled, settings: RenderSettings, dev: torch.device, budget: DeviceBudget) -> _Rendered:
    """The effect on one batch with its maps (on its thread's stream): its subject decisions wait
    for the device on this thread, while the next batch is in the models."""
    photos, live = modelled.photos, modelled.live
    rendered: dict[int, tuple[effect_torch.TorchRendering, int]] = {}
    if not live:
        return _Rendered(modelled.headers, live, rendered, modelled.clock, modelled.steps, None)
    _take_over(dev, modelled.ready, [*(photos[i] for i in live), *modelled.saliency, *modelled.depth])
    steps = _Steps(modelled.clock)
    saliency, depth = modelled.saliency, modelled.depth
    by_size: dict[tuple[int, int], list[int]] = {}
    for k, i in enumerate(live):
        height, width = photos[i].shape[-2:]
        by_size.setdefault((height, width), []).append(k)
    for (height, width), same_size in by_size.items():
        per_call = max(1, int(budget.effect_pixels // (height * width)))
        for start in range(0, len(same_size), per_call):
            members = same_size[start : start + per_call]
            done = effect_torch.render(
                torch.stack([photos[live[k]] for k in members]),
                _stack_maps([saliency[k] for k in members]),
                _stack_maps([depth[k] for k in members]),
                settings.params,
                modelled.depth_measured,
            )
            for j, k in enumerate(members):
                rendered[live[k]] = (done, j)
    steps.mark("effect")
    return _Rendered(modelled.headers, live, rendered, modelled.clock, [*modelled.steps, steps], _handed_over(dev))


def _encode_batch(
    batch: _Rendered, settings: RenderSettings, dev: torch.device, results: list[Finished | str], done: list[BatchSpans]
) -> None:
    """The encode stage of one batch (its thread's stream is current), and what the host makes
    of its numbers (the reason a photo was left alone, the intermediates): its results set."""
    live, rendered, headers = batch.live, batch.rendered, batch.headers
    if not live:
        return
    calls = {id(call): call for call, _ in rendered.values()}.values()  # the batch's effect calls
    _take_over(dev, batch.ready, [tensor for call in calls for tensor in _tensors(call)])
    steps = _Steps(batch.clock)
    images = [rendered[i][0].image[rendered[i][1]] for i in live]
    if settings.format == "jpeg":
        jpegs = encode_jpegs(images, settings.quality)
        encoded = [with_metadata(e, headers[i].exif) for i, e in zip(live, jpegs)]
    else:
        encoded = [
            encode_photo(image.permute(1, 2, 0).cpu().numpy(), settings.format, settings.quality, headers[i].exif)
            for i, image in zip(live, images)
        ]
    steps.mark("encode")
    spans = BatchSpans(tuple(live), tuple(span for stage in (*batch.steps, steps) for span in stage.spans()))
    done.append(spans)
    seconds = {step: spent / len(live) for step, spent in spans.seconds().items()}
    numbers = _numbers(rendered, live)
    params = settings.params
    for i, blob, image in zip(live, encoded, images):
        torch_rendering, j = rendered[i]
        height, width = image.shape[-2:]
        rendering = torch_rendering.host(j, with_image=False) if settings.intermediates else numbers[i]
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


# --------------------------------------------------------------------------- the overlap

_POLL_SECONDS = 0.05  # how often a waiting side looks whether another side has failed


class _Stopped(Exception):
    """Another side of the pipeline failed: this one stops (the failure itself is raised)."""


class _Pipeline:
    """What the three sides share: the first failure, and the waits that give way to it."""

    def __init__(self) -> None:
        self.failure: BaseException | None = None
        self.failed = threading.Event()

    def fail(self, exc: BaseException) -> None:
        if self.failure is None:
            self.failure = exc
        self.failed.set()

    def put(self, into: queue.Queue, item: object) -> None:
        while not self.failed.is_set():
            try:
                into.put(item, timeout=_POLL_SECONDS)
                return
            except queue.Full:
                continue
        raise _Stopped

    def get(self, out_of: queue.Queue) -> Any:
        while not self.failed.is_set():
            try:
                return out_of.get(timeout=_POLL_SECONDS)
            except queue.Empty:
                continue
        raise _Stopped


class _InFlight:
    """The decoded bytes of the batches between the start of their decode and the end of their
    encode, held within a limit; a batch goes alone whatever its size, so none waits forever."""

    def __init__(self, limit: int, pipeline: _Pipeline) -> None:
        self.limit, self.pipeline = limit, pipeline
        self.held = 0
        self.changed = threading.Condition()

    def take(self, size: int) -> None:
        with self.changed:
            while self.held and self.held + size > self.limit:
                if self.pipeline.failed.is_set():
                    raise _Stopped
                self.changed.wait(_POLL_SECONDS)
            self.held += size

    def give(self, size: int) -> None:
        with self.changed:
            self.held -= size
            self.changed.notify_all()


_END = object()  # after the last batch
MODELS_STAGE = 1  # render_on_device's stages: decode, models (on the calling thread), effect, encode


def _overlapped(
    batches: Sequence[object],
    sizes: Sequence[int],
    in_flight_bytes: int,
    dev: torch.device,
    stages: Sequence[Callable[[Any], Any]],
    on_caller: int = MODELS_STAGE,
) -> None:
    """Each batch through ``stages`` in turn (each takes what the one before made; the first
    takes the batch, the last's result is dropped), every stage on a batch of its own at once:
    stage ``on_caller`` on this thread (where the models are), each other on a thread of its
    own, queues of one between them. A batch starts once its bytes fit beside those in flight
    (``in_flight_bytes``) and holds them until its last stage is done. The first exception, in
    any stage, stops the others and is raised here; every wait gives way to it, so none hangs.

    On CUDA each thread queues its work on a stream of its own. What one stage makes, the next
    reads only after its stream waits on the maker's event, and with record_stream, so the
    caching allocator (one for all streams) does not hand that memory to the maker's stream
    while the reader still uses it (_take_over). Each codec is used by one thread only: the
    decoder (nvJPEG) by the first stage's, the encoder by the last's.
    """
    pipeline = _Pipeline()
    in_flight = _InFlight(in_flight_bytes, pipeline)
    between: list[queue.Queue] = [queue.Queue(maxsize=1) for _ in stages[1:]]  # between[k]: stage k's results

    def taken() -> Iterator[tuple[object, int]]:
        for batch, size in zip(batches, sizes):
            in_flight.take(size)
            yield batch, size

    def stage(k: int) -> None:
        last = k == len(stages) - 1
        items = taken() if k == 0 else iter(lambda: pipeline.get(between[k - 1]), _END)
        for item in items:
            result, size = item
            del item  # nothing here holds a batch past its stage: its memory goes with the next
            result = stages[k](result)
            if last:
                del result
                in_flight.give(size)
            else:
                pipeline.put(between[k], (result, size))
                del result
        if not last:
            pipeline.put(between[k], _END)

    def run(k: int) -> None:
        try:
            with nullcontext() if k == on_caller else _own_stream(dev), torch.inference_mode():
                stage(k)
        except _Stopped:
            pass
        except BaseException as exc:  # noqa: BLE001 - raised in the caller below
            pipeline.fail(exc)

    threads = [
        threading.Thread(target=run, args=(k,), name=f"device-stage-{k}", daemon=True)
        for k in range(len(stages))
        if k != on_caller
    ]
    for thread in threads:
        thread.start()
    try:
        run(on_caller)
    finally:
        for thread in threads:
            thread.join()
    if pipeline.failure is not None:
        raise pipeline.failure


def _own_stream(dev: torch.device) -> AbstractContextManager:
    """A CUDA stream of the thread's own made current (its work then runs beside the calling
    thread's), or nothing to do on other devices."""
    return torch.cuda.stream(torch.cuda.Stream(dev)) if dev.type == "cuda" else nullcontext()


def _handed_over(dev: torch.device) -> torch.cuda.Event | None:
    """On CUDA, an event after the work queued so far on this thread's stream: the next stage's
    stream waits on it before it reads what this one made."""
    if dev.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(dev))
    return event


def _take_over(dev: torch.device, ready: torch.cuda.Event | None, tensors: Sequence[torch.Tensor]) -> None:
    """Make the tensors another stage's stream made safe to read on this thread's stream: its
    work waits for theirs (``ready``), and the caching allocator, told that this stream uses
    them (record_stream), hands out their memory again only once this stream's work on them is
    done, not as soon as their maker's stream lets go of them."""
    if ready is None:
        return
    stream = torch.cuda.current_stream(dev)
    stream.wait_event(ready)
    for tensor in tensors:
        tensor.record_stream(stream)


def _drain(dev: torch.device) -> None:
    """On CUDA, wait (this thread only) until its stream has done what it was given. The CUDA
    JPEG codecs run on streams of their own: torchvision's decoder writes into memory it takes
    on the current stream without waiting for that stream (pytorch/vision#9606: a block the
    stream still reads, freed to the allocator, is overwritten), and its encoder has read images
    before they were ready (pytorch/vision#8587). So decode_jpegs and encode_jpegs drain it first."""
    if dev.type == "cuda":
        torch.cuda.current_stream(dev).synchronize()


def _tensors(rendering: effect_torch.TorchRendering) -> list[torch.Tensor]:
    return [value for value in vars(rendering).values() if isinstance(value, torch.Tensor)]


# ------------------------------------------------------------------------- memory budget

# A device batch holds each photo decoded, turned upright and rendered (3 bytes a pixel each)
# until its encode; a share of the free memory is left for the models' and the encoder's work.
HELD_PER_DECODED_BYTE = 3
USABLE_SHARE = 0.8
# Batches in flight at once where a batch size is given: one in each stage of _overlapped
# (decoded, in the models, in the effect, encoded); each must fit beside the others.
IN_FLIGHT = 4


@dataclass(frozen=True)
class DeviceBudget:
    """How much of a batch the device takes at once."""

    batch_bytes: int  # decoded pixel bytes of one device batch (a larger photo goes alone)
    effect_pixels: float  # photo pixels per effect_torch.render call
    in_flight_bytes: int  # decoded pixel bytes of the batches in flight together (one alone may hold more)


def free_device_memory(device: torch.device) -> int | None:
    """Bytes the device can still hand out (free, plus what torch's allocator holds unused);
    None where no limit is known (the CPU: the host's memory, as for the CPU path)."""
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def device_budget(device: torch.device, params: EffectParams, batch_bytes: int | None = None) -> DeviceBudget:
    """``batch_bytes`` a batch where given, IN_FLIGHT of them in flight; else half the usable free
    memory for the photos and half for one effect call, so photos of any size (24 MP, 50 MP) and
    any mix of sizes fit. That half holds the photos of all the batches in flight together:
    batches smaller than half of it overlap, and one as large waits until it can go alone."""
    given = None if batch_bytes is None else (batch_bytes, IN_FLIGHT * batch_bytes)
    free = free_device_memory(device)
    if free is None:
        whole, in_flight = given or (sys.maxsize, sys.maxsize)
        return DeviceBudget(whole, _effect_pixels(params), in_flight)
    half = USABLE_SHARE * free / 2
    photos = int(half / HELD_PER_DECODED_BYTE)
    whole, in_flight = given or (photos, photos)
    return DeviceBudget(whole, min(_effect_pixels(params), half / _effect_bytes_per_pixel(params)), in_flight)


def decoded_bytes(header: JpegHeader) -> int:
    """Bytes of the photo decoded to 8-bit RGB (gray JPEGs too are decoded to RGB)."""
    return header.width * header.height * 3


def device_batches(sizes: dict[int, int], budget: int, most: int | None = None) -> list[list[int]]:
    """The photos (index -> decoded bytes) in order, cut into batches of at most ``budget``
    bytes and ``most`` photos; a photo over the budget makes a batch of its own."""
    batches: list[list[int]] = []
    held = budget  # so the first photo opens a batch
    for i, size in sizes.items():
        if held + size > budget or (most is not None and len(batches[-1]) >= most):
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
