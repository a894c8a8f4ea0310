"""ECA's Triton path: seven launches and seven passes over the map per forward + backward.

Forward: per-channel means (one pass), the channel conv1d and its sigmoid (one small kernel),
the gate multiply (one pass in, one out). Backward: ``dL/da = sum_n dout * x`` (one pass
over each), the conv's backward (one small kernel: dL/ds, and per-program partial sums of the
weight gradient, added up by one ``sum``), ``dx = dout * a + dL/ds / N`` (one pass in, one out).
"""
from typing import Tuple

import torch
import triton
import triton.language as tl

from scsa.attention.kernels import common

__all__ = ["eca"]

_BLOCK_B = 16


@triton.jit
def _eca_gate_kernel(s, w, a, B, C, K: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
    """a[b, c] = sigmoid(sum_j w[j] * s[b, c + j - K // 2]), zero-padded along channels."""
    bi = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)[:, None]
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)[None, :]
        z = tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32)
        for j in tl.static_range(K):
            cj = c + j - K // 2
            z += tl.load(w + j) * tl.load(s + bi * C + cj, mask=(bi < B) & (cj >= 0) & (cj < C), other=0.0)
        tl.store(a + bi * C + c, tl.sigmoid(z), mask=(bi < B) & (c < C))


@triton.jit
def _eca_bwd_kernel(t, a, s, w, ds, dwp, B, C, K: tl.constexpr, KP: tl.constexpr,
                    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
    """From t = dL/da: ds[b, c] = sum_j w[j] dz[b, c - j + K // 2] with dz = t * a * (1 - a), and this
    program's share of dL/dw[j] = sum dz[b, c] s[b, c + j - K // 2] in dwp[program, j]."""
    bi = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)[:, None]
    taps = tl.arange(0, KP)
    dw = tl.zeros([KP], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)[None, :]
        m = (bi < B) & (c < C)
        av = tl.load(a + bi * C + c, mask=m, other=0.0)
        dz = tl.load(t + bi * C + c, mask=m, other=0.0) * av * (1.0 - av)
        acc = tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32)
        for j in tl.static_range(K):
            cj = c + j - K // 2  # forward tap j reads s at cj
            mj = (bi < B) & (cj >= 0) & (cj < C)
            dw += tl.where(taps == j, tl.sum(tl.sum(dz * tl.load(s + bi * C + cj, mask=mj & (c < C), other=0.0), 1), 0),
                           0.0)
            ck = c - j + K // 2  # output ck reads s[c] through tap j
            mk = (bi < B) & (ck >= 0) & (ck < C)
            ak = tl.load(a + bi * C + ck, mask=mk, other=0.0)
            acc += tl.load(w + j) * tl.load(t + bi * C + ck, mask=mk, other=0.0) * ak * (1.0 - ak)
        tl.store(ds + bi * C + c, acc, mask=m)
    tl.store(dwp + tl.program_id(0) * K + taps, dw, mask=taps < K)


def _blocks(c: int) -> int:
    return min(common.pow2(c), 256, common.tile_budget())


@torch.library.custom_op("scsa::eca_forward", mutates_args=())
def eca_forward(x: torch.Tensor, w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, c = x.shape[:2]
    s = common.reduce_n(x, scale=1.0 / (x.shape[2] * x.shape[3]))[0]
    a = torch.empty_like(s)
    k = w.numel()
    _eca_gate_kernel[(triton.cdiv(b, _BLOCK_B),)](s, w.float().contiguous(), a, b, c, K=k,
                                                   BLOCK_B=_BLOCK_B, BLOCK_C=_blocks(c))
    return common.scale_add(x, a=a), s, a


@eca_forward.register_fake
def _(x, w):
    b, c = x.shape[:2]
    return common.new_map(x), x.new_empty(b, c, dtype=torch.float32), x.new_empty(b, c, dtype=torch.float32)


@torch.library.custom_op("scsa::eca_backward", mutates_args=())
def eca_backward(dout: torch.Tensor, x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, a: torch.Tensor
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    b, c = x.shape[:2]
    k = w.numel()
    t = common.reduce_n(dout, x)[0]  # dL/da
    ds = torch.empty_like(s)
    grid = triton.cdiv(b, _BLOCK_B)
    dwp = torch.empty(grid, k, dtype=torch.float32, device=x.device)
    _eca_bwd_kernel[(grid,)](t, a, s, w.float().contiguous(), ds, dwp, b, c, K=k, KP=common.pow2(k),
                             BLOCK_B=_BLOCK_B, BLOCK_C=_blocks(c))
    dx = common.scale_add(dout, a=a, da=ds, da_scale=1.0 / (x.shape[2] * x.shape[3]), like=x)
    return dx, dwp.sum(0).view(w.shape).to(w.dtype)


@eca_backward.register_fake
def _(dout, x, w, s, a):
    return common.new_map(x), torch.empty_like(w)


common.register_autograd(eca_forward, eca_backward, differentiable=(0, 1))


def eca(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x * sigmoid(conv1d(mean_hw(x), w))`` along channels, ``w`` of odd size, zero padding."""
    return eca_forward(x, w)[0]
