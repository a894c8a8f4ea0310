"""Backbones and their registry (``scsa.models.backbone``): one spec per backbone, registered in the
backbone's own file, read by ``create_model``, timm's registry, export, the attention maps and the tests.

Every module file in this folder is imported here, so a new backbone is one file (its builder and its
``register_backbone`` line) plus one ``conf/model/<name>.yaml``.
"""
import importlib
import pkgutil
from typing import Tuple

from scsa.models.backbone import BackboneSpec, backbone_spec, list_backbones, register_backbone
from scsa.models.factory import create_model, create_model_from_config

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")  # each backbone file registers its spec; registry: timm's

__all__ = ["MODELS", "BackboneSpec", "backbone_spec", "create_model", "create_model_from_config", "list_backbones",
           "register_backbone"]


def __getattr__(name: str) -> Tuple[str, ...]:
    if name == "MODELS":  # the backbone names, as a tuple (the name before the registry)
        return tuple(list_backbones())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
