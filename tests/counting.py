"""Launches and activation passes of one forward + backward, as issue #13 defines them.

``count(module, x)`` runs ``module(x).backward(g)`` once and counts:

* **launches**: aten ops dispatched (each is at least one GPU kernel), leaving out views,
  reshapes and empty allocations, plus Triton kernel launches. A custom op is not an aten op:
  what its implementation dispatches and launches is counted instead, so an op that wraps a
  Triton kernel counts once, as that launch.
* **activation passes**: bytes through tensors at least as large as the activation (by
  element count, so a bool mask of the activation's shape counts a quarter of an fp32
  pass), each such tensor counted once per op or launch that reads or writes it, divided by
  the activation's size in bytes. A broadcast (expanded) tensor counts at its logical size.

Aten ops are seen by a ``TorchDispatchMode``; Triton launches by wrapping the ``run`` method
of Triton's kernel classes, which every ``kernel[grid](...)`` call goes through, compiled
(``JITFunction``) or interpreted (``InterpretedFunction``, under ``TRITON_INTERPRET=1``).
Autotuning launches would count too: pass ``warmup=True`` to count a second call.
"""
import collections
import contextlib
from typing import Any, Dict, Iterator, List, NamedTuple, Optional

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["Counts", "count"]

# Allocations that launch nothing (the memory is not written).
_EMPTY = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "empty_permuted"}
# Views that return a fresh tensor object without an alias annotation in their schema.
_VIEWS = {"_unsafe_view", "_reshape_alias", "lift_fresh"}


class Counts(NamedTuple):
    launches: int
    passes: float
    ops: Dict[str, int]  # launches by op or kernel name, to see where they go


def _free(func: torch._ops.OpOverload) -> bool:
    """Whether an aten op launches no kernel: a view (returns an alias it does not write), a
    reshape or an empty allocation."""
    name = func._schema.name.split("::")[-1]
    if name in _EMPTY or name in _VIEWS:
        return True
    returns = func._schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


class _Tally:
    def __init__(self, x: torch.Tensor):
        self.numel = x.numel()
        self.bytes = x.numel() * x.element_size()
        self.launches = 0
        self.passes = 0.0
        self.ops: Dict[str, int] = collections.Counter()
        self.launching = False  # inside a Triton launch: the interpreter's own tensor copies are not ops

    def add(self, name: str, tensors: List[Any]) -> None:
        self.launches += 1
        self.ops[name] += 1
        seen = set()
        for t in tensors:
            if not isinstance(t, torch.Tensor) or t.numel() < self.numel:
                continue
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
            if key not in seen:
                seen.add(key)
                self.passes += t.numel() * t.element_size() / self.bytes


class _AtenCounter(TorchDispatchMode):
    def __init__(self, tally: _Tally):
        super().__init__()
        self.tally = tally

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if isinstance(func, torch._ops.OpOverload) and func.namespace != "aten":
            opdef = _custom_op_def(func)
            if opdef is not None:  # count what the implementation dispatches and launches, not the op
                with self:
                    return opdef._init_fn(*args, **kwargs)
        out = func(*args, **kwargs)
        if (isinstance(func, torch._ops.OpOverload) and func.namespace == "aten" and not _free(func)
                and not self.tally.launching):
            self.tally.add(str(func.overloadpacket.__name__), tree_flatten((args, kwargs, out))[0])
        return out


def _custom_op_def(func: torch._ops.OpOverload):
    """The Python definition of a ``torch.library.custom_op`` / ``triton_op``, if ``func`` is one."""
    try:
        from torch._library.custom_ops import _maybe_get_opdef
    except ImportError:
        return None
    return _maybe_get_opdef(func)


def _triton_kernel_classes() -> list:
    classes = []
    with contextlib.suppress(ImportError):
        from triton.runtime.jit import JITFunction
        classes.append(JITFunction)
    with contextlib.suppress(ImportError):
        from triton.runtime.interpreter import InterpretedFunction
        classes.append(InterpretedFunction)
    return classes


@contextlib.contextmanager
def _triton_hook(tally: _Tally) -> Iterator[None]:
    """Count every Triton launch (``kernel[grid](...)`` calls ``run``); warm-up compiles are not launches."""
    saved = [(cls, cls.__dict__["run"]) for cls in _triton_kernel_classes() if "run" in cls.__dict__]

    def wrap(run):
        def counted_run(self, *args, **kwargs):
            if kwargs.get("warmup", False) or tally.launching:
                return run(self, *args, **kwargs)
            tally.add(getattr(self, "__name__", type(self).__name__), [*args, *kwargs.values()])
            tally.launching = True
            try:
                return run(self, *args, **kwargs)
            finally:
                tally.launching = False
        return counted_run

    try:
        for cls, run in saved:
            cls.run = wrap(run)
        yield
    finally:
        for cls, run in saved:
            cls.run = run


def count(module: nn.Module, x: torch.Tensor, grad: Optional[torch.Tensor] = None,
          warmup: bool = False) -> Counts:
    """Launches and activation passes of ``module(x).backward(grad)``, with x a leaf needing grad.

    ``grad`` defaults to a random tensor shaped and laid out like ``x`` (made before counting).
    Parameter gradients start unset, as in a training step after ``zero_grad(set_to_none=True)``.
    """
    x = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
    if grad is None:
        grad = torch.randn_like(x)
    if warmup:
        module(x).backward(grad)
    module.zero_grad(set_to_none=True)
    x.grad = None
    tally = _Tally(x)
    with _triton_hook(tally), _AtenCounter(tally):
        module(x).backward(grad)
    return Counts(tally.launches, round(tally.passes, 4), dict(tally.ops))
