"""Attention modules and their registry (``scsa.attention.registry``): one spec per module, registered in
the module's own file, read by the models, the timm registry, the attention maps, benchmarks and tests.

Every module file in this folder is imported here, so a new module is one file (its class and its
``register_attention`` line) plus one ``conf/attention/<name>.yaml``.

Default positions: SCSA goes ``mid``, where its authors put it. SE, CBAM and ECA go ``end``, where
their own papers did. CA goes ``mid``: its paper inserts it right after the depthwise 3x3 conv of
MobileNetV2's inverted residual, its main benchmark. EMA extends CA and its paper compares the two,
so it takes CA's place (the paper does not spell one out).
"""
import importlib
import pkgutil

from scsa.attention.cbam import CBAM
from scsa.attention.coord import CoordAttention
from scsa.attention.eca import ECA
from scsa.attention.ema import EMA
from scsa.attention.gate import RecordsGate
from scsa.attention.registry import (KERNEL_KWARG, POSITIONS, AttentionSpec, attention_spec, check_position,
                                     create_attention, default_position, list_attentions, register_attention,
                                     spec_for)
from scsa.attention.scsa import SCSA
from scsa.attention.se import SE

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")  # each module file registers its spec

__all__ = ["CBAM", "ECA", "EMA", "KERNEL_KWARG", "POSITIONS", "SCSA", "SE", "AttentionSpec", "CoordAttention",
           "RecordsGate", "attention_spec", "check_position", "create_attention", "default_position",
           "list_attentions", "register_attention", "spec_for"]
