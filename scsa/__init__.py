"""Attention-augmented CNNs for ImageNet: the public API.

``import scsa`` gives the models (and registers them with timm as ``<backbone>_<attention>``), the
attention modules and their kernels, and ``scsa.export`` (which imports onnx only when exporting).
"""
from typing import Tuple

from scsa import export
from scsa.attention import create_attention, list_attentions, register_attention
from scsa.attention.kernels.autotune import decide_kernels, kernel_decisions
from scsa.models import create_model, list_backbones, register_backbone

__version__ = "0.1.0"  # the one place: pyproject.toml reads it from here

__all__ = ["MODELS", "__version__", "create_attention", "create_model", "decide_kernels", "export",
           "kernel_decisions", "list_attentions", "list_backbones", "register_attention", "register_backbone"]


def __getattr__(name: str) -> Tuple[str, ...]:
    if name == "MODELS":  # the backbone names, as a tuple (the name before the registry)
        return tuple(list_backbones())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
