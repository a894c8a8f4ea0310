"""Attention-augmented CNNs for ImageNet: the public API."""
from scsa.attention import create_attention, list_attentions
from scsa.models import MODELS, create_model

__all__ = ["MODELS", "create_attention", "create_model", "list_attentions"]
