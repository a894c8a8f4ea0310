"""CA's (coordinate attention's) Triton path: seven passes over the map per forward + backward.

Forward: the H- and W-strip means in one pass; the small chain (1x1 conv, BatchNorm, h-swish,
the two 1x1 convs and sigmoids) in plain ops on (B, C, H + W) tensors, in fp32; then
``out = x * a_h * a_w`` (one pass in, one out). Backward: ``dL/da_h = sum_w dout * x * a_w``
and ``dL/da_w = sum_h dout * x * a_h`` in one pass over dout and x; the small chain's backward
by hand (BatchNorm through ``native_batch_norm_backward``); ``dx = dout * a_h * a_w + dL/dx_h / W
+ dL/dx_w / H`` (one pass in, one out). BatchNorm's batch statistics need every sample, so the
small chain stays in plain ops rather than one kernel; its running statistics are updated as
``nn.BatchNorm2d`` updates them.
"""
from typing import Optional, Tuple

import torch
import torch.nn as nn

from scsa.attention.kernels import common

__all__ = ["coord_attention"]


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
        y = torch.nn.functional.hardswish(ybn)
        a = torch.sigmoid(torch.cat([torch.baddbmm(bh.float()[:, None], wh.float().expand(b, -1, -1), y[..., :h]),
                                     torch.baddbmm(bw.float()[:, None], ww.float().expand(b, -1, -1), y[..., h:])], 2))
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
    with torch.autocast(x.device.type, enabled=False):
        dz = t * a * (1 - a)
        dz_h, dz_w = dz[..., :h], dz[..., h:]
        dwh = torch.einsum("bch,bkh->ck", dz_h, y[..., :h])
        dww = torch.einsum("bcw,bkw->ck", dz_w, y[..., h:])
        dy = torch.cat([torch.matmul(wh.float().t(), dz_h), torch.matmul(ww.float().t(), dz_w)], dim=2)
        dybn = torch.ops.aten.hardswish_backward(dy, ybn)
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
