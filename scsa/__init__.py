"""Attention-augmented CNNs for ImageNet: the public API.

``import scsa`` gives the models (and registers them with timm as ``<backbone>_<attention>``), the
attention modules and their kernels, and ``scsa.export`` (which imports onnx only when exporting).
"""
from scsa import export
from scsa.attention import create_attention, list_attentions
from scsa.models import MODELS, create_model

__version__ = "0.1.0"  # the one place: pyproject.toml reads it from here

__all__ = ["MODELS", "__version__", "create_attention", "create_model", "export", "list_attentions"]
