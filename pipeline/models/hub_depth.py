"""Any depth-estimation model that transformers loads, named ``hf:ORG/NAME`` after its hub id.

``--depth-model hf:depth-anything/Depth-Anything-V2-Large-hf`` (or ``-Base-hf``),
``hf:apple/DepthPro-hf``, ``hf:Intel/dpt-hybrid-midas``, ``hf:Intel/zoedepth-nyu-kitti``, ...:
one class per hub id, made on first use, with the weights found as every transformers depth
model's are (hf_depth.py: a path or URI given, ``<cache>/hf--ORG--NAME/``, the variable
``DREAMFOCUS_HF_ORG_NAME_URL`` (non-word characters as _, upper case), the hub when it is
reachable or its own cache holds the model).

The input policy (long side, multiple, normalisation) is the architecture's, from INPUT_POLICY,
overridden by the weights' own preprocessor_config.json where they have one. Models that predict
metric depth (ZoeDepth, GLPN, Depth Anything's metric variants: larger is farther) are turned
into inverse depth (larger is nearer), as the effect expects; relative models (Depth Anything,
DPT/MiDaS) and Depth Pro (its canonical inverse depth) already are.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from ..errors import BadInputError
from .hf_depth import HFDepthModel
from .weights import read_json

HUB_PREFIX = "hf:"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
NONE = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


class InputPolicy(NamedTuple):
    size: int  # long side
    multiple: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    metric: bool  # predicts depth (larger is farther), not inverse depth


# config.json's model_type -> how its published models take their input
INPUT_POLICY = {
    "depth_anything": InputPolicy(518, 14, *IMAGENET, metric=False),
    "dpt": InputPolicy(384, 32, *HALF, metric=False),
    "depth_pro": InputPolicy(1536, 16, *HALF, metric=False),
    "zoedepth": InputPolicy(512, 32, *HALF, metric=True),
    "glpn": InputPolicy(640, 32, *NONE, metric=True),
}


def hub_depth_class(name: str) -> type[HubDepthModel]:
    """The class of the depth model named ``hf:ORG/NAME`` (made here; the registry keeps it)."""
    hub_id = name[len(HUB_PREFIX) :]
    if not name.startswith(HUB_PREFIX) or not _HUB_ID.fullmatch(hub_id):
        raise BadInputError(f"{name!r}: a hub depth model is named hf:ORG/NAME, e.g. hf:apple/DepthPro-hf")
    attributes = {
        "name": name,
        "hub_id": hub_id,
        "cache_name": "hf--" + hub_id.replace("/", "--"),
        "weights_env": "DREAMFOCUS_HF_" + re.sub(r"\W", "_", hub_id).upper() + "_URL",
        "source": f"hub {hub_id} (transformers)",
        "licence": f"see the model card of {hub_id}",
    }
    return type("HubDepth_" + re.sub(r"\W", "_", hub_id), (HubDepthModel,), attributes)


class HubDepthModel(HFDepthModel):
    """A transformers depth-estimation model of any supported architecture (see INPUT_POLICY)."""

    model_type = " or ".join(INPUT_POLICY)  # any of these (runs_model_type)
    # Until the model's own configuration is known (_configure): Depth Anything's.
    size, multiple, mean, std = 518, 14, *IMAGENET
    metric = False

    @classmethod
    def model_class(cls):
        from transformers import AutoModelForDepthEstimation

        return AutoModelForDepthEstimation

    @classmethod
    def build(cls, config):
        from transformers import AutoModelForDepthEstimation

        return AutoModelForDepthEstimation.from_config(config)

    @classmethod
    def runs_model_type(cls, model_type: str | None) -> bool:
        return model_type in INPUT_POLICY

    def _configure(self, config) -> None:
        if config.model_type not in INPUT_POLICY:
            raise BadInputError(f"{self.name}: {config.model_type!r} depth models are not supported")
        policy = INPUT_POLICY[config.model_type]
        metric = policy.metric or getattr(config, "depth_estimation_type", "relative") == "metric"
        size, multiple, mean, std = policy.size, policy.multiple, policy.mean, policy.std
        if config.model_type == "depth_pro":  # its input is its patch at the smallest of its scales
            size = round(config.patch_size / min(config.scaled_images_ratios))
        processor = self.weights_path / "preprocessor_config.json" if self.weights_path else None
        if processor is not None and processor.is_file():
            settings = read_json(processor)
            wanted = settings.get("size")
            if isinstance(wanted, dict):
                size = max(int(v) for k, v in wanted.items() if k in ("height", "width", "shortest_edge")) or size
            elif isinstance(wanted, int):
                size = wanted
            multiple = int(settings.get("ensure_multiple_of") or settings.get("size_divisor") or multiple)
            if settings.get("do_normalize", True):
                mean = tuple(settings.get("image_mean", mean))  # type: ignore[assignment]
                std = tuple(settings.get("image_std", std))  # type: ignore[assignment]
            else:
                mean, std = NONE
        self.size, self.multiple, self.mean, self.std, self.metric = size, multiple, mean, std, metric

    def _forward(self, batch):
        depth = super()._forward(batch)
        return 1.0 / depth.clamp(min=1e-3) if self.metric else depth
