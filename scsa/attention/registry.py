"""The attention registry: one ``AttentionSpec`` per module, registered next to its class.

A spec says everything the rest of the code needs to know about a module:

- ``cls``: built as ``cls(channels, **kwargs)`` for a feature map with ``channels`` channels; it
  returns a map of the same shape.
- ``position``: where it goes in a block unless told otherwise (``POSITIONS``):
  ``mid`` after the block's spatial conv-bn-act (conv2 of a bottleneck, conv1 of a basic block,
  the depthwise conv of an inverted residual); ``end`` after the last BN of the residual branch,
  before the add.
- ``takes_kernel``: whether ``cls`` accepts ``kernel`` (``KERNEL_KWARG``), the choice of code path:
  ``auto`` (fused Triton kernels on CUDA tensors, the eager PyTorch path otherwise), ``triton`` or
  ``torch``. A module without it has one path, the eager one: ``auto`` and ``torch`` are then
  dropped, not passed, and ``triton`` is an error (a silent substitute would mislead).
- ``spatial_gate``: whether the module keeps the spatial gate its forward multiplies in when asked
  (``scsa.attention.gate.RecordsGate``): what the attention maps of ``evaluate.py cam=`` show.

A user's class needs no registration: ``spec_for(MyAttention)`` describes any class from its
signature (``kernel`` or not; no spatial gate unless it is a ``RecordsGate``).
"""
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Union

import torch.nn as nn

from scsa.attention.gate import RecordsGate

__all__ = ["KERNEL_KWARG", "POSITIONS", "AttentionSpec", "NoAttention", "attention_spec", "check_position",
           "create_attention", "default_position", "keyword_names", "list_attentions", "register_attention", "spec_for",
           "subscribe"]

POSITIONS = ("mid", "end")
KERNEL_KWARG = "kernel"  # the one runtime argument: which code path runs, not part of the architecture
ONE_PATH_KERNELS = ("auto", "torch")  # what a module without kernels runs anyway


def check_position(position: str) -> str:
    """``position`` if it is ``mid`` or ``end``, else a ValueError naming the choices."""
    if position not in POSITIONS:
        raise ValueError(f"unknown attention position {position!r}: use 'mid' or 'end'")
    return position


def _accepts(cls: Callable[..., Any], name: str) -> bool:
    params = inspect.signature(cls).parameters.values()
    return any(p.name == name or p.kind is p.VAR_KEYWORD for p in params)


def keyword_names(cls: Callable[..., Any]) -> Optional[List[str]]:
    """The keyword arguments ``cls`` takes after ``channels``; None when it takes any (``**kwargs``)."""
    params = list(inspect.signature(cls).parameters.values())[1:]
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


@dataclass(frozen=True)
class AttentionSpec:
    name: str
    cls: Callable[..., nn.Module]
    position: Optional[str]  # None: a user's class, placed where the caller says
    takes_kernel: bool
    spatial_gate: bool

    def build(self, channels: int, **kwargs: Any) -> nn.Module:
        """``cls(channels, **kwargs)``, with ``kernel`` passed only where the class takes it."""
        kernel = kwargs.pop(KERNEL_KWARG, None)
        if kernel is not None:
            if self.takes_kernel:
                kwargs[KERNEL_KWARG] = kernel
            elif kernel not in ONE_PATH_KERNELS:
                raise ValueError(f"attention {self.name!r} has no Triton kernels, only its own forward: "
                                 f"use kernel='auto' (or 'torch'), or drop it")
        return self.cls(channels, **kwargs)

    def check_kwargs(self, kwargs: Mapping[str, Any], owner: str) -> None:
        """A TypeError naming ``owner`` for keywords neither ``cls`` nor the registry takes."""
        names = keyword_names(self.cls)
        if names is None:
            return
        unknown = [k for k in kwargs if k not in names and k != KERNEL_KWARG]
        if unknown:
            raise TypeError(f"{owner} got an unexpected keyword argument {unknown[0]!r}: it takes timm's model "
                            f"arguments and {self.name}'s ({', '.join(names) or 'none'})")


_REGISTRY: Dict[str, AttentionSpec] = {}
_LISTENERS: List[Callable[[AttentionSpec], None]] = []


def register_attention(name: str, cls: Callable[..., nn.Module], position: str = "end", *,
                       takes_kernel: Optional[bool] = None, spatial_gate: Optional[bool] = None) -> AttentionSpec:
    """Make ``name`` buildable by ``create_attention`` and every backbone (``<backbone>_<name>`` in timm),
    placed at ``position`` by default. ``takes_kernel``/``spatial_gate``: read from ``cls`` when not given."""
    spec = AttentionSpec(name, cls, check_position(position),
                         _accepts(cls, KERNEL_KWARG) if takes_kernel is None else takes_kernel,
                         _records_gate(cls) if spatial_gate is None else spatial_gate)
    _REGISTRY[name] = spec
    for listener in _LISTENERS:
        listener(spec)
    return spec


def _records_gate(cls: Callable[..., nn.Module]) -> bool:
    return isinstance(cls, type) and issubclass(cls, RecordsGate)


def subscribe(listener: Callable[[AttentionSpec], None]) -> None:
    """Call ``listener`` with every spec registered so far and with each one registered later."""
    _LISTENERS.append(listener)
    for spec in list(_REGISTRY.values()):
        listener(spec)


def list_attentions() -> List[str]:
    return sorted(_REGISTRY)


def attention_spec(name: str) -> AttentionSpec:
    if name not in _REGISTRY:
        raise ValueError(f"unknown attention '{name}': choose one of {', '.join(list_attentions())}")
    return _REGISTRY[name]


def spec_for(attention: Union[str, Callable[..., nn.Module]]) -> AttentionSpec:
    """The spec of a registered name, or of a class: its registered spec, else one read from the class."""
    if isinstance(attention, str):
        return attention_spec(attention)
    registered = next((s for s in _REGISTRY.values() if s.cls is attention), None)
    if registered is not None:
        return registered
    if not callable(attention):
        raise TypeError(f"attention must be a registered name or a class, got {attention!r}")
    return AttentionSpec(getattr(attention, "__name__", repr(attention)), attention, None,
                         _accepts(attention, KERNEL_KWARG), _records_gate(attention))


def default_position(name: str) -> str:
    """Where attention ``name`` goes in a block unless told otherwise: ``mid`` or ``end``."""
    return attention_spec(name).position


def create_attention(name: Union[str, Callable[..., nn.Module]], channels: int, **kwargs: Any) -> nn.Module:
    """Build attention module ``name`` (or a class) for a feature map with ``channels`` channels."""
    return spec_for(name).build(channels, **kwargs)


class NoAttention(nn.Identity):
    """``attention=none``: the block's attention slot passes its input through."""

    def __init__(self, channels: int):
        super().__init__()


register_attention("none", NoAttention, "end")
