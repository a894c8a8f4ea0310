"""SCSA's Triton path (``kernel="triton"``) against the plain reference (tests/reference_scsa.py).

Where the kernels run: on CUDA tensors when a GPU is present (compiled), otherwise on CPU
tensors in Triton's interpreter (``TRITON_INTERPRET=1``: set while this module imports the
kernels, and by conftest.py's ``interpret`` fixture while each test runs). Interpreted kernels
are slow, so the shapes are tiny and every test here is marked slow; the ``cuda`` tests at
ResNet-50's shapes run only on a GPU.
"""
import os
from unittest import mock

import pytest
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from counting import count
from reference_scsa import ReferenceSCSA
from weights import randomize
from scsa.attention import SCSA
from scsa.attention.kernels import triton_available

ON_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_CUDA else "cpu")
if not triton_available():
    pytest.skip("the Triton kernels need triton", allow_module_level=True)

with mock.patch.dict(os.environ, {} if ON_CUDA else {"TRITON_INTERPRET": "1"}):
    from scsa.attention.kernels import scsa as kernels  # noqa: E402  (defines triton's kernels)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("interpret")]



def pair(c: int, shape=None, **kwargs):
    """An SCSA on the Triton path and the reference with the same weights (window shrunk as SCSA does)."""
    fast = randomize(SCSA(c, kernel="triton", **kwargs)).to(DEVICE).eval()
    window = kwargs.pop("window_size", 7)
    if shape is not None and window != -1:
        window = fast.pool_window(*shape[2:])
    ref = ReferenceSCSA(c, window_size=window, **kwargs).to(DEVICE).eval()
    ref.load_state_dict(fast.state_dict(), strict=True)
    return fast, ref


def forward_backward(module: nn.Module, x: torch.Tensor, grad: torch.Tensor):
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    out = module(x)
    out.backward(grad)
    return out.detach(), x.grad, {n.removeprefix("_orig_mod."): p.grad for n, p in module.named_parameters()}


def assert_same(fast, ref, x, grad, tol=1e-5, grad_tol=None):
    out, dx, dparams = forward_backward(fast, x, grad)
    ref_out, ref_dx, ref_dparams = forward_backward(ref, x.float().contiguous(), grad.float().contiguous())
    assert out.dtype == x.dtype and out.stride() == x.stride()  # the input's dtype and memory format
    torch.testing.assert_close(out.float(), ref_out, rtol=tol, atol=tol)
    torch.testing.assert_close(dx.float(), ref_dx, rtol=tol, atol=tol)
    assert dparams.keys() == ref_dparams.keys()
    for name, g in dparams.items():
        torch.testing.assert_close(g, ref_dparams[name], rtol=grad_tol or tol, atol=grad_tol or tol,
                                   msg=lambda m: f"{name}: {m}")


def rand(shape, channels_last=False, dtype=torch.float32):
    x = torch.randn(shape, device=DEVICE).to(dtype)
    return x.to(memory_format=torch.channels_last) if channels_last else x


CASES = [
    ((2, 16, 14, 14), {}),
    ((1, 16, 15, 9), {}),  # batch 1, odd sizes, H != W
    ((1, 16, 3, 5), {}),  # smaller than the window: it shrinks to 3 x 5
    ((1, 32, 9, 16), dict(head_num=4)),
    ((1, 32, 11, 8), dict(head_num=2, qkv_bias=True, window_size=4, group_kernel_sizes=(1, 3, 5, 11))),
    ((1, 16, 13, 10), dict(window_size=-1)),
    ((2, 16, 17, 14), dict(down_sample_mode="max_pool")),
    ((1, 16, 10, 13), dict(gate_layer="softmax")),
    ((1, 16, 7, 9), dict(down_sample_mode="max_pool", gate_layer="softmax", head_num=4)),
]


@pytest.mark.parametrize("shape,kwargs", CASES)
def test_triton_equals_reference(shape, kwargs):
    torch.manual_seed(0)
    fast, ref = pair(shape[1], shape, **kwargs)
    assert_same(fast, ref, rand(shape), rand(shape))


@pytest.mark.parametrize("shape,kwargs", [CASES[1], CASES[4], CASES[6]])
def test_triton_channels_last(shape, kwargs):
    torch.manual_seed(1)
    fast, ref = pair(shape[1], shape, **kwargs)
    assert_same(fast, ref, rand(shape, channels_last=True), rand(shape, channels_last=True))


@pytest.mark.parametrize("shape,kwargs,channels_last", [
    ((1, 32, 9, 18), dict(window_size=2), False),
    ((1, 16, 13, 10), dict(window_size=-1, gate_layer="softmax"), False),
    ((1, 16, 12, 13), dict(window_size=3, down_sample_mode="max_pool", qkv_bias=True), True),
])
def test_small_tiles_take_every_multi_step_path(shape, kwargs, channels_last, monkeypatch):
    """With a tiny tile budget every loop runs more than once: channel blocks, bands of window rows,
    row steps within a window (max pooling's ties across steps), strip groups in steps, token
    chunks and attention blocks."""
    monkeypatch.setattr(kernels, "TILE_BUDGET", 256)
    monkeypatch.setattr(kernels, "INTERPRETER_TILE_BUDGET", 256)
    torch.manual_seed(11)
    fast, ref = pair(shape[1], shape, **kwargs)
    assert_same(fast, ref, rand(shape, channels_last), rand(shape, channels_last))


def test_gradient_laid_out_unlike_the_map():
    """dout in NCHW for a channels_last map (and a broadcast one): each big tensor has its own strides."""
    torch.manual_seed(2)
    fast, ref = pair(16, (2, 16, 10, 9))
    assert_same(fast, ref, rand((2, 16, 10, 9), channels_last=True), rand((2, 16, 10, 9)))
    x = rand((2, 16, 10, 9)).requires_grad_()
    fast(x).sum().backward()  # dout = ones expanded from a scalar: all strides 0
    torch.testing.assert_close(x.grad, torch.autograd.grad(ref(x).sum(), x)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_maps(dtype):
    """The map is loaded and stored in its dtype, everything else is fp32: out and dx are within the
    dtype's rounding of the fp32 reference on the same (rounded) input, parameter gradients
    within 1e-4."""
    torch.manual_seed(3)
    shape = (1, 16, 12, 10)
    fast, ref = pair(16, shape, head_num=2)
    x, grad = rand(shape, True, dtype), rand(shape, True, dtype)
    assert_same(fast, ref, x, grad, tol=1e-2, grad_tol=1e-4)
    with torch.no_grad():
        plain = fast(x)
        with torch.autocast(DEVICE.type, dtype=dtype):  # changes nothing: the kernels choose their precision
            assert torch.equal(fast(x), plain)
            assert fast(x.float()).dtype == torch.float32


class _FixedDropout(nn.Module):
    """Dropout with a given keep mask, for the reference."""

    def __init__(self, keep: torch.Tensor, p: float):
        super().__init__()
        self.keep, self.p = keep, p

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return a * self.keep / (1 - self.p)


def test_attention_dropout_matches_the_reference_with_the_same_mask():
    torch.manual_seed(4)
    shape, p = (2, 32, 7, 8), 0.3
    fast, ref = pair(32, shape, head_num=2, attn_drop_ratio=p)
    fast.train()
    x, grad = rand(shape), rand(shape)
    torch.manual_seed(5)
    out = fast(x)
    torch.manual_seed(5)
    keep = kernels.dropout_keep(kernels.dropout_seed(DEVICE), 2, 2, 16, p)
    assert 0.5 < keep.float().mean().item() < 0.9 and not keep.all()
    ref.attn_drop = _FixedDropout(keep, p)
    torch.manual_seed(5)
    assert_same(fast, ref, x, grad)
    assert not torch.equal(fast(x), out)  # a fresh mask per call
    assert torch.equal(fast.eval()(x), fast(x))  # none in eval mode


def test_compiled_is_one_graph_through_the_custom_ops_and_equals_reference():
    from torch._dynamo.testing import CompileCounterWithBackend
    torch._dynamo.reset()
    torch.manual_seed(6)
    shape = (1, 16, 11, 9)
    fast, ref = pair(16, shape, head_num=2, qkv_bias=True)
    backend = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fast, backend=backend, fullgraph=True)  # fullgraph: a graph break fails
    assert_same(compiled, ref, rand(shape), rand(shape))
    assert backend.frame_count == 1
    targets = {node.target for gm in backend.graphs for node in gm.graph.nodes}
    assert torch.ops.scsa.forward.default in targets  # the kernels, not the plain-op path


def test_activation_checkpointing_replays_the_same_dropout():
    torch.manual_seed(7)
    shape = (1, 16, 14, 14)
    fast, _ = pair(16, shape, attn_drop_ratio=0.2)
    fast.train()
    x, grad = rand(shape), rand(shape)
    results = []
    for use_checkpoint in (False, True):
        fast.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        torch.manual_seed(8)
        out = checkpoint(fast, xi, use_reentrant=False) if use_checkpoint else fast(xi)
        out.backward(grad)
        results.append([out, xi.grad, *(p.grad for p in fast.parameters())])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_frozen_parameters_and_input_gradient_only():
    torch.manual_seed(9)
    fast, ref = pair(16, (1, 16, 9, 8))
    for p in fast.parameters():
        p.requires_grad_(False)
    x = rand((1, 16, 9, 8)).requires_grad_()
    fast(x).square().sum().backward()
    torch.testing.assert_close(x.grad, torch.autograd.grad(ref(x).square().sum(), x)[0], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), ref(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs", [{}, dict(head_num=2, qkv_bias=True, down_sample_mode="max_pool",
                                             gate_layer="softmax", attn_drop_ratio=0.1)])
def test_launch_and_pass_budget(kwargs):
    """Issue #13's proof: at most 12 launches and 10 activation passes per forward + backward, counted
    by tests/counting.py in the issue's set-up (C=64, 56x56, fp32, channels_last) at batch 1: the
    counts do not depend on the batch (the same launches; passes are relative to the map)."""
    module = SCSA(64, kernel="triton", **kwargs).to(DEVICE).train()
    counts = count(module, torch.randn(1, 64, 56, 56, device=DEVICE).to(memory_format=torch.channels_last))
    assert counts.launches <= 12, counts.ops
    assert counts.passes <= 10, counts
    assert counts.ops.get("strip_sums_kernel") == 1  # the Triton path ran


@pytest.mark.skipif(not ON_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("shape,dtype", [
    ((8, 64, 56, 56), torch.float32), ((8, 128, 28, 28), torch.float32), ((8, 512, 7, 7), torch.float32),
    ((8, 64, 56, 56), torch.bfloat16), ((8, 512, 7, 7), torch.float16),
])
def test_triton_equals_reference_on_cuda(shape, dtype):
    """ResNet-50's stage shapes, channels_last as trained (few dtype x shape pairs: each compiles the
    kernels anew)."""
    torch.manual_seed(10)
    fast, ref = pair(shape[1], shape)
    x, grad = rand(shape, True, dtype), rand(shape, True, dtype)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # the reference's convs in full fp32
        if dtype == torch.float32:
            assert_same(fast, ref, x, grad, tol=1e-4)
        else:
            assert_same(fast, ref, x, grad, tol=2e-2, grad_tol=1e-3)
