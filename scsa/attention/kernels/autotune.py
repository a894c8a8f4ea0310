"""``kernel="auto"``: the path a module runs, chosen by running both on the device, once per case.

The first time a module meets a case (module type, input shape, dtype and autocast dtype, memory
layout, device), both paths run forward and backward on a copy of its input: the Triton path must
agree with the eager one (output and input gradient, relative error within the dtype's tolerance),
then both are timed and the faster is kept. A Triton path that raises (compile or runtime error)
or disagrees leaves the case on the eager path, with one warning. The module's buffers (CA's
BatchNorm statistics) and the RNG are left as they were, and no ``.grad`` is touched.

Cases are keyed by module type, not options: a model's modules of one type share their options.
A module not training (validation) reuses a decision made at another batch size of its case.

Under DDP every rank must run the same path: ``scsa.training.distributed`` installs an agreement
hook (``set_agreement``) that makes rank 0's choice everyone's. Under ``torch.compile`` the choice
is a constant of the traced graph: decide first, on an eager call (``decide_kernels``); a case
traced undecided runs the eager path.
"""
import dataclasses
import statistics
import time
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

__all__ = ["PATHS", "choose", "decide_kernels", "format_decisions", "kernel_decisions", "set_agreement"]

PATHS = ("triton", "torch")
ROUNDS = 3  # timed forward + backward runs of each path, interleaved; the median counts
CLEAR_LOSS = 3.0  # after one round, a path this many times slower than the other is not timed again
# Relative error (norm of the difference over the norm) allowed between the paths: the kernel tests'.
# TF32 products keep fp16's 10-bit mantissa, so fp32 under TF32 is held to fp16's tolerance.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
TF32_TOLERANCE = TOLERANCE[torch.float16]

# Called on every rank with (local choice, whether Triton ran and agreed here); returns the path all run.
Agreement = Callable[[str, bool], str]
_agreement: Optional[Agreement] = None


@dataclasses.dataclass(frozen=True)
class Decision:
    module: str                   # the module's class name
    shape: Tuple[int, ...]        # the input's (B, C, H, W)
    dtype: str                    # the input's dtype
    autocast: Optional[str]       # autocast's dtype, if on
    layout: str                   # contiguous | channels_last | strided
    device: str                   # the device's name
    chosen: str                   # triton | torch: the path every call of this case runs
    ms: Dict[str, float]          # median ms per forward + backward, by path (timed paths only)
    max_abs_diff: Optional[float]  # the largest |triton - torch| over the output and input gradient
    rel_err: Optional[float]       # the larger relative error of the two
    reason: Optional[str]         # why Triton is not chosen where it ran badly or was overruled
    decide_ms: float              # wall time the decision took


Key = Tuple[str, Tuple[int, ...], torch.dtype, Optional[torch.dtype], str, torch.device]
_DECISIONS: Dict[Key, Decision] = {}


def set_agreement(agreement: Optional[Agreement]) -> None:
    """Install (or with None, remove) the hook that makes all processes run one path per case."""
    global _agreement
    _agreement = agreement


def kernel_decisions() -> List[Dict]:
    """Every decision this process made, in order, as plain dicts (what ``kernels.json`` holds)."""
    return [dataclasses.asdict(d) for d in _DECISIONS.values()]


def _layout(x: torch.Tensor) -> str:
    if x.is_contiguous():
        return "contiguous"
    return "channels_last" if x.is_contiguous(memory_format=torch.channels_last) else "strided"


def _amp_dtype(device_type: str) -> Optional[torch.dtype]:
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def _key(module: nn.Module, x: torch.Tensor) -> Key:
    return (type(module).__name__, tuple(x.shape), x.dtype, _amp_dtype(x.device.type), _layout(x), x.device)


def _sibling(key: Key) -> Optional[Decision]:
    """The decision for ``key``'s case at another batch size (the largest), if any."""
    same = [(k[1][0], d) for k, d in _DECISIONS.items()
            if k[0] == key[0] and k[1][1:] == key[1][1:] and k[2:] == key[2:]]
    return max(same, key=lambda t: t[0])[1] if same else None


def choose(module: nn.Module, x: torch.Tensor) -> str:
    """The path (``triton`` or ``torch``) ``module`` with ``kernel="auto"`` runs on ``x``: decided on first
    meeting its case, cached for the process."""
    if torch.compiler.is_compiling():  # the decided paths are constants; shapes are compared (guarded if dynamic)
        for c, h, w, path in _traced_cases(type(module).__name__, x.dtype, _amp_dtype(x.device.type), _layout(x),
                                           x.device):
            if x.shape[1] == c and x.shape[2] == h and x.shape[3] == w:
                return path
        return _traced_undecided(type(module).__name__)
    key = _key(module, x)
    decision = _DECISIONS.get(key)
    if decision is None and not (module.training and torch.is_grad_enabled()):
        decision = _sibling(key)
    if decision is not None:
        return decision.chosen
    if is_in_torch_dispatch_mode():  # a mode counting ops (FLOPs, launches) would count both candidates
        return "torch"
    decision = _DECISIONS[key] = _decide(module, x, key)
    return decision.chosen


@torch.compiler.assume_constant_result
def _traced_cases(name: str, dtype: torch.dtype, amp: Optional[torch.dtype], layout: str, device: torch.device
                  ) -> Tuple[Tuple[int, int, int, str], ...]:
    """(C, H, W, path) of each decided case of a module type while ``torch.compile`` traces: constants in the
    graph (dynamo passes scalars, not shapes, to such functions). A case decided at several batch sizes
    gives the largest's path."""
    cases = {(k[1][1:], k[2:]): d.chosen for k, d in sorted(_DECISIONS.items(), key=lambda kd: kd[0][1][0])
             if k[0] == name}
    return tuple((*chw, path) for (chw, rest), path in cases.items() if rest == (dtype, amp, layout, device))


@torch.compiler.assume_constant_result
def _traced_undecided(name: str) -> str:
    warnings.warn(f"kernel=auto: {name} was traced by torch.compile at a shape it had not decided: it runs the "
                  "eager path (call scsa.decide_kernels(model, x) before compiling)", RuntimeWarning)
    return "torch"


def _forward_backward(module: nn.Module, x: torch.Tensor, grad: torch.Tensor, path: str
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``module``'s output and input gradient on ``path``; parameter gradients are computed, not stored."""
    module.kernel = path
    out = module.forward(x)  # forward, not __call__: the module's hooks see only real calls
    params = [p for p in module.parameters() if p.requires_grad]
    dx = torch.autograd.grad(out, [x, *params], grad.to(out.dtype), allow_unused=True)[0]
    return out.detach(), dx


def _time_path(module: nn.Module, x: torch.Tensor, grad: torch.Tensor, path: str) -> float:
    """Milliseconds of one forward + backward on ``path`` (CUDA events on a GPU)."""
    if x.is_cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        _forward_backward(module, x, grad, path)
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    start = time.perf_counter()
    _forward_backward(module, x, grad, path)
    return (time.perf_counter() - start) * 1000


def _tolerance(x: torch.Tensor, amp: Optional[torch.dtype]) -> float:
    dtype = amp if amp is not None and x.dtype == torch.float32 else x.dtype
    tf32 = torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32
    if dtype == torch.float32 and x.is_cuda and tf32:
        return TF32_TOLERANCE
    return TOLERANCE.get(dtype, TOLERANCE[torch.float16])


def _compare(got: Tuple[torch.Tensor, ...], ref: Tuple[torch.Tensor, ...]) -> Tuple[float, float]:
    """(largest |difference|, largest relative error) over pairs of tensors."""
    diffs = [(a.double() - b.double()) for a, b in zip(got, ref)]
    rel = max((d.norm() / b.double().norm().clamp_min(1e-30)).item() for d, b in zip(diffs, ref))
    return max(d.abs().max().item() for d in diffs), rel


def _check(module: nn.Module, x: torch.Tensor, grad: torch.Tensor, tol: float
           ) -> Tuple[Optional[str], Optional[float], Optional[float]]:
    """Run both paths once (warming them up): (why Triton is unfit or None, max |diff|, relative error).

    Options that draw random numbers (SCSA's attention dropout) are off for this run: the two paths
    draw different masks.
    """
    random = {name: getattr(module, name) for name in getattr(module, "random_options", ())}
    try:
        for name in random:
            setattr(module, name, 0.0)
        ref = _forward_backward(module, x, grad, "torch")
        try:
            got = _forward_backward(module, x, grad, "triton")
        except Exception as e:  # a compile or launch error of any kind: the run goes on, eagerly
            first_line = (str(e).strip().splitlines() or [""])[0][:200]
            return f"Triton failed: {type(e).__name__}: {first_line}", None, None
    finally:
        for name, value in random.items():
            setattr(module, name, value)
    if got[0].shape != ref[0].shape or got[1].shape != ref[1].shape:
        return f"Triton disagrees: output shape {tuple(got[0].shape)} != {tuple(ref[0].shape)}", None, None
    max_diff, rel = _compare(got, ref)
    if not rel <= tol:  # NaN fails too
        return f"Triton disagrees: relative error {rel:.2e} > {tol:.0e}", max_diff, rel
    return None, max_diff, rel


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"{device.type} (Triton interpreter)"


def _keep(t: torch.Tensor) -> torch.Tensor:
    return t


def _decide(module: nn.Module, x: torch.Tensor, key: Key) -> Decision:
    start = time.perf_counter()
    kernel, buffers = module.kernel, [b.clone() for b in module.buffers()]
    devices = [x.device] if x.is_cuda else []
    try:
        # saved_tensors_hooks: the candidates' autograd saves its own tensors, not through the hooks of a
        # non-reentrant activation checkpoint around this call (which count what the forward saves)
        with torch.random.fork_rng(devices, device_type=x.device.type), torch.inference_mode(False), \
                torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_keep, _keep):
            xi = x.detach().clone().requires_grad_()
            grad = torch.randn_like(xi)
            reason, max_diff, rel = _check(module, xi, grad, _tolerance(x, key[3]))
            times: Dict[str, List[float]] = {p: [] for p in PATHS if reason is None or p == "torch"}
            for round_ in range(ROUNDS if reason is None else 0):
                for path in times:
                    times[path].append(_time_path(module, xi, grad, path))
                firsts = [t[0] for t in times.values()]
                if round_ == 0 and max(firsts) >= CLEAR_LOSS * min(firsts):
                    break
    finally:
        module.kernel = kernel
        with torch.no_grad():
            for b, saved in zip(module.buffers(), buffers):
                b.copy_(saved)
    ms = {path: statistics.median(t) for path, t in times.items() if t}
    local = min(ms, key=ms.get) if reason is None else "torch"
    chosen = _agreement(local, reason is None) if _agreement is not None else local
    name, shape, dtype, amp, layout, device = key
    if reason is not None:
        warnings.warn(f"kernel=auto: {name} at {'x'.join(map(str, shape))} ({str(dtype).removeprefix('torch.')}, "
                      f"{layout}) runs the eager path: {reason}", RuntimeWarning)
    elif chosen != local:
        reason = f"the ranks agreed on {chosen}"  # rank 0 measured otherwise, or Triton failed on another
    return Decision(name, shape, str(dtype).removeprefix("torch."), None if amp is None else str(amp).removeprefix(
        "torch."), layout, _device_name(device), chosen, ms, max_diff, rel, reason,
        (time.perf_counter() - start) * 1000)


@torch.no_grad()
def decide_kernels(model: nn.Module, x: torch.Tensor) -> List[Dict]:
    """Run ``model`` once on ``x`` so that each of its ``kernel="auto"`` modules decides its path now, on an
    eager call: before ``torch.compile`` traces it (call under the autocast the model will run in).
    The model's buffers and the RNG are left as they were. Returns ``kernel_decisions()``."""
    buffers = [b.clone() for b in model.buffers()]
    devices = [x.device] if x.is_cuda else []
    with torch.random.fork_rng(devices, device_type=x.device.type):
        try:
            model(x)
        finally:
            for b, saved in zip(model.buffers(), buffers):
                b.copy_(saved)
    return kernel_decisions()


def format_decisions(decisions: List[Dict]) -> str:
    """The decisions as a Markdown table: module, stage shape, chosen path, ms per path, difference."""
    lines = ["| module | shape | dtype | layout | chosen | triton ms | torch ms | max abs diff | rel err | note |",
             "|---|---|---|---|---|---:|---:|---:|---:|---|"]

    def num(value: Optional[float], spec: str) -> str:
        return "-" if value is None else format(value, spec)

    for d in decisions:
        dtype = d["dtype"] if d["autocast"] is None else f"{d['dtype']} (autocast {d['autocast']})"
        lines.append(f"| {d['module']} | {'x'.join(map(str, d['shape']))} | {dtype} | {d['layout']} | {d['chosen']} | "
                     f"{num(d['ms'].get('triton'), '.3f')} | {num(d['ms'].get('torch'), '.3f')} | "
                     f"{num(d['max_abs_diff'], '.2e')} | {num(d['rel_err'], '.2e')} | {d['reason'] or ''} |")
    return "\n".join(lines)
