"""The Triton paths of SE, ECA, CBAM, CA and EMA (``kernel="triton"``) against their eager paths.

The eager modules are the spec's formulas (tests/test_attention.py checks them); here each
Triton path must give the same output, dx and parameter gradients as the eager module run in
float64: ``|a - ref| / |ref| <= 1e-5`` (norms over the tensor) in fp32, 1e-2 in bf16 and 2e-3 in
fp16 (inputs rounded to that dtype, reference on the rounded values).

Where the kernels run: on CUDA tensors when a GPU is present (compiled), otherwise on CPU
tensors in Triton's interpreter. ``triton.jit`` reads ``TRITON_INTERPRET`` when a kernel is
defined, so without CUDA this module imports the kernel modules with it set, and each test sets
it again while it runs (``use_triton`` checks it per call); other test modules see the
environment unchanged. The modules import their kernels on first use, so nothing else has
defined them before. Interpreted kernels are slow: tiny shapes, every test here but the
counter's calibration is marked slow. One test shrinks the interpreter's tiles to 64 elements,
so that every kernel loop runs several iterations.
"""
import copy
import importlib
import os
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from counting import count
from weights import randomize
from scsa.attention import create_attention

pytest.importorskip("triton")
ON_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_CUDA else "cpu")
FAMILIES = ("se", "eca", "cbam", "coord", "ema")
with mock.patch.dict(os.environ, {} if ON_CUDA else {"TRITON_INTERPRET": "1"}):
    KERNELS = {f: importlib.import_module(f"scsa.attention.kernels.{f}") for f in FAMILIES}
common = importlib.import_module("scsa.attention.kernels.common")
if not ON_CUDA:
    from triton.runtime.interpreter import InterpretedFunction
    if not isinstance(common._scale_add_kernel, InterpretedFunction):
        raise RuntimeError("scsa.attention.kernels was imported before TRITON_INTERPRET=1 was set: "
                           "its kernels cannot run on CPU tensors")

# (name, kwargs, channels): every option that changes a kernel's work
CONFIGS = [("se", {}, 32), ("eca", {}, 32), ("eca", {"k_size": 5}, 32), ("cbam", {}, 32),
           ("cbam", {"kernel_size": 3}, 32), ("ca", {}, 32), ("ema", {}, 64), ("ema", {}, 96)]
# (B, H, W, layout): odd sizes, H != W, maps smaller than CBAM's 7x7 and EMA's 3x3 windows, B=1
SHAPES = [(2, 5, 7, "nchw"), (1, 4, 9, "cl"), (2, 1, 6, "cl"), (2, 2, 3, "strided")]
EAGER_COUNTS = {"se": (15, 14), "eca": (11, 16), "cbam": (48, 41.5), "ca": (31, 28), "ema": (54, 76)}


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    if not ON_CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")



def pair(name: str, channels: int, **kwargs):
    """The module on the Triton path, and its eager twin in float64 with the same weights."""
    fast = randomize(create_attention(name, channels, kernel="triton", **kwargs)).to(DEVICE)
    ref = copy.deepcopy(fast).double()
    ref.kernel = "torch"
    return fast, ref


def make_input(b: int, c: int, h: int, w: int, layout: str, dtype=torch.float32) -> torch.Tensor:
    if layout == "strided":  # H and W do not flatten into one axis
        return torch.randn(b, c, w, h, device=DEVICE).to(dtype).transpose(2, 3)
    x = torch.randn(b, c, h, w, device=DEVICE).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if layout == "cl" else x


def forward_backward(module: nn.Module, x: torch.Tensor, grad: torch.Tensor):
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    out = module(x)
    out.backward(grad)
    return out, x.grad, {n: p.grad for n, p in module.named_parameters()}


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def errors(module, x, grad, ref_results):
    """Relative errors of ``module``'s out, dx and parameter gradients, and its output."""
    out, dx, dparams = forward_backward(module, x, grad)
    ref_out, ref_dx, ref_dparams = ref_results
    assert dparams.keys() == ref_dparams.keys() and all(g is not None for g in dparams.values())
    errs = {"out": rel_err(out, ref_out), "dx": rel_err(dx, ref_dx),
            **{n: rel_err(g, ref_dparams[n]) for n, g in dparams.items()}}
    return errs, out


def assert_matches(fast, ref, x, grad, tol):
    """Within ``tol`` of the float64 eager path, or no more than 4x as far as the eager path in x's
    dtype where that is further (ill-conditioned cases, e.g. GroupNorm over two pixels)."""
    state = copy.deepcopy(fast.state_dict())  # BatchNorm statistics before this step
    ref_results = forward_backward(ref, x.double(), grad.double())
    got, out = errors(fast, x, grad, ref_results)
    assert out.dtype == x.dtype
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        assert out.is_contiguous(memory_format=torch.channels_last)
    base = {}
    if max(got.values()) > tol:
        eager = copy.deepcopy(ref).to(x.dtype)
        eager.load_state_dict(state)
        base = errors(eager, x, grad, ref_results)[0]
    bad = {k: (v, base.get(k)) for k, v in got.items() if v > max(tol, 4 * base.get(k, 0.0))}
    assert not bad, bad


@pytest.mark.slow
@pytest.mark.parametrize("name, kwargs, channels, shape",
                         [(*config, shape) for config in CONFIGS for shape in SHAPES
                          if config != ("ema", {}, 96) or shape[3] == "nchw"],  # cg=3 twice: EMA is slow to interpret
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_triton_equals_eager_in_fp32(name, kwargs, channels, shape):
    torch.manual_seed(0)
    b, h, w, layout = shape
    fast, ref = pair(name, channels, **kwargs)
    x = make_input(b, channels, h, w, layout)
    assert_matches(fast, ref, x, torch.randn(x.shape, device=DEVICE), tol=1e-5)


# With 64-element tiles these make every kernel loop walk several tiles: pixels (NCHW and
# channels_last), channels, rows, channel groups (EMA) and samples (the MLP's weight gradient).
TILED = [("se", {}, 32, (1, 9, 9, "nchw")), ("se", {}, 96, (1, 2, 3, "cl")), ("se", {}, 32, (17, 1, 2, "cl")),
         ("eca", {"k_size": 5}, 32, (1, 9, 9, "nchw")), ("eca", {}, 96, (1, 2, 3, "cl")),
         ("ca", {}, 32, (1, 9, 9, "nchw")), ("ca", {}, 96, (1, 2, 3, "cl")),
         ("cbam", {}, 96, (1, 2, 3, "cl")), ("cbam", {"kernel_size": 3}, 96, (1, 2, 3, "cl")),
         ("cbam", {}, 32, (17, 1, 2, "cl")), ("ema", {}, 96, (1, 2, 3, "cl"))]


@pytest.mark.slow
@pytest.mark.skipif(ON_CUDA, reason="sets the interpreter's tile size")
@pytest.mark.parametrize("name, kwargs, channels, shape", TILED, ids=lambda v: str(v))
def test_kernel_loops_over_several_tiles(name, kwargs, channels, shape, monkeypatch):
    monkeypatch.setattr(common, "_TILE_INTERP", 64)
    torch.manual_seed(0)
    b, h, w, layout = shape
    fast, ref = pair(name, channels, **kwargs)
    x = make_input(b, channels, h, w, layout)
    assert_matches(fast, ref, x, torch.randn(x.shape, device=DEVICE), tol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", ["se", "eca", "cbam", "ca", "ema"])
def test_autocast(name, dtype, tol):
    torch.manual_seed(0)
    fast, ref = pair(name, 64)
    x = make_input(2, 64, 6, 5, "cl", dtype)
    grad = torch.randn(x.shape, device=DEVICE).to(dtype)
    with torch.autocast(DEVICE.type, dtype=dtype):
        out, dx, dparams = forward_backward(fast, x, grad)
    ref_out, ref_dx, ref_dparams = forward_backward(ref, x.double(), grad.double())
    assert out.dtype == dtype and dx.dtype == dtype
    assert rel_err(out, ref_out) <= tol and rel_err(dx, ref_dx) <= tol
    assert all(rel_err(g, ref_dparams[n]) <= tol for n, g in dparams.items())


@pytest.mark.slow
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_ca_batchnorm_matches_eager(training):
    """Batch statistics and the running ones' updates in training, the running ones in eval."""
    torch.manual_seed(0)
    fast, ref = pair("ca", 32)
    fast.train(training)
    ref.train(training)
    for step in range(2):
        x = make_input(2, 32, 5, 4, "cl")
        assert_matches(fast, ref, x, torch.randn(x.shape, device=DEVICE), tol=1e-5)
    for name, buf in fast.bn1.named_buffers():
        torch.testing.assert_close(buf.double(), getattr(ref.bn1, name).double(), rtol=1e-6, atol=1e-6)


def _stack(kernel: str) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*(randomize(create_attention(n, 64, kernel=kernel), i)
                           for i, n in enumerate(["se", "eca", "cbam", "ca", "ema"]))).to(DEVICE)


@pytest.mark.slow
def test_compiles_to_one_graph(tmp_path, monkeypatch):
    # a fresh compile cache: the shared one keys graphs on the code that calls the custom ops, not on their schemas
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    fast, ref = _stack("triton"), _stack("torch")
    x = make_input(2, 64, 5, 6, "cl")
    grad = torch.randn(x.shape, device=DEVICE)
    compiled = torch.compile(fast, fullgraph=True)  # a graph break would raise
    out, dx, _ = forward_backward(compiled, x, grad)
    ref_out, ref_dx, _ = forward_backward(ref, x, grad)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dx, ref_dx, rtol=1e-4, atol=1e-4)
    for n, p in ref.named_parameters():
        torch.testing.assert_close(fast.get_parameter(n).grad, p.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_activation_checkpointing_and_ddp(tmp_path):
    """Recomputed forwards (non-reentrant checkpointing) and DDP's gradient hooks see plain ops."""
    fast, ref = _stack("triton"), _stack("torch")
    x = make_input(2, 64, 4, 5, "nchw")
    grad = torch.randn(x.shape, device=DEVICE)
    backend = "nccl" if ON_CUDA else "gloo"
    dist.init_process_group(backend, init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(fast)

        class Checkpointed(nn.Module):
            def forward(self, t):
                return checkpoint(ddp, t, use_reentrant=False)

        out, dx, dparams = forward_backward(Checkpointed(), x, grad)
    finally:
        dist.destroy_process_group()
    ref_out, ref_dx, _ = forward_backward(ref, x, grad)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dx, ref_dx, rtol=1e-4, atol=1e-4)
    for n, p in ref.named_parameters():
        torch.testing.assert_close(fast.get_parameter(n).grad, p.grad, rtol=1e-4, atol=1e-4)


def _count_input() -> torch.Tensor:
    """The issue's counting input: B=4, C=64, 56x56, fp32, channels_last."""
    return torch.randn(4, 64, 56, 56, device=DEVICE).contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("name", sorted(EAGER_COUNTS))
def test_counter_gives_the_issue_table_for_eager_paths(name):
    counts = count(create_attention(name, 64, kernel="torch").to(DEVICE), _count_input())
    assert (counts.launches, counts.passes) == EAGER_COUNTS[name], counts.ops


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EAGER_COUNTS))
def test_launch_and_pass_budgets(name):
    """SE and ECA: at most 8 launches and 7 passes; CBAM, CA, EMA: at most half of the eager passes."""
    counts = count(create_attention(name, 64, kernel="triton").to(DEVICE), _count_input())
    if name in ("se", "eca"):
        assert counts.launches <= 8 and counts.passes <= 7, counts
    else:
        assert counts.passes <= EAGER_COUNTS[name][1] / 2, counts
    assert not any(op.startswith("_to_copy") or op == "clone" for op in counts.ops), counts.ops  # no map copies
