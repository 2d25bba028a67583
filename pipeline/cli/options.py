"""Options shared by subcommands, and the rule that joins them with a YAML config.

Precedence: preset < config file < flags. Every flag's dest is also a config key.
"""

from __future__ import annotations

import argparse
import dataclasses

from ..params import GRADIENT_DIRECTIONS, PRESETS, EffectParams, effect_params
from ..photo_io import OUTPUT_EXTENSIONS

_EFFECT_HELP = {
    "work_size": "long side (px) of the working image; 0 = full resolution",
    "kernel_size": "painterly kernel diameter, px at the working size",
    "brightness_min": "background brightness floor (0..255)",
    "brightness_max": "background brightness ceiling (0..255)",
    "fg_threshold": "mask level that counts as subject",
    "start_percentile": "percentile of subject depth where the ramp starts (crisp in front)",
    "stop_percentile": "percentile of background depth where the ramp stops (all background behind)",
    "refine_radius": "edge-aware refinement radius, px at the working size; 0 = off",
    "refine_eps": "edge-aware refinement regularisation",
    "gradient_strength": "alpha at the gradient's named edge",
    "min_background_detail": "leave photos alone whose background detail is below this share of the "
                             "subject's (already soft); 0 = never",
}


def add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="YAML", help="read options from a YAML file whose keys match the flags")


def add_effect_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("effect")
    group.add_argument("--preset", choices=sorted(PRESETS), default="default",
                       help="seed: the original write-up exactly; default: our best look")
    group.add_argument("--gradient", choices=GRADIENT_DIRECTIONS, default=None,
                       help="keep more of the photo towards this edge")
    for field in dataclasses.fields(EffectParams):
        if field.name in ("preset", "gradient"):
            continue
        group.add_argument("--" + field.name.replace("_", "-"), type={"int": int, "float": float}[field.type],
                           default=None, help=_EFFECT_HELP.get(field.name))


def add_output_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("output")
    group.add_argument("--format", choices=sorted(OUTPUT_EXTENSIONS), default=None,
                       help="output format (render: taken from the output name by default; run: jpeg)")
    group.add_argument("--quality", type=int, default=92, help="JPEG/WebP quality 1..100")
    group.add_argument("--max-megapixels", type=float, default=200.0,
                       help="refuse photos declaring more pixels than this (decompression bombs)")


def add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("models")
    group.add_argument("--saliency-model", default=None, help="salient-object model name (see `models list`)")
    group.add_argument("--depth-model", default=None, help="depth model name (see `models list`)")
    group.add_argument("--saliency-weights", default=None, help="path or URI of saliency weights")
    group.add_argument("--depth-weights", default=None, help="path or URI of depth weights")
    group.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")


def params_from_args(args: argparse.Namespace) -> EffectParams:
    names = [f.name for f in dataclasses.fields(EffectParams) if f.name != "preset"]
    return effect_params(args.preset, **{n: getattr(args, n, None) for n in names})
