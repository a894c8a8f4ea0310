"""Attention modules and their registry: ``create_attention(name, channels, **kwargs)``.

Each entry also says where the module goes in a block unless told otherwise (its default
``position``): the one place both the Python API and ``conf/attention/*.yaml`` read it from.

- ``mid``: after the block's spatial conv-bn-act (conv2 of a bottleneck, conv1 of a basic
  block, the depthwise conv of an inverted residual).
- ``end``: after the last BN of the residual branch, before the add.

SCSA goes ``mid``, where its authors put it. SE, CBAM and ECA go ``end``, where their own
papers did. CA goes ``mid``: its paper inserts it right after the depthwise 3x3 conv of
MobileNetV2's inverted residual, its main benchmark. EMA extends CA and its paper compares
the two, so it takes CA's place (the paper does not spell one out).
"""
from typing import Callable, Dict, NamedTuple

import torch.nn as nn

from scsa.attention.cbam import CBAM
from scsa.attention.coord import CoordAttention
from scsa.attention.eca import ECA
from scsa.attention.ema import EMA
from scsa.attention.scsa import SCSA
from scsa.attention.se import SE

__all__ = ["CBAM", "CoordAttention", "ECA", "EMA", "POSITIONS", "SCSA", "SE",
           "attention_factory", "create_attention", "default_position", "list_attentions", "register_attention"]

POSITIONS = ("mid", "end")


class _Entry(NamedTuple):
    factory: Callable[..., nn.Module]
    position: str


_REGISTRY: Dict[str, _Entry] = {}


def register_attention(name: str, factory: Callable[..., nn.Module], position: str = "end") -> None:
    """Make ``name`` buildable by ``create_attention``, placed at ``position`` by default."""
    if position not in POSITIONS:
        raise ValueError(f"unknown attention position '{position}': use 'mid' or 'end'")
    _REGISTRY[name] = _Entry(factory, position)


def list_attentions() -> list:
    return sorted(_REGISTRY)


def _entry(name: str) -> _Entry:
    if name not in _REGISTRY:
        raise ValueError(f"unknown attention '{name}': choose one of {', '.join(list_attentions())}")
    return _REGISTRY[name]


def default_position(name: str) -> str:
    """Where attention ``name`` goes in a block unless told otherwise: ``mid`` or ``end``."""
    return _entry(name).position


def attention_factory(name: str) -> Callable[..., nn.Module]:
    """What builds attention ``name`` (its class): its signature says which kwargs the module takes."""
    return _entry(name).factory


def create_attention(name: str, channels: int, **kwargs) -> nn.Module:
    """Build attention module ``name`` for a feature map with ``channels`` channels."""
    return _entry(name).factory(channels, **kwargs)


register_attention("none", lambda channels, **_: nn.Identity(), "end")
register_attention("scsa", SCSA, "mid")
register_attention("se", SE, "end")
register_attention("cbam", CBAM, "end")
register_attention("eca", ECA, "end")
register_attention("ca", CoordAttention, "mid")
register_attention("ema", EMA, "mid")
