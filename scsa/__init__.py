"""Attention-augmented CNNs for ImageNet: the public API."""
from typing import Tuple

from scsa.attention import create_attention, list_attentions, register_attention
from scsa.attention.kernels.autotune import decide_kernels, kernel_decisions
from scsa.models import create_model, list_backbones, register_backbone

__all__ = ["MODELS", "create_attention", "create_model", "decide_kernels", "kernel_decisions", "list_attentions",
           "list_backbones", "register_attention", "register_backbone"]


def __getattr__(name: str) -> Tuple[str, ...]:
    if name == "MODELS":  # the backbone names, as a tuple (the name before the registry)
        return tuple(list_backbones())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
