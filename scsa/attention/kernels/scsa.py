"""SCSA in fused Triton kernels, registered as the custom ops ``scsa::forward`` and ``scsa::backward``.

Forward, five launches: strip means (reads x), strip gates (small), pooled map of
``x * a_h * a_w`` recomputed (reads x), channel gates (small), ``out = x * a_h * a_w * a_c``
(reads x, writes out). Backward, four launches and one sum: one reduction pass over dout and
x gives every gate's share from the output multiply plus x_s's window sums; the channel chain's
backward gives the pooled map's gradient; the strip chain's backward turns both into the strip
means' gradient; one pass writes dx. Nothing as large as the map is saved: only x (the input,
which the network keeps anyway) and small fp32 tensors. Parameter gradients are summed over
the batch per sample in one (B, P) buffer, then added up by one ``sum``. Counted as issue #13
defines it (tests/counting.py): 10 launches and 8 passes over the map per forward + backward
(11 launches with attention dropout, which draws a seed).

Being custom ops (``torch.library.custom_op`` with fake implementations), both are opaque to
TorchDynamo: ``torch.compile(fullgraph=True)`` traces a model through them without a graph
break. Under ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors.
"""
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import triton
from torch import Tensor

from scsa.attention.kernels import interpreting
from scsa.attention.kernels.scsa_channel import channel_gates_kernel, channel_grads_kernel, dropout_mask_kernel
from scsa.attention.kernels.scsa_map import (gate_out_kernel, grad_sums_kernel, grad_x_kernel, pool_kernel,
                                             strip_sums_kernel)
from scsa.attention.kernels.scsa_strip import strip_gates_kernel, strip_grads_kernel

__all__ = ["dropout_keep", "dropout_seed", "scsa_triton"]

_GN_EPS = 1e-5  # nn.GroupNorm's default, as the module's GroupNorms
_STRIP_CONVS = ("local_dwc", "global_dwc_s", "global_dwc_m", "global_dwc_l")


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


class _Plan(NamedTuple):
    """Shapes and block sizes of one call, from the map's shape and layout and the module's options."""
    hp: int
    wp: int
    tiles: Dict[str, int]  # map kernels: channels, rows, windows, offsets per tile (BC, BR, BJ, BU)
    n_cb: int  # ... channel blocks
    band_win: int  # ... window rows per program
    n_band: int  # ... programs along H
    bg: int  # strip kernels: channels of each group per step
    bl: int  # ... strip positions (padded)
    kp: int  # ... conv taps (padded)
    bi: int  # channel kernels: attention rows (and columns) per block
    bn: int  # ... pooled tokens per chunk
    block: int  # ... flat block


# Elements per tile of the map kernels (and the base of the others' block sizes). The interpreter
# pays per op and per program, not per element: it takes bigger tiles, so fewer programs.
TILE_BUDGET = 1 << 12
INTERPRETER_TILE_BUDGET = 1 << 16


def _plan(x: Tensor, window: Sequence[int], heads: int, ksizes: Sequence[int]) -> _Plan:
    b, c, h, w = x.shape
    wh, ww = window
    hp, wp = h // wh, w // ww
    budget = INTERPRETER_TILE_BUDGET if interpreting() else TILE_BUDGET
    bu, bj = _pow2(ww), _pow2(triton.cdiv(w, ww))
    if x.stride(1) == 1 and c > 1:  # channels_last: channels are the contiguous axis, take many
        bc = min(_pow2(c), 64, max(1, budget // (bj * bu)))
        br = min(_pow2(wh), max(1, budget // (bc * bj * bu)))
    else:
        br = min(_pow2(wh), 8)
        bc = min(_pow2(c), max(1, budget // (br * bj * bu)))
    band_win = max(1, 8 // wh)  # at least ~8 map rows per program
    n_win = triton.cdiv(h, wh)
    bl, kp = _pow2(max(h, w)), _pow2(max(ksizes))
    bg = min(_pow2(c // 4), max(1, 2 * budget // (4 * bl * kp)))  # (4 * bg, bl, kp) conv tiles, 8 warps
    bn = max(16, min(_pow2(hp * wp), budget // 64))  # token chunks; tl.dot needs blocks of 16 or more
    bi = max(16, min(64, _pow2(c // heads), budget // 64))
    return _Plan(hp, wp, dict(BC=bc, BR=br, BJ=bj, BU=bu), triton.cdiv(c, bc), band_win,
                 triton.cdiv(n_win, band_win), bg, bl, kp, bi, bn, min(budget // 4, _pow2(c * hp * wp)))


def _columns(c: int, ksizes: Sequence[int], qkv_bias: bool) -> Dict[str, int]:
    """Offsets of each parameter's gradient in a row of the per-sample gradient buffer (B, P)."""
    g = c // 4
    cols = {"conv_w": 0, "conv_b": g * sum(ksizes)}
    cols["norm_h"] = cols["conv_b"] + c
    cols["norm_w"] = cols["norm_h"] + 2 * c
    cols["norm"] = cols["norm_w"] + 2 * c
    cols["qkv"] = cols["norm"] + 2 * c
    cols["qkv_b"] = cols["qkv"] + 3 * c
    cols["P"] = cols["qkv_b"] + (3 * c if qkv_bias else 0)
    return cols


def _forward_impl(x: Tensor, w0: Tensor, w1: Tensor, w2: Tensor, w3: Tensor, b0: Tensor, b1: Tensor, b2: Tensor,
                  b3: Tensor, gnh_w: Tensor, gnh_b: Tensor, gnw_w: Tensor, gnw_b: Tensor, gn_w: Tensor, gn_b: Tensor,
                  wq: Tensor, wk: Tensor, wv: Tensor, bq: Optional[Tensor], bk: Optional[Tensor],
                  bv: Optional[Tensor], seed: Optional[Tensor], window: List[int], heads: int, max_pool: bool,
                  softmax: bool, p_drop: float
                  ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    bsz, c, h, w = x.shape
    wh, ww = window
    ks = [t.shape[-1] for t in (w0, w1, w2, w3)]
    pl = _plan(x, window, heads, ks)
    f32 = dict(device=x.device, dtype=torch.float32)
    s = torch.empty(bsz, c, h + w, **f32)
    colp = torch.empty(bsz, pl.n_band, c, w, **f32)
    a = torch.empty(bsz, c, h + w, **f32)
    xhat = torch.empty(bsz, c, h + w, **f32)
    rstd = torch.empty(bsz, 2, 4, **f32)
    y = torch.empty(bsz, c, pl.hp, pl.wp, **f32)
    idx = torch.empty(bsz, c, pl.hp, pl.wp, device=x.device, dtype=torch.int32) if max_pool else y.new_empty(0)
    a_c = torch.empty(bsz, c, **f32)
    stats = torch.empty(bsz, 2, c, **f32)
    out = torch.empty_like(x)
    grid = (bsz * pl.n_cb, pl.n_band)
    tiles = pl.tiles
    strip_sums_kernel[grid](x, *x.stride(), s, colp, c, h, w, wh, ww, pl.band_win, pl.n_cb, **tiles)
    strip_gates_kernel[(bsz,)](s, colp, a, xhat, rstd, c, h, w, pl.n_band, w0, w1, w2, w3, b0, b1, b2, b3, *ks,
                               gnh_w, gnh_b, gnw_w, gnw_b, _GN_EPS, SOFTMAX=softmax, BG=pl.bg, BL=pl.bl, KP=pl.kp,
                               num_warps=8)
    pool_kernel[grid](x, *x.stride(), a, y, idx if max_pool else y, c, h, w, wh, ww, pl.hp, pl.wp, pl.band_win,
                      pl.n_cb, MAX=max_pool, **tiles)
    d = c // heads
    has_bias = bq is not None
    channel_gates_kernel[(bsz,)](y, a_c, stats, c, pl.hp * pl.wp, heads, d, d ** -0.5, _GN_EPS, gn_w, gn_b,
                                 wq, wk, wv, bq if has_bias else wq, bk if has_bias else wk, bv if has_bias else wv,
                                 seed if seed is not None else a_c, p_drop, HAS_BIAS=has_bias,
                                 DROP=seed is not None, SOFTMAX=softmax, BI=pl.bi, BN=pl.bn, BLOCK=pl.block)
    gate_out_kernel[grid](x, *x.stride(), out, *out.stride(), a, a_c, c, h, w, wh, ww, pl.band_win, pl.n_cb,
                          **tiles)
    return out, s, a, xhat, rstd, y, idx, a_c, stats


def _backward_impl(g: Tensor, x: Tensor, s: Tensor, a: Tensor, xhat: Tensor, rstd: Tensor, y: Tensor, idx: Tensor,
                   a_c: Tensor, stats: Tensor, w0: Tensor, w1: Tensor, w2: Tensor, w3: Tensor, gnh_w: Tensor,
                   gnw_w: Tensor, gn_w: Tensor, gn_b: Tensor, wq: Tensor, wk: Tensor, wv: Tensor,
                   bq: Optional[Tensor], bk: Optional[Tensor], bv: Optional[Tensor], seed: Optional[Tensor],
                   window: List[int], heads: int, max_pool: bool, softmax: bool, p_drop: float,
                   need_dx: bool) -> Tuple[Tensor, Tensor]:
    bsz, c, h, w = x.shape
    wh, ww = window
    ks = [t.shape[-1] for t in (w0, w1, w2, w3)]
    pl = _plan(x, window, heads, ks)
    n = pl.hp * pl.wp
    has_bias = bq is not None
    cols = _columns(c, ks, has_bias)
    f32 = dict(device=x.device, dtype=torch.float32)
    ph = torch.empty(bsz, c, h, **f32)
    pwp = torch.empty(bsz, pl.n_band, c, w, **f32)
    rows = y if max_pool else torch.empty(bsz, c, pl.hp * wh, pl.wp, **f32)
    wcols = y if max_pool else torch.empty(bsz, c, pl.hp, pl.wp * ww, **f32)
    grid = (bsz * pl.n_cb, pl.n_band)
    tiles = pl.tiles
    grad_sums_kernel[grid](g, *g.stride(), x, *x.stride(), a, ph, pwp, rows, wcols, c, h, w, wh, ww, pl.hp, pl.wp,
                           pl.band_win, pl.n_cb, MAX=max_pool, **tiles)
    pg = torch.empty(bsz, cols["P"], **f32)
    dy = torch.empty(bsz, c, pl.hp, pl.wp, **f32)
    scratch = torch.empty(bsz * (c + 2 * c * n), **f32)
    d = c // heads
    channel_grads_kernel[(bsz,)](y, a_c, stats, ph, h, dy, scratch, pg, cols["P"], c, n, heads, d, d ** -0.5, _GN_EPS,
                                 gn_w, gn_b, wq, wk, wv, bq if has_bias else wq, bk if has_bias else wk,
                                 bv if has_bias else wv, seed if seed is not None else a_c, p_drop, cols["norm"],
                                 cols["qkv"], cols["qkv_b"], HAS_BIAS=has_bias, DROP=seed is not None,
                                 SOFTMAX=softmax, BI=pl.bi, BN=pl.bn, BLOCK=pl.block)
    dsx = torch.empty(bsz, c, h + w, **f32)
    strip_scratch = torch.empty(bsz, 2, c, h + w, **f32)
    strip_grads_kernel[(bsz,)](s, a, xhat, rstd, a_c, ph, pwp, dy, rows, wcols, y, idx if max_pool else y, dsx,
                               strip_scratch, pg, cols["P"], c, h, w, wh, ww, pl.hp, pl.wp, pl.n_band,
                               w0, w1, w2, w3, *ks, gnh_w, gnw_w, cols["conv_b"], cols["norm_h"],
                               cols["norm_w"], SOFTMAX=softmax, MAX=max_pool, BG=pl.bg, BL=pl.bl, KP=pl.kp,
                               num_warps=8)
    dx = torch.empty_like(x) if need_dx else x.new_empty(0)
    if need_dx:
        grad_x_kernel[grid](g, *g.stride(), dx, *dx.stride(), a, a_c, dsx, dy, idx if max_pool else dy,
                            c, h, w, wh, ww, pl.hp, pl.wp, pl.band_win, pl.n_cb, MAX=max_pool, **tiles)
    return dx, pg.sum(0)


_forward_op = torch.library.custom_op("scsa::forward", _forward_impl, mutates_args=())
_backward_op = torch.library.custom_op("scsa::backward", _backward_impl, mutates_args=())


@_forward_op.register_fake
def _forward_fake(x, w0, w1, w2, w3, b0, b1, b2, b3, gnh_w, gnh_b, gnw_w, gnw_b, gn_w, gn_b, wq, wk, wv, bq, bk, bv,
                  seed, window, heads, max_pool, softmax, p_drop):
    bsz, c, h, w = x.shape
    hp, wp = h // window[0], w // window[1]
    f32 = dict(device=x.device, dtype=torch.float32)
    idx = x.new_empty(bsz, c, hp, wp, dtype=torch.int32) if max_pool else x.new_empty(0, dtype=torch.float32)
    strips = [x.new_empty(bsz, c, h + w, **f32) for _ in range(3)]
    return (torch.empty_like(x), *strips, x.new_empty(bsz, 2, 4, **f32), x.new_empty(bsz, c, hp, wp, **f32), idx,
            x.new_empty(bsz, c, **f32), x.new_empty(bsz, 2, c, **f32))


@_backward_op.register_fake
def _backward_fake(g, x, s, a, xhat, rstd, y, idx, a_c, stats, w0, w1, w2, w3, gnh_w, gnw_w, gn_w, gn_b,
                   wq, wk, wv, bq, bk, bv, seed, window, heads, max_pool, softmax, p_drop, need_dx):
    cols = _columns(x.shape[1], [t.shape[-1] for t in (w0, w1, w2, w3)], bq is not None)
    return (torch.empty_like(x) if need_dx else x.new_empty(0)), x.new_empty(cols["P"], dtype=torch.float32)


_N_PARAMS = 20  # inputs after x and before seed: 8 conv, 4 strip norm, 2 norm, 3 scales, 3 optional biases


def _setup_context(ctx, inputs, output) -> None:
    x, params, seed, options = inputs[0], inputs[1:1 + _N_PARAMS], inputs[1 + _N_PARAMS], inputs[2 + _N_PARAMS:]
    saved = output[1:]  # s, a, xhat, rstd, y, idx, a_c, stats
    ctx.mark_non_differentiable(*saved)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, *saved, seed, *params)
    ctx.options = options
    ctx.has_bias = params[-1] is not None


def _backward(ctx, dout, *_):
    n_in = 2 + _N_PARAMS + len(ctx.options)
    if dout is None:
        return (None,) * n_in
    x, s, a, xhat, rstd, y, idx, a_c, stats, seed, *params = ctx.saved_tensors
    w0, w1, w2, w3, b0, b1, b2, b3, gnh_w, gnh_b, gnw_w, gnw_b, gn_w, gn_b, wq, wk, wv, bq, bk, bv = params
    need_dx = ctx.needs_input_grad[0]
    dx, flat = _backward_op(dout, x, s, a, xhat, rstd, y, idx, a_c, stats, w0, w1, w2, w3, gnh_w, gnw_w, gn_w,
                            gn_b, wq, wk, wv, bq, bk, bv, seed, *ctx.options, need_dx)
    c = x.shape[1]
    g = c // 4
    cols = _columns(c, [t.shape[-1] for t in (w0, w1, w2, w3)], ctx.has_bias)
    grads, at = [], cols["conv_w"]
    for wt in (w0, w1, w2, w3):
        grads.append(flat[at:at + wt.numel()].view(wt.shape))
        at += wt.numel()
    grads += [flat[cols["conv_b"] + i * g:cols["conv_b"] + (i + 1) * g] for i in range(4)]
    for key in ("norm_h", "norm_w", "norm"):
        grads += [flat[cols[key]:cols[key] + c], flat[cols[key] + c:cols[key] + 2 * c]]
    grads += [flat[cols["qkv"] + i * c:cols["qkv"] + (i + 1) * c].view(t.shape) for i, t in enumerate((wq, wk, wv))]
    grads += ([flat[cols["qkv_b"] + i * c:cols["qkv_b"] + (i + 1) * c] for i in range(3)] if ctx.has_bias
              else [None] * 3)
    grads = [None if gr is None or not ctx.needs_input_grad[1 + i] else gr.to(params[i].dtype)
             for i, gr in enumerate(grads)]
    return (dx if need_dx else None, *grads, *(None,) * (n_in - 1 - _N_PARAMS))


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def dropout_seed(device: torch.device) -> Tensor:
    """A seed for the attention dropout's mask, drawn from torch's generator (so ``torch.manual_seed``
    and activation checkpointing's RNG replay govern it)."""
    return torch.randint(0, 2 ** 31 - 1, (1,), device=device, dtype=torch.int64)


def dropout_keep(seed: Tensor, batch: int, heads: int, d: int, p: float) -> Tensor:
    """The keep mask (B, heads, d, d) that the kernels apply with ``seed``, materialised for a reference."""
    mask = torch.empty(batch, heads, d, d, device=seed.device, dtype=torch.int8)
    dropout_mask_kernel[(batch * heads * d,)](mask, seed, d, p, BLOCK=min(1024, _pow2(d)))
    return mask.bool()


def scsa_triton(module: torch.nn.Module, x: Tensor) -> Tensor:
    """``module(x)`` (an ``SCSA``) through the fused kernels. x: (B, C, H, W), any layout, fp32/bf16/fp16."""
    convs = [getattr(module, n) for n in _STRIP_CONVS]
    drop = module.attn_drop_ratio if module.training else 0.0
    seed = dropout_seed(x.device) if drop > 0 else None
    window = list(module.pool_window(*x.shape[2:]))
    max_pool = module.down_sample_mode == "max_pool" and module.window_size != -1
    return _forward_op(x, *(cv.weight for cv in convs), *(cv.bias for cv in convs),
                       module.norm_h.weight, module.norm_h.bias, module.norm_w.weight, module.norm_w.bias,
                       module.norm.weight, module.norm.bias, module.q.weight, module.k.weight, module.v.weight,
                       module.q.bias, module.k.bias, module.v.bias, seed, window, module.head_num, max_pool,
                       module.gate_layer == "softmax", drop)[0]
