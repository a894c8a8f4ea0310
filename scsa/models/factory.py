"""``create_model``: a backbone with a plug-in attention module at a chosen position."""
from functools import partial
from typing import Any, Mapping, Optional

import torch.nn as nn

from scsa.attention import create_attention, default_position
from scsa.models.mobilenetv2 import build_mobilenetv2
from scsa.models.resnet import RESNET_LAYOUTS, build_resnet

MODELS = (*RESNET_LAYOUTS, "mobilenetv2")


def create_model(name: str, attention: str = "none", num_classes: int = 1000,
                 position: Optional[str] = None, drop_rate: Optional[float] = None, in_chans: int = 3,
                 **attention_kwargs) -> nn.Module:
    """Build backbone ``name`` with ``attention`` in every block.

    ``position`` is ``mid`` or ``end`` (see ``scsa.attention``), by default the module's own
    (``scsa.attention.default_position``); ``attention_kwargs`` go to its constructor.
    ``in_chans``: input image channels (timm's name; 3 for RGB).
    """
    if name not in MODELS:
        raise ValueError(f"unknown model '{name}': choose one of {', '.join(MODELS)}")
    attn_layer = None if attention == "none" else partial(create_attention, attention, **attention_kwargs)
    position = position or default_position(attention)
    extra = {"in_chans": in_chans, **({} if drop_rate is None else {"drop_rate": drop_rate})}
    if name == "mobilenetv2":
        return build_mobilenetv2(attn_layer, position, num_classes, **extra)
    return build_resnet(name, attn_layer, position, num_classes, **extra)


def create_model_from_config(model: Mapping[str, Any], attention: Mapping[str, Any], num_classes: int,
                             kernel: Optional[str] = None) -> nn.Module:
    """``create_model`` from the ``model`` and ``attention`` config groups (a run's, or a checkpoint's).

    ``kernel`` replaces the attention kernel the config names: where a trained model runs now is
    the caller's choice, not the run's.
    """
    kwargs = {**attention["kwargs"], **({"kernel": kernel} if kernel else {})}
    return create_model(model["name"], attention["name"], num_classes=num_classes, position=attention["position"],
                        drop_rate=model["drop_rate"], **kwargs)
