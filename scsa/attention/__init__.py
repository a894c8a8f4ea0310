"""Attention modules and their registry: ``create_attention(name, channels, **kwargs)``."""
from typing import Callable, Dict

import torch.nn as nn

from scsa.attention.cbam import CBAM
from scsa.attention.coord import CoordAttention
from scsa.attention.eca import ECA
from scsa.attention.ema import EMA
from scsa.attention.scsa import SCSA
from scsa.attention.se import SE

__all__ = ["CBAM", "CoordAttention", "ECA", "EMA", "SCSA", "SE",
           "create_attention", "list_attentions", "register_attention"]

_REGISTRY: Dict[str, Callable[..., nn.Module]] = {"none": lambda channels, **_: nn.Identity()}


def register_attention(name: str, factory: Callable[..., nn.Module]) -> None:
    _REGISTRY[name] = factory


def list_attentions() -> list:
    return sorted(_REGISTRY)


def create_attention(name: str, channels: int, **kwargs) -> nn.Module:
    """Build attention module ``name`` for a feature map with ``channels`` channels."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown attention '{name}': choose one of {', '.join(list_attentions())}")
    return _REGISTRY[name](channels, **kwargs)


for _name, _cls in (("scsa", SCSA), ("se", SE), ("cbam", CBAM), ("eca", ECA), ("ca", CoordAttention), ("ema", EMA)):
    register_attention(_name, _cls)
