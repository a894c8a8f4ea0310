"""EMA's Triton path: ten passes over the map per forward + backward, against 76 eagerly.

Per sample and channel group (``g``, cg channels), EMA's pixel weights are
``wt = w1 . x2 + w2 . x1`` with ``x1 = GN(g * s_h * s_w)``, ``x2 = conv3x3(g)``, ``w1 = softmax(mean x1)``
and ``w2 = softmax(mean x2)``; ``out = g * sigmoid(wt)``. Neither x1 nor x2 is ever stored:

* ``mean x1`` is GroupNorm's bias (every channel is its own group), and ``mean x2`` follows from
  the sums of g over the nine tap-shifted windows, so both softmaxes come from small tensors;
* ``w1 . x2`` is one 3x3 stencil of g with the kernel ``sum_co w1[co] W3[co]``, and ``w2 . x1``
  a per-channel scale of ``g * s_h * s_w`` plus a constant: ``wt`` is computed per pixel from g.

Forward: strip means (one pass), GroupNorm statistics of ``g * s_h * s_w`` and the shifted sums
(one pass), ``wt`` and ``out`` (one pass in, one out). Backward: ``e = dL/dwt`` (dout and g), the
sums over g that the small gradients need (one pass), dx (dout, g, dx). The small chain (1x1
conv, gates, softmaxes and their backward) runs in plain fp32 ops on (B * G, cg, ...) tensors.
"""
from typing import Tuple

import torch
import triton
import triton.language as tl

from scsa.attention.kernels import common

__all__ = ["ema"]


@triton.jit
def _stats_kernel(x, sxb, sxc, sxn, gates, stats, shifted, C, N, H, W,
                  BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr):
    """Per (b, c): mean and variance over pixels of ``x * s_h * s_w`` (Chan's pairwise update) into
    stats[0:2, b, c], and shifted[b, c, t] = the sum of x over the pixels that 3x3 tap t reads."""
    b = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mc = c < C
    taps = tl.arange(0, 16)
    mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    sums = tl.zeros([BLOCK_C, 16], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        h, w = (n // W)[None, :], (n % W)[None, :]
        m = mc[:, None] & (n < N)[None, :]
        g = tl.load(x + b.to(tl.int64) * sxb + c[:, None] * sxc + n[None, :] * sxn, mask=m, other=0.0).to(tl.float32)
        row = (b * C + c)[:, None] * (H + W)
        v = g * tl.load(gates + row + h, mask=m, other=0.0) * tl.load(gates + row + H + w, mask=m, other=0.0)
        k = tl.sum((n < N).to(tl.float32), 0)
        seen = n0 * 1.0
        tmean = tl.sum(v, 1) / k
        dev = tl.where(m, v - tmean[:, None], 0.0)
        delta = tmean - mean
        mean += delta * k / (seen + k)
        m2 += tl.sum(dev * dev, 1) + delta * delta * seen * k / (seen + k)
        for t in tl.static_range(9):
            # tap t reads input (h', w') for output (h' - dh, w' - dw): keep the pixels with an in-map output
            hh, ww = h - (t // 3 - 1), w - (t % 3 - 1)
            keep = (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
            sums += tl.where(taps[None, :] == t, tl.sum(tl.where(keep, g, 0.0), 1)[:, None], 0.0)
    tl.store(stats + b * C + c, mean, mask=mc)
    tl.store(stats + (tl.num_programs(0) + b) * C + c, m2 / N, mask=mc)
    tl.store(shifted + (b * C + c)[:, None] * 9 + taps[None, :], sums, mask=mc[:, None] & (taps < 9)[None, :])


@triton.jit
def _group_tile(x, sxb, sxc, sxn, b, gb, n, G, CG, N, BLOCK_G: tl.constexpr, CGP: tl.constexpr):
    """A (groups, channels in group, pixels) tile: its channel index, mask and pointer offsets."""
    gi = gb + tl.arange(0, BLOCK_G)[:, None, None]
    ci = tl.arange(0, CGP)[None, :, None]
    c = gi * CG + ci
    m = (gi < G) & (ci < CG) & (n < N)[None, None, :]
    return gi, ci, c, m, x + b.to(tl.int64) * sxb + c * sxc


@triton.jit
def _weights_out_kernel(x, sxb, sxc, sxn, out, sob, soc, son, gates, kern, alpha, const, sig, G, CG, N, H, W,
                        BLOCK_G: tl.constexpr, CGP: tl.constexpr, BLOCK_N: tl.constexpr):
    """wt[bg, n] = sum_c (alpha g s_h s_w + sum_t kern[c, t] g[n + t]) + const; sig = sigmoid(wt) and
    out = g * sig, for one block of pixels and every group."""
    b = tl.program_id(0)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    h, w = n // W, n % W
    n3 = n[None, None, :]
    C = G * CG
    for gb in range(0, G, BLOCK_G):
        gi, ci, c, m, xb = _group_tile(x, sxb, sxc, sxn, b, gb, n, G, CG, N, BLOCK_G, CGP)
        g = tl.load(xb + n3 * sxn, mask=m, other=0.0).to(tl.float32)
        row = (b * C + c) * (H + W)
        v = g * tl.load(gates + row + h[None, None, :], mask=m, other=0.0)
        v *= tl.load(gates + row + H + w[None, None, :], mask=m, other=0.0)
        v *= tl.load(alpha + b * C + c, mask=m, other=0.0)
        for t in tl.static_range(9):
            hh, ww = h + (t // 3 - 1), w + (t % 3 - 1)
            ok = (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
            gt = tl.load(xb + (hh * W + ww)[None, None, :] * sxn, mask=m & ok[None, None, :], other=0.0)
            v += tl.load(kern + ci * 9 + t, mask=ci < CG, other=0.0) * gt.to(tl.float32)
        g2 = gb + tl.arange(0, BLOCK_G)[:, None]
        wt = tl.sum(v, 1) + tl.load(const + b * G + g2, mask=g2 < G, other=0.0)
        s = tl.sigmoid(wt)
        tl.store(sig + (b * G + g2) * N + n[None, :], s, mask=(g2 < G) & (n < N)[None, :])
        tl.store(out + b.to(tl.int64) * sob + c * soc + n3 * son, (g * s[:, None, :]).to(out.dtype.element_ty),
                 mask=m)


@triton.jit
def _e_kernel(dout, sdb, sdc, sdn, x, sxb, sxc, sxn, sig, e, G, CG, N,
              BLOCK_G: tl.constexpr, CGP: tl.constexpr, BLOCK_N: tl.constexpr):
    """e[bg, n] = dL/dwt = sig * (1 - sig) * sum_c dout * g."""
    b = tl.program_id(0)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n3 = n[None, None, :]
    for gb in range(0, G, BLOCK_G):
        gi, ci, c, m, xb = _group_tile(x, sxb, sxc, sxn, b, gb, n, G, CG, N, BLOCK_G, CGP)
        g = tl.load(xb + n3 * sxn, mask=m, other=0.0).to(tl.float32)
        d = tl.load(dout + b.to(tl.int64) * sdb + c * sdc + n3 * sdn, mask=m, other=0.0).to(tl.float32)
        g2 = gb + tl.arange(0, BLOCK_G)[:, None]
        m2 = (g2 < G) & (n < N)[None, :]
        s = tl.load(sig + (b * G + g2) * N + n[None, :], mask=m2, other=0.0)
        tl.store(e + (b * G + g2) * N + n[None, :], s * (1.0 - s) * tl.sum(d * g, 1), mask=m2)


@triton.jit
def _grad_sums_kernel(x, sxb, sxc, sxh, sxw, gates, e, egs, gs, g2s, shifted, C, CG, H, W,
                      BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """Per (b, c), strips (rows over w, then columns over h, into (B, C, H + W)) of e*g*s_w | e*g*s_h
    (egs), g*s_w | g*s_h (gs), g^2*s_w^2 | g^2*s_h^2 (g2s); and shifted[b, c, t] = sum_n g[n] e[n - t]."""
    b = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c3 = c[:, None, None]
    w3 = tl.arange(0, BLOCK_W)[None, None, :]
    mcw = (c3 < C) & (w3 < W)
    L = H + W
    row3 = (b * C + c3) * L
    sw = tl.load(gates + row3 + H + w3, mask=mcw, other=0.0)
    ebase = e + (b * (C // CG) + c3 // CG) * (H * W)
    taps = tl.arange(0, 16)
    q = tl.zeros([BLOCK_C, 16], dtype=tl.float32)
    col_eg = tl.zeros([BLOCK_C, 1, BLOCK_W], dtype=tl.float32)
    col_g = tl.zeros([BLOCK_C, 1, BLOCK_W], dtype=tl.float32)
    col_g2 = tl.zeros([BLOCK_C, 1, BLOCK_W], dtype=tl.float32)
    xb = x + b.to(tl.int64) * sxb + c3 * sxc + w3 * sxw
    for h0 in range(0, H, BLOCK_H):
        h3 = h0 + tl.arange(0, BLOCK_H)[None, :, None]
        m = mcw & (h3 < H)
        g = tl.load(xb + h3 * sxh, mask=m, other=0.0).to(tl.float32)
        sh = tl.load(gates + row3 + h3, mask=(c3 < C) & (h3 < H), other=0.0)
        ev = tl.load(ebase + h3 * W + w3, mask=m, other=0.0)
        h2 = h0 + tl.arange(0, BLOCK_H)[None, :]
        m2 = (c[:, None] < C) & (h2 < H)
        rows = (b * C + c[:, None]) * L + h2
        tl.store(egs + rows, tl.sum(ev * g * sw, 2), mask=m2)
        tl.store(gs + rows, tl.sum(g * sw, 2), mask=m2)
        tl.store(g2s + rows, tl.sum(g * g * sw * sw, 2), mask=m2)
        col_eg += tl.sum(ev * g * sh, 1)[:, None, :]
        col_g += tl.sum(g * sh, 1)[:, None, :]
        col_g2 += tl.sum(g * g * sh * sh, 1)[:, None, :]
        for t in tl.static_range(9):
            hh, ww = h3 - (t // 3 - 1), w3 - (t % 3 - 1)
            et = tl.load(ebase + hh * W + ww, mask=m & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W), other=0.0)
            q += tl.where(taps[None, :] == t, tl.sum(tl.sum(g * et, 2), 1)[:, None], 0.0)
    cols = row3 + H + w3
    tl.store(egs + cols, col_eg, mask=mcw)
    tl.store(gs + cols, col_g, mask=mcw)
    tl.store(g2s + cols, col_g2, mask=mcw)
    tl.store(shifted + (b * C + c)[:, None] * 9 + taps[None, :], q, mask=(c < C)[:, None] & (taps < 9)[None, :])


@triton.jit
def _dx_kernel(dout, sdb, sdc, sdn, x, sxb, sxc, sxn, dx, sob, soc, son, gates, sig, e, per_c, ebar, kern, lin, du,
               C, CG, N, H, W, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr):
    """dx = dout * sig + kappa (e - mean e - xhat * mean(e xhat)) s_h s_w + sum_t kern[c, t] e[n - t]
    + sum_t lin[b, c, t] [n - t in the map] + du_h / W + du_w / H, with per_c = (mean, rstd, kappa, mean(e xhat))."""
    b = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    mc = c < C
    m = mc[:, None] & (n < N)[None, :]
    h, w = (n // W)[None, :], (n % W)[None, :]
    bc = (b * C + c)[:, None]
    bg = b * (C // CG) + c[:, None] // CG
    ci = c[:, None] % CG
    d = tl.load(dout + b.to(tl.int64) * sdb + c[:, None] * sdc + n[None, :] * sdn, mask=m, other=0.0).to(tl.float32)
    g = tl.load(x + b.to(tl.int64) * sxb + c[:, None] * sxc + n[None, :] * sxn, mask=m, other=0.0).to(tl.float32)
    ssw = tl.load(gates + bc * (H + W) + h, mask=m, other=0.0) * tl.load(gates + bc * (H + W) + H + w, mask=m,
                                                                          other=0.0)
    mu = tl.load(per_c + bc * 4, mask=mc[:, None], other=0.0)
    rstd = tl.load(per_c + bc * 4 + 1, mask=mc[:, None], other=0.0)
    kappa = tl.load(per_c + bc * 4 + 2, mask=mc[:, None], other=0.0)
    exh = tl.load(per_c + bc * 4 + 3, mask=mc[:, None], other=0.0)
    ev = tl.load(e + bg * N + n[None, :], mask=m, other=0.0)
    xhat = (g * ssw - mu) * rstd
    acc = d * tl.load(sig + bg * N + n[None, :], mask=m, other=0.0)
    acc += kappa * (ev - tl.load(ebar + bg, mask=mc[:, None], other=0.0) - xhat * exh) * ssw
    for t in tl.static_range(9):
        ho, wo = h - (t // 3 - 1), w - (t % 3 - 1)  # the output that reads this pixel through tap t
        ok = (ho >= 0) & (ho < H) & (wo >= 0) & (wo < W)
        acc += tl.load(kern + ci * 9 + t, mask=mc[:, None], other=0.0) * tl.load(e + bg * N + ho * W + wo,
                                                                                 mask=m & ok, other=0.0)
        acc += tl.where(ok, tl.load(lin + bc * 9 + t, mask=mc[:, None], other=0.0), 0.0)
    acc += tl.load(du + bc * (H + W) + h, mask=m, other=0.0) / W
    acc += tl.load(du + bc * (H + W) + H + w, mask=m, other=0.0) / H
    tl.store(dx + b.to(tl.int64) * sob + c[:, None] * soc + n[None, :] * son, acc.to(dx.dtype.element_ty), mask=m)


@triton.jit
def _gates_kernel(u, w1, b1, gates, CG, L, CGP: tl.constexpr, BLOCK_L: tl.constexpr):
    """gates[bg] = sigmoid(w1 @ u[bg] + b1): the shared 1x1 conv over both strips, for a block of positions."""
    bg = tl.program_id(0)
    i = tl.arange(0, CGP)[:, None, None]
    j = tl.arange(0, CGP)[None, :, None]
    l3 = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)[None, None, :]
    uv = tl.load(u + (bg * CG + j) * L + l3, mask=(j < CG) & (l3 < L), other=0.0)
    z = tl.sum(tl.load(w1 + i * CG + j, mask=(i < CG) & (j < CG), other=0.0) * uv, 1)  # (CGP, BLOCK_L)
    i2 = tl.arange(0, CGP)[:, None]
    l2 = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)[None, :]
    z += tl.load(b1 + i2, mask=i2 < CG, other=0.0)
    tl.store(gates + (bg * CG + i2) * L + l2, tl.sigmoid(z), mask=(i2 < CG) & (l2 < L))


@triton.jit
def _softmax(z, mask):
    z = tl.where(mask, z, float("-inf"))
    p = tl.exp(z - tl.max(z, 0))
    return p / tl.sum(p, 0)


@triton.jit
def _fwd_small_kernel(stats, shifted, w3, b3, gamma, beta, rstd_out, w2s_out, alpha_out, const_out, kern, BG, CG, N,
                      eps, CGP: tl.constexpr, BLOCK_J: tl.constexpr):
    """Per sample-group: rstd, w2 = softmax(mean x2), alpha = w2 * gamma * rstd and the constant of wt;
    program 0 also writes the stencil kern = w1 @ W3 (w1 = softmax(beta) is the same for every bg)."""
    bg = tl.program_id(0)
    co = tl.arange(0, CGP)
    mco = co < CG
    m2 = tl.zeros([CGP], dtype=tl.float32)
    for j0 in range(0, CG * 9, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        wt = tl.load(w3 + co[:, None] * (CG * 9) + j[None, :], mask=mco[:, None] & (j < CG * 9)[None, :], other=0.0)
        m2 += tl.sum(wt * tl.load(shifted + bg * CG * 9 + j, mask=j < CG * 9, other=0.0)[None, :], 1)
    b3v = tl.load(b3 + co, mask=mco, other=0.0)
    w2s = _softmax(b3v + m2 / N, mco)
    g, be = tl.load(gamma + co, mask=mco, other=0.0), tl.load(beta + co, mask=mco, other=0.0)
    w1s = _softmax(be, mco)
    mu = tl.load(stats + bg * CG + co, mask=mco, other=0.0)
    rstd = 1.0 / tl.sqrt(tl.load(stats + (BG + bg) * CG + co, mask=mco, other=0.0) + eps)
    tl.store(rstd_out + bg * CG + co, rstd, mask=mco)
    tl.store(w2s_out + bg * CG + co, w2s, mask=mco)
    tl.store(alpha_out + bg * CG + co, w2s * g * rstd, mask=mco)
    tl.store(const_out + bg, tl.sum(tl.where(mco, w2s * (be - g * mu * rstd) + w1s * b3v, 0.0), 0))
    if bg == 0:
        for j0 in range(0, CG * 9, BLOCK_J):
            j = j0 + tl.arange(0, BLOCK_J)
            wt = tl.load(w3 + co[:, None] * (CG * 9) + j[None, :], mask=mco[:, None] & (j < CG * 9)[None, :], other=0.0)
            tl.store(kern + j, tl.sum(w1s[:, None] * wt, 0), mask=j < CG * 9)


@triton.jit
def _bwd_small_kernel(e, egs, gs, g2s, gates, mu_in, rstd_in, w2s_in, q, w3, b3, gamma, beta, w1,
                      dz_out, du_out, lin_out, per_c, ebar_out, partial, CG, N, H, L,
                      CGP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_L: tl.constexpr):
    """Per sample-group, the backward of the small chain: from e = dL/dwt and the strip sums to dz (the
    1x1 conv's output gradient), du = w1.T @ dz, the per-channel terms of dx, and this group's share of
    the parameter gradients: partial = (w2 * sum(e xhat) | w2 * sum(e) + dm1 | dm2 | sum(e))."""
    bg = tl.program_id(0)
    co = tl.arange(0, CGP)
    mco = co < CG
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        acc += tl.load(e + bg * N + n, mask=n < N, other=0.0)
    esum = tl.sum(acc, 0)
    pacc = tl.zeros([CGP], dtype=tl.float32)
    for l0 in range(0, H, BLOCK_L):
        l = l0 + tl.arange(0, BLOCK_L)[None, :]
        m = mco[:, None] & (l < H)
        off = (bg * CG + co[:, None]) * L + l
        pacc += tl.sum(tl.load(gates + off, mask=m, other=0.0) * tl.load(egs + off, mask=m, other=0.0), 1)
    mu = tl.load(mu_in + bg * CG + co, mask=mco, other=0.0)
    rstd = tl.load(rstd_in + bg * CG + co, mask=mco, other=0.0)
    w2s = tl.load(w2s_in + bg * CG + co, mask=mco, other=0.0)
    g, be = tl.load(gamma + co, mask=mco, other=0.0), tl.load(beta + co, mask=mco, other=0.0)
    w1s = _softmax(be, mco)
    ehat = rstd * (pacc - mu * esum)  # sum_n e * xhat
    dw1s = esum * tl.load(b3 + co, mask=mco, other=0.0)
    for j0 in range(0, CG * 9, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        wt = tl.load(w3 + co[:, None] * (CG * 9) + j[None, :], mask=mco[:, None] & (j < CG * 9)[None, :], other=0.0)
        dw1s += tl.sum(wt * tl.load(q + bg * CG * 9 + j, mask=j < CG * 9, other=0.0)[None, :], 1)
    dw2s = g * ehat + be * esum
    dm1 = tl.where(mco, w1s * (dw1s - tl.sum(w1s * dw1s, 0)), 0.0)
    dm2 = tl.where(mco, w2s * (dw2s - tl.sum(w2s * dw2s, 0)), 0.0)
    for j0 in range(0, CG * 9, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        wt = tl.load(w3 + co[:, None] * (CG * 9) + j[None, :], mask=mco[:, None] & (j < CG * 9)[None, :], other=0.0)
        tl.store(lin_out + bg * CG * 9 + j, tl.sum(wt * dm2[:, None], 0) / N, mask=j < CG * 9)
    kappa = g * rstd * w2s
    exh = ehat / N
    ebar = esum / N
    tl.store(per_c + (bg * CG + co) * 4, mu, mask=mco)
    tl.store(per_c + (bg * CG + co) * 4 + 1, rstd, mask=mco)
    tl.store(per_c + (bg * CG + co) * 4 + 2, kappa, mask=mco)
    tl.store(per_c + (bg * CG + co) * 4 + 3, exh, mask=mco)
    tl.store(ebar_out + bg, ebar)
    pbase = partial + bg * (3 * CG + 1)
    tl.store(pbase + co, w2s * ehat, mask=mco)
    tl.store(pbase + CG + co, w2s * esum + dm1, mask=mco)
    tl.store(pbase + 2 * CG + co, dm2, mask=mco)
    tl.store(pbase + 3 * CG, esum)
    i3 = tl.arange(0, CGP)[:, None, None]
    j3 = tl.arange(0, CGP)[None, :, None]
    w1v = tl.load(w1 + i3 * CG + j3, mask=(i3 < CG) & (j3 < CG), other=0.0)  # w1[i, j]
    for l0 in range(0, L, BLOCK_L):
        l = l0 + tl.arange(0, BLOCK_L)[None, :]
        m = mco[:, None] & (l < L)
        off = (bg * CG + co[:, None]) * L + l
        gv = tl.load(gates + off, mask=m, other=0.0)
        gsv = tl.load(gs + off, mask=m, other=0.0)
        dg = kappa[:, None] * (tl.load(egs + off, mask=m, other=0.0) - ebar * gsv
                               - (exh * rstd)[:, None] * (gv * tl.load(g2s + off, mask=m, other=0.0) - mu[:, None] * gsv))
        dz = tl.where(m, dg * gv * (1.0 - gv), 0.0)
        tl.store(dz_out + off, dz, mask=m)
        tl.store(du_out + off, tl.sum(w1v * dz[:, None, :], 0), mask=m)  # du[j, l] = sum_i w1[i, j] dz[i, l]


def _group_blocks(x: torch.Tensor, groups: int, cg: int, n: int) -> Tuple[int, int, int]:
    """(BLOCK_G, CGP, BLOCK_N) for (groups, channels, pixels) tiles: wide along the contiguous axis."""
    cgp = common.pow2(cg)
    budget = common.tile_budget()
    if n > 1 and common.flat(x)[3] == 1:
        bn = min(common.pow2(n), 256 if budget == common._TILE else budget)
        return min(common.pow2(groups), max(1, budget // (cgp * bn))), cgp, bn
    bg = min(common.pow2(groups), max(1, min(64, budget) // cgp))
    return bg, cgp, min(common.pow2(n), max(1, budget // (bg * cgp)))


def _small_block(cg: int, length: int) -> int:
    """Positions per step of the small (per sample-group) kernels: (cg, cg, block) tiles within the budget."""
    return min(common.pow2(length), max(1, min(common._TILE, common.tile_budget()) // common.pow2(cg) ** 2))


def _rows_blocks(c: int, h: int, w: int) -> Tuple[int, int, int]:
    bw = common.pow2(w)
    budget = common.tile_budget()
    bh = min(common.pow2(h), max(1, budget // (bw * 16)))
    return min(common.pow2(c), max(1, budget // (bw * bh))), bh, bw


@torch.library.custom_op("scsa::ema_forward", mutates_args=())
def ema_forward(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, gn_w: torch.Tensor, gn_b: torch.Tensor,
                w3: torch.Tensor, b3: torch.Tensor, groups: int, eps: float
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                           torch.Tensor, torch.Tensor, torch.Tensor]:
    b, c, h, w = x.shape
    n, cg, bgs = h * w, c // groups, b * groups
    u = common.strips(x, mean=True).view(bgs, cg, h + w)  # x_h then x_w, per group
    f32 = dict(dtype=torch.float32, device=x.device)
    cgp = common.pow2(cg)
    gates = torch.empty_like(u)
    bl = _small_block(cg, h + w)
    _gates_kernel[(bgs, triton.cdiv(h + w, bl))](u, w1.float().contiguous(), b1.float().contiguous(), gates, cg,
                                                 h + w, CGP=cgp, BLOCK_L=bl)
    xf, sxb, sxc, sxn = common.flat(x)
    stats = torch.empty(2, b, c, **f32)
    shifted = torch.empty(b, c, 9, **f32)
    bc, bn = common.nc_blocks(xf, c, n)
    _stats_kernel[(b, triton.cdiv(c, bc))](xf, sxb, sxc, sxn, gates, stats, shifted, c, n, h, w,
                                           BLOCK_C=bc, BLOCK_N=bn)
    mu = stats[0].view(bgs, cg)
    rstd, w2s, alpha = (torch.empty(bgs, cg, **f32) for _ in range(3))
    const = torch.empty(bgs, **f32)
    kern = torch.empty(cg, 9, **f32)
    _fwd_small_kernel[(bgs,)](stats, shifted, w3.float().contiguous(), b3.float().contiguous(), gn_w.float().contiguous(),
                              gn_b.float().contiguous(), rstd, w2s, alpha, const, kern, bgs, cg, n, eps,
                              CGP=cgp, BLOCK_J=_small_block(cg, cg * 9))
    out = common.new_map(x)
    _, sob, soc, son = common.flat(out)
    sig = torch.empty(bgs, n, dtype=torch.float32, device=x.device)
    bg, cgp, bn = _group_blocks(xf, groups, cg, n)
    _weights_out_kernel[(b, triton.cdiv(n, bn))](xf, sxb, sxc, sxn, out, sob, soc, son, gates, kern, alpha, const,
                                                sig, groups, cg, n, h, w, BLOCK_G=bg, CGP=cgp, BLOCK_N=bn)
    return out, u, gates, mu, rstd, shifted, w2s, sig, kern


@ema_forward.register_fake
def _(x, w1, b1, gn_w, gn_b, w3, b3, groups, eps):
    b, c, h, w = x.shape
    bgs, cg = b * groups, c // groups
    f32 = dict(dtype=torch.float32, device=x.device)
    return (common.new_map(x), torch.empty(bgs, cg, h + w, **f32), torch.empty(bgs, cg, h + w, **f32),
            torch.empty(bgs, cg, **f32), torch.empty(bgs, cg, **f32), torch.empty(b, c, 9, **f32),
            torch.empty(bgs, cg, **f32), torch.empty(bgs, h * w, **f32), torch.empty(cg, 9, **f32))


@torch.library.custom_op("scsa::ema_backward", mutates_args=())
def ema_backward(dout: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, gn_w: torch.Tensor,
                 gn_b: torch.Tensor, w3: torch.Tensor, b3: torch.Tensor, groups: int, eps: float, u: torch.Tensor,
                 gates: torch.Tensor, mu: torch.Tensor, rstd: torch.Tensor, shifted: torch.Tensor, w2s: torch.Tensor,
                 sig: torch.Tensor, kern: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                 torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    b, c, h, w = x.shape
    n, cg, bgs = h * w, c // groups, b * groups
    xf, sxb, sxc, sxn = common.flat(x)
    gf, sdb, sdc, sdn = common.flat(dout)
    e = torch.empty(bgs, n, dtype=torch.float32, device=x.device)
    bg, cgp, bn = _group_blocks(xf, groups, cg, n)
    _e_kernel[(b, triton.cdiv(n, bn))](gf, sdb, sdc, sdn, xf, sxb, sxc, sxn, sig, e, groups, cg, n,
                                       BLOCK_G=bg, CGP=cgp, BLOCK_N=bn)
    egs, gs, g2s = (torch.empty(bgs, cg, h + w, dtype=torch.float32, device=x.device) for _ in range(3))
    q = torch.empty(b, c, 9, dtype=torch.float32, device=x.device)
    rc, rh, rw = _rows_blocks(c, h, w)
    _grad_sums_kernel[(b, triton.cdiv(c, rc))](xf, *xf.stride(), gates, e, egs, gs, g2s, q, c, cg, h, w,
                                               BLOCK_C=rc, BLOCK_H=rh, BLOCK_W=rw)
    f32 = dict(dtype=torch.float32, device=x.device)
    w3f = w3.float().contiguous()
    dz, du = torch.empty_like(gates), torch.empty_like(gates)
    lin = torch.empty(bgs, cg * 9, **f32)
    per_c = torch.empty(bgs, cg, 4, **f32)
    ebar = torch.empty(bgs, **f32)
    partial = torch.empty(bgs, 3 * cg + 1, **f32)
    _bwd_small_kernel[(bgs,)](e, egs, gs, g2s, gates, mu, rstd, w2s, q, w3f, b3.float().contiguous(),
                              gn_w.float().contiguous(), gn_b.float().contiguous(), w1.float().contiguous(), dz, du,
                              lin, per_c, ebar, partial, cg, n, h, h + w, CGP=common.pow2(cg),
                              BLOCK_N=min(common.pow2(n), common.tile_budget(), common._TILE),
                              BLOCK_J=_small_block(cg, cg * 9), BLOCK_L=_small_block(cg, h + w))
    with torch.autocast(x.device.type, enabled=False):
        dgamma, dbeta = partial[:, :cg].sum(0), partial[:, cg:2 * cg].sum(0)  # summed over sample-groups
        dm2_e = partial[:, 2 * cg:].sum(0)  # dm2 | sum(e)
        w1s = torch.softmax(gn_b.float(), 0)
        dw3 = torch.addmm(torch.outer(w1s, q.view(bgs, cg * 9).sum(0)), partial[:, 2 * cg:3 * cg].t(),
                          shifted.view(bgs, cg * 9), alpha=1.0 / n).view(w3.shape)
        db3 = torch.addcmul(dm2_e[:cg], w1s, dm2_e[cg])
        dw1 = torch.einsum("gil,gjl->ij", dz, u)
        db1 = dz.sum((0, 2))
    dx = common.new_map(x)
    _, sob, soc, son = common.flat(dx)
    bc, bn = common.nc_blocks(xf, c, n)
    _dx_kernel[(b, triton.cdiv(c, bc), triton.cdiv(n, bn))](gf, sdb, sdc, sdn, xf, sxb, sxc, sxn, dx, sob, soc, son,
                                                            gates, sig, e, per_c, ebar, kern, lin, du, c, cg, n, h, w,
                                                            BLOCK_C=bc, BLOCK_N=bn)
    return (dx, dw1.to(w1.dtype), db1.to(b1.dtype), dgamma.to(gn_w.dtype), dbeta.to(gn_b.dtype), dw3.to(w3.dtype),
            db3.to(b3.dtype))


@ema_backward.register_fake
def _(dout, x, w1, b1, gn_w, gn_b, w3, b3, groups, eps, *saved):
    return (common.new_map(x), torch.empty_like(w1), torch.empty_like(b1), torch.empty_like(gn_w),
            torch.empty_like(gn_b), torch.empty_like(w3), torch.empty_like(b3))


common.register_autograd(ema_forward, ema_backward, differentiable=(0, 1, 2, 3, 4, 5, 6))


def ema(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, gn_w: torch.Tensor, gn_b: torch.Tensor,
        w3: torch.Tensor, b3: torch.Tensor, groups: int, eps: float) -> torch.Tensor:
    """EMA with ``groups`` channel groups: 1x1 conv ``w1`` (cg, cg) + ``b1``, GroupNorm affine ``gn_w``,
    ``gn_b`` (eps ``eps``), 3x3 conv ``w3`` (cg, cg, 3, 3) + ``b3``."""
    return ema_forward(x, w1, b1, gn_w, gn_b, w3, b3, groups, eps)[0]
