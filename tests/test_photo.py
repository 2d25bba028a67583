"""One photo's path (pipeline/photo.py): the model copy, both models on one batch, finishing."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.models import DEPTH, SALIENCY, load_model
from pipeline.models.depth_anything import DepthAnythingV2Small
from pipeline.models.isnet import ISNet
from pipeline.models.rsu import SMALL, ISNetNetwork
from pipeline.params import effect_params
from pipeline.photo import (
    BACKGROUND_ALREADY_SOFT,
    MODEL_INPUT_SIZE,
    NO_CLEAR_SUBJECT,
    RenderSettings,
    SceneMaps,
    SceneModels,
    model_copy,
    prepare,
    render_on_host,
)
from pipeline.photo_io import decode_photo, encode_photo

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def jpeg(pixels: np.ndarray) -> bytes:
    return encode_photo(pixels, "jpeg", 95)


def textured(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_model_copy_keeps_small_photos_and_shrinks_large_ones_to_the_model_size():
    small = textured(300, 200, 0)
    assert model_copy(small) is small
    large = prepare(jpeg(textured(1500, 3000, 1)), "large.jpg", 200)
    assert large.shape == (MODEL_INPUT_SIZE // 2, MODEL_INPUT_SIZE, 3)


def torch_scene_models() -> SceneModels:
    torch.manual_seed(0)
    saliency = ISNet.from_network(ISNetNetwork(SMALL).eval(), device="cpu", batch_size=3, size=256)
    depth = DepthAnythingV2Small.from_config(
        DepthAnythingV2Small.small_config(), device="cpu", batch_size=3, runtime="torch"
    )
    return SceneModels.from_models(saliency, depth)


def test_both_models_on_the_device_give_what_each_gives_alone():
    """Where both models run in torch the batch is uploaded once; the maps are those of each
    model's own numpy path, for photos of mixed sizes."""
    models = torch_scene_models()
    assert models.saliency.accepts_tensors and models.depth.accepts_tensors
    copies = [textured(120, 160, 2), textured(90, 200, 3), textured(150, 100, 4)]
    maps = models.predict(copies)

    saliency = models.saliency.predict(copies)
    depth = models.depth.predict(copies, saliency=saliency)
    for found, s, d, copy in zip(maps, saliency, depth, copies):
        assert found.saliency.shape == found.depth.shape == copy.shape[:2]
        assert np.abs(found.saliency - s).max() < 0.01
        scale = float(d.max() - d.min()) or 1.0
        assert np.abs(found.depth - d).max() / scale < 0.01


def test_maps_given_are_used_and_their_model_is_never_loaded(monkeypatch):
    loaded = []
    monkeypatch.setattr(
        "pipeline.photo.load_model", lambda task, name, *a, **k: loaded.append(task) or load_model(task, name, *a, **k)
    )
    models = SceneModels("trivial-saliency", "trivial-depth", device="cpu")
    copy = textured(60, 80, 5)
    mask = np.zeros((60, 80), np.float32)
    maps = models.predict([copy], saliency=[mask])
    assert loaded == [DEPTH] and maps[0].saliency is mask
    assert models.describe() == ["trivial-depth builtin (numpy, cpu)"]
    models.predict([copy])
    assert loaded == [DEPTH, SALIENCY]


def test_finish_renders_encodes_and_keeps_the_photos_size_and_exif():
    data = (EXAMPLES / "motorcycle_left.jpg").read_bytes()
    models = SceneModels("trivial-saliency", "trivial-depth", device="cpu")
    maps = models.predict([prepare(data, "m.jpg", 200)])[0]
    done = render_on_host(data, "m.jpg", maps, RenderSettings(effect_params("default"), "png", intermediates=True))
    photo = decode_photo(data, "m.jpg")
    assert (done.height, done.width) == photo.pixels.shape[:2]
    result = np.asarray(Image.open(io.BytesIO(done.encoded)))
    assert result.shape == photo.pixels.shape and not np.array_equal(result, photo.pixels)
    assert set(done.intermediates) == {"background", "saliency", "subject", "depth16", "alpha"}
    assert set(done.seconds) == {"decode", "effect", "encode"} and done.left_alone == ""


def test_intermediates_show_the_models_map_and_the_whole_subject_apart():
    """saliency is what the model found; subject, that mask extended to the whole object."""
    data = (EXAMPLES / "motorcycle_left.jpg").read_bytes()
    models = SceneModels("trivial-saliency", "trivial-depth", device="cpu")
    maps = models.predict([prepare(data, "m.jpg", 200)])[0]
    done = render_on_host(data, "m.jpg", maps, RenderSettings(effect_params("default"), intermediates=True))

    def gray(name: str) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(done.intermediates[name]))).astype(np.float32) / 255

    saliency, subject = gray("saliency"), gray("subject")
    assert saliency.shape == subject.shape == (done.height, done.width)
    found = np.asarray(Image.fromarray(maps.saliency).resize((done.width, done.height), Image.Resampling.BILINEAR))
    assert np.abs(saliency - found).mean() < 0.02  # the model's own ellipse
    assert (subject > 0.5).mean() > (saliency > 0.5).mean() + 0.1  # extended beyond it to the whole motorcycle
    assert done.rendering.saliency is not None and not np.array_equal(done.rendering.fg, done.rendering.saliency)


def test_a_soft_background_is_left_alone_with_its_reason():
    """A flat background around a detailed subject: written unchanged, with the reason."""
    pixels = np.full((240, 320, 3), 128, np.uint8)
    pixels[60:180, 100:220] = textured(120, 120, 6)
    saliency = np.zeros((240, 320), np.float32)
    saliency[60:180, 100:220] = 1
    depth = np.tile(np.linspace(0, 1, 240, dtype=np.float32)[:, None], (1, 320))
    done = render_on_host(
        encode_photo(pixels, "png"),
        "soft.png",
        SceneMaps(saliency, depth),
        RenderSettings(effect_params("default"), "png"),
    )
    assert done.left_alone == BACKGROUND_ALREADY_SOFT and "already soft" in done.reason
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(done.encoded))), pixels)


@pytest.mark.parametrize(
    "bad, kind", [(b"", "empty-file"), (b"hello", "not-an-image"), (b"\x89PNG\r\n\x1a\n" + b"\0" * 20, "corrupt-image")]
)
def test_prepare_raises_the_kind_of_the_problem(bad, kind):
    from pipeline.errors import BadInputError

    with pytest.raises(BadInputError) as raised:
        prepare(bad, "bad.jpg", 200)
    assert raised.value.kind == kind and str(raised.value).startswith("bad.jpg: ")


def test_no_clear_subject_is_left_alone_with_its_reason():
    """A textured photo in which the salient-object model found nothing: written unchanged."""
    pixels = textured(240, 320, 7)
    saliency = np.zeros((240, 320), np.float32)
    depth = np.tile(np.linspace(0, 1, 240, dtype=np.float32)[:, None], (1, 320))
    done = render_on_host(
        encode_photo(pixels, "png"),
        "meadow.png",
        SceneMaps(saliency, depth),
        RenderSettings(effect_params("default"), "png"),
    )
    assert done.left_alone == NO_CLEAR_SUBJECT and "no clear subject" in done.reason and "0.00%" in done.reason
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(done.encoded))), pixels)
