"""torch.hub entry points: one per model in scsa's timm registry (``<backbone>_<attention>``).

``torch.hub.load("<owner>/<repo>", "resnet50_scsa", num_classes=10)``, or with a checkout
``torch.hub.load("<dir>", "resnet50_scsa", source="local")``. Keyword arguments are
``timm.create_model``'s: ``num_classes``, ``features_only``, the attention module's own
(``head_num=2``), and for trained weights ``pretrained=True,
pretrained_cfg_overlay=dict(file="<export folder>/model.safetensors")`` (``evaluate.py export=safetensors``).
"""
import typing as _typing  # names without an underscore are entry points (torch.hub.list)

import timm as _timm
import torch.nn as _nn

from scsa.models.registry import MODEL_NAMES as _MODEL_NAMES

dependencies = ["torch", "timm", "safetensors", "numpy"]  # pyproject.toml's, checked by torch.hub before loading


def _entry(name: str) -> _typing.Callable[..., _nn.Module]:
    def entry(pretrained: bool = False, **kwargs: _typing.Any) -> _nn.Module:
        return _timm.create_model(name, pretrained=pretrained, **kwargs)

    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = f"timm.create_model({name!r}, pretrained=pretrained, **kwargs) with scsa's models registered."
    return entry


for _name in _MODEL_NAMES:
    globals()[_name] = _entry(_name)
