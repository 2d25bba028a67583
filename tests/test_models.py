"""The model registry, the transformers depth models (tiny random configs), weights resolution,
the fallback to the ground prior, the weight-free models and `dreamfocus models`."""

from __future__ import annotations

import logging
import tarfile

import numpy as np
import pytest
import torch
from random_weights import scramble

import pipeline.models as models
from pipeline.errors import BadInputError, WeightsUnavailableError
from pipeline.models import DEPTH, SALIENCY, create_model, default_model, default_models, load_model, model_names
from pipeline.models.depth_anything import DepthAnythingV2Small
from pipeline.models.dpt import DPTLarge
from pipeline.models.ground_prior import GroundPrior
from pipeline.models.tensors import upload
from pipeline.models.weights import cache_dir, extract_archive, fetch_to_cache, sha256_file

RNG = np.random.default_rng(7)
SIZES = [(120, 200), (300, 90), (64, 64), (40, 500)]


def _photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth photo-like image (gradients and a blob) with a little noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack(
        [
            255 * y / max(h - 1, 1),
            255 * x / max(w - 1, 1),
            255 * np.exp(-((x - w / 2) ** 2 + (y - h / 2) ** 2) / (0.1 * h * w + 1)),
        ],
        -1,
    )
    return np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)


PHOTOS = [_photo(h, w, i) for i, (h, w) in enumerate(SIZES)]


def _tiny_dpt_config():
    from transformers import DPTConfig

    return DPTConfig(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        backbone_out_indices=[0, 1, 2, 3],
        neck_hidden_sizes=[8, 16, 32, 32],
        fusion_hidden_size=16,
    )


def _scramble(model, seed: int) -> None:
    scramble(model.model, seed)


@pytest.fixture(scope="module")
def da():
    # torch: its weights are scrambled after loading, and the device path is tested on it
    model = DepthAnythingV2Small.from_config(
        DepthAnythingV2Small.small_config(), device="cpu", batch_size=4, runtime="torch"
    )
    _scramble(model, 0)
    return model


@pytest.fixture(scope="module")
def dpt():
    model = DPTLarge.from_config(_tiny_dpt_config(), device="cpu", batch_size=4)
    _scramble(model, 1)
    return model


@pytest.fixture(scope="module")
def da_saved(da, tmp_path_factory):
    """The tiny DA model saved as a hub-style folder (config.json + model.safetensors)."""
    folder = tmp_path_factory.mktemp("da-weights")
    da.model.save_pretrained(folder)
    return folder


# ------------------------------------------------------------------------------------ registry


def test_registry_lists_models_by_task():
    assert {"isnet-general-use", "trivial-saliency"} <= set(model_names(SALIENCY))
    assert {"depth-anything-v2-small", "dpt-large", "ground-prior", "trivial-depth"} <= set(model_names(DEPTH))
    assert not set(model_names(SALIENCY)) & set(model_names(DEPTH))
    assert default_model(SALIENCY) == "isnet-general-use"
    assert default_model(DEPTH) == "depth-anything-v2-small"
    for name in model_names():
        cls = models.model_class(name)
        assert cls.name == name and cls.licence and cls.source


def test_registry_imports_a_model_only_when_used():
    """Importing the package, listing names and the defaults load no model module (nor torch)."""
    import subprocess
    import sys

    code = (
        "import sys, pipeline.models as m; m.model_names(); m.default_models(); "
        "m.load_model('depth', 'ground-prior'); "
        "print(' '.join(n for n in sys.modules if n.startswith('pipeline.models.') or n == 'torch'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = set(out.split()) - {"pipeline.models.base", "pipeline.models.weights"}
    assert loaded == {"pipeline.models.ground_prior"}


def test_every_model_states_what_runs(da):
    models_ = [create_model("trivial-saliency"), create_model("trivial-depth"), create_model("ground-prior"), da]
    for model in models_:
        assert model.describe() == f"{model.name} {model.version} ({model.runtime}, {model.device})"
        assert model.task in (SALIENCY, DEPTH) and model.device == "cpu"
    assert [(m.runtime, m.accepts_tensors) for m in models_] == [("numpy", False)] * 3 + [("torch", True)]
    assert create_model("ground-prior").describe() == "ground-prior builtin-horizon0.33 (numpy, cpu)"
    for name in model_names():
        cls = models.model_class(name)
        assert (cls.weights_env or "").startswith("DREAMFOCUS_") == cls.needs_weights, name


def test_fetch_defaults_are_the_task_defaults():
    from pipeline.cli.models import DEFAULT_FETCH

    assert list(DEFAULT_FETCH) == default_models() == [default_model(SALIENCY), default_model(DEPTH)]


def test_cache_folder_is_created_only_when_written(cache, da_saved, monkeypatch, capsys):
    assert cache_dir() == cache and not cache.exists()
    for name in model_names():
        models.model_class(name).cache_paths()
    with pytest.raises(WeightsUnavailableError):
        load_model(SALIENCY)
    load_model(DEPTH)  # the ground prior, after looking for weights
    code, out, _ = _cli(monkeypatch, capsys, "models", "list")
    assert code == 0 and str(cache) in out
    assert not cache.exists()
    DepthAnythingV2Small.fetch(str(da_saved))
    assert (cache / "depth-anything-v2-small" / "config.json").is_file()


# ---------------------------------------------------------------------- transformers depth models


@pytest.mark.parametrize("which", ["da", "dpt"])
def test_depth_maps_at_each_photo_size(which, request):
    model = request.getfixturevalue(which)
    maps = model.predict(PHOTOS)
    assert [m.shape for m in maps] == SIZES
    for m in maps:
        assert m.dtype == np.float32 and np.isfinite(m).all()
        assert m.std() > 1e-3  # a real map, not a constant


@pytest.mark.parametrize("which", ["da", "dpt"])
def test_input_shape_policy(which, request):
    model = request.getfixturevalue(which)
    for h, w in SIZES + [(3000, 4000), (1, 1)]:
        ih, iw = model.input_shape(h, w)
        assert ih % model.multiple == 0 and iw % model.multiple == 0
        assert max(ih, iw) == model.size and min(ih, iw) >= model.multiple
        if min(h, w) * model.size / max(h, w) >= 2 * model.multiple:
            assert abs(ih / iw - h / w) / (h / w) < 0.25  # the aspect is kept (up to the grid)


@pytest.mark.parametrize("which", ["da", "dpt"])
def test_batched_equals_one_by_one_and_deterministic(which, request):
    model = request.getfixturevalue(which)
    batched = model.predict(PHOTOS)
    again = model.predict(PHOTOS)
    single = [model.predict([p])[0] for p in PHOTOS]
    for b, a, s in zip(batched, again, single):
        np.testing.assert_allclose(b, s, atol=1e-4, rtol=0)
        np.testing.assert_array_equal(b, a)


@pytest.mark.parametrize("which", ["da", "dpt"])
def test_padding_does_not_leak_between_photos(which, request):
    """A tall photo with a bright object gives the same map alone and beside a very wide photo."""
    model = request.getfixturevalue(which)
    tall = _photo(300, 80, 11)
    tall[100:160, 20:60] = (255, 40, 40)
    wide = _photo(50, 700, 12)
    alone = model.predict([tall])[0]
    together = model.predict([wide, tall, wide])[1]
    np.testing.assert_allclose(alone, together, atol=1e-4, rtol=0)


@pytest.mark.parametrize("which", ["da", "dpt"])
def test_predict_tensors_matches_predict(which, request):
    """The device path (here on the CPU) gives predict's maps: same resize, padding and crop."""
    model = request.getfixturevalue(which)
    photos = [PHOTOS[0], PHOTOS[3], _photo(700, 900, 9), _photo(1000, 300, 10)]  # the last two shrink
    maps = model.predict(photos)
    tensors = model.predict_tensors(upload(photos, "cpu"))
    assert len(tensors) == len(photos)
    for photo, m, t in zip(photos, maps, tensors):
        assert t.dtype == torch.float32 and t.device.type == "cpu" and tuple(t.shape) == photo.shape[:2]
        # OpenCV resizes uint8 photos with fixed-point weights: inputs differ by one level at most
        assert np.abs(t.numpy() - m).max() <= 0.005 * np.ptp(m)


class _PositionModel(torch.nn.Module):
    """Stands in for the network: its 'depth' at each output pixel is that pixel's input row,
    or 1000 where the input pixel is padding, at half the input resolution like a coarse head."""

    def __init__(self, pad_rows: list[int], pad_cols: list[int]):
        super().__init__()
        self.valid = list(zip(pad_rows, pad_cols))

    def forward(self, pixel_values):
        n, _, s, _ = pixel_values.shape
        rows = torch.arange(s, dtype=torch.float32)[:, None].expand(s, s)
        out = []
        for h, w in self.valid[:n]:
            d = rows.clone()
            d[h:, :] = 1000.0
            d[:, w:] = 1000.0
            out.append(d[::2, ::2])
        return type("Out", (), {"predicted_depth": torch.stack(out)})()


def test_crop_removes_every_padded_pixel(dpt):
    """With a stand-in network that marks padding, no mark survives in any map."""
    photos = [_photo(*s) for s in SIZES]
    shapes = [dpt.input_shape(*p.shape[:2]) for p in photos]
    real = dpt.model
    try:
        dpt.model = _PositionModel([h for h, _ in shapes], [w for _, w in shapes])
        raws = dpt._predict_batch(photos)
    finally:
        dpt.model = real
    for raw, (h, w) in zip(raws, shapes):
        assert raw.max() < 1000.0
        assert raw.shape == (h // 2, w // 2)


# ------------------------------------------------------------------------------ weights resolution


def test_weights_from_local_folder(da, da_saved, cache):
    loaded = DepthAnythingV2Small(weights=str(da_saved), device="cpu")
    assert loaded.version == sha256_file(da_saved / "model.safetensors")[:12]
    np.testing.assert_allclose(loaded.predict(PHOTOS[:2])[0], da.predict(PHOTOS[:2])[0], atol=1e-5)
    # a local folder is used in place: the cache holds only the OpenVINO graph converted from it
    assert loaded.runtime == "openvino"
    digest = sha256_file(da_saved / "model.safetensors")[:16]
    assert sorted(p.name for p in cache.iterdir()) == [
        f"depth-anything-v2-small.{digest}.openvino.v1.{ext}" for ext in ("bin", "xml")
    ]


def test_weights_from_uri_fetched_once_into_cache(da, da_saved, cache):
    import fsspec

    mem = fsspec.filesystem("memory")
    for f in da_saved.iterdir():
        mem.pipe(f"/tiny-da/{f.name}", f.read_bytes())
    first = DepthAnythingV2Small(weights="memory://tiny-da", device="cpu")
    fetched = [p for p in cache.iterdir() if p.name.startswith("depth-anything-v2-small-")]
    assert len(fetched) == 1 and (fetched[0] / "config.json").is_file()
    assert not list(cache.glob("*.partial"))
    mem.rm("/tiny-da", recursive=True)  # the cached copy is used from now on
    second = DepthAnythingV2Small(weights="memory://tiny-da", device="cpu")
    assert first.version == second.version == sha256_file(da_saved / "model.safetensors")[:12]
    np.testing.assert_allclose(second.predict(PHOTOS[:1])[0], da.predict(PHOTOS[:1])[0], atol=1e-5)


def test_weights_from_archive_uri(da_saved, cache, tmp_path):
    archive = tmp_path / "da.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(da_saved, arcname="Depth-Anything-V2-Small-hf")
    model = DepthAnythingV2Small(weights=f"file://{archive}", device="cpu")
    assert model.version == sha256_file(da_saved / "model.safetensors")[:12]


def test_weights_from_s3(da_saved, cache, s3_bucket):
    import fsspec

    fs = fsspec.filesystem("s3")
    fs.put(str(da_saved) + "/", f"{s3_bucket}/models/da/", recursive=True)
    model = DepthAnythingV2Small(weights=f"{s3_bucket}/models/da", device="cpu")
    assert model.version == sha256_file(da_saved / "model.safetensors")[:12]


def test_resolution_order_explicit_then_env_then_cache(da_saved, cache, tmp_path, monkeypatch):
    digest = sha256_file(da_saved / "model.safetensors")[:12]
    # nothing anywhere: the loader says how to supply weights
    with pytest.raises(WeightsUnavailableError, match="models fetch depth-anything-v2-small --from"):
        DepthAnythingV2Small(device="cpu")
    # the environment's URL fills the cache once
    monkeypatch.setenv("DREAMFOCUS_DEPTH_ANYTHING_URL", f"file://{da_saved}")
    assert DepthAnythingV2Small(device="cpu").version == digest
    assert DepthAnythingV2Small.local_weights() == cache / "depth-anything-v2-small"
    monkeypatch.setenv("DREAMFOCUS_DEPTH_ANYTHING_URL", f"file://{tmp_path}/gone")
    assert load_model(DEPTH).version == digest  # the cache wins over the URL now
    # an explicit path wins over the cache
    other = DepthAnythingV2Small.from_config(DepthAnythingV2Small.small_config(), device="cpu")
    _scramble(other, 5)
    other_dir = tmp_path / "other"
    other.model.save_pretrained(other_dir)
    chosen = load_model(DEPTH, weights=str(other_dir))
    assert chosen.name == "depth-anything-v2-small"
    assert chosen.version == sha256_file(other_dir / "model.safetensors")[:12] != digest


def test_weights_of_another_architecture_are_refused(da_saved, cache):
    with pytest.raises(WeightsUnavailableError, match="not dpt-large"):
        DPTLarge(weights=str(da_saved), device="cpu")


def test_fetch_to_cache_checks_checksum_and_writes_atomically(cache, tmp_path):
    src = tmp_path / "w.bin"
    src.write_bytes(b"weights" * 1000)
    digest = sha256_file(src)
    with pytest.raises(WeightsUnavailableError, match="checksum mismatch"):
        fetch_to_cache(str(src), "w.bin", sha256="0" * 64)
    assert not (cache / "w.bin").exists() and not list(cache.glob("*.partial"))
    path = fetch_to_cache(f"file://{src}", "w.bin", sha256=digest)
    assert path == cache / "w.bin" and sha256_file(path) == digest
    src.unlink()
    assert fetch_to_cache(str(src), "w.bin", sha256=digest) == path  # cached: not fetched again
    with pytest.raises(WeightsUnavailableError, match="cannot fetch"):
        fetch_to_cache(str(tmp_path / "missing.bin"), "missing.bin")


def test_extract_archive_refuses_paths_outside(tmp_path):
    import io

    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tf:
        info = tarfile.TarInfo("../evil.txt")
        info.size = 4
        tf.addfile(info, io.BytesIO(b"evil"))
    with pytest.raises(WeightsUnavailableError, match="unsafe path"):
        extract_archive(archive, tmp_path / "out")
    assert not (tmp_path / "evil.txt").exists()


# ------------------------------------------------------------------------------------- fallback


def test_load_model_falls_back_to_ground_prior_once(cache, caplog):
    with caplog.at_level(logging.WARNING, logger="pipeline.models"):
        first = load_model(DEPTH)
        second = load_model(DEPTH, batch_size=2)
    assert first.name == second.name == "ground-prior"
    assert first.version.startswith("builtin")
    warnings = [r for r in caplog.records if "using ground-prior depth instead" in r.getMessage()]
    assert len(warnings) == 1
    assert "no weights for depth-anything-v2-small" in warnings[0].getMessage()
    with pytest.raises(WeightsUnavailableError):
        load_model(DEPTH, fallback=False)
    with pytest.raises(WeightsUnavailableError):  # saliency never falls back
        load_model(SALIENCY, weights=str(cache / "nothing.onnx"))


def test_depth_weights_named_that_cannot_be_used_are_an_error_not_the_ground_prior(cache, tmp_path):
    """The same rule as a job's (tests/test_job_weights.py): only weights that are nowhere fall back."""
    with pytest.raises(WeightsUnavailableError):
        load_model(DEPTH, weights=str(tmp_path / "nowhere"))


# -------------------------------------------------------------------------- weight-free models


def test_ground_prior_lower_rows_nearer():
    depth = GroundPrior().predict([np.zeros((90, 60, 3), np.uint8)])[0]
    assert depth.shape == (90, 60) and depth.dtype == np.float32
    col = depth[:, 0]
    assert np.all(np.diff(col) >= 0) and col[0] == 0.0 and col[-1] == pytest.approx(1.0)
    assert np.all(np.diff(col[40:]) > 0)  # strictly nearer below the horizon
    assert np.all(depth == depth[:, :1])  # constant along each row


def test_ground_prior_places_each_subject_at_its_lowest_point():
    photo = np.zeros((120, 80, 3), np.uint8)
    saliency = np.zeros((120, 80), np.float32)
    saliency[20:70, 10:30] = 0.9  # a standing figure
    saliency[80:110, 50:70] = 0.6  # another, nearer
    saliency[0:5, 0:80] = 0.4  # below the threshold: not a subject
    plain, placed = create_model("ground-prior").predict([photo, photo], saliency=[None, saliency])
    for top, bottom, left, right in ((20, 70, 10, 30), (80, 110, 50, 70)):
        subject = placed[top:bottom, left:right]
        assert np.ptp(subject) == 0  # the whole subject at one depth ...
        assert subject[0, 0] == pytest.approx(plain[bottom - 1, left], abs=1e-6)  # ... its lowest row's
    far_figure, near_figure = placed[40, 20], placed[90, 60]
    assert near_figure > far_figure
    background = placed[:, 40:48]
    np.testing.assert_array_equal(background, plain[:, 40:48])


def test_models_that_ignore_saliency_accept_it():
    photos = [np.zeros((30, 40, 3), np.uint8), np.zeros((50, 20, 3), np.uint8)]
    sal = [np.ones((30, 40), np.float32), np.ones((50, 20), np.float32)]
    model = create_model("trivial-depth")
    assert [m.shape for m in model.predict(photos, saliency=sal)] == [(30, 40), (50, 20)]
    with pytest.raises(ValueError):
        model.predict(photos, saliency=sal[:1])


def test_trivial_models():
    photos = [np.zeros((300, 400, 3), np.uint8), np.full((33, 17, 3), 200, np.uint8)]
    sal = create_model("trivial-saliency").predict(photos)
    depth = create_model("trivial-depth").predict(photos)
    for photo, s, d in zip(photos, sal, depth):
        assert s.shape == d.shape == photo.shape[:2]
        assert s.dtype == d.dtype == np.float32
        h, w = s.shape
        assert s[h // 2, w // 2] == 1.0 and s[0, 0] == 0.0 and 0.2 < s.mean() < 0.4
        assert d[0, 0] == 0.0 and d[-1, 0] == 1.0 and np.all(np.diff(d[:, 0]) >= 0)
    again = create_model("trivial-saliency").predict(photos)
    np.testing.assert_array_equal(sal[0], again[0])


# ---------------------------------------------------------------------------------------- CLI


def _cli(monkeypatch, capsys, *argv) -> tuple[int, str, str]:
    import pipeline.cli as cli

    if "models" not in cli.SUBCOMMANDS:
        monkeypatch.setattr(cli, "SUBCOMMANDS", tuple(cli.SUBCOMMANDS) + ("models",))
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_models_list(cache, da_saved, monkeypatch, capsys):
    code, out, _ = _cli(monkeypatch, capsys, "models", "fetch", "depth-anything-v2-small", "--from", str(da_saved))
    assert code == 0 and str(cache / "depth-anything-v2-small") in out
    code, out, _ = _cli(monkeypatch, capsys, "models", "list")
    assert code == 0
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:] if line and not line.startswith("cache:")}
    assert set(model_names()) <= set(rows)
    assert rows["depth-anything-v2-small"][1:3] == ["depth", "yes"]
    assert rows["dpt-large"][1:3] == ["depth", "no"]
    assert rows["ground-prior"][2] == "yes"
    assert "Apache-2.0" in " ".join(rows["isnet-general-use"]) and "MIT" in rows["dpt-large"]


def test_cli_models_fetch_offline_fails_clearly(cache, monkeypatch, capsys):
    code, out, err = _cli(monkeypatch, capsys, "models", "fetch", "dpt-large")
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dreamfocus: error:")
    assert "dpt-large" in lines[0] and "--from" in lines[0] and "DREAMFOCUS_DPT_URL" in lines[0]
    code, _, err = _cli(monkeypatch, capsys, "models", "fetch", "dpt-large", "--missing-ok")
    assert code == 0 and "warning" in err
    code, _, err = _cli(monkeypatch, capsys, "models", "fetch", "no-such-model")
    assert code == 2 and "unknown model" in err


# ---------------------------------------------------------------------- any hub depth model (hf:ORG/NAME)


def _tiny_depth_pro_config():
    from transformers import DepthProConfig

    def dino(size: int) -> dict:
        return dict(
            model_type="dinov2",
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            mlp_ratio=2,
            image_size=size,
            patch_size=8,
        )

    return DepthProConfig(
        patch_size=32,
        image_model_config=dino(32),
        patch_model_config=dino(32),
        fov_model_config=dino(32),
        scaled_images_ratios=[0.25, 0.5, 1],
        scaled_images_overlap_ratios=[0.0, 0.5, 0.25],
        scaled_images_feature_dims=[32, 32, 32],
        intermediate_hook_ids=[1, 0],
        intermediate_feature_dims=[16, 16],
        fusion_hidden_size=16,
    )


def _tiny_glpn_config():
    from transformers import GLPNConfig

    return GLPNConfig(
        num_encoder_blocks=2,
        depths=[1, 1],
        sr_ratios=[2, 1],
        hidden_sizes=[8, 16],
        patch_sizes=[7, 3],
        strides=[4, 2],
        num_attention_heads=[1, 2],
        mlp_ratios=[2, 2],
        decoder_hidden_size=16,
    )


def _tiny_zoedepth_config():
    from transformers import Dinov2Config, ZoeDepthConfig

    backbone = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        mlp_ratio=2,
        image_size=64,
        patch_size=8,
        out_indices=[1, 2, 3, 4],
        reshape_hidden_states=False,
    )
    return ZoeDepthConfig(
        backbone_config=backbone,
        hidden_size=32,
        patch_size=8,
        neck_hidden_sizes=[8, 16, 32, 32],
        reassemble_factors=[4, 2, 1, 0.5],
        fusion_hidden_size=16,
        bottleneck_features=16,
        num_relative_features=8,
        bin_embedding_dim=8,
        num_attractors=[4, 4, 2, 1],
        bin_configurations=[{"n_bins": 8, "min_depth": 0.001, "max_depth": 10.0, "name": "nyu"}],
        num_patch_transformer_layers=1,
        patch_transformer_hidden_size=16,
        patch_transformer_intermediate_size=32,
        patch_transformer_num_attention_heads=2,
    )


# architecture -> (a small configuration of it, the input's long side its published models take)
HUB_CONFIGS = {
    "depth_anything": (DepthAnythingV2Small.small_config, 518),  # V2 Base and Large: the same class
    "dpt": (_tiny_dpt_config, 384),
    "depth_pro": (_tiny_depth_pro_config, 128),  # its patch (32 here, 384 published) / 0.25
    "glpn": (_tiny_glpn_config, 640),
    "zoedepth": (_tiny_zoedepth_config, 512),
}


@pytest.fixture(scope="module", params=sorted(HUB_CONFIGS))
def hub_saved(request, tmp_path_factory):
    """A small random model of each architecture saved as the hub publishes it."""
    from transformers import AutoModelForDepthEstimation

    torch.manual_seed(0)
    model = AutoModelForDepthEstimation.from_config(HUB_CONFIGS[request.param][0]())
    holder = type("Holder", (), {"model": model})()
    _scramble(holder, 3)
    folder = tmp_path_factory.mktemp(f"hub-{request.param}")
    model.save_pretrained(folder)
    return request.param, folder


def test_hub_depth_models_are_named_by_their_hub_id(cache):
    cls = models.model_class("hf:depth-anything/Depth-Anything-V2-Large-hf")
    assert cls.task == DEPTH and cls.hub_id == "depth-anything/Depth-Anything-V2-Large-hf"
    assert cls.cache_name == "hf--depth-anything--Depth-Anything-V2-Large-hf"
    assert cls.weights_env == "DREAMFOCUS_HF_DEPTH_ANYTHING_DEPTH_ANYTHING_V2_LARGE_HF_URL"
    assert models.model_class("hf:depth-anything/Depth-Anything-V2-Large-hf") is cls
    assert models.model_class("hf:apple/DepthPro-hf") is not cls
    for bad in ("hf:no-organisation", "hf:a/b/c", "hf:"):
        with pytest.raises(BadInputError, match="hf:ORG/NAME"):
            models.model_class(bad)
    # No weights and no hub: one clear error, or the ground prior where falling back is allowed.
    with pytest.raises(WeightsUnavailableError, match="DepthPro-hf"):
        load_model(DEPTH, "hf:apple/DepthPro-hf", fallback=False)
    assert load_model(DEPTH, "hf:apple/DepthPro-hf").name == "ground-prior"


def test_hub_depth_model_of_each_architecture_predicts_inverse_depth(hub_saved, cache):
    kind, folder = hub_saved
    model = load_model(DEPTH, f"hf:test/{kind}", weights=str(folder), device="cpu", fallback=False)
    assert model.name == f"hf:test/{kind}" and model.measures_depth
    assert model.version == sha256_file(folder / "model.safetensors")[:12]
    assert model.size == HUB_CONFIGS[kind][1]
    maps = model.predict(PHOTOS[:2])
    assert [m.shape for m in maps] == SIZES[:2]
    for m in maps:
        assert m.dtype == np.float32 and np.isfinite(m).all() and m.std() > 1e-4
    # Metric models (larger is farther) come out inverted: larger is nearer, as for every model.
    x = torch.rand(1, 3, model.size, model.size)
    raw = model.model(pixel_values=x).predicted_depth.float()
    expected = 1.0 / raw.clamp(min=1e-3) if kind in ("glpn", "zoedepth") else raw
    torch.testing.assert_close(model._forward(x), expected.squeeze(1) if expected.ndim == 4 else expected)


@pytest.mark.parametrize("hub_saved", ["dpt"], indirect=True)  # one architecture shows it
def test_hub_depth_model_takes_the_input_policy_of_its_preprocessor_config(hub_saved, cache, tmp_path):
    kind, folder = hub_saved
    import shutil

    own = tmp_path / "dpt-512"
    shutil.copytree(folder, own)
    (own / "preprocessor_config.json").write_text(
        '{"size": {"height": 512, "width": 512}, "ensure_multiple_of": 16, '
        '"image_mean": [0.4, 0.4, 0.4], "image_std": [0.2, 0.2, 0.2]}'
    )
    model = load_model(DEPTH, "hf:Intel/dpt-beit-large-512", weights=str(own), device="cpu", fallback=False)
    assert (model.size, model.multiple, model.mean, model.std) == (512, 16, (0.4, 0.4, 0.4), (0.2, 0.2, 0.2))
    assert max(model.input_shape(300, 200)) == 512


def test_hub_depth_weights_of_an_unsupported_kind_are_refused(cache, tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(WeightsUnavailableError, match="'bert' model"):
        load_model(DEPTH, "hf:some/bert", weights=str(tmp_path), device="cpu", fallback=False)
