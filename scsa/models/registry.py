"""Every backbone x attention in timm's registry, as ``<backbone>_<attention>`` (``resnet50_scsa``).

Importing ``scsa`` registers them. They are built through timm's ``build_model_with_cfg``, so
``features_only``/``out_indices``, ``pretrained`` with ``pretrained_cfg_overlay=dict(file=...)``
and ``timm.create_model("local-dir:<export folder>")`` work as for timm's own models. Keyword
arguments are ``scsa.create_model``'s: ``num_classes``, ``position``, ``drop_rate``, ``in_chans``,
and the attention module's own (``head_num=2``), with the same defaults (``mobilenetv2_ema``:
``factor=16``, see ``MODEL_DEFAULTS``). The plain backbones stay timm's own.
"""
from functools import partial
from typing import Any, Callable, Dict, Tuple

import timm.models
import torch.nn as nn
from safetensors import safe_open
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from scsa.attention import list_attentions
from scsa.models.factory import MODELS, create_model

__all__ = ["ATTENTIONS", "MODEL_NAMES", "timm_name"]

ATTENTIONS = tuple(a for a in list_attentions() if a != "none")
FIRST_CONV = {"mobilenetv2": "features.0.conv"}  # the ResNets': conv1
CLASSIFIER = "fc"
# Defaults a model needs to build at all: EMA's factor=32 does not divide MobileNetV2's 144-channel blocks.
MODEL_DEFAULTS = {("mobilenetv2", "ema"): dict(factor=16)}


def timm_name(backbone: str, attention: str) -> str:
    return f"{backbone}_{attention}"


MODEL_NAMES: Tuple[str, ...] = tuple(timm_name(b, a) for b in MODELS for a in ATTENTIONS)


def _cfg(backbone: str) -> Dict[str, Any]:
    """No hosted weights: ImageNet preprocessing at 224 px, as this project trains and evaluates."""
    return dict(url="", num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.875,
                interpolation="bilinear", mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
                first_conv=FIRST_CONV.get(backbone, "conv1"), classifier=CLASSIFIER)


default_cfgs = generate_default_cfgs({timm_name(b, a): _cfg(b) for b in MODELS for a in ATTENTIONS})


def _file_classes(overlay: Dict[str, Any]) -> Dict[str, Any]:
    """The class count of a ``.safetensors`` weights file named in ``pretrained_cfg_overlay``.

    timm drops the classifier when the model's class count differs from the pretrained cfg's,
    which would be 1000 here: knowing the file's own count keeps an exported head.
    """
    file = str(overlay.get("file") or "")
    if not file.endswith(".safetensors") or "num_classes" in overlay:
        return overlay
    with safe_open(file, framework="pt") as f:
        if f"{CLASSIFIER}.weight" not in f.keys():
            return overlay
        return {**overlay, "num_classes": f.get_slice(f"{CLASSIFIER}.weight").get_shape()[0]}


def _build(backbone: str, attention: str, global_pool: str = "avg", **kwargs) -> nn.Module:
    """``create_model``, taking the ``global_pool`` timm records in an export's ``model_args``."""
    if global_pool != "avg":
        raise ValueError(f"{timm_name(backbone, attention)} pools by average only: drop global_pool={global_pool!r}")
    return create_model(backbone, attention, **kwargs)


def _entrypoint(backbone: str, attention: str) -> Callable[..., Any]:
    name = timm_name(backbone, attention)

    def entrypoint(pretrained: bool = False, **kwargs):
        kwargs = {**MODEL_DEFAULTS.get((backbone, attention), {}), **kwargs}
        if pretrained and kwargs.get("pretrained_cfg_overlay"):
            kwargs["pretrained_cfg_overlay"] = _file_classes(kwargs["pretrained_cfg_overlay"])
        # MobileNetV2's stages are children of one nn.Sequential (`features`): timm flattens it
        feature_cfg = dict(flatten_sequential=True) if backbone == "mobilenetv2" else None
        return build_model_with_cfg(partial(_build, backbone, attention), name, pretrained,
                                    feature_cfg=feature_cfg, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"scsa.create_model({backbone!r}, {attention!r}, **kwargs), through timm's builder."
    return entrypoint


def _register(backbone: str, attention: str) -> None:
    name = timm_name(backbone, attention)
    if timm.models.is_model(name) and timm.models.model_entrypoint(name).__module__ != __name__:
        raise RuntimeError(f"timm already has a model named '{name}': registering this project's would replace "
                           f"it; pin the timm version in requirements.txt")
    globals()[name] = register_model(_entrypoint(backbone, attention))


for _backbone in MODELS:
    for _attention in ATTENTIONS:
        _register(_backbone, _attention)
