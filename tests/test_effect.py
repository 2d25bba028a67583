"""The effect as pure functions: the seed preset by hand, invariants, edge cases, scale."""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest
from PIL import Image

from pipeline import effect
from pipeline.errors import BadInputError
from pipeline.params import PRESETS, effect_params, load_yaml_config

EXAMPLES = __import__("pathlib").Path(__file__).resolve().parents[1] / "examples"


def example(name: str = "astronaut") -> np.ndarray:
    return np.asarray(Image.open(EXAMPLES / f"{name}.jpg").convert("RGB"))


def hand_case() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """100x100: a dark left half (50,60,70) with a 1-px bright line, a bright right half
    (200,210,220); depth 10 on top, 30 below, a 20x20 subject at depth 40 (fg = 1)."""
    photo = np.zeros((100, 100, 3), np.uint8)
    photo[:, :50] = (50, 60, 70)
    photo[:, 50:] = (200, 210, 220)
    photo[:, 20] = (250, 250, 250)
    depth = np.full((100, 100), 10.0, np.float32)
    depth[50:] = 30.0
    fg = np.zeros((100, 100), np.float32)
    fg[60:80, 60:80] = 1.0
    depth[60:80, 60:80] = 40.0
    return photo, fg, depth


def test_seed_matches_a_case_computed_by_hand():
    photo, fg, depth = hand_case()
    result = effect.render(photo, fg, depth, PRESETS["seed"])
    # Depth normalised: top 0, bottom 2/3, subject 1. start = median over the subject = 1;
    # the background has 5000 pixels at 0 and 4600 at 2/3, so stop = 0.
    assert result.start == pytest.approx(1.0)
    assert result.stop == pytest.approx(0.0)
    # Opening removes the thin line; min-max over all channels maps 50 -> 40 and 220 -> 255:
    # v' = 40 + (v - 50) * 215 / 170, rounded.
    assert result.background[10, 20].tolist() == [40, 53, 65]
    assert result.background[10, 90].tolist() == [230, 242, 255]
    # alpha = clamp(fg + depth - 0, 0, 1): 0 on top, 2/3 below, 1 on the subject.
    assert result.image[10, 20].tolist() == [40, 53, 65]
    assert result.image[10, 90].tolist() == [230, 242, 255]
    assert result.image[70, 70].tolist() == [200, 210, 220]
    # Below: photo * 2/3 + background / 3: (50,60,70),(40,53,65) -> (46.67, 57.67, 68.33).
    assert result.image[90, 10].tolist() == [47, 58, 68]
    # (200,210,220),(230,242,255) -> (210.0, 220.67, 231.67).
    assert result.image[90, 90].tolist() == [210, 221, 232]


def test_seed_background_is_the_write_up_opening_and_normalisation():
    photo = example()
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (24, 24))
    expected = cv2.normalize(cv2.morphologyEx(photo, cv2.MORPH_OPEN, kernel), None, 40, 255, cv2.NORM_MINMAX)
    np.testing.assert_array_equal(effect.painterly_background(photo, 24, 40, 255), expected)


def test_interpolation_alpha_ramp():
    fg = np.array([[0, 0, 0, 1]], np.float32)
    depth = np.array([[0.2, 0.5, 0.8, 0.0]], np.float32)
    alpha = effect.interpolation_alpha(fg, depth, start=0.8, stop=0.2)
    np.testing.assert_allclose(alpha, [[0.0, 0.5, 1.0, 1.0]], atol=1e-6)


@pytest.mark.parametrize("preset", ["seed", "default"])
def test_pixels_with_alpha_one_are_the_input(preset):
    photo = example("coffee")
    h, w = photo.shape[:2]
    fg = np.zeros((h, w), np.float32)
    fg[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = 1.0
    depth = np.tile(np.linspace(0, 1, h, dtype=np.float32)[:, None], (1, w))
    result = effect.render(photo, fg, depth, PRESETS[preset])
    alpha = full_alpha(result, photo, PRESETS[preset])
    crisp = alpha >= 1.0
    assert crisp.mean() > 0.2
    np.testing.assert_array_equal(result.image[crisp], photo[crisp])
    # ... and where alpha is 0 the output is the (upscaled) painterly background.
    background = effect.upscale(result.background, result.factor, h, w)
    soft = alpha <= 0.0
    assert soft.mean() > 0.05
    np.testing.assert_array_equal(result.image[soft], background[soft])


def full_alpha(result: effect.Rendering, photo: np.ndarray, params) -> np.ndarray:
    """The full-size alpha computed the slow, whole-image way."""
    h, w = photo.shape[:2]
    work_photo = effect.downscale(photo, result.factor)
    radius = round(params.refine_radius * max(work_photo.shape[:2]) / params.work_size) if params.work_size else 0
    raw = effect.interpolation_alpha(result.fg, result.depth, result.start, result.stop)
    if radius:
        a, b = effect.guided_filter_coefficients(effect.luminance(work_photo), raw, radius, params.refine_eps)
    else:
        a, b = np.zeros_like(raw), raw
    gray = cv2.cvtColor(photo, cv2.COLOR_RGB2GRAY)
    alpha = effect.upscale(a * np.float32(1 / 255), result.factor, h, w) * gray + effect.upscale(b, result.factor, h, w)
    floor = effect.gradient_floor(h, w, params.gradient, params.gradient_strength)
    if floor is not None:
        alpha = np.maximum(alpha, floor[0][None, :] + floor[1][:, None])
    return np.clip(alpha, 0, 1)


@pytest.mark.parametrize("size", [(1203, 1501), (640, 480), (97, 131)])
@pytest.mark.parametrize("gradient", ["none", "left", "bottom"])
def test_tiled_composite_equals_whole_image_composite(size, gradient):
    photo = cv2.resize(example(), size[::-1], interpolation=cv2.INTER_AREA)
    fg = np.zeros((300, 300), np.float32)
    cv2.ellipse(fg, (150, 150), (50, 100), 0, 0, 360, 1.0, -1)
    depth = np.tile(np.linspace(0, 1, 300, dtype=np.float32)[:, None], (1, 300))
    params = effect_params("default", gradient=gradient)
    result = effect.render(photo, fg, depth, params)
    background = effect.upscale(result.background, result.factor, *size)
    expected = effect.composite(photo, background, full_alpha(result, photo, params))
    np.testing.assert_array_equal(result.image, expected)


def high_frequency_energy(image: np.ndarray) -> float:
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)
    return float(np.mean(cv2.Laplacian(gray, cv2.CV_32F) ** 2))


@pytest.mark.parametrize("preset", ["seed", "default"])
def test_background_high_frequency_energy_is_reduced(preset):
    photo = example("chelsea")
    h, w = photo.shape[:2]
    fg = np.zeros((h, w), np.float32)  # no subject, everything far: all background
    depth = np.zeros((h, w), np.float32)
    depth[: h // 2] = 1.0
    params = dataclasses.replace(PRESETS[preset], min_subject_area=0.0, min_subject_confidence=0.0)
    result = effect.render(photo, fg, depth, params)
    bottom = np.s_[h // 2 + 20 :, :]
    assert high_frequency_energy(result.image[bottom]) < 0.2 * high_frequency_energy(photo[bottom])


@pytest.mark.parametrize("preset", ["seed", "default"])
def test_degenerate_maps_neither_crash_nor_divide_by_zero(preset):
    photo = example("rocket")
    h, w = photo.shape[:2]
    params = PRESETS[preset]
    ramp = np.tile(np.linspace(0, 1, h, dtype=np.float32)[:, None], (1, w))
    subject = np.zeros((h, w), np.float32)
    subject[h // 3 : 2 * h // 3, w // 3 : 2 * w // 3] = 1.0

    with np.errstate(all="raise"):
        # Empty foreground: only what is nearest stays crisp.
        empty_fg = effect.render(photo, np.zeros((h, w), np.float32), ramp, params)
        # Empty background: everything is subject, the photo comes back unchanged.
        empty_bg = effect.render(photo, np.ones((h, w), np.float32), ramp, params)
        # Flat depth: the mask alone decides.
        flat = effect.render(photo, subject, np.full((h, w), 7.0, np.float32), params)
        # Non-finite depth values are tolerated.
        nan_depth = ramp.copy()
        nan_depth[:10] = np.nan
        effect.render(photo, subject, nan_depth, params)

    assert empty_fg.start == 1.0
    # default: no subject, so the photo is left as it is; seed paints it as the write-up did.
    assert empty_fg.no_subject == (preset == "default") == empty_fg.left_alone
    assert np.array_equal(empty_fg.image, photo) == (preset == "default")
    np.testing.assert_array_equal(empty_bg.image, photo)
    assert flat.start == flat.stop == 0.0
    inner = np.s_[h // 3 + 20 : 2 * h // 3 - 20, w // 3 + 20 : 2 * w // 3 - 20]
    np.testing.assert_array_equal(flat.image[inner], photo[inner])
    corner = np.s_[: h // 5, : w // 5]
    assert np.abs(flat.image[corner].astype(int) - photo[corner]).mean() > 5


def render_at(photo: np.ndarray, size: tuple[int, int], preset: str) -> np.ndarray:
    scaled = cv2.resize(photo, size, interpolation=cv2.INTER_AREA if size[0] < photo.shape[1] else cv2.INTER_CUBIC)
    fg = np.zeros((512, 512), np.float32)
    cv2.ellipse(fg, (256, 230), (110, 190), 0, 0, 360, 1.0, -1)
    depth = np.tile(np.linspace(0.2, 1, 512, dtype=np.float32)[:, None], (1, 512))
    return effect.render(scaled, fg, np.maximum(depth, fg), PRESETS[preset]).image


def test_default_looks_alike_at_two_resolutions_and_seed_does_not():
    photo = example("astronaut")  # 512x512, upscaled to 4 MP and compared at 1 MP
    differences = {}
    for preset in ("seed", "default"):
        small = render_at(photo, (1024, 1024), preset).astype(np.float32)
        large = render_at(photo, (2048, 2048), preset)
        large_down = cv2.resize(large, (1024, 1024), interpolation=cv2.INTER_AREA).astype(np.float32)
        differences[preset] = float(np.abs(small - large_down).mean())
    assert differences["default"] < 3.0, differences
    assert differences["default"] < differences["seed"] / 2, differences


def test_gradient_keeps_more_of_the_photo_towards_its_edge():
    photo = example("chelsea")
    h, w = photo.shape[:2]
    fg = np.zeros((h, w), np.float32)
    depth = np.zeros((h, w), np.float32)
    plain = effect.render(photo, fg, depth, effect_params("default", min_subject_area=0, min_subject_confidence=0))
    left = effect.render(
        photo,
        fg,
        depth,
        effect_params("default", gradient="left", gradient_strength=0.8, min_subject_area=0, min_subject_confidence=0),
    )

    def distance(image, cols):
        return float(np.abs(image[:, cols].astype(int) - photo[:, cols]).mean())

    assert distance(left.image, slice(0, 20)) < 0.4 * distance(plain.image, slice(0, 20))
    assert distance(left.image, slice(w - 3, w)) == pytest.approx(distance(plain.image, slice(w - 3, w)), abs=0.5)


def test_parameters_validate_hash_and_load_from_yaml(tmp_path):
    assert effect_params("default").digest() == effect_params("default").digest()
    assert effect_params("default", kernel_size=9).digest() != effect_params("default").digest()
    assert PRESETS["seed"].digest() != PRESETS["default"].digest()
    with pytest.raises(BadInputError, match="gradient must be one of"):
        effect_params("default", gradient="diagonal")
    with pytest.raises(BadInputError, match="unknown preset"):
        effect_params("dreamy")
    with pytest.raises(BadInputError, match="unknown effect parameter"):
        effect_params("default", kernel=3)
    config = tmp_path / "look.yaml"
    config.write_text("kernel-size: 11\ngradient: top\n")
    assert load_yaml_config(config) == {"kernel_size": 11, "gradient": "top"}
    (tmp_path / "bad.yaml").write_text("- a list\n")
    with pytest.raises(BadInputError, match="must be a mapping"):
        load_yaml_config(tmp_path / "bad.yaml")


def test_a_photo_whose_background_is_already_soft_is_left_alone():
    photo = example("astronaut")
    h, w = photo.shape[:2]
    fg = np.zeros((h, w), np.float32)
    fg[h // 4 :, w // 4 : 3 * w // 4] = 1.0
    depth = np.tile(np.linspace(0, 1, h, dtype=np.float32)[:, None], (1, w))
    soft = cv2.GaussianBlur(photo, (0, 0), 6)
    inside = fg[..., None] >= 0.5
    shallow = np.where(inside, photo, soft)  # as if shot with a fast lens

    left = effect.render(shallow, fg, depth, PRESETS["default"])
    assert left.left_alone and left.background_detail < 0.2
    np.testing.assert_array_equal(left.image, shallow)

    sharp = effect.render(photo, fg, depth, PRESETS["default"])
    assert not sharp.left_alone and sharp.background_detail > 0.2
    assert not effect.render(shallow, fg, depth, PRESETS["seed"]).left_alone  # seed: as written up
    off = effect.render(shallow, fg, depth, effect_params("default", min_background_detail=0))
    assert not off.left_alone


def disc_scene(size: int = 240, radius: int = 60, seen: int = 120) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A detailed red disc (the object) on green noise, and a mask that saw only the part of it
    left of column `seen`."""
    rng = np.random.default_rng(0)
    photo = np.zeros((size, size, 3), np.uint8)
    photo[...] = (40, 140, 50)
    photo = np.clip(photo + rng.normal(0, 25, photo.shape), 0, 255).astype(np.uint8)
    disc = np.zeros((size, size), np.uint8)
    cv2.circle(disc, (size // 2, size // 2), radius, 1, -1)
    stripes = np.broadcast_to(np.arange(size) // 3 % 2 * 40, (size, size))  # the object's own fine detail
    red = np.stack([np.full((size, size), 200), 40 + stripes, np.full((size, size), 30)], -1).astype(np.uint8)
    photo[disc > 0] = red[disc > 0]
    fg = np.zeros((size, size), np.float32)
    fg[disc > 0] = 1.0
    fg[:, seen:] = 0.0
    return photo, fg, disc > 0


@pytest.mark.parametrize("depth_measured", [True, False])
def test_a_partial_mask_is_extended_to_the_whole_object(depth_measured):
    photo, fg, disc = disc_scene()
    depth = np.where(disc, 0.8, 0.2).astype(np.float32) if depth_measured else np.zeros(fg.shape, np.float32)
    whole = effect.extend_subject(photo, fg, depth, depth_measured) >= 0.5
    assert whole[disc].mean() > 0.97  # the right half the mask missed joined it
    assert whole[~disc].mean() < 0.04  # the background did not (but for a line along its edge)
    # ... and the photo's right half of the disc stays crisp in the rendering.
    result = effect.render(photo, fg, depth, PRESETS["default"], depth_measured=depth_measured)
    right = np.s_[100:140, 130:170]
    np.testing.assert_array_equal(result.image[right], photo[right])
    if not depth_measured:  # (measured depth alone keeps it crisp: it is as near as the rest)
        unextended = effect.render(photo, fg, depth, effect_params("default", extend_subject=False), False)
        assert np.abs(unextended.image[right].astype(int) - photo[right]).mean() > 5


def test_measured_depth_extends_an_object_that_colour_cannot_tell_apart():
    """A grey object on a grey background: only depth says where it ends."""
    rng = np.random.default_rng(1)
    photo = np.clip(128 + rng.normal(0, 20, (200, 300, 3)), 0, 255).astype(np.uint8)
    obj = np.zeros((200, 300), bool)
    obj[40:180, 60:200] = True
    fg = np.zeros((200, 300), np.float32)
    fg[40:180, 60:120] = 1.0  # the mask saw the left part only
    depth = np.where(obj, 0.9, np.linspace(0, 0.5, 300, dtype=np.float32)[None, :])
    whole = effect.extend_subject(photo, fg, depth, depth_measured=True) >= 0.5
    assert whole[obj].mean() > 0.97 and whole[~obj].mean() < 0.05
    # Colour alone cannot tell them apart; with the ground prior that doubt keeps both crisp.
    prior = effect.extend_subject(photo, fg, depth, depth_measured=False) >= 0.5
    assert prior[obj].mean() > 0.97 and prior[~obj].mean() > 0.5


def test_with_the_ground_prior_what_the_mask_was_unsure_of_stays_crisp():
    photo, fg, disc = disc_scene()
    unsure = fg.copy()
    unsure[disc & (fg == 0)] = 0.3  # the model half-saw the right half
    depth = np.zeros(fg.shape, np.float32)
    prior = effect.extend_subject(photo, unsure, depth, depth_measured=False)
    assert (prior[disc] >= 0.5).mean() > 0.97
    # Measured depth that puts the right half far behind: depth wins, it is not kept.
    far_right = np.where(disc & (fg == 0), 0.0, np.where(disc, 0.9, 0.5)).astype(np.float32)
    measured = effect.extend_subject(photo, unsure, far_right, depth_measured=True)
    assert (measured[disc & (fg == 0)] >= 0.5).mean() < 0.1


@pytest.mark.parametrize(
    "mask, why",
    [
        ("empty", "area"),
        ("tiny", "area"),  # 0.5% of the photo: too small to lead the eye
        ("unsure", "confidence"),  # a large blob the model gives 0.6 everywhere
    ],
)
def test_no_clear_subject_leaves_the_photo_as_it_is(mask, why):
    photo = example("chelsea")
    h, w = photo.shape[:2]
    fg = np.zeros((h, w), np.float32)
    if mask == "tiny":
        side = round((0.005 * h * w) ** 0.5)
        fg[h // 2 : h // 2 + side, w // 2 : w // 2 + side] = 1.0
    elif mask == "unsure":
        fg[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = 0.6
    depth = np.tile(np.linspace(0, 1, h, dtype=np.float32)[:, None], (1, w))
    result = effect.render(photo, fg, depth, PRESETS["default"])
    assert result.no_subject and result.left_alone
    np.testing.assert_array_equal(result.image, photo)
    params = PRESETS["default"]
    if why == "area":
        assert result.fg_fraction < params.min_subject_area
    else:
        assert result.fg_fraction > params.min_subject_area
        assert result.subject_confidence == pytest.approx(0.6)
        assert result.subject_confidence < params.min_subject_confidence
    # The same mask, sure of itself and large enough, is a subject.
    clear = np.zeros((h, w), np.float32)
    clear[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = 1.0
    assert not effect.render(photo, clear, depth, params).no_subject
    # seed keeps the write-up's behaviour: it paints whatever it is given.
    assert not effect.render(photo, fg, depth, PRESETS["seed"]).left_alone


def test_soft_background_is_judged_against_the_whole_subject():
    """A sharp object on a blurred background, the mask on half of it: the other half is not
    background detail, so the photo is recognised as already soft."""
    photo, fg, disc = disc_scene(radius=90, seen=80)
    soft = cv2.GaussianBlur(photo, (0, 0), 5)
    shallow = np.where(disc[..., None], photo, soft)
    depth = np.zeros(fg.shape, np.float32)
    extended = effect.render(shallow, fg, depth, PRESETS["default"], depth_measured=False)
    assert extended.left_alone and not extended.no_subject
    assert extended.background_detail < PRESETS["default"].min_background_detail
    np.testing.assert_array_equal(extended.image, shallow)
    partial = effect.render(shallow, fg, depth, effect_params("default", extend_subject=False), depth_measured=False)
    assert not partial.left_alone and partial.background_detail > PRESETS["default"].min_background_detail
