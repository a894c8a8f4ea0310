"""CBAM's Triton path: twelve launches and eleven passes over the map per forward + backward.

``x1 = x * a_c`` (channel gate) and ``out = x1 * a_s`` (spatial gate); x1 is never stored.

Forward: per-channel mean and max (one pass), the shared MLP on both and the sigmoid of the sum
(one small kernel), per-pixel mean and max over channels of x1, recomputed (one pass), the 2->1
spatial conv and its sigmoid (one small kernel), ``out = x * a_c * a_s`` (one pass in, one out).

Backward: ``u = sum_c dout * x1`` (two passes), the conv's backward (one small kernel, its
weight gradient from per-program partial sums and one ``sum``), ``dL/da_c = sum_n dL/dx1 * x``
(two passes), the MLP's backward (two small kernels), ``dx`` (three passes: dout, x and dx).
A maximum's gradient is shared among the elements that reach it, as ``amax``'s is.
"""
from typing import Tuple

import torch
import triton
import triton.language as tl

from scsa.attention.kernels import common

__all__ = ["cbam"]


@triton.jit
def _reduce_c_kernel(x, sxb, sxc, sxn, y, syb, syc, syn, A, out, cnt, C, N,
                     HAS_Y: tl.constexpr, WITH_MAX: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr):
    """Per pixel, over channels, of v = x * A[b, c] (* y): out[b, 0, n] = mean_c v and, with WITH_MAX,
    out[b, 1, n] = max_c v and cnt[b, n] = how many reach it; else out[b, n] = sum_c v."""
    b = tl.program_id(0)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mn = n < N
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    mx = tl.full([BLOCK_N], float("-inf"), tl.float32)
    k = tl.zeros([BLOCK_N], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        m = (c < C)[:, None] & mn[None, :]
        v = tl.load(x + b.to(tl.int64) * sxb + c[:, None] * sxc + n[None, :] * sxn, mask=m, other=0.0).to(tl.float32)
        v *= tl.load(A + b * C + c, mask=c < C, other=0.0)[:, None]
        if HAS_Y:
            v *= tl.load(y + b.to(tl.int64) * syb + c[:, None] * syc + n[None, :] * syn, mask=m, other=0.0).to(tl.float32)
        acc += tl.sum(v, 0)
        if WITH_MAX:
            vm = tl.where(m, v, float("-inf"))
            tmax = tl.max(vm, 0)
            tk = tl.sum((vm == tmax[None, :]).to(tl.float32), 0)
            k = tl.where(tmax > mx, tk, tl.where(tmax == mx, k + tk, k))
            mx = tl.maximum(mx, tmax)
    if WITH_MAX:
        tl.store(out + (b * 2) * N + n, acc / C, mask=mn)
        tl.store(out + (b * 2 + 1) * N + n, mx, mask=mn)
        tl.store(cnt + b * N + n, k, mask=mn)
    else:
        tl.store(out + b * N + n, acc, mask=mn)


@triton.jit
def _taps(n, H, W, KS: tl.constexpr, TAPS: tl.constexpr):
    """(pixels, taps) tile: flat offsets of the tap's pixel (forward direction) and in-map masks."""
    t = tl.arange(0, TAPS)[None, :]
    dh, dw = t // KS - KS // 2, t % KS - KS // 2
    h, w = (n // W)[:, None], (n % W)[:, None]
    hf, wf = h + dh, w + dw  # the input an output reads through the tap
    ho, wo = h - dh, w - dw  # the output that reads an input through the tap
    ok = (n < H * W)[:, None] & (t < KS * KS)
    mf = ok & (hf >= 0) & (hf < H) & (wf >= 0) & (wf < W)
    mo = ok & (ho >= 0) & (ho < H) & (wo >= 0) & (wo < W)
    return t, hf * W + wf, mf, ho * W + wo, mo


@triton.jit
def _spatial_conv_kernel(feat, wc, a_s, N, H, W, KS: tl.constexpr, TAPS: tl.constexpr, BLOCK: tl.constexpr):
    """a_s[b, n] = sigmoid(conv2d(feat[b] (2 maps), wc (2, KS, KS), padding KS // 2))."""
    b = tl.program_id(0)
    n = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    t, pf, mf, _, _ = _taps(n, H, W, KS, TAPS)
    z = tl.zeros([BLOCK], dtype=tl.float32)
    for i in tl.static_range(2):
        wt = tl.load(wc + i * KS * KS + t, mask=t < KS * KS, other=0.0)
        z += tl.sum(wt * tl.load(feat + (b * 2 + i) * N + pf, mask=mf, other=0.0), 1)
    tl.store(a_s + b * N + n, tl.sigmoid(z), mask=n < N)


@triton.jit
def _spatial_conv_bwd_kernel(u, a_s, feat, wc, dfeat, dwp, N, H, W, KS: tl.constexpr, TAPS: tl.constexpr,
                             BLOCK: tl.constexpr):
    """From u = dL/da_s: dfeat = conv_transpose(dz, wc) with dz = u * a_s * (1 - a_s), and this
    program's share of dL/dwc in dwp[program]."""
    b = tl.program_id(0)
    prog = b * tl.num_programs(1) + tl.program_id(1)
    n = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    t, pf, mf, po, mo = _taps(n, H, W, KS, TAPS)
    av = tl.load(a_s + b * N + n, mask=n < N, other=0.0)
    dz = tl.load(u + b * N + n, mask=n < N, other=0.0) * av * (1.0 - av)
    ao = tl.load(a_s + b * N + po, mask=mo, other=0.0)
    dzo = tl.load(u + b * N + po, mask=mo, other=0.0) * ao * (1.0 - ao)  # dz of the output each tap feeds
    for i in tl.static_range(2):
        wt = tl.load(wc + i * KS * KS + t, mask=t < KS * KS, other=0.0)
        tl.store(dfeat + (b * 2 + i) * N + n, tl.sum(wt * dzo, 1), mask=n < N)
        fv = tl.load(feat + (b * 2 + i) * N + pf, mask=mf, other=0.0)
        tap = tl.arange(0, TAPS)
        tl.store(dwp + prog * (2 * KS * KS) + i * KS * KS + tap, tl.sum(dz[:, None] * fv, 0), mask=tap < KS * KS)


@triton.jit
def _dx1(g, x, ac, a_s, dfeat, feat, cntm, b, n, m, C, N):
    """dL/dx1 on a (channels, pixels) tile: through the spatial gate and both channel statistics."""
    mn = n < N
    x1 = x * ac
    fmax = tl.load(feat + (b * 2 + 1) * N + n, mask=mn, other=0.0)[None, :]
    dmax = tl.load(dfeat + (b * 2 + 1) * N + n, mask=mn, other=0.0) / tl.load(cntm + b * N + n, mask=mn, other=1.0)
    d = g * tl.load(a_s + b * N + n, mask=mn, other=0.0)[None, :]
    d += (tl.load(dfeat + b * 2 * N + n, mask=mn, other=0.0) / C)[None, :]
    return d + tl.where(m & (x1 == fmax), dmax[None, :], 0.0)


@triton.jit
def _channel_grad_kernel(g, sgb, sgc, sgn, x, sxb, sxc, sxn, A, a_s, dfeat, feat, cntm, t, C, N,
                         BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr):
    """t[b, c] = dL/da_c = sum_n dL/dx1 * x."""
    b = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ac = tl.load(A + b * C + c, mask=c < C, other=0.0)[:, None]
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        m = (c < C)[:, None] & (n < N)[None, :]
        gv = tl.load(g + b.to(tl.int64) * sgb + c[:, None] * sgc + n[None, :] * sgn, mask=m, other=0.0).to(tl.float32)
        xv = tl.load(x + b.to(tl.int64) * sxb + c[:, None] * sxc + n[None, :] * sxn, mask=m, other=0.0).to(tl.float32)
        acc += tl.sum(_dx1(gv, xv, ac, a_s, dfeat, feat, cntm, b, n, m, C, N) * xv, 1)
    tl.store(t + b * C + c, acc, mask=c < C)


@triton.jit
def _dx_kernel(g, sgb, sgc, sgn, x, sxb, sxc, sxn, dx, sdb, sdc, sdn, A, a_s, dfeat, feat, cntm, ds, pooled, C, N,
               BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr):
    """dx = dL/dx1 * a_c + dL/d(mean_n x) / N + dL/d(max_n x) * [x reaches it] / ties."""
    b = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    mc = c < C
    m = mc[:, None] & (n < N)[None, :]
    B = tl.num_programs(0)
    gv = tl.load(g + b.to(tl.int64) * sgb + c[:, None] * sgc + n[None, :] * sgn, mask=m, other=0.0).to(tl.float32)
    xv = tl.load(x + b.to(tl.int64) * sxb + c[:, None] * sxc + n[None, :] * sxn, mask=m, other=0.0).to(tl.float32)
    ac = tl.load(A + b * C + c, mask=mc, other=0.0)[:, None]
    d = _dx1(gv, xv, ac, a_s, dfeat, feat, cntm, b, n, m, C, N) * ac
    d += (tl.load(ds + b * C + c, mask=mc, other=0.0) / N)[:, None]
    smax = tl.load(pooled + (B + b) * C + c, mask=mc, other=0.0)[:, None]
    dmax = tl.load(ds + (B + b) * C + c, mask=mc, other=0.0) / tl.load(pooled + (2 * B + b) * C + c, mask=mc, other=1.0)
    d += tl.where(m & (xv == smax), dmax[:, None], 0.0)
    tl.store(dx + b.to(tl.int64) * sdb + c[:, None] * sdc + n[None, :] * sdn, d.to(dx.dtype.element_ty), mask=m)


def _reduce_c(x: torch.Tensor, a: torch.Tensor, y=None, with_max: bool = False):
    b, c, h, w = x.shape
    n = h * w
    x, sxb, sxc, sxn = common.flat(x)
    y, syb, syc, syn = common.flat(y) if y is not None else (x, sxb, sxc, sxn)
    out = torch.empty(b, 2 if with_max else 1, n, dtype=torch.float32, device=x.device)
    cnt = torch.empty(b, n, dtype=torch.float32, device=x.device) if with_max else out
    bc, bn = common.nc_blocks(x, c, n)
    _reduce_c_kernel[(b, triton.cdiv(n, bn))](x, sxb, sxc, sxn, y, syb, syc, syn, a, out, cnt, c, n,
                                             HAS_Y=y is not x, WITH_MAX=with_max, BLOCK_C=bc, BLOCK_N=bn)
    return out, cnt


def _conv_block(n: int, ks: int) -> int:
    """Pixels per program of the spatial conv: a (pixels, taps) tile within the tile budget."""
    return min(common.pow2(n), max(1, common.tile_budget() // common.pow2(ks * ks)))


@torch.library.custom_op("scsa::cbam_forward", mutates_args=())
def cbam_forward(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, wc: torch.Tensor
                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                            torch.Tensor]:
    b, c, h, w = x.shape
    pooled = common.reduce_n(x, scale=1.0 / (h * w), with_max=True)  # (3, B, C): mean, max, ties
    hid, a_c = common.mlp_forward(pooled[:2], w1.float().contiguous(), w2.float().contiguous())
    feat, cntm = _reduce_c(x, a_c, with_max=True)  # (B, 2, N) mean and max over channels of x1, (B, N) ties
    a_s = torch.empty(b, h * w, dtype=torch.float32, device=x.device)
    ks = wc.shape[-1]
    block = _conv_block(h * w, ks)
    _spatial_conv_kernel[(b, triton.cdiv(h * w, block))](feat, wc.float().contiguous(), a_s, h * w, h, w,
                                                         KS=ks, TAPS=common.pow2(ks * ks), BLOCK=block)
    return common.scale_add(x, a=a_c, s=a_s[:, None]), pooled, hid, a_c, feat, cntm, a_s


@cbam_forward.register_fake
def _(x, w1, w2, wc):
    b, c, h, w = x.shape
    f32 = dict(dtype=torch.float32, device=x.device)
    return (common.new_map(x), torch.empty(3, b, c, **f32), torch.empty(2, b, w1.shape[0], **f32),
            torch.empty(b, c, **f32), torch.empty(b, 2, h * w, **f32), torch.empty(b, h * w, **f32),
            torch.empty(b, h * w, **f32))


@torch.library.custom_op("scsa::cbam_backward", mutates_args=())
def cbam_backward(dout: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, wc: torch.Tensor,
                  pooled: torch.Tensor, hid: torch.Tensor, a_c: torch.Tensor, feat: torch.Tensor, cntm: torch.Tensor,
                  a_s: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    b, c, h, w = x.shape
    n = h * w
    ks = wc.shape[-1]
    wcf = wc.float().contiguous()
    u = _reduce_c(x, a_c, y=dout)[0]  # (B, 1, N): dL/da_s
    block = _conv_block(n, ks)
    grid = (b, triton.cdiv(n, block))
    dfeat = torch.empty_like(feat)
    dwp = torch.empty(grid[0] * grid[1], 2 * ks * ks, dtype=torch.float32, device=x.device)
    _spatial_conv_bwd_kernel[grid](u, a_s, feat, wcf, dfeat, dwp, n, h, w, KS=ks, TAPS=common.pow2(ks * ks),
                                   BLOCK=block)
    xf, sxb, sxc, sxn = common.flat(x)
    g, sgb, sgc, sgn = common.flat(dout)
    bc, bn = common.nc_blocks(xf, c, n)
    t = torch.empty(b, c, dtype=torch.float32, device=x.device)
    _channel_grad_kernel[(b, triton.cdiv(c, bc))](g, sgb, sgc, sgn, xf, sxb, sxc, sxn, a_c, a_s, dfeat, feat, cntm, t,
                                                  c, n, BLOCK_C=bc, BLOCK_N=bn)
    ds, dw1, dw2 = common.mlp_backward(t, a_c, pooled[:2], hid, w1.float().contiguous(), w2.float().contiguous())
    dx = common.new_map(x)
    _, sdb, sdc, sdn = common.flat(dx)
    _dx_kernel[(b, triton.cdiv(c, bc), triton.cdiv(n, bn))](g, sgb, sgc, sgn, xf, sxb, sxc, sxn, dx, sdb, sdc, sdn,
                                                            a_c, a_s, dfeat, feat, cntm, ds, pooled, c, n,
                                                            BLOCK_C=bc, BLOCK_N=bn)
    return dx, dw1.to(w1.dtype), dw2.to(w2.dtype), dwp.sum(0).view(wc.shape).to(wc.dtype)


@cbam_backward.register_fake
def _(dout, x, w1, w2, wc, pooled, hid, a_c, feat, cntm, a_s):
    return common.new_map(x), torch.empty_like(w1), torch.empty_like(w2), torch.empty_like(wc)


common.register_autograd(cbam_forward, cbam_backward, differentiable=(0, 1, 2, 3))


def cbam(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, wc: torch.Tensor) -> torch.Tensor:
    """CBAM with channel MLP weights ``w1`` (R, C), ``w2`` (C, R) and spatial conv ``wc`` (1, 2, k, k)."""
    return cbam_forward(x, w1, w2, wc)[0]
