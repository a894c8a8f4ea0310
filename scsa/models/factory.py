"""``create_model``: a registered backbone with a plug-in attention module at a chosen position."""
import importlib
from typing import Any, Callable, Mapping, Optional, Union

import torch
import torch.nn as nn

from scsa.attention import KERNEL_KWARG, AttentionSpec, check_position, spec_for
from scsa.models.backbone import AttnFactory, backbone_spec

__all__ = ["create_model", "create_model_from_config", "import_class", "model_name"]


def model_name(backbone: str, attention: AttentionSpec) -> str:
    """What errors call the model: timm's name for it (``resnet50_scsa``), the backbone's without attention."""
    return backbone if attention.name == "none" else f"{backbone}_{attention.name}"


def _checked(spec: AttentionSpec, kwargs: Mapping[str, Any]) -> AttnFactory:
    """``spec.build`` for each block; a class from outside this package is first run on a small map, so a
    module that changes the channel count is named at build time, not as a shape error mid-forward."""
    ours = getattr(spec.cls, "__module__", "").startswith("scsa.")

    def build(channels: int) -> nn.Module:
        module = spec.build(channels, **kwargs)
        if not ours:
            x = torch.zeros(2, channels, 4, 4)
            training = module.training
            with torch.no_grad():
                out = module.eval()(x)
            module.train(training)
            if not isinstance(out, torch.Tensor) or out.shape != x.shape:
                got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise ValueError(f"attention {spec.name} turns a {tuple(x.shape)} map into {got}: an attention "
                                 f"module must return its input's shape (channels in = channels out)")
        return module
    return build


def create_model(name: str, attention: Union[str, Callable[..., nn.Module]] = "none", num_classes: int = 1000,
                 position: Optional[str] = None, drop_rate: Optional[float] = None, in_chans: int = 3,
                 drop_path_rate: float = 0.0, output_stride: int = 32, global_pool: str = "avg",
                 **attention_kwargs: Any) -> nn.Module:
    """Build backbone ``name`` (``scsa.models.list_backbones()``) with ``attention`` in every block.

    ``attention``: a registered name (``scsa.list_attentions()``) or your own class, built as
    ``cls(channels, **attention_kwargs)``; it must return its input's shape. ``position`` is ``mid`` or
    ``end`` (see ``scsa.attention.registry``), by default the module's own; a class that is not registered
    needs one. An attention keyword left at None takes the backbone's default for that module (MobileNetV2
    + EMA: ``factor=16``), else the module's own. ``drop_rate``, ``in_chans``, ``drop_path_rate``,
    ``output_stride`` (8, 16, 32) and ``global_pool`` are timm's arguments, with timm's meaning; None for
    ``drop_rate`` keeps the backbone's default. Any other keyword must be the attention module's.
    """
    backbone = backbone_spec(name)
    spec = spec_for(attention)
    if position is None and spec.position is None:
        raise ValueError(f"attention {spec.name} is not registered, so it has no default position: "
                         f"pass position='mid' or 'end'")
    position = check_position(position or spec.position)
    kwargs = {**backbone.attention_defaults.get(spec.name, {}),
              **{k: v for k, v in attention_kwargs.items() if v is not None}}
    spec.check_kwargs(kwargs, model_name(name, spec))
    attn_layer = None if spec.name == "none" else _checked(spec, kwargs)
    timm_args = dict(num_classes=num_classes, in_chans=in_chans, drop_path_rate=drop_path_rate,
                     output_stride=output_stride, global_pool=global_pool,
                     **({} if drop_rate is None else {"drop_rate": drop_rate}))
    return backbone.build(attn_layer, position, **timm_args)


def import_class(path: str) -> Callable[..., nn.Module]:
    """The class named by a dotted path (``my_pkg.my_attn.MyAttention``), or a ValueError naming the fix."""
    module_name, _, attr = str(path).rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"cannot import attention class {path!r} ({e}): give its full dotted path "
                         f"(package.module.Class) and put its package on PYTHONPATH") from None


def create_model_from_config(model: Mapping[str, Any], attention: Mapping[str, Any], num_classes: int,
                             kernel: Optional[str] = None) -> nn.Module:
    """``create_model`` from the ``model`` and ``attention`` config groups (a run's, or a checkpoint's).

    ``attention.cls`` (``attention=custom``), when given, names the class to build in place of
    ``attention.name``. ``kernel`` replaces the attention kernel the config names: where a trained model
    runs now is the caller's choice, not the run's.
    """
    cls = attention.get("cls")
    kwargs = {**attention["kwargs"], **({KERNEL_KWARG: kernel} if kernel else {})}
    return create_model(model["name"], import_class(cls) if cls else attention["name"], num_classes=num_classes,
                        position=attention["position"], drop_rate=model["drop_rate"], **kwargs)
