"""Every backbone x attention in timm's registry, as ``<backbone>_<attention>`` (``resnet50_scsa``).

Importing ``scsa`` registers them: every pair of a registered backbone (``scsa.models.backbone``) and a
registered attention (``scsa.attention.registry``), including pairs registered later. They are built
through timm's ``build_model_with_cfg``, so ``features_only``/``out_indices``, ``pretrained`` with
``pretrained_cfg_overlay=dict(file=...)`` and ``timm.create_model("local-dir:<export folder>")`` work as for
timm's own models. Keyword arguments are ``scsa.create_model``'s: timm's ``num_classes``, ``in_chans``,
``drop_rate``, ``drop_path_rate``, ``output_stride``, ``global_pool``, then ``position`` and the attention
module's own (``head_num=2``), with the same defaults (``mobilenetv2_ema``: ``factor=16``, the backbone
spec's). The plain backbones stay timm's own.
"""
from functools import partial
from typing import Any, Callable, Dict, List, Tuple

import timm.models
import torch.nn as nn
from safetensors import safe_open
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from scsa.attention.registry import AttentionSpec, list_attentions, subscribe
from scsa.models.backbone import BackboneSpec, backbone_spec, list_backbones, subscribe_backbones
from scsa.models.factory import create_model

__all__ = ["ATTENTIONS", "MODEL_NAMES", "model_names", "timm_name"]

_REGISTERED: List[str] = []
default_cfgs: Dict[str, Any] = {}  # timm's register_model reads each name's cfg here


def timm_name(backbone: str, attention: str) -> str:
    return f"{backbone}_{attention}"


def model_names() -> List[str]:
    """Every ``<backbone>_<attention>`` this package registered with timm."""
    return list(_REGISTERED)


def _cfg(backbone: BackboneSpec) -> Dict[str, Any]:
    """No hosted weights: ImageNet preprocessing at 224 px, as this project trains and evaluates."""
    return dict(url="", num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.875,
                interpolation="bilinear", mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
                first_conv=backbone.first_conv, classifier=backbone.classifier)


def _file_classes(overlay: Dict[str, Any], classifier: str) -> Dict[str, Any]:
    """The class count of a ``.safetensors`` weights file named in ``pretrained_cfg_overlay``.

    timm drops the classifier when the model's class count differs from the pretrained cfg's,
    which would be 1000 here: knowing the file's own count keeps an exported head.
    """
    file = str(overlay.get("file") or "")
    if not file.endswith(".safetensors") or "num_classes" in overlay:
        return overlay
    with safe_open(file, framework="pt") as f:
        if f"{classifier}.weight" not in f.keys():
            return overlay
        return {**overlay, "num_classes": f.get_slice(f"{classifier}.weight").get_shape()[0]}


def _entrypoint(backbone: str, attention: str) -> Callable[..., Any]:
    name = timm_name(backbone, attention)

    def entrypoint(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        spec = backbone_spec(backbone)
        if pretrained and kwargs.get("pretrained_cfg_overlay"):
            kwargs["pretrained_cfg_overlay"] = _file_classes(kwargs["pretrained_cfg_overlay"], spec.classifier)
        return build_model_with_cfg(partial(create_model, backbone, attention), name, pretrained,
                                    feature_cfg=dict(spec.feature_cfg) or None, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"scsa.create_model({backbone!r}, {attention!r}, **kwargs), through timm's builder."
    return entrypoint


def _register(backbone: BackboneSpec, attention: str) -> None:
    name = timm_name(backbone.name, attention)
    if name in _REGISTERED:
        return
    if timm.models.is_model(name):
        raise RuntimeError(f"timm already has a model named '{name}': registering this project's would replace "
                           f"it; pin the timm version in requirements.txt, or rename the backbone or attention")
    default_cfgs.update(generate_default_cfgs({name: _cfg(backbone)}))
    globals()[name] = register_model(_entrypoint(backbone.name, attention))
    _REGISTERED.append(name)


def _on_backbone(backbone: BackboneSpec) -> None:
    for attention in list_attentions():
        if attention != "none":  # without attention, the backbone is timm's own
            _register(backbone, attention)


def _on_attention(attention: AttentionSpec) -> None:
    if attention.name != "none":
        for backbone in list_backbones():
            _register(backbone_spec(backbone), attention.name)


subscribe_backbones(_on_backbone)
subscribe(_on_attention)


def __getattr__(name: str) -> Tuple[str, ...]:
    """The names before ``model_names()``: ``MODEL_NAMES`` and ``ATTENTIONS`` (the attentions with timm names)."""
    if name == "MODEL_NAMES":
        return tuple(model_names())
    if name == "ATTENTIONS":
        return tuple(a for a in list_attentions() if a != "none")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
