"""`dreamfocus render`: given maps, intermediates, config files and clear one-line errors."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from pipeline.cli import main
from pipeline.params import load_yaml_config

ROOT = Path(__file__).resolve().parents[1]
PHOTO = ROOT / "examples" / "motorcycle_left.jpg"
DISPARITY = ROOT / "tests" / "data" / "motorcycle_disp.png"


@pytest.fixture
def maps(tmp_path):
    """A mask (8-bit, half size) and depth (.npy, another size) for the motorcycle photo."""
    disparity = cv2.imread(str(DISPARITY), cv2.IMREAD_UNCHANGED)
    mask = (disparity > np.percentile(disparity, 75)).astype(np.uint8) * 255
    mask_path = tmp_path / "mask.png"
    cv2.imwrite(str(mask_path), cv2.resize(mask, (370, 250)))
    depth_path = tmp_path / "depth.npy"
    np.save(depth_path, cv2.resize(disparity.astype(np.float32), (300, 200)))
    return mask_path, depth_path


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_render_with_given_maps_and_intermediates(tmp_path, maps, capsys):
    mask, depth = maps
    out = tmp_path / "result.jpg"
    code, stdout, err = run(
        capsys, "render", PHOTO, "-o", out, "--mask", mask, "--depth", depth, "--save-intermediates", tmp_path / "steps"
    )
    assert code == 0, err
    assert "result.jpg: 741x500" in stdout and "models" not in stdout
    result = np.asarray(Image.open(out).convert("RGB"))
    photo = np.asarray(Image.open(PHOTO).convert("RGB"))
    assert result.shape == photo.shape
    assert 5 < np.abs(result.astype(int) - photo).mean() < 60  # changed, but still the same photo
    with Image.open(out) as im:
        assert im.info.get("icc_profile")
    names = {p.name: p for p in (tmp_path / "steps").iterdir()}
    kinds = ("background", "saliency", "subject", "depth16", "alpha")
    assert set(names) == {f"motorcycle_left.{k}.png" for k in kinds}
    saliency = cv2.imread(str(names["motorcycle_left.saliency.png"]), cv2.IMREAD_UNCHANGED)
    given = cv2.resize(cv2.imread(str(mask), cv2.IMREAD_UNCHANGED), saliency.shape[::-1])
    assert saliency.shape == photo.shape[:2] and np.abs(saliency.astype(int) - given).mean() < 8  # the --mask given
    depth16 = cv2.imread(str(names["motorcycle_left.depth16.png"]), cv2.IMREAD_UNCHANGED)
    assert depth16.dtype == np.uint16 and depth16.shape == photo.shape[:2] and depth16.max() > 65000
    alpha = cv2.imread(str(names["motorcycle_left.alpha.png"]), cv2.IMREAD_UNCHANGED)
    assert alpha.shape == photo.shape[:2] and alpha.min() == 0 and alpha.max() == 255


def test_flags_override_a_yaml_config(tmp_path, maps, capsys):
    mask, depth = maps
    config = tmp_path / "look.yaml"
    config.write_text("preset: seed\nkernel-size: 3\ngradient: left\nquality: 70\n")
    small_kernel = tmp_path / "k3.jpg"
    assert (
        run(capsys, "render", PHOTO, "-o", small_kernel, "--mask", mask, "--depth", depth, "--config", config)[0] == 0
    )
    big_kernel = tmp_path / "k31.jpg"
    assert (
        run(
            capsys,
            "render",
            PHOTO,
            "-o",
            big_kernel,
            "--mask",
            mask,
            "--depth",
            depth,
            "--config",
            config,
            "--kernel-size",
            "31",
        )[0]
        == 0
    )
    photo = np.asarray(Image.open(PHOTO).convert("RGB")).astype(int)

    def change(path):
        return np.abs(np.asarray(Image.open(path).convert("RGB")).astype(int) - photo).mean()

    assert change(big_kernel) > change(small_kernel) + 3
    config.write_text("kernel-size: 3\nno-such-option: 1\n")
    code, _, err = run(capsys, "render", PHOTO, "-o", tmp_path / "x.jpg", "--config", config)
    assert code == 2 and "unknown option(s): no_such_option" in err


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing photo", "file not found"),
        ("not a photo", "not an image"),
        ("colour depth", "expected a single-channel depth map"),
        ("bad extension", "cannot tell the output format"),
        ("unwritable output", "cannot write"),
    ],
)
def test_bad_input_is_one_clear_line_and_writes_nothing(tmp_path, maps, capsys, case, expected):
    mask, depth = maps
    photo, out = PHOTO, tmp_path / "out" / "result.jpg"
    if case == "missing photo":
        photo = tmp_path / "nowhere.jpg"
    elif case == "not a photo":
        photo = tmp_path / "notes.jpg"
        photo.write_text("just text")
    elif case == "colour depth":
        depth = PHOTO
    elif case == "bad extension":
        out = tmp_path / "out" / "result.gif"
    elif case == "unwritable output":
        (tmp_path / "out").write_text("a file where the folder should be")
    code, stdout, err = run(capsys, "render", photo, "-o", out, "--mask", mask, "--depth", depth)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dreamfocus: error: ") and expected in lines[0]
    assert "Traceback" not in err
    assert not out.exists() or case == "unwritable output"
    if (tmp_path / "out").is_dir():
        assert not list((tmp_path / "out").iterdir())


def test_render_runs_the_models_when_no_maps_are_given(tmp_path, capsys):
    out = tmp_path / "result.png"
    code, stdout, err = run(
        capsys, "render", PHOTO, "-o", out, "--saliency-model", "trivial-saliency", "--depth-model", "trivial-depth"
    )
    assert code == 0, err
    assert "models: trivial-saliency builtin (numpy, cpu), trivial-depth builtin (numpy, cpu)" in stdout
    assert Image.open(out).format == "PNG"


def test_subject_decisions_are_flags_and_yaml_keys(tmp_path):
    import argparse

    from pipeline.cli.options import add_effect_options, params_from_args

    parser = argparse.ArgumentParser()
    add_effect_options(parser)
    params = params_from_args(parser.parse_args(["--extend-subject", "no", "--min-subject-area", "0.05"]))
    assert params.extend_subject is False and params.min_subject_area == 0.05
    assert params_from_args(parser.parse_args(["--extend-subject", "yes"])).extend_subject is True
    assert params_from_args(parser.parse_args([])).min_subject_confidence == 0.75
    with pytest.raises(SystemExit):
        parser.parse_args(["--extend-subject", "maybe"])
    config = tmp_path / "look.yaml"
    config.write_text("extend-subject: no\nmin-subject-confidence: 0\n")
    assert load_yaml_config(config) == {"extend_subject": False, "min_subject_confidence": 0}


def test_help_opens_with_what_the_command_does(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    usage, description = out.split("\n\n")[:2]
    assert usage == "usage: dreamfocus [-h] [-v] COMMAND ..."
    assert " ".join(description.split()).startswith(
        "Make the subject of an everyday, everything-in-focus photo stand out against a soft, painterly background"
    )
    assert "add_parser" not in out and "module" not in out  # the code's docstring is no help
    for command in ("render", "models", "run", "status", "review"):
        assert f"\n    {command} " in out
