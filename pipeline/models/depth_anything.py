"""Depth Anything V2 Small, the default depth model (Apache-2.0), through transformers.

Input: long side 518, sides multiples of 14, ImageNet mean/std; see hf_depth.py for the
resize/pad policy and the order in which weights are looked for.

On the CPU it runs in OpenVINO (hf_depth.py: converted once from the torch module, cached by the
weights' digest). scripts/bench_depth_runtimes.py, the real architecture with He-scaled random
weights, the 5 examples and 3 generated scenes, 2 rounds on a shared 2-core CPU, against torch
fp32 (3.2 s a photo): OpenVINO fp32 converted from the torch module 0.51 (0.62 in an earlier run
on a busier machine), from an ONNX export 0.49, onnxruntime on that export 0.57; every map within
6e-6 of torch's range (Pearson and Spearman 1.000000). OpenVINO straight from the torch module
needs no ONNX exporter (the dynamo one needs onnxscript, the TorchScript one is deprecated), so
that is the one run.
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
    openvino_on_cpu = True

    @classmethod
    def model_class(cls):
        from transformers import DepthAnythingForDepthEstimation

        return DepthAnythingForDepthEstimation

    @classmethod
    def default_config(cls):
        """transformers' DepthAnythingConfig defaults are the V2 Small architecture (ViT-S/14)."""
        from transformers import DepthAnythingConfig

        return DepthAnythingConfig()

    @classmethod
    def small_config(cls):
        """The same structure with a few small layers: the real code paths in a fraction of the
        time, for tests and benchmarks (random weights only)."""
        from transformers import DepthAnythingConfig, Dinov2Config

        backbone = Dinov2Config(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            mlp_ratio=2,
            image_size=518,
            patch_size=14,
            out_indices=[1, 2],
            reshape_hidden_states=False,
        )
        return DepthAnythingConfig(
            backbone_config=backbone,
            reassemble_hidden_size=32,
            neck_hidden_sizes=[8, 16],
            reassemble_factors=[2, 1],
            fusion_hidden_size=16,
            head_hidden_size=8,
        )
