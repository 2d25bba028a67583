"""Depth Anything V2 Small, the default depth model (Apache-2.0), through transformers.

Input: long side 518, sides multiples of 14, ImageNet mean/std; see hf_depth.py for the
resize/pad policy and the order in which weights are looked for.
"""

from __future__ import annotations

from . import register
from .hf_depth import HFDepthModel


@register
class DepthAnythingV2Small(HFDepthModel):
    name = "depth-anything-v2-small"
    cache_name = name  # weights folder: <cache>/<name>/
    licence = "Apache-2.0"
    source = "hub depth-anything/Depth-Anything-V2-Small-hf (transformers)"
    hub_id = "depth-anything/Depth-Anything-V2-Small-hf"
    model_type = "depth_anything"
    weights_env = "DREAMFOCUS_DEPTH_ANYTHING_URL"
    size = 518
    multiple = 14
    mean = (0.485, 0.456, 0.406)
    std = (0.229, 0.224, 0.225)

    @classmethod
    def model_class(cls):
        from transformers import DepthAnythingForDepthEstimation

        return DepthAnythingForDepthEstimation

    @classmethod
    def default_config(cls):
        """transformers' DepthAnythingConfig defaults are the V2 Small architecture (ViT-S/14)."""
        from transformers import DepthAnythingConfig

        return DepthAnythingConfig()
