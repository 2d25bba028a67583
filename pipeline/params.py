"""Effect parameters, the two presets, YAML loading and the parameter hash."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .errors import BadInputError

GRADIENT_DIRECTIONS = ("none", "left", "right", "top", "bottom")


@dataclass(frozen=True)
class EffectParams:
    """Everything that changes how a photo looks. Spatial sizes are in pixels of the working image.

    work_size: long side (px) at which background and alpha are computed, then brought back to
        full size; 0 computes everything at full resolution. A fixed working size is what makes
        the look independent of the photo's resolution.
    min_background_detail: photos whose background has less fine detail than this share of the
        subject's are left as they are (their background is already soft); 0 turns this off.
    min_subject_area, min_subject_confidence: photos with no clear subject are left as they are:
        a foreground (saliency >= fg_threshold) under this share of the photo, or a foreground
        whose mean saliency is under this (the model is unsure); 0 turns each check off.
    extend_subject: grow a partial mask to the whole object it belongs to (the regions that
        colour, texture and, with a depth model, depth tie to its confident core).
    """

    preset: str = "default"
    work_size: int = 640
    kernel_size: int = 16
    brightness_min: int = 40
    brightness_max: int = 255
    fg_threshold: float = 0.5
    start_percentile: float = 50.0
    stop_percentile: float = 50.0
    refine_radius: int = 4
    refine_eps: float = 1e-2
    gradient: str = "none"
    gradient_strength: float = 0.6
    min_background_detail: float = 0.2
    min_subject_area: float = 0.01
    min_subject_confidence: float = 0.75
    extend_subject: bool = True

    def __post_init__(self) -> None:
        problems = []
        if self.work_size < 0 or (0 < self.work_size < 64):
            problems.append("work_size must be 0 (full resolution) or at least 64")
        if self.kernel_size < 1:
            problems.append("kernel_size must be at least 1")
        if not 0 <= self.brightness_min <= self.brightness_max <= 255:
            problems.append("need 0 <= brightness_min <= brightness_max <= 255")
        if not 0 < self.fg_threshold < 1:
            problems.append("fg_threshold must be between 0 and 1")
        for name in ("start_percentile", "stop_percentile"):
            if not 0 <= getattr(self, name) <= 100:
                problems.append(f"{name} must be within 0..100")
        if self.refine_radius < 0 or self.refine_eps <= 0:
            problems.append("refine_radius must be >= 0 and refine_eps > 0")
        if self.gradient not in GRADIENT_DIRECTIONS:
            problems.append(f"gradient must be one of {', '.join(GRADIENT_DIRECTIONS)}")
        if not 0 <= self.gradient_strength <= 1:
            problems.append("gradient_strength must be within 0..1")
        if self.min_background_detail < 0:
            problems.append("min_background_detail must be >= 0 (0 = never leave a photo alone)")
        if not 0 <= self.min_subject_area < 1 or not 0 <= self.min_subject_confidence <= 1:
            problems.append("min_subject_area must be within 0..1 (below 1) and min_subject_confidence within 0..1")
        if problems:
            raise BadInputError("invalid effect parameters: " + "; ".join(problems))

    def digest(self) -> str:
        """A short hash of every parameter: equal hashes mean identical renderings."""
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


PRESETS: dict[str, EffectParams] = {
    # The original write-up, number for number: full resolution, 24 px kernel, no refinement.
    "seed": EffectParams(
        preset="seed",
        work_size=0,
        kernel_size=24,
        refine_radius=0,
        min_background_detail=0.0,
        min_subject_area=0.0,
        min_subject_confidence=0.0,
        extend_subject=False,
    ),
    "default": EffectParams(),
}

FIELD_NAMES = tuple(f.name for f in dataclasses.fields(EffectParams))


def effect_params(preset: str = "default", **overrides: Any) -> EffectParams:
    """The named preset with the given fields replaced (None values are ignored)."""
    if preset not in PRESETS:
        raise BadInputError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    unknown = set(overrides) - set(FIELD_NAMES)
    if unknown:
        raise BadInputError(f"unknown effect parameter(s): {', '.join(sorted(unknown))}")
    changes = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(PRESETS[preset], **changes)


def load_yaml_config(path: str | Path) -> dict[str, Any]:
    """A YAML mapping whose keys are option names (dashes or underscores)."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
    except FileNotFoundError:
        raise BadInputError(f"{path}: config file not found") from None
    except yaml.YAMLError as exc:
        raise BadInputError(f"{path}: not valid YAML ({exc.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise BadInputError(f"{path}: config must be a mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}
