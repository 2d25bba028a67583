"""Options shared by subcommands, made from the fields that define them, and the rule that joins
them with a YAML config.

Every option is a field: effect options are EffectParams' fields, model, output and job options
are JobConfig's. A flag, its YAML key and its field share one name (dashes for underscores).
Precedence: preset < config file < flags.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from typing import Any

from ..job.plan import JobConfig, config_fields
from ..params import GRADIENT_DIRECTIONS, PRESETS, EffectParams, effect_params

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
    "min_subject_area": "leave photos alone whose subject covers less than this share of the photo; 0 = never",
    "min_subject_confidence": "leave photos alone whose subject's mean mask level is below this; 0 = never",
    "extend_subject": "grow a partial mask to the whole object (colour, texture, depth): yes or no",
}


def _yes_no(text: str) -> bool:
    value = text.strip().lower()
    if value not in ("yes", "no", "true", "false", "on", "off", "1", "0"):
        raise argparse.ArgumentTypeError(f"expected yes or no, not {text!r}")
    return value in ("yes", "true", "on", "1")


_TYPES: dict[str, Callable[[str], Any]] = {"int": int, "float": float, "str": str, "bool": _yes_no}


def _keys(parser: argparse.ArgumentParser, *names: str) -> None:
    """Remember which option names a subcommand takes: the keys its --config file may hold."""
    parser.set_defaults(config_keys=(parser.get_default("config_keys") or frozenset()) | set(names))


def add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="YAML", help="read options from a YAML file whose keys match the flags")


def add_effect_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("effect")
    group.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="default",
        help="seed: the original write-up exactly; default: our best look",
    )
    group.add_argument(
        "--gradient", choices=GRADIENT_DIRECTIONS, default=None, help="keep more of the photo towards this edge"
    )
    for field in dataclasses.fields(EffectParams):
        if field.name in ("preset", "gradient"):
            continue
        group.add_argument(
            "--" + field.name.replace("_", "-"),
            type=_TYPES[str(field.type)],
            default=None,
            help=_EFFECT_HELP.get(field.name),
        )
    _keys(parser, *(f.name for f in dataclasses.fields(EffectParams)))


def add_config_fields(parser: argparse.ArgumentParser, *groups: str, **defaults) -> None:
    """A flag for each JobConfig field of these groups (their defaults, unless given here)."""
    for name in groups:
        group = parser.add_argument_group(name)
        for field in config_fields(name):
            kwargs = dict(field.metadata["argparse"])
            kind = str(field.type).replace(" | None", "")
            if kind == "bool":
                kwargs["action"] = "store_true"
            else:
                kwargs.setdefault("type", _TYPES.get(kind))
            default = defaults.get(field.name, field.default)
            if default is dataclasses.MISSING:  # a field with a factory: the value it makes
                default = field.default_factory()  # type: ignore[misc,operator]
            group.add_argument(
                "--" + field.name.replace("_", "-"), default=default, help=field.metadata["help"], **kwargs
            )
            _keys(parser, field.name)


def params_from_args(args: argparse.Namespace) -> EffectParams:
    names = [f.name for f in dataclasses.fields(EffectParams) if f.name != "preset"]
    return effect_params(args.preset, **{n: getattr(args, n, None) for n in names})


def config_from_args(args: argparse.Namespace, **given) -> JobConfig:
    """A JobConfig of every field the parsed arguments hold, plus the effect parameters."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(JobConfig) if hasattr(args, f.name)}
    return JobConfig(**{**values, "params": params_from_args(args), **given})
