"""DPT-Large (MiDaS v3 DPT_Large, MIT licence), the original write-up's depth model, via transformers.

Input: long side 384, sides multiples of 32, mean/std 0.5; see hf_depth.py for the resize/pad
policy and the order in which weights are looked for.
"""

from __future__ import annotations

from . import register
from .hf_depth import HFDepthModel


@register
class DPTLarge(HFDepthModel):
    name = "dpt-large"
    cache_name = name  # weights folder: <cache>/<name>/
    licence = "MIT"
    source = "hub Intel/dpt-large (MiDaS v3 DPT_Large, transformers)"
    hub_id = "Intel/dpt-large"
    model_type = "dpt"
    weights_env = "DREAMFOCUS_DPT_URL"
    size = 384
    multiple = 32
    mean = (0.5, 0.5, 0.5)
    std = (0.5, 0.5, 0.5)

    @classmethod
    def model_class(cls):
        from transformers import DPTForDepthEstimation

        return DPTForDepthEstimation

    @classmethod
    def default_config(cls):
        """The configuration published with Intel/dpt-large (ViT-L/16 at 384, MiDaS v3)."""
        from transformers import DPTConfig

        return DPTConfig(
            hidden_size=1024,
            num_hidden_layers=24,
            num_attention_heads=16,
            intermediate_size=4096,
            image_size=384,
            patch_size=16,
            backbone_out_indices=[5, 11, 17, 23],
            neck_hidden_sizes=[256, 512, 1024, 1024],
            fusion_hidden_size=256,
            readout_type="project",
            qkv_bias=True,
            reassemble_factors=[4, 2, 1, 0.5],
            layer_norm_eps=1e-12,
        )
