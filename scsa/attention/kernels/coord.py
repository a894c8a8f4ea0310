"""CA's (coordinate attention's) Triton path: seven passes over the map per forward + backward.

Forward: the H- and W-strip means in one pass; the small chain on (B, K or C, H + W) fp32
tensors (the 1x1 squeeze conv and BatchNorm in plain ops; h-swish, both gate convs and their
sigmoids in one kernel); ``out = x * a_h * a_w`` (one pass in, one out). Backward:
``dL/da_h = sum_w dout * x * a_w`` and ``dL/da_w = sum_h dout * x * a_h`` in one pass over dout
and x; the small chain's backward by hand (gates and h-swish in one kernel, BatchNorm through
``native_batch_norm_backward``); ``dx = dout * a_h * a_w + dL/dx_h / W + dL/dx_w / H`` (one pass
in, one out). BatchNorm's batch statistics need every sample before any gate, so it stays a
plain op between kernels; its running statistics are updated as ``nn.BatchNorm2d`` updates them.
"""
from typing import Optional, Tuple

import torch
import torch.nn as nn
import triton
import triton.language as tl

from scsa.attention.kernels import common

__all__ = ["coord_attention"]


@triton.jit
def _gates_kernel(ybn, wh, bh, ww, bw, y, a, C, K, H, L, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    """y = hardswish(ybn) (B, K, H + W) and a = sigmoid(wh @ y_h + bh | ww @ y_w + bw) (B, C, H + W)."""
    b = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    l = tl.program_id(2) * BLOCK_L + tl.arange(0, BLOCK_L)
    mc, ml = c < C, l < L
    rows = (l < H)[None, :]
    z = tl.where(rows, tl.load(bh + c, mask=mc, other=0.0)[:, None], tl.load(bw + c, mask=mc, other=0.0)[:, None])
    for k in range(K):
        v = tl.load(ybn + (b * K + k) * L + l, mask=ml, other=0.0)
        yk = v * tl.minimum(tl.maximum(v + 3.0, 0.0), 6.0) / 6.0
        if tl.program_id(1) == 0:
            tl.store(y + (b * K + k) * L + l, yk, mask=ml)
        wk = tl.where(rows, tl.load(wh + c * K + k, mask=mc, other=0.0)[:, None],
                      tl.load(ww + c * K + k, mask=mc, other=0.0)[:, None])
        z += wk * yk[None, :]
    tl.store(a + (b * C + c)[:, None] * L + l[None, :], tl.sigmoid(z), mask=mc[:, None] & ml[None, :])


@triton.jit
def _gates_bwd_kernel(t, a, ybn, wh, ww, dz, dybn, C, K, H, L,
                      BLOCK_C: tl.constexpr, KP: tl.constexpr, BLOCK_L: tl.constexpr):
    """From t = dL/da: dz = t * a * (1 - a) (stored) and dL/dybn = hardswish'(ybn) * (W.T @ dz)."""
    b = tl.program_id(0)
    l = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    k = tl.arange(0, KP)
    ml, mk = l < L, k < K
    rows3 = (l < H)[None, None, :]
    acc = tl.zeros([KP, BLOCK_L], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        m = (c < C)[:, None] & ml[None, :]
        off = (b * C + c)[:, None] * L + l[None, :]
        av = tl.load(a + off, mask=m, other=0.0)
        d = tl.load(t + off, mask=m, other=0.0) * av * (1.0 - av)
        tl.store(dz + off, d, mask=m)
        wm = (c < C)[:, None, None] & mk[None, :, None]
        woff = c[:, None, None] * K + k[None, :, None]
        wsel = tl.where(rows3, tl.load(wh + woff, mask=wm, other=0.0), tl.load(ww + woff, mask=wm, other=0.0))
        acc += tl.sum(wsel * d[:, None, :], 0)
    m2 = mk[:, None] & ml[None, :]
    off2 = (b * K + k)[:, None] * L + l[None, :]
    v = tl.load(ybn + off2, mask=m2, other=0.0)
    grad = tl.where(v < -3.0, 0.0, tl.where(v <= 3.0, acc * (v / 3.0 + 0.5), acc))
    tl.store(dybn + off2, grad, mask=m2)


def _blocks(c: int, k: int, length: int) -> Tuple[int, int]:
    bl = min(common.pow2(length), 64)
    return min(common.pow2(c), max(1, min(common._TILE, common.tile_budget()) // (common.pow2(k) * bl))), bl


@torch.library.custom_op("scsa::ca_forward", mutates_args=())
def ca_forward(x: torch.Tensor, w1: torch.Tensor, bn_w: torch.Tensor, bn_b: torch.Tensor,
               running_mean: torch.Tensor, running_var: torch.Tensor, wh: torch.Tensor, bh: torch.Tensor,
               ww: torch.Tensor, bw: torch.Tensor, training: bool, eps: float
               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                          torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out, *saved)``; in training, saved[-1] is the batch variance with Bessel's correction (for
    the running statistics, which the caller updates: a custom op with autograd cannot mutate)."""
    b, c, h, w = x.shape
    u = common.strips(x, mean=True)  # (B, C, H + W): x_h then x_w
    with torch.autocast(x.device.type, enabled=False):
        v = torch.matmul(w1.float(), u)  # (B, K, H + W)
        stats = (None, None) if training else (running_mean, running_var)
        ybn, mean, invstd = torch.ops.aten.native_batch_norm(v, bn_w.float(), bn_b.float(), *stats, training, 0.0, eps)
        var = torch.var(v, dim=(0, 2)) if training else v.new_empty(0)
    k = w1.shape[0]
    y, a = torch.empty_like(ybn), torch.empty_like(u)
    bc, bl = _blocks(c, 1, h + w)
    _gates_kernel[(b, triton.cdiv(c, bc), triton.cdiv(h + w, bl))](
        ybn, wh.float().contiguous(), bh.float().contiguous(), ww.float().contiguous(), bw.float().contiguous(),
        y, a, c, k, h, h + w, BLOCK_C=bc, BLOCK_L=bl)
    return common.scale_add(x, ah=a[..., :h], aw=a[..., h:]), u, v, mean, invstd, ybn, y, a, var


@ca_forward.register_fake
def _(x, w1, bn_w, bn_b, running_mean, running_var, wh, bh, ww, bw, training, eps):
    b, c, h, w = x.shape
    k = w1.shape[0]
    f32 = dict(dtype=torch.float32, device=x.device)
    stats = k if training else 0
    return (common.new_map(x), torch.empty(b, c, h + w, **f32), torch.empty(b, k, h + w, **f32),
            torch.empty(stats, **f32), torch.empty(stats, **f32), torch.empty(b, k, h + w, **f32),
            torch.empty(b, k, h + w, **f32), torch.empty(b, c, h + w, **f32), torch.empty(stats, **f32))


@torch.library.custom_op("scsa::ca_backward", mutates_args=())
def ca_backward(dout: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, bn_w: torch.Tensor, bn_b: torch.Tensor,
                running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor], wh: torch.Tensor, bh: torch.Tensor,
                ww: torch.Tensor, bw: torch.Tensor, training: bool, eps: float, u: torch.Tensor,
                v: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor, ybn: torch.Tensor, y: torch.Tensor,
                a: torch.Tensor, var: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                               torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    b, c, h, w = x.shape
    t = common.strips(x, y=dout, gates=a)  # (B, C, H + W): dL/da_h then dL/da_w
    k = w1.shape[0]
    dz, dybn = torch.empty_like(t), torch.empty_like(ybn)
    bc, bl = _blocks(c, k, h + w)
    _gates_bwd_kernel[(b, triton.cdiv(h + w, bl))](t, a, ybn, wh.float().contiguous(), ww.float().contiguous(), dz,
                                                  dybn, c, k, h, h + w, BLOCK_C=bc, KP=common.pow2(k), BLOCK_L=bl)
    with torch.autocast(x.device.type, enabled=False):
        dz_h, dz_w = dz[..., :h], dz[..., h:]
        dwh = torch.einsum("bch,bkh->ck", dz_h, y[..., :h])
        dww = torch.einsum("bcw,bkw->ck", dz_w, y[..., h:])
        dv, dbn_w, dbn_b = torch.ops.aten.native_batch_norm_backward(
            dybn, v, bn_w.float(), running_mean, running_var, mean, invstd, training, eps, [True, True, True])
        dw1 = torch.einsum("bkl,bcl->kc", dv, u)
        du = torch.matmul(w1.float().t(), dv)  # dL/dx_h then dL/dx_w
    dx = common.scale_add(dout, ah=a[..., :h], aw=a[..., h:], dh=du[..., :h], dw=du[..., h:], dh_scale=1.0 / w,
                          dw_scale=1.0 / h, like=x)
    return (dx, dw1.to(w1.dtype), dbn_w.to(bn_w.dtype), dbn_b.to(bn_b.dtype), dwh.to(wh.dtype),
            dz_h.sum((0, 2)).to(bh.dtype), dww.to(ww.dtype), dz_w.sum((0, 2)).to(bw.dtype))


@ca_backward.register_fake
def _(dout, x, w1, bn_w, bn_b, running_mean, running_var, wh, bh, ww, bw, training, eps, *saved):
    return (common.new_map(x), torch.empty_like(w1), torch.empty_like(bn_w), torch.empty_like(bn_b),
            torch.empty_like(wh), torch.empty_like(bh), torch.empty_like(ww), torch.empty_like(bw))


# In training the backward uses the batch statistics: the running ones (updated in place) stay unsaved.
common.register_autograd(ca_forward, ca_backward, differentiable=(0, 1, 2, 3, 6, 7, 8, 9),
                         unsaved=lambda inputs: (4, 5) if inputs[10] else ())


def coord_attention(x: torch.Tensor, w1: torch.Tensor, bn: nn.BatchNorm2d, wh: torch.Tensor, bh: torch.Tensor,
                    ww: torch.Tensor, bw: torch.Tensor) -> torch.Tensor:
    """``x * a_w * a_h`` of coordinate attention; ``bn`` is used (and its statistics updated) as its
    own ``forward`` would: batch statistics in training, running ones in eval."""
    if bn.running_mean is None or bn.running_var is None or not bn.affine:
        raise ValueError("CA's Triton path needs its BatchNorm with affine weights and running statistics "
                         "(track_running_stats=True): use kernel='torch' for other BatchNorm settings")
    out, *saved = ca_forward(x, w1, bn.weight, bn.bias, bn.running_mean, bn.running_var, wh, bh, ww, bw,
                             bn.training, bn.eps)
    if bn.training:
        bn.num_batches_tracked.add_(1)
        momentum = bn.momentum
        if momentum is None:  # cumulative moving average, as nn.BatchNorm2d does
            momentum = 1.0 / float(bn.num_batches_tracked)
        with torch.no_grad():
            bn.running_mean.lerp_(saved[2], momentum)
            bn.running_var.lerp_(saved[-1], momentum)
    return out
