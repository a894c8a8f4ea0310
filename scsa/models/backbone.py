"""The backbone registry: one ``BackboneSpec`` per backbone, registered in the backbone's own file.

Everything the rest of the code knows about a backbone is here: ``scsa.create_model`` builds it,
``scsa.models.registry`` registers ``<backbone>_<attention>`` with timm (first conv, classifier,
feature extraction), ``scsa.export`` names its plain timm twin, the attention maps start from its
last stage, and the tests parametrise over ``list_backbones()``.
"""
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping

import torch.nn as nn

__all__ = ["AttnFactory", "BackboneSpec", "backbone_spec", "list_backbones", "register_backbone",
           "subscribe_backbones"]

AttnFactory = Callable[[int], nn.Module]  # channels -> the attention module for a map of that width


@dataclass(frozen=True)
class BackboneSpec:
    """``build(attn_layer, attn_position, **timm_args)`` returns the model with ``attn_layer(channels)`` in
    every block (None: no attention). ``timm_args`` are timm's model arguments, with timm's meaning:
    ``num_classes``, ``in_chans``, ``drop_rate``, ``drop_path_rate``, ``output_stride``, ``global_pool``.
    """

    name: str
    build: Callable[..., nn.Module]
    timm_plain: str                  # timm's name for the same network without attention (export, tests)
    first_conv: str = "conv1"        # module paths, as timm's pretrained_cfg names them
    classifier: str = "fc"
    last_stage: str = "layer4"       # where Grad-CAM looks unless told otherwise
    feature_cfg: Mapping[str, Any] = field(default_factory=dict)  # timm's feature extraction settings
    plain_renamed: bool = False      # timm's plain model names the same tensors, in the same order, differently
    # attention name -> keyword defaults this backbone needs (an explicit keyword still wins)
    attention_defaults: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


_REGISTRY: Dict[str, BackboneSpec] = {}
_LISTENERS: List[Callable[[BackboneSpec], None]] = []


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    """Make ``spec.name`` a backbone of ``scsa.create_model``, of ``model=`` and of timm's registry."""
    _REGISTRY[spec.name] = spec
    for listener in _LISTENERS:
        listener(spec)
    return spec


def subscribe_backbones(listener: Callable[[BackboneSpec], None]) -> None:
    """Call ``listener`` with every spec registered so far and with each one registered later."""
    _LISTENERS.append(listener)
    for spec in list(_REGISTRY.values()):
        listener(spec)


def list_backbones() -> List[str]:
    return list(_REGISTRY)


def backbone_spec(name: str) -> BackboneSpec:
    if name not in _REGISTRY:
        raise ValueError(f"unknown model '{name}': choose one of {', '.join(list_backbones())}")
    return _REGISTRY[name]

