"""Non-default weights for the modules under test (a helper module, shared by the attention tests)."""
import torch
import torch.nn as nn


def randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights, biases around 1 (init leaves e.g. norms at 1/0), so every parameter matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5 + (1.0 if p.dim() == 1 else 0.0))
    return module
