"""The device render path (pipeline/device_render.py) on the CPU: the same pictures as the CPU path,
orientation and metadata kept, and what it cannot take sent to the CPU path with the reason."""

from __future__ import annotations

import io
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageCms, ImageOps

from pipeline import device_render
from pipeline.models.trivial import TrivialDepth, TrivialSaliency
from pipeline.params import PRESETS
from pipeline.photo import NO_CLEAR_SUBJECT, RenderSettings, SceneMaps, SceneModels, render_on_host
from pipeline.photo_io import decode_photo

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def on_host(data, maps, params, depth_measured=True):
    """The CPU path's result for (saliency, depth) maps."""
    return render_on_host(data, "coffee.jpg", SceneMaps(*maps, depth_measured), RenderSettings(params))


def on_device(datas, params, maps, depth_measured=True, batch_bytes=None):
    """The device path's results, on the CPU, for (saliency, depth) maps."""
    settings = RenderSettings(params, device_batch_bytes=batch_bytes)
    chosen = [SceneMaps(*m, depth_measured) for m in maps]
    return device_render.render_on_device(datas, settings, "cpu", maps=chosen)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def jpeg(image: Image.Image, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", quality=95, **options)
    return out.getvalue()


def scene_maps(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    fg = ((((yy - height / 2) / (height / 3)) ** 2 + ((xx - width / 2) / (width / 5)) ** 2) < 1).astype(np.float32)
    return fg, yy / height + 0.3 * fg


def exif_with_orientation(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif[0x010F] = "TestMaker"  # Make: must survive
    return exif.tobytes()


@pytest.mark.parametrize("preset", ["seed", "default"])
@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_device_path_gives_the_cpu_paths_picture_and_metadata(preset, orientation):
    data = jpeg(Image.open(EXAMPLES / "coffee.jpg"), exif=exif_with_orientation(orientation))
    upright = decode_photo(data, "coffee.jpg").pixels
    maps = scene_maps(*upright.shape[:2])
    reference = on_host(data, maps, PRESETS[preset])
    (got,) = on_device([data], PRESETS[preset], [maps])
    assert not isinstance(got, str), got
    assert (got.width, got.height) == (reference.width, reference.height) == (upright.shape[1], upright.shape[0])
    assert psnr(pixels(got.encoded), pixels(reference.encoded)) >= 40  # two JPEG encodes of ~equal pictures
    assert got.rendering.start == pytest.approx(reference.rendering.start, abs=1e-5)
    assert got.rendering.fg_fraction == pytest.approx(reference.rendering.fg_fraction, abs=1e-4)
    written = Image.open(io.BytesIO(got.encoded))
    assert written.getexif()[0x0112] == 1 and written.getexif()[0x010F] == "TestMaker"
    profile = ImageCms.ImageCmsProfile(io.BytesIO(written.info["icc_profile"]))
    assert "srgb" in ImageCms.getProfileDescription(profile).lower()
    assert set(got.seconds) == {"decode", "saliency", "depth", "effect", "encode"}


def test_a_photo_with_no_clear_subject_is_left_as_it_is_on_both_paths():
    data = (EXAMPLES / "coffee.jpg").read_bytes()
    photo = decode_photo(data, "coffee.jpg").pixels
    fg, depth = scene_maps(*photo.shape[:2])
    maps = (fg * np.float32(0.6), depth)  # a large mask the model is unsure of
    reference = on_host(data, maps, PRESETS["default"])
    (got,) = on_device([data], PRESETS["default"], [maps])
    assert not isinstance(got, str), got
    assert reference.left_alone == got.left_alone == NO_CLEAR_SUBJECT
    assert got.reason == reference.reason and "min_subject_confidence" in got.reason
    assert got.rendering.no_subject and got.rendering.left_alone
    assert psnr(pixels(got.encoded), photo) >= 40  # the photo itself, encoded once
    assert psnr(pixels(got.encoded), pixels(reference.encoded)) >= 40


@pytest.mark.parametrize("depth_measured", [True, False])
def test_depth_measured_reaches_the_device_path(depth_measured):
    """A partial mask is extended as the CPU path extends it: by depth, or by colour alone under
    the ground prior."""
    data = (EXAMPLES / "coffee.jpg").read_bytes()
    fg, depth = scene_maps(*decode_photo(data, "coffee.jpg").pixels.shape[:2])
    fg[:, : fg.shape[1] // 2] = 0  # the right half of the subject only
    fractions = {}
    for measured in (True, False):
        reference = on_host(data, (fg, depth), PRESETS["default"], depth_measured=measured)
        fractions[measured] = reference.rendering.fg_fraction
        if measured != depth_measured:
            continue
        (got,) = on_device([data], PRESETS["default"], [(fg, depth)], depth_measured=measured)
        assert not isinstance(got, str), got
        assert got.rendering.fg_fraction == pytest.approx(reference.rendering.fg_fraction, abs=1e-6)
        assert got.rendering.start == pytest.approx(reference.rendering.start, abs=1e-5)
        assert psnr(pixels(got.encoded), pixels(reference.encoded)) >= 40
    assert fractions[True] != pytest.approx(fractions[False], abs=1e-3)  # the argument decides something


@pytest.mark.parametrize("orientation", range(1, 9))
def test_upright_turns_as_pillow_does(orientation):
    image = Image.fromarray(np.random.default_rng(orientation).integers(0, 255, (5, 7, 3), dtype=np.uint8))
    image.getexif()[0x0112] = orientation
    expected = np.asarray(ImageOps.exif_transpose(image))
    tensor = torch.from_numpy(np.asarray(image).transpose(2, 0, 1).copy())
    got = device_render.upright(tensor, orientation).permute(1, 2, 0).numpy()
    assert np.array_equal(got, expected)


def cmyk_jpeg() -> bytes:
    return jpeg(Image.open(EXAMPLES / "chelsea.jpg").convert("CMYK"))


def wide_gamut_jpeg() -> bytes:
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("XYZ")).tobytes()
    return jpeg(Image.open(EXAMPLES / "chelsea.jpg"), icc_profile=profile)


def png() -> bytes:
    out = io.BytesIO()
    Image.open(EXAMPLES / "chelsea.jpg").save(out, "PNG")
    return out.getvalue()


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (png, "not a JPEG"),
        (cmyk_jpeg, "CMYK JPEG"),
        (wide_gamut_jpeg, "ICC profile other than sRGB"),
        (lambda: (EXAMPLES / "chelsea.jpg").read_bytes()[:3000], "refused"),  # truncated: the decoder refuses
    ],
)
def test_what_the_device_path_cannot_take_goes_to_the_cpu_path(make, reason):
    good = (EXAMPLES / "chelsea.jpg").read_bytes()
    maps = scene_maps(300, 451)
    got = on_device([make(), good], PRESETS["default"], [maps, maps])
    assert isinstance(got[0], str) and reason in got[0]
    assert not isinstance(got[1], str)  # the other photo of the batch goes on


def test_megapixel_limit_is_left_to_the_cpu_path():
    assert device_render.takes((EXAMPLES / "chelsea.jpg").read_bytes(), 0.1) == "over the megapixel limit"


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["seed", "default"])
def test_render_command_with_the_torch_backend(tmp_path, preset):
    """`dreamfocus render --render-backend torch --device cpu` gives the numpy backend's picture."""
    photo = EXAMPLES / "motorcycle_left.jpg"
    outputs = {}
    for backend in ("numpy", "torch"):
        out = tmp_path / f"{backend}.png"
        command = [sys.executable, "-m", "pipeline.cli", "render", str(photo), "-o", str(out), "--preset", preset]
        command += ["--saliency-model", "trivial-saliency", "--depth-model", "trivial-depth"]
        command += ["--render-backend", backend, "--device", "cpu"]
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=False)
        assert done.returncode == 0, done.stderr
        assert f"render path {'torch:cpu' if backend == 'torch' else 'numpy'};" in done.stdout
        outputs[backend] = np.asarray(Image.open(out).convert("RGB"))
    assert psnr(outputs["torch"], outputs["numpy"]) >= 45


def test_manifest_parts_written_before_render_path_read_it_as_null(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.manifest import read_manifest
    from pipeline.storage import Storage

    pq.write_table(pa.table({"relpath": ["a.jpg"], "status": ["ok"]}), tmp_path / "part-old-00000.parquet")
    rows = read_manifest(Storage(str(tmp_path)), ["relpath", "render_path"])
    assert rows.column("render_path").to_pylist() == [None]


def test_a_batch_too_large_for_one_effect_call_goes_in_parts(monkeypatch):
    datas = [(EXAMPLES / name).read_bytes() for name in ("chelsea.jpg", "coffee.jpg", "chelsea.jpg")]
    sizes = [decode_photo(d, "x").pixels.shape[:2] for d in datas]
    maps = [scene_maps(*size) for size in sizes]
    whole = on_device(datas, PRESETS["seed"], maps)
    calls = []
    original = device_render.effect_torch.render
    monkeypatch.setattr(device_render, "_effect_pixels", lambda params: 1.0)  # one photo per call
    monkeypatch.setattr(device_render.effect_torch, "render", lambda *a: calls.append(a[0].shape[0]) or original(*a))
    parts = on_device(datas, PRESETS["seed"], maps)
    assert calls == [1, 1, 1]
    for a, b in zip(whole, parts):
        assert not isinstance(a, str) and not isinstance(b, str)
        assert np.array_equal(pixels(a.encoded), pixels(b.encoded))


def test_a_mixed_batch_is_split_to_fit_a_declared_device_memory(monkeypatch):
    """A device that declares 12 MB free, of which the decoded photos may hold 1.6 MB: photos of
    mixed sizes go in device batches that fit, in their order, with the pictures of one photo
    at a time; the same photos as one batch run out of the declared memory."""
    rng = np.random.default_rng(0)
    sizes = [(300, 400), (300, 400), (600, 800), (150, 200), (300, 400)]  # height, width
    datas = [jpeg(Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))) for h, w in sizes]
    maps = [scene_maps(h, w) for h, w in sizes]
    declared = 12_000_000
    monkeypatch.setattr(device_render, "free_device_memory", lambda device: declared)
    budget = device_render.device_budget(torch.device("cpu"), PRESETS["seed"])
    assert budget.batch_bytes == int(0.8 * declared / 2 / 3)

    decoded_batches, effect_pixels = [], []
    original_decode, original_render = device_render.decode_jpegs, device_render.effect_torch.render

    def decode_within_memory(batch, device):
        held = sum(w * h * 3 for h, w in (sizes[datas.index(d)] for d in batch))
        if held > budget.batch_bytes:
            raise torch.OutOfMemoryError(f"{held} bytes decoded at once")
        decoded_batches.append([datas.index(d) for d in batch])
        return original_decode(batch, device)

    def render_counted(photos, *args):
        effect_pixels.append(photos.shape[0] * photos.shape[-1] * photos.shape[-2])
        return original_render(photos, *args)

    monkeypatch.setattr(device_render, "decode_jpegs", decode_within_memory)
    monkeypatch.setattr(device_render.effect_torch, "render", render_counted)
    split = on_device(datas, PRESETS["seed"], maps)

    assert decoded_batches == [[0, 1], [2, 3], [4]]  # 0.72 MB, 1.53 MB, 0.36 MB of 1.6 MB
    assert all(pixels_in <= max(budget.effect_pixels, 600 * 800) for pixels_in in effect_pixels)
    for (h, w), done in zip(sizes, split):
        assert not isinstance(done, str), done
        assert pixels(done.encoded).shape == (h, w, 3)
    one_by_one = [on_device([d], PRESETS["seed"], [m])[0] for d, m in zip(datas, maps)]
    for a, b in zip(split, one_by_one):
        assert not isinstance(a, str) and not isinstance(b, str)
        assert np.array_equal(pixels(a.encoded), pixels(b.encoded))
    with pytest.raises(torch.OutOfMemoryError):
        on_device(datas, PRESETS["seed"], maps, batch_bytes=10**12)


def test_device_batches_are_cut_by_bytes_in_order():
    assert device_render.device_batches({0: 4, 1: 4, 2: 9, 3: 1, 5: 2}, budget=8) == [[0, 1], [2], [3, 5]]
    assert device_render.device_batches({}, budget=8) == []
    # at most the models' batch of photos too: a call of several model batches overlaps them
    assert device_render.device_batches(dict.fromkeys(range(5), 1), budget=100, most=2) == [[0, 1], [2, 3], [4]]
    assert device_render.device_batches({0: 4, 1: 4, 2: 1}, budget=8, most=2) == [[0, 1], [2]]


def test_a_model_call_on_the_device_path_holds_several_device_batches(tmp_path):
    """A GPU's model actor is called with four model batches, each a device batch of its own, so
    they overlap within the call (one device batch a call would leave the device idle while it
    is decoded and encoded); the CPU stage's calls stay a model batch."""
    from pipeline.job.driver import DEVICE_BATCHES_PER_CALL, model_call_rows, model_layout
    from pipeline.job.plan import JobConfig

    layout = model_layout(JobConfig(input=str(tmp_path), output=str(tmp_path / "out")), cluster_gpus=1)
    assert (layout.batch_size, DEVICE_BATCHES_PER_CALL) == (16, 4)
    assert model_call_rows(layout, on_device=True) == 64 and model_call_rows(layout, on_device=False) == 16

    models = SceneModels.from_models(TrivialSaliency(batch_size=2), TrivialDepth(batch_size=2))
    trace: list[device_render.BatchSpans] = []
    settings = RenderSettings(PRESETS["default"])  # no byte limit on the CPU: the models' batch cuts
    got = device_render.render_on_device(small_jpegs(8), settings, "cpu", models=models, trace=trace)
    assert [batch.photos for batch in trace] == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert all(not isinstance(done, str) for done in got)


def test_device_batch_bytes_reaches_the_model_actor_and_is_checked(tmp_path):
    from pipeline.errors import BadInputError
    from pipeline.job.plan import JobConfig

    config = JobConfig(input=str(tmp_path), output=str(tmp_path / "out"), device_batch_bytes=2_000_000_000)
    assert config.render_settings().device_batch_bytes == 2_000_000_000
    with pytest.raises(BadInputError, match="device-batch-bytes must be >= 1"):
        JobConfig(input=str(tmp_path), output=str(tmp_path / "out"), device_batch_bytes=0)


# ------------------------------------------------------------------------- the overlap


def small_jpegs(count: int, height: int = 48, width: int = 64) -> list[bytes]:
    rng = np.random.default_rng(count)
    return [jpeg(Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))) for _ in range(count)]


class GatedSaliency(TrivialSaliency):
    """The trivial mask; on its first batch it waits for the next batch's decode to begin (at
    most 10 s: a device path that decodes only after the models fails the test, it does not hang)."""

    def __init__(self, in_models: threading.Event, next_decoding: threading.Event) -> None:
        super().__init__()
        self.in_models, self.next_decoding = in_models, next_decoding
        self.waited: list[bool] = []  # whether the next decode began while the first batch waited

    def _predict_batch(self, photos):
        self.in_models.set()
        if not self.waited:
            self.waited.append(self.next_decoding.wait(timeout=10))
        return super()._predict_batch(photos)


def overlaps(a: device_render.Span, b: device_render.Span) -> bool:
    return a.start < b.end and b.start < a.end


def test_the_next_batch_is_decoded_while_one_is_in_the_models(monkeypatch):
    """Two batches in different steps at once, shown by their spans: the first batch's saliency
    model waits until the second batch's decode has begun, and that decode until the first batch
    is in the models, so the two spans overlap on any machine, however slow, or the test fails."""
    datas = small_jpegs(4)
    in_models, next_decoding = threading.Event(), threading.Event()
    original = device_render.decode_jpegs
    decodes = []

    def gated_decode(batch, device):
        decodes.append(len(batch))
        if len(decodes) == 2:
            next_decoding.set()
            assert in_models.wait(timeout=10)
        return original(batch, device)

    monkeypatch.setattr(device_render, "decode_jpegs", gated_decode)
    saliency = GatedSaliency(in_models, next_decoding)
    models = SceneModels.from_models(saliency, TrivialDepth())
    settings = RenderSettings(PRESETS["default"], device_batch_bytes=2 * 48 * 64 * 3)  # two photos a batch
    trace: list[device_render.BatchSpans] = []
    got = device_render.render_on_device(datas, settings, "cpu", models=models, trace=trace)

    assert saliency.waited == [True] and decodes == [2, 2]
    assert [batch.photos for batch in trace] == [(0, 1), (2, 3)]
    first = {span.step: span for span in trace[0].spans}
    second_decode = trace[1].spans[0]  # the decode stage's (the model copy is a decode step too)
    assert second_decode.step == "decode" and overlaps(second_decode, first["saliency"])
    for batch in trace:  # each step of a batch after the one before
        assert all(a.end <= b.start for a, b in zip(batch.spans[:-1], batch.spans[1:]))
        assert [span.step for span in batch.spans] == ["decode", "decode", "saliency", "depth", "effect", "encode"]
    for batch in trace:  # each photo's seconds: its share of its batch's
        for i in batch.photos:
            done = got[i]
            assert not isinstance(done, str), done
            for step, spent in batch.seconds().items():
                assert done.seconds[step] == pytest.approx(spent / len(batch.photos))
    monkeypatch.setattr(device_render, "decode_jpegs", original)
    whole = device_render.render_on_device(datas, RenderSettings(PRESETS["default"]), "cpu", models=models)
    for a, b in zip(got, whole):  # the same pictures as one batch gives
        assert not isinstance(a, str) and not isinstance(b, str)
        assert np.array_equal(pixels(a.encoded), pixels(b.encoded))
        assert (a.width, a.height, a.rendering.start, a.left_alone) == (
            b.width,
            b.height,
            b.rendering.start,
            b.left_alone,
        )


class SecondBatchGate(TrivialSaliency):
    """The trivial mask; on its second batch it says so and waits (at most 10 s) until the first
    batch's subject decisions have begun."""

    def __init__(self, second_in_models: threading.Event, deciding: threading.Event) -> None:
        super().__init__()
        self.second_in_models, self.deciding = second_in_models, deciding
        self.batches = 0

    def _predict_batch(self, photos):
        self.batches += 1
        if self.batches == 2:
            self.second_in_models.set()
            assert self.deciding.wait(timeout=10)
        return super()._predict_batch(photos)


def test_a_batchs_subject_decisions_run_while_the_next_is_in_the_models(monkeypatch):
    """The subject decisions (a host copy and a watershed, which wait for the device) are off the
    models' thread: the first batch's decisions wait until the second batch is in the saliency
    model, which waits until those decisions have begun, so the first batch's effect and the
    second's saliency overlap, or the test fails after 10 s (a pipeline with the effect on the
    models' thread would), it does not hang."""
    second_in_models, deciding = threading.Event(), threading.Event()
    original = device_render.effect_torch.subject_decisions
    waited: list[bool] = []

    def gated_decisions(*args):
        if not waited:
            deciding.set()
            waited.append(second_in_models.wait(timeout=10))
        return original(*args)

    monkeypatch.setattr(device_render.effect_torch, "subject_decisions", gated_decisions)
    models = SceneModels.from_models(SecondBatchGate(second_in_models, deciding), TrivialDepth())
    settings = RenderSettings(PRESETS["default"], device_batch_bytes=2 * 48 * 64 * 3)  # two photos a batch
    trace: list[device_render.BatchSpans] = []
    got = device_render.render_on_device(small_jpegs(4), settings, "cpu", models=models, trace=trace)

    assert waited == [True] and all(not isinstance(done, str) for done in got)
    first = {span.step: span for span in trace[0].spans}
    second = {span.step: span for span in trace[1].spans}
    assert overlaps(first["effect"], second["saliency"])


def test_batches_in_flight_stay_within_the_budget():
    """Eight batches of one photo, IN_FLIGHT (4) at most in flight: no five batches' lives (first
    step to last) overlap (without the budget the stages and the queues between them could hold
    seven), and the photos come back in their order; a batch whose one photo the decoder refuses
    gives its reason and holds up none of the others."""
    datas = small_jpegs(8)
    datas[1] = datas[1][: len(datas[1]) // 2]  # its header whole, its scan cut short
    maps = [scene_maps(48, 64)] * 8
    settings = RenderSettings(PRESETS["default"], device_batch_bytes=48 * 64 * 3)
    trace: list[device_render.BatchSpans] = []
    chosen = [SceneMaps(*m) for m in maps]
    got = device_render.render_on_device(datas, settings, "cpu", maps=chosen, trace=trace)
    assert [batch.photos for batch in trace] == [(i,) for i in (0, *range(2, 8))]
    lives = [(batch.spans[0].start, batch.spans[-1].end) for batch in trace]
    for start, _ in lives:
        assert sum(a <= start < b for a, b in lives) <= device_render.IN_FLIGHT
    assert isinstance(got[1], str) and "refused" in got[1]
    assert all(not isinstance(got[i], str) for i in (0, *range(2, 8)))


@pytest.mark.parametrize(
    ("where", "name"),
    [(device_render, "decode_jpegs"), (device_render.effect_torch, "render"), (device_render, "encode_jpegs")],
)
def test_a_failure_on_any_side_of_the_overlap_reaches_the_caller(monkeypatch, where, name):
    """The decode thread, the effect's thread or the encode thread fails on the second of
    four batches: the caller gets that exception, and no thread of the call is left running; the
    backend then gives each photo the reason."""
    from pipeline.backend import device_results

    datas = small_jpegs(4)
    chosen = [SceneMaps(*scene_maps(48, 64))] * 4
    settings = RenderSettings(PRESETS["default"], device_batch_bytes=48 * 64 * 3)
    original, calls = getattr(where, name), []

    def fails_on_the_second(*args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError(f"{name} lost the device")
        return original(*args)

    monkeypatch.setattr(where, name, fails_on_the_second)
    with pytest.raises(RuntimeError, match=f"{name} lost the device"):
        device_render.render_on_device(datas, settings, "cpu", maps=chosen)
    assert not [t for t in threading.enumerate() if t.name.startswith("device-")]

    monkeypatch.setattr(where, name, lambda *args: (_ for _ in ()).throw(RuntimeError(f"{name} lost the device")))
    reasons = device_results(datas, settings, "cpu", maps=chosen)
    assert reasons == [f"the device path failed (RuntimeError: {name} lost the device)"] * 4


def test_a_batch_in_each_stage_where_a_batch_size_is_given(monkeypatch):
    cpu = torch.device("cpu")
    assert device_render.device_budget(cpu, PRESETS["seed"], 1000).in_flight_bytes == 4000
    monkeypatch.setattr(device_render, "free_device_memory", lambda device: 12_000_000)
    from_memory = device_render.device_budget(cpu, PRESETS["seed"])
    assert from_memory.in_flight_bytes == from_memory.batch_bytes  # the photos' share, all batches together


def test_busy_share_is_the_union_of_the_compute_spans_over_the_wall_time():
    span = device_render.Span
    first = device_render.BatchSpans((0,), (span("decode", 0, 1), span("saliency", 1, 3), span("encode", 3, 4)))
    second = device_render.BatchSpans((1,), (span("decode", 1, 2), span("effect", 2.5, 5), span("encode", 5, 6)))
    assert device_render.busy_share([first, second]) == pytest.approx(4 / 6)  # [1, 5] of [0, 6]
    assert device_render.busy_share([]) == 0.0
