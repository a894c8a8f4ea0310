"""Attention-augmented CNNs for ImageNet: the public API."""
from scsa.attention import create_attention, list_attentions
from scsa.attention.kernels.autotune import decide_kernels, kernel_decisions
from scsa.models import MODELS, create_model

__all__ = ["MODELS", "create_attention", "create_model", "decide_kernels", "kernel_decisions", "list_attentions"]
