"""He-scaled random weights for a transformers model: its own initialisation gives near-constant
depth maps, which would make comparisons of maps vacuous."""

from __future__ import annotations


def scramble(module, seed: int) -> None:
    """Every parameter of the torch ``module`` drawn anew: weights He-scaled, the rest N(0, 0.1)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=g) * (2.0 / p[0].numel()) ** 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
