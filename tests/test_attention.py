"""Attention modules: the spec's formulas, parameter names and counts, and the fast SCSA
against a plain transcription of the spec (tests/reference_scsa.py), forward and backward."""
import inspect
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from options import modules
from reference_scsa import ReferenceSCSA
from scsa.attention import (CBAM, ECA, EMA, POSITIONS, SCSA, SE, CoordAttention, RecordsGate, attention_spec,
                            create_attention, list_attentions, register_attention)
from scsa.attention.eca import eca_kernel_size
from weights import randomize

NAMES = modules()



def forward_backward(module: nn.Module, x: torch.Tensor, grad: torch.Tensor):
    module.zero_grad()
    x = x.detach().clone().requires_grad_()
    out = module(x)
    out.backward(grad)
    return out.detach(), x.grad, {n: p.grad for n, p in module.named_parameters()}


# --- registry ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list_attentions())
def test_each_spec_describes_its_class(name):
    spec = attention_spec(name)
    assert spec.name == name and spec.position in POSITIONS
    assert spec.takes_kernel == ("kernel" in inspect.signature(spec.cls).parameters)
    module = create_attention(name, 64, kernel="auto")  # the runtime argument every spec accepts
    assert isinstance(module, spec.cls) and spec.spatial_gate == isinstance(module, RecordsGate)


def test_registry_builds_by_name():
    assert isinstance(create_attention("none", 64), nn.Identity)
    assert isinstance(create_attention("scsa", 64, head_num=2), SCSA)
    with pytest.raises(ValueError, match="unknown attention position 'middle'"):
        register_attention("middle_module", SE, "middle")


def test_unknown_attention_names_the_choices():
    with pytest.raises(ValueError, match=r"unknown attention 'sk'.*scsa"):
        create_attention("sk", 64)


@pytest.mark.parametrize("name", NAMES)
def test_shapes_and_gradients(name):
    torch.manual_seed(0)
    module = create_attention(name, 64)
    x = torch.randn(2, 64, 9, 12, requires_grad=True)
    out = module(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    out.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for n, p in module.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n


@pytest.mark.parametrize("name,channels,expected", [
    ("scsa", 64, 16 * 64),
    ("scsa", 512, 16 * 512),
    ("se", 256, 2 * 256 * 256 // 16),
    ("cbam", 256, 2 * 256 * 16 + 2 * 49),
    ("cbam", 64, 2 * 64 * 8 + 2 * 49),  # hidden = max(C / 16, 8)
    ("eca", 64, 1),  # authors' default: k = 1 below 96 channels
    ("eca", 256, 3),
    ("ca", 256, 256 * 8 + 2 * 8 + 2 * (8 * 256 + 256)),  # hidden = max(8, C / 32)
    ("ca", 512, 512 * 16 + 2 * 16 + 2 * (16 * 512 + 512)),
    ("ema", 256, (8 * 8 + 8) + (8 * 8 * 9 + 8) + 2 * 8),  # C / G = 8 channels per group
])
def test_parameter_counts(name, channels, expected):
    assert sum(p.numel() for p in create_attention(name, channels).parameters()) == expected


# --- the comparison modules against plain transcriptions of the spec -----------------------

def test_se_matches_spec():
    se = randomize(SE(64))
    w1, w2 = se.fc1.weight.flatten(1), se.fc2.weight.flatten(1)  # Linear(C, C/16), Linear(C/16, C), no bias
    assert w1.shape == (4, 64) and se.fc1.bias is None and se.fc2.bias is None
    x = torch.randn(2, 64, 7, 9)
    w = torch.sigmoid(F.relu(x.mean((2, 3)) @ w1.T) @ w2.T)
    torch.testing.assert_close(se(x), x * w[:, :, None, None])


def test_cbam_matches_spec():
    cbam = randomize(CBAM(64))
    w1, w2 = cbam.channel.fc1.weight.flatten(1), cbam.channel.fc2.weight.flatten(1)
    conv = cbam.spatial.conv.weight
    assert w1.shape == (8, 64) and conv.shape == (1, 2, 7, 7)
    assert all(m.bias is None for m in (cbam.channel.fc1, cbam.channel.fc2, cbam.spatial.conv))
    x = torch.randn(2, 64, 10, 11)

    def mlp(v):
        return F.relu(v @ w1.T) @ w2.T
    x1 = x * torch.sigmoid(mlp(x.mean((2, 3))) + mlp(x.amax((2, 3))))[:, :, None, None]
    s = torch.cat([x1.mean(1, keepdim=True), x1.amax(1, keepdim=True)], 1)
    torch.testing.assert_close(cbam(x), x1 * torch.sigmoid(F.conv2d(s, conv, padding=3)))


@pytest.mark.parametrize("channels,k_size,expected", [
    (64, "scsa", 1), (95, "scsa", 1), (96, "scsa", 3), (2048, "scsa", 3),
    (64, "auto", 3), (256, "auto", 5), (512, "auto", 5), (2048, "auto", 7), (8, "auto", 3), (2, "auto", 1),
    (64, 5, 5),
])
def test_eca_kernel_rules(channels, k_size, expected):
    assert eca_kernel_size(channels, k_size) == expected
    assert ECA(channels, k_size).conv.kernel_size == (expected,)


def test_eca_rejects_bad_kernel():
    with pytest.raises(ValueError, match="k_size"):
        ECA(64, 4)


def test_eca_matches_spec():
    eca = randomize(ECA(256, "auto"))
    w = eca.conv.weight
    assert w.shape == (1, 1, 5) and eca.conv.bias is None
    x = torch.randn(2, 256, 6, 5)
    a = torch.sigmoid(F.conv1d(x.mean((2, 3))[:, None], w, padding=2))[:, 0]
    torch.testing.assert_close(eca(x), x * a[:, :, None, None])


def test_ca_matches_spec():
    ca = randomize(CoordAttention(256)).eval()  # eval: BatchNorm uses its (randomized) running stats
    with torch.no_grad():
        ca.bn1.running_mean.normal_()
        ca.bn1.running_var.uniform_(0.5, 2)
    assert ca.conv1.weight.shape == (8, 256, 1, 1) and ca.conv1.bias is None
    assert ca.conv_h.bias is not None and ca.conv_w.bias is not None
    x = torch.randn(2, 256, 6, 9)
    h, w = x.shape[2:]
    y = torch.cat([x.mean(3, keepdim=True), x.mean(2, keepdim=True).transpose(2, 3)], 2)
    y = F.conv2d(y, ca.conv1.weight)
    y = F.batch_norm(y, ca.bn1.running_mean, ca.bn1.running_var, ca.bn1.weight, ca.bn1.bias, eps=ca.bn1.eps)
    y = y * F.relu6(y + 3) / 6  # h-swish
    y_h, y_w = y[:, :, :h], y[:, :, h:]
    a_h = torch.sigmoid(F.conv2d(y_h, ca.conv_h.weight, ca.conv_h.bias))
    a_w = torch.sigmoid(F.conv2d(y_w.transpose(2, 3), ca.conv_w.weight, ca.conv_w.bias))
    torch.testing.assert_close(ca(x), x * a_w * a_h)


def test_ema_matches_authors_code():
    ema = randomize(EMA(64))
    assert {n for n, _ in ema.named_parameters()} == {
        "gn.weight", "gn.bias", "conv1x1.weight", "conv1x1.bias", "conv3x3.weight", "conv3x3.bias"}
    x = torch.randn(2, 64, 7, 10)
    # the EMA authors' forward, transcribed
    b, c, h, w = x.shape
    g = x.reshape(b * 32, -1, h, w)
    x_h = nn.AdaptiveAvgPool2d((None, 1))(g)
    x_w = nn.AdaptiveAvgPool2d((1, None))(g).permute(0, 1, 3, 2)
    hw = ema.conv1x1(torch.cat([x_h, x_w], dim=2))
    x_h, x_w = torch.split(hw, [h, w], dim=2)
    x1 = ema.gn(g * x_h.sigmoid() * x_w.permute(0, 1, 3, 2).sigmoid())
    x2 = ema.conv3x3(g)
    x11 = nn.Softmax(-1)(nn.AdaptiveAvgPool2d((1, 1))(x1).reshape(b * 32, -1, 1).permute(0, 2, 1))
    x21 = nn.Softmax(-1)(nn.AdaptiveAvgPool2d((1, 1))(x2).reshape(b * 32, -1, 1).permute(0, 2, 1))
    weights = (x11 @ x2.reshape(b * 32, c // 32, -1) + x21 @ x1.reshape(b * 32, c // 32, -1)).reshape(b * 32, 1, h, w)
    torch.testing.assert_close(ema(x), (g * weights.sigmoid()).reshape(b, c, h, w))


def test_ema_needs_channels_divisible_by_factor():
    with pytest.raises(ValueError, match=r"divisible by factor=32 \(got 48\)"):
        EMA(48)
    assert EMA(48, factor=16).groups == 16


# --- SCSA: parameters --------------------------------------------------------------------

def spec_state_dict(c: int) -> dict:
    """The authors' parameter names and shapes, as attention.md lists them."""
    g = c // 4
    shapes = {"local_dwc.weight": (g, 1, 3), "local_dwc.bias": (g,),
              "global_dwc_s.weight": (g, 1, 5), "global_dwc_s.bias": (g,),
              "global_dwc_m.weight": (g, 1, 7), "global_dwc_m.bias": (g,),
              "global_dwc_l.weight": (g, 1, 9), "global_dwc_l.bias": (g,),
              "norm_h.weight": (c,), "norm_h.bias": (c,), "norm_w.weight": (c,), "norm_w.bias": (c,),
              "norm.weight": (c,), "norm.bias": (c,),
              "q.weight": (c, 1, 1, 1), "k.weight": (c, 1, 1, 1), "v.weight": (c, 1, 1, 1)}
    return {n: torch.randn(s) for n, s in shapes.items()}


def test_scsa_loads_the_authors_state_dict_strictly():
    state = spec_state_dict(64)
    module = SCSA(64)
    assert {n: tuple(t.shape) for n, t in module.state_dict().items()} == {n: tuple(t.shape) for n, t in state.items()}
    module.load_state_dict(state, strict=True)
    assert sum(t.numel() for t in state.values()) == 16 * 64
    torch.testing.assert_close(module.q.weight, state["q.weight"])


def test_scsa_qkv_bias_adds_the_biases():
    assert {"q.bias", "k.bias", "v.bias"} <= set(SCSA(64, qkv_bias=True).state_dict())


@pytest.mark.parametrize("kwargs,match", [
    (dict(channels=30), r"divisible by 4 \(got 30\): use a multiple of 4"),
    (dict(channels=64, head_num=3), r"divisible by head_num .*channels=64, head_num=3"),
    (dict(channels=64, down_sample_mode="recombination"), "down_sample_mode"),
    (dict(channels=64, gate_layer="relu"), "gate_layer"),
    (dict(channels=64, window_size=0), "window_size"),
    (dict(channels=64, group_kernel_sizes=(3, 5, 7)), "group_kernel_sizes"),
])
def test_scsa_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SCSA(**kwargs)


# --- SCSA: the fast implementation equals the reference ------------------------------------

CASES = [
    ((2, 16, 14, 14), {}),
    ((2, 16, 15, 9), {}),  # H != W, neither a multiple of 7
    ((1, 32, 21, 28), dict(head_num=4)),  # batch 1
    ((2, 32, 16, 23), dict(head_num=2, qkv_bias=True)),
    ((2, 16, 14, 17), dict(window_size=-1)),
    ((2, 16, 17, 14), dict(down_sample_mode="max_pool")),
    ((2, 16, 10, 13), dict(gate_layer="softmax")),
    ((1, 16, 7, 7), dict(down_sample_mode="max_pool", gate_layer="softmax", head_num=4)),
    ((2, 16, 12, 12), dict(attn_drop_ratio=0.1, group_kernel_sizes=(1, 3, 5, 11), window_size=4)),
]


def assert_same(fast: nn.Module, ref: nn.Module, x: torch.Tensor, grad: torch.Tensor, tol: float = 1e-5):
    out, dx, dparams = forward_backward(fast, x, grad)
    ref_out, ref_dx, ref_dparams = forward_backward(ref, x.contiguous(), grad.contiguous())
    torch.testing.assert_close(out, ref_out, rtol=tol, atol=tol)
    torch.testing.assert_close(dx, ref_dx, rtol=tol, atol=tol)
    assert dparams.keys() == ref_dparams.keys()
    for name, g in dparams.items():
        torch.testing.assert_close(g, ref_dparams[name], rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")


def pair(c: int, seed: int = 0, **kwargs):
    fast = randomize(SCSA(c, **kwargs), seed).eval()
    ref = ReferenceSCSA(c, **kwargs).eval()
    ref.load_state_dict(fast.state_dict(), strict=True)
    return fast, ref


@pytest.mark.parametrize("shape,kwargs", CASES)
def test_fast_scsa_equals_reference(shape, kwargs):
    torch.manual_seed(1)
    fast, ref = pair(shape[1], **kwargs)
    assert_same(fast, ref, torch.randn(shape), torch.randn(shape))


@pytest.mark.parametrize("shape,kwargs", [CASES[1], CASES[5], CASES[6]])
def test_fast_scsa_channels_last(shape, kwargs):
    torch.manual_seed(2)
    fast, ref = pair(shape[1], **kwargs)
    x = torch.randn(shape).to(memory_format=torch.channels_last)
    assert fast(x).is_contiguous(memory_format=torch.channels_last)
    assert_same(fast, ref, x, torch.randn(shape).to(memory_format=torch.channels_last))


@pytest.mark.parametrize("shape,kwargs", [CASES[1], *(pytest.param(*c, marks=pytest.mark.slow) for c in CASES[3:7])])
def test_compiled_scsa_is_one_graph_and_equals_reference(shape, kwargs):
    torch.manual_seed(3)
    torch._dynamo.reset()
    fast, ref = pair(shape[1], **kwargs)
    fast.compile(backend="aot_eager", fullgraph=True)  # fullgraph: any graph break fails the test
    assert_same(fast, ref, torch.randn(shape), torch.randn(shape))


def test_small_map_shrinks_the_window():
    """3x5 map, window 7: the authors' AvgPool2d(7) would fail; the window becomes 3x5."""
    torch.manual_seed(3)
    fast = randomize(SCSA(16)).eval()
    ref = ReferenceSCSA(16, window_size=(3, 5)).eval()
    ref.load_state_dict(fast.state_dict())
    assert_same(fast, ref, torch.randn(2, 16, 3, 5), torch.randn(2, 16, 3, 5))
    with pytest.raises(RuntimeError):
        ReferenceSCSA(16)(torch.randn(2, 16, 3, 5))


def test_inference_and_frozen_paths_match():
    torch.manual_seed(4)
    fast, ref = pair(16)
    x = torch.randn(2, 16, 11, 8)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), ref(x), rtol=1e-5, atol=1e-5)
    x.requires_grad_()  # input gradient only
    for p in fast.parameters():
        p.requires_grad_(False)
    fast(x).sum().backward()
    expected = torch.autograd.grad(ref(x).sum(), x)[0]
    torch.testing.assert_close(x.grad, expected, rtol=1e-5, atol=1e-5)


def test_retain_graph_and_reuse_in_one_graph():
    torch.manual_seed(5)
    fast, ref = pair(16)
    x = torch.randn(2, 16, 9, 9, requires_grad=True)
    out = fast(fast(x))  # the same module twice
    out.sum().backward(retain_graph=True)
    first = x.grad.clone()
    out.sum().backward()
    torch.testing.assert_close(x.grad, 2 * first)
    expected = torch.autograd.grad(ref(ref(x)).sum(), x)[0]
    torch.testing.assert_close(first, expected, rtol=1e-5, atol=1e-5)


def test_attention_dropout_is_active_in_training_only():
    torch.manual_seed(6)
    module = randomize(SCSA(64, attn_drop_ratio=0.5))
    x = torch.randn(2, 64, 14, 14)
    assert not torch.equal(module.train()(x), module(x))
    assert torch.equal(module.eval()(x), module(x))


def test_bf16_autocast_follows_the_input_dtype():
    torch.manual_seed(7)
    fast, ref = pair(32)
    x = torch.randn(2, 32, 14, 14)
    with torch.no_grad():
        expected = ref(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out_fp32_in = fast(x)
            out_bf16_in = fast(x.bfloat16())
    assert out_fp32_in.dtype == torch.float32 and out_bf16_in.dtype == torch.bfloat16
    torch.testing.assert_close(out_fp32_in, expected, rtol=1e-5, atol=1e-5)  # the gates stay fp32
    torch.testing.assert_close(out_bf16_in.float(), expected, rtol=2e-2, atol=2e-2)
    xb = x.bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast(xb).float().square().sum().backward()
    xr = x.clone().requires_grad_()
    ref(xr).square().sum().backward()
    assert xb.grad.dtype == torch.bfloat16
    cos = F.cosine_similarity(xb.grad.float().flatten(), xr.grad.flatten(), dim=0)
    assert cos > 0.999
    assert all(p.grad.dtype == torch.float32 for p in fast.parameters())


def test_default_init_is_the_authors():
    torch.manual_seed(8)
    module = SCSA(256)
    for conv in (module.q, module.k, module.v):  # Kaiming normal, fan_out: std = sqrt(2 / C)
        assert abs(conv.weight.std().item() - math.sqrt(2 / 256)) < 0.2 * math.sqrt(2 / 256)
    for norm in (module.norm_h, module.norm_w, module.norm):
        assert torch.equal(norm.weight, torch.ones(256)) and torch.equal(norm.bias, torch.zeros(256))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("shape,kwargs", [CASES[0], CASES[1], CASES[5], CASES[6], ((4, 512, 7, 7), {})])
def test_fast_scsa_equals_reference_on_cuda(shape, kwargs):
    torch.manual_seed(9)
    fast, ref = pair(shape[1], **kwargs)
    fast, ref = fast.cuda(), ref.cuda()
    x, grad = torch.randn(shape, device="cuda"), torch.randn(shape, device="cuda")
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        assert_same(fast, ref, x, grad, tol=1e-4)  # CUDA kernels sum in other orders
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = fast(x.bfloat16())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
