"""Triton kernels and launch helpers shared by the comparison modules (SE, ECA, CBAM, CA, EMA).

The big tensor (the feature map, B x C x H x W) is addressed as (B, C, N) with N = H * W and
one stride per axis, so NCHW and channels_last maps are read in place (the compiler finds the
contiguous axis from the unit stride); a map whose H and W do not flatten into one axis is
copied first. Every big tensor an op touches is passed with its own strides: a gradient may
be laid out unlike the map. Values are loaded and stored in the map's dtype and computed in
fp32; every small tensor (pooled vectors, gates, strips) is fp32 and contiguous.

Kernels:

* ``reduce_n``: per (b, c), the sum over N of ``x`` (or ``x * y``), optionally also the maximum
  and how many elements reach it (a maximum's gradient is shared among ties, as in ``amax``);
* ``scale_add``: ``out = src * A[b, c] * S[b, c // CG, n] * AH[b, c, h] * AW[b, c, w]
  + DA[b, c] + DH[b, c, h] + DW[b, c, w]`` (each term scaled), each factor and term optional: every gate
  multiply, and the dL/dx of modules whose input gradient is of that form;
* ``strips``: the row and column sums (over W and over H) of ``x``, or of ``x * y`` weighted
  by column and row gates, in one pass, into one (B, C, H + W) tensor;
* ``mlp_fwd``, ``mlp_bwd_h``, ``mlp_bwd_w``: the bias-free ``C -> R -> C`` channel MLP of SE
  and CBAM (ReLU inside, sigmoid of the sum over the pooled inputs outside), fused.
"""
from typing import Callable, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

_TILE = 4096  # elements per program tile of the big tensor
_TILE_INTERP = 1 << 16  # the interpreter pays per program and per op, not per element


def tile_budget() -> int:
    from scsa.attention.kernels import interpreting
    return _TILE_INTERP if interpreting() else _TILE


def pow2(n: int) -> int:
    return triton.next_power_of_2(max(1, int(n)))


def flat(t: torch.Tensor) -> Tuple[torch.Tensor, int, int, int]:
    """``t`` (B, C, H, W) and its (B, C, N) strides; copied when H and W do not flatten into one axis."""
    _, _, h, w = t.shape
    if w == 1:
        return t, t.stride(0), t.stride(1), t.stride(2)
    if h == 1 or t.stride(2) == w * t.stride(3):
        return t, t.stride(0), t.stride(1), t.stride(3)
    return flat(t.contiguous())


def new_map(x: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """An uninitialised big tensor like ``x``: channels_last if ``x`` is, else contiguous.

    The same rule in a custom op's real and fake implementations, so compiled graphs agree on strides.
    """
    cl = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    fmt = torch.channels_last if cl else torch.contiguous_format
    return torch.empty(x.shape, dtype=dtype or x.dtype, device=x.device, memory_format=fmt)


def nc_blocks(t: torch.Tensor, c: int, n: int) -> Tuple[int, int]:
    """(BLOCK_C, BLOCK_N) for a (channels, positions) tile of ``t``: wide along its contiguous axis."""
    budget = tile_budget()
    if n > 1 and flat(t)[3] == 1:  # positions contiguous (NCHW)
        bn = min(pow2(n), 256 if budget == _TILE else budget)
        return min(pow2(c), max(1, budget // bn)), bn
    bc = min(pow2(c), 64 if budget == _TILE else budget)
    return bc, min(pow2(n), max(1, budget // bc))


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _reduce_n_kernel(x, sxb, sxc, sxn, y, syb, syc, syn, out_sum, out_max, out_cnt, C, N, scale,
                     HAS_Y: tl.constexpr, WITH_MAX: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr):
    b = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mc = c < C
    xb = x + b.to(tl.int64) * sxb + c[:, None] * sxc
    yb = y + b.to(tl.int64) * syb + c[:, None] * syc
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    mx = tl.full([BLOCK_C], float("-inf"), tl.float32)
    cnt = tl.zeros([BLOCK_C], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        m = mc[:, None] & (n < N)[None, :]
        v = tl.load(xb + n[None, :] * sxn, mask=m, other=0.0).to(tl.float32)
        if HAS_Y:
            v *= tl.load(yb + n[None, :] * syn, mask=m, other=0.0).to(tl.float32)
        acc += tl.sum(v, 1)
        if WITH_MAX:
            vm = tl.where(m, v, float("-inf"))
            tmax = tl.max(vm, 1)
            tcnt = tl.sum((vm == tmax[:, None]).to(tl.float32), 1)
            cnt = tl.where(tmax > mx, tcnt, tl.where(tmax == mx, cnt + tcnt, cnt))
            mx = tl.maximum(mx, tmax)
    tl.store(out_sum + b * C + c, acc * scale, mask=mc)
    if WITH_MAX:
        tl.store(out_max + b * C + c, mx, mask=mc)
        tl.store(out_cnt + b * C + c, cnt, mask=mc)


@triton.jit
def _scale_add_kernel(src, ssb, ssc, ssn, out, sob, soc, son, A, S, AH, AW, DA, DH, DW, C, N, H, W, CG, G, LH, LW,
                      da_scale, dh_scale, dw_scale,
                      HAS_A: tl.constexpr, HAS_S: tl.constexpr, HAS_HW: tl.constexpr,
                      ADD_A: tl.constexpr, ADD_HW: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr):
    b = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    mc = c < C
    m = mc[:, None] & (n < N)[None, :]
    v = tl.load(src + b.to(tl.int64) * ssb + c[:, None] * ssc + n[None, :] * ssn, mask=m, other=0.0).to(tl.float32)
    if HAS_A:
        v *= tl.load(A + b * C + c, mask=mc, other=0.0)[:, None]
    if HAS_S:
        v *= tl.load(S + (b * G + c // CG)[:, None] * N + n[None, :], mask=m, other=0.0)
    if HAS_HW or ADD_HW:
        h = (n // W)[None, :]
        w = (n % W)[None, :]
        row = (b * C + c)[:, None]
    if HAS_HW:
        v *= tl.load(AH + row * LH + h, mask=m, other=0.0) * tl.load(AW + row * LW + w, mask=m, other=0.0)
    if ADD_A:
        v += tl.load(DA + b * C + c, mask=mc, other=0.0)[:, None] * da_scale
    if ADD_HW:
        v += (tl.load(DH + row * LH + h, mask=m, other=0.0) * dh_scale
              + tl.load(DW + row * LW + w, mask=m, other=0.0) * dw_scale)
    tl.store(out + b.to(tl.int64) * sob + c[:, None] * soc + n[None, :] * son, v.to(out.dtype.element_ty), mask=m)


@triton.jit
def _strips_kernel(x, sxb, sxc, sxh, sxw, y, syb, syc, syh, syw, gates, out, C, H, W, row_scale, col_scale,
                   HAS_Y: tl.constexpr, GATED: tl.constexpr,
                   BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """out[b, c, h] = sum_w v * a_w[b, c, w] and out[b, c, H + w] = sum_h v * a_h[b, c, h] (gates
    (B, C, H + W) laid out as out, if GATED), v = x (* y); one program per (b, block of channels)
    walks all rows (BLOCK_W covers W)."""
    b = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c3 = c[:, None, None]
    w3 = tl.arange(0, BLOCK_W)[None, None, :]
    mcw = (c3 < C) & (w3 < W)
    xb = x + b.to(tl.int64) * sxb + c3 * sxc + w3 * sxw
    yb = y + b.to(tl.int64) * syb + c3 * syc + w3 * syw
    if GATED:
        gw = tl.load(gates + (b * C + c3) * (H + W) + H + w3, mask=mcw, other=0.0)
    col = tl.zeros([BLOCK_C, 1, BLOCK_W], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        h3 = h0 + tl.arange(0, BLOCK_H)[None, :, None]
        m = mcw & (h3 < H)
        v = tl.load(xb + h3 * sxh, mask=m, other=0.0).to(tl.float32)
        if HAS_Y:
            v *= tl.load(yb + h3 * syh, mask=m, other=0.0).to(tl.float32)
        h2 = h0 + tl.arange(0, BLOCK_H)[None, :]
        c2 = c[:, None]
        if GATED:
            gh = tl.load(gates + (b * C + c3) * (H + W) + h3, mask=(c3 < C) & (h3 < H), other=0.0)
            tl.store(out + (b * C + c2) * (H + W) + h2, tl.sum(v * gw, 2) * row_scale, mask=(c2 < C) & (h2 < H))
            col += tl.sum(v * gh, 1)[:, None, :]
        else:
            tl.store(out + (b * C + c2) * (H + W) + h2, tl.sum(v, 2) * row_scale, mask=(c2 < C) & (h2 < H))
            col += tl.sum(v, 1)[:, None, :]
    tl.store(out + (b * C + c3) * (H + W) + H + w3, col * col_scale, mask=mcw)


@triton.jit
def _mlp_fwd_kernel(s, w1, w2, hid, a, B, C, R, P: tl.constexpr,
                    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """hid[p] = relu(s[p] @ w1.T) for the P pooled inputs; a = sigmoid(sum_p hid[p] @ w2.T)."""
    bi = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    r = tl.arange(0, BLOCK_R)
    mb, mr = bi < B, r < R
    h0 = tl.zeros([BLOCK_B, BLOCK_R], dtype=tl.float32)
    h1 = tl.zeros([BLOCK_B, BLOCK_R], dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        mk = k < C
        w1t = tl.load(w1 + r[None, :] * C + k[:, None], mask=mk[:, None] & mr[None, :], other=0.0)  # (K, R)
        ms = mb[:, None] & mk[None, :]
        h0 += tl.dot(tl.load(s + bi[:, None] * C + k[None, :], mask=ms, other=0.0), w1t, input_precision="ieee")
        if P == 2:
            h1 += tl.dot(tl.load(s + (B + bi[:, None]) * C + k[None, :], mask=ms, other=0.0), w1t,
                         input_precision="ieee")
    h0 = tl.maximum(h0, 0.0)
    mh = mb[:, None] & mr[None, :]
    tl.store(hid + bi[:, None] * R + r[None, :], h0, mask=mh)
    if P == 2:
        h1 = tl.maximum(h1, 0.0)
        tl.store(hid + (B + bi[:, None]) * R + r[None, :], h1, mask=mh)
    for k0 in range(0, C, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        mk = k < C
        w2t = tl.load(w2 + k[None, :] * R + r[:, None], mask=mr[:, None] & mk[None, :], other=0.0)  # (R, K)
        z = tl.dot(h0, w2t, input_precision="ieee")
        if P == 2:
            z += tl.dot(h1, w2t, input_precision="ieee")
        tl.store(a + bi[:, None] * C + k[None, :], tl.sigmoid(z), mask=mb[:, None] & mk[None, :])


@triton.jit
def _mlp_bwd_h_kernel(t, a, hid, w1, w2, dhid, ds, B, C, R, P: tl.constexpr,
                      BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """From t = dL/da: dhid[p] = (dz @ w2) * (hid[p] > 0) with dz = t * a * (1 - a); ds[p] = dhid[p] @ w1."""
    bi = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    r = tl.arange(0, BLOCK_R)
    mb, mr = bi < B, r < R
    mh = mb[:, None] & mr[None, :]
    acc = tl.zeros([BLOCK_B, BLOCK_R], dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        mk = k < C
        ms = mb[:, None] & mk[None, :]
        av = tl.load(a + bi[:, None] * C + k[None, :], mask=ms, other=0.0)
        dz = tl.load(t + bi[:, None] * C + k[None, :], mask=ms, other=0.0) * av * (1.0 - av)
        w2b = tl.load(w2 + k[:, None] * R + r[None, :], mask=mk[:, None] & mr[None, :], other=0.0)  # (K, R)
        acc += tl.dot(dz, w2b, input_precision="ieee")
    d0 = tl.where(tl.load(hid + bi[:, None] * R + r[None, :], mask=mh, other=0.0) > 0, acc, 0.0)
    tl.store(dhid + bi[:, None] * R + r[None, :], d0, mask=mh)
    if P == 2:
        d1 = tl.where(tl.load(hid + (B + bi[:, None]) * R + r[None, :], mask=mh, other=0.0) > 0, acc, 0.0)
        tl.store(dhid + (B + bi[:, None]) * R + r[None, :], d1, mask=mh)
    for k0 in range(0, C, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        mk = k < C
        ms = mb[:, None] & mk[None, :]
        w1b = tl.load(w1 + r[:, None] * C + k[None, :], mask=mr[:, None] & mk[None, :], other=0.0)  # (R, K)
        tl.store(ds + bi[:, None] * C + k[None, :], tl.dot(d0, w1b, input_precision="ieee"), mask=ms)
        if P == 2:
            tl.store(ds + (B + bi[:, None]) * C + k[None, :], tl.dot(d1, w1b, input_precision="ieee"), mask=ms)


@triton.jit
def _mlp_bwd_w_kernel(t, a, s, hid, dhid, dw1, dw2, B, C, R, P: tl.constexpr,
                      BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """For a block of channels: dw2 = dz.T @ sum_p hid[p] and dw1 = sum_p dhid[p].T @ s[p], summed over B."""
    k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    r = tl.arange(0, BLOCK_R)
    mk, mr = k < C, r < R
    g2 = tl.zeros([BLOCK_K, BLOCK_R], dtype=tl.float32)
    g1 = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        bi = b0 + tl.arange(0, BLOCK_B)
        mb = bi < B
        mkb = mk[:, None] & mb[None, :]
        av = tl.load(a + bi[None, :] * C + k[:, None], mask=mkb, other=0.0)  # (K, B)
        dzt = tl.load(t + bi[None, :] * C + k[:, None], mask=mkb, other=0.0) * av * (1.0 - av)
        mh = mb[:, None] & mr[None, :]
        mrb = mr[:, None] & mb[None, :]
        mbk = mb[:, None] & mk[None, :]
        hsum = tl.load(hid + bi[:, None] * R + r[None, :], mask=mh, other=0.0)
        g1 += tl.dot(tl.load(dhid + bi[None, :] * R + r[:, None], mask=mrb, other=0.0),
                     tl.load(s + bi[:, None] * C + k[None, :], mask=mbk, other=0.0), input_precision="ieee")
        if P == 2:
            hsum += tl.load(hid + (B + bi[:, None]) * R + r[None, :], mask=mh, other=0.0)
            g1 += tl.dot(tl.load(dhid + (B + bi[None, :]) * R + r[:, None], mask=mrb, other=0.0),
                         tl.load(s + (B + bi[:, None]) * C + k[None, :], mask=mbk, other=0.0), input_precision="ieee")
        g2 += tl.dot(dzt, hsum, input_precision="ieee")
    tl.store(dw2 + k[:, None] * R + r[None, :], g2, mask=mk[:, None] & mr[None, :])
    tl.store(dw1 + r[:, None] * C + k[None, :], g1, mask=mr[:, None] & mk[None, :])


# ----------------------------------------------------------------------------- launchers

def reduce_n(x: torch.Tensor, y: Optional[torch.Tensor] = None, scale: float = 1.0,
             with_max: bool = False) -> torch.Tensor:
    """Per (b, c): ``scale * sum_n x (* y)``, and with ``with_max`` also max_n x and its tie count:
    (1 or 3, B, C) fp32."""
    b, c, h, w = x.shape
    x, sxb, sxc, sxn = flat(x)
    y, syb, syc, syn = flat(y) if y is not None else (x, sxb, sxc, sxn)
    out = torch.empty(3 if with_max else 1, b, c, dtype=torch.float32, device=x.device)
    bc, bn = nc_blocks(x, c, h * w)
    _reduce_n_kernel[(b, triton.cdiv(c, bc))](x, sxb, sxc, sxn, y, syb, syc, syn, out[0], out[1 % len(out)],
                                              out[2 % len(out)],
                                              c, h * w, scale, HAS_Y=y is not x, WITH_MAX=with_max,
                                              BLOCK_C=bc, BLOCK_N=bn)
    return out


def scale_add(src: torch.Tensor, a: Optional[torch.Tensor] = None, s: Optional[torch.Tensor] = None,
              ah: Optional[torch.Tensor] = None, aw: Optional[torch.Tensor] = None,
              da: Optional[torch.Tensor] = None, dh: Optional[torch.Tensor] = None,
              dw: Optional[torch.Tensor] = None, da_scale: float = 1.0, dh_scale: float = 1.0, dw_scale: float = 1.0,
              like: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``src * a[b,c] * s[b, g(c), n] * ah[b,c,h] * aw[b,c,w] + da_scale * da[b,c] + dh_scale * dh[b,c,h]
    + dw_scale * dw[b,c,w]``, any factor or term None (dh and dw go together); ``s`` is (B, G, N) for G
    channel groups. The strip tensors may be views into a (B, C, H + W) buffer: ``ah`` and ``dh`` share
    one row stride, ``aw`` and ``dw`` another. Laid out as ``new_map(like or src)``."""
    b, c, h, w = src.shape
    out = new_map(src if like is None else like)
    src, ssb, ssc, ssn = flat(src)
    _, sob, soc, son = flat(out)
    groups = s.shape[1] if s is not None else 1
    bc, bn = nc_blocks(src, c, h * w)
    d = src  # stands in for the pointers a launch does not use
    lh = (ah if ah is not None else dh if dh is not None else src).stride(1)
    lw = (aw if aw is not None else dw if dw is not None else src).stride(1)
    _scale_add_kernel[(b, triton.cdiv(c, bc), triton.cdiv(h * w, bn))](
        src, ssb, ssc, ssn, out, sob, soc, son, d if a is None else a, d if s is None else s,
        d if ah is None else ah, d if aw is None else aw, d if da is None else da,
        d if dh is None else dh, d if dw is None else dw, c, h * w, h, w, c // groups, groups, lh, lw,
        da_scale, dh_scale, dw_scale, HAS_A=a is not None, HAS_S=s is not None, HAS_HW=ah is not None,
        ADD_A=da is not None, ADD_HW=dh is not None, BLOCK_C=bc, BLOCK_N=bn)
    return out


def strips(x: torch.Tensor, y: Optional[torch.Tensor] = None, gates: Optional[torch.Tensor] = None,
           mean: bool = False) -> torch.Tensor:
    """Row sums (over W) and column sums (over H) of ``x`` (* ``y``) as one (B, C, H + W) fp32 tensor,
    rows first; with ``gates`` (B, C, H + W), rows weighted by its column part and columns by its
    row part; means instead of sums with ``mean``."""
    b, c, h, w = x.shape
    y = x if y is None else y
    out = torch.empty(b, c, h + w, dtype=torch.float32, device=x.device)
    bw = pow2(w)
    budget = tile_budget()
    bh = min(pow2(h), max(1, budget // (bw * 16)))
    bc = min(pow2(c), max(1, budget // (bw * bh)))
    _strips_kernel[(b, triton.cdiv(c, bc))](
        x, *x.stride(), y, *y.stride(), x if gates is None else gates, out, c, h, w,
        1.0 / w if mean else 1.0, 1.0 / h if mean else 1.0, HAS_Y=y is not x, GATED=gates is not None,
        BLOCK_C=bc, BLOCK_H=bh, BLOCK_W=bw)
    return out


_MLP_WARPS = 8  # the weight-gradient kernel holds two (BLOCK_K, R) fp32 accumulators


def _mlp_blocks(c: int, r: int) -> Tuple[int, int, int]:
    """(BLOCK_B, BLOCK_K, BLOCK_R): tl.dot needs every side at least 16; BLOCK_K shrinks as R grows,
    keeping the accumulators within registers."""
    br = max(16, pow2(r))
    return 16, max(16, min(64, 8192 // br, pow2(c), tile_budget())), br


def mlp_forward(s: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``s`` (P, B, C) pooled inputs, ``w1`` (R, C), ``w2`` (C, R): hidden (P, B, R) and gate (B, C)."""
    p, b, c = s.shape
    r = w1.shape[0]
    hid = torch.empty(p, b, r, dtype=torch.float32, device=s.device)
    a = torch.empty(b, c, dtype=torch.float32, device=s.device)
    bb, bk, br = _mlp_blocks(c, r)
    _mlp_fwd_kernel[(triton.cdiv(b, bb),)](s, w1, w2, hid, a, b, c, r, P=p, BLOCK_B=bb, BLOCK_K=bk, BLOCK_R=br,
                                          num_warps=_MLP_WARPS)
    return hid, a


def mlp_backward(t: torch.Tensor, a: torch.Tensor, s: torch.Tensor, hid: torch.Tensor, w1: torch.Tensor,
                 w2: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From ``t`` = dL/da (B, C): dL/ds (P, B, C), dL/dw1 (R, C), dL/dw2 (C, R), fp32."""
    p, b, c = s.shape
    r = w1.shape[0]
    dhid = torch.empty_like(hid)
    ds = torch.empty_like(s)
    dw1 = torch.empty(r, c, dtype=torch.float32, device=s.device)
    dw2 = torch.empty(c, r, dtype=torch.float32, device=s.device)
    bb, bk, br = _mlp_blocks(c, r)
    _mlp_bwd_h_kernel[(triton.cdiv(b, bb),)](t, a, hid, w1, w2, dhid, ds, b, c, r, P=p,
                                              BLOCK_B=bb, BLOCK_K=bk, BLOCK_R=br, num_warps=_MLP_WARPS)
    _mlp_bwd_w_kernel[(triton.cdiv(c, bk),)](t, a, s, hid, dhid, dw1, dw2, b, c, r, P=p,
                                              BLOCK_B=bb, BLOCK_K=bk, BLOCK_R=br, num_warps=_MLP_WARPS)
    return ds, dw1, dw2


def register_autograd(forward_op, backward_op, differentiable: Sequence[int],
                      unsaved: Callable[[tuple], Sequence[int]] = lambda inputs: ()) -> None:
    """Autograd for ``forward_op``, whose outputs are ``(out, *saved)``: the saved outputs are not
    differentiable; ``backward_op(dout, *inputs, *saved)`` returns the gradients of the inputs at
    positions ``differentiable``, every other input gets None. Inputs at ``unsaved(inputs)`` reach
    the backward as None (buffers the forward updates in place and the backward does not read)."""

    def setup_context(ctx, inputs, output):
        skip = set(unsaved(inputs))
        ctx.saved_tensors_at = [i for i, v in enumerate(inputs) if isinstance(v, torch.Tensor) and i not in skip]
        ctx.others = {i: v for i, v in enumerate(inputs) if not isinstance(v, torch.Tensor) and i not in skip}
        ctx.n_inputs = len(inputs)
        ctx.save_for_backward(*(inputs[i] for i in ctx.saved_tensors_at), *output[1:])
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)

    def backward(ctx, dout, *_):
        saved = ctx.saved_tensors
        k = len(ctx.saved_tensors_at)
        inputs = [None] * ctx.n_inputs
        for i, t in zip(ctx.saved_tensors_at, saved[:k]):
            inputs[i] = t
        for i, v in ctx.others.items():
            inputs[i] = v
        grads = backward_op(dout, *inputs, *saved[k:])
        out = [None] * ctx.n_inputs
        for i, g in zip(differentiable, grads):
            out[i] = g
        return tuple(out)

    forward_op.register_autograd(backward, setup_context=setup_context)
