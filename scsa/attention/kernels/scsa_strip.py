"""SMSA's small chain in Triton: both strips' depthwise conv1d + GroupNorm(4) + gate, one kernel
each way.

GroupNorm(4)'s groups are the four conv groups (C/4 channels each), so one program takes one
(sample, group) pair, both strips, and needs no other program's result. It picks its group's
conv (weights, bias, kernel size) at run time, so the kernel is compiled once, not once per
group. The conv is recomputed from the strip means wherever it is needed: a 1-D conv of a few
hundred positions costs less than storing it.

Strips live in one (B, C, H + W) fp32 buffer: the H strip at [0, H), the W strip at [H, H + W).
"""
import triton
import triton.language as tl


@triton.jit
def _pick(gi, v0, v1, v2, v3):
    """``(v0, v1, v2, v3)[gi]`` for a run-time group index (pointers or ints)."""
    return tl.where(gi == 0, v0, tl.where(gi == 1, v1, tl.where(gi == 2, v2, v3)))


@triton.jit
def _conv(s, row, L, cl, cm, l2, m2, wp, bp, K, KP: tl.constexpr):
    """(BG, BL) conv of the strips at ``s + row[c] + l`` (zero padded) with the group's weights (G, 1, K)."""
    t3 = tl.arange(0, KP)[None, None, :]
    wt = tl.load(wp + cl[:, None, None] * K + t3, mask=cm[:, None, None] & (t3 < K), other=0.0).to(tl.float32)
    pos = l2[:, :, None] + t3 - K // 2
    sv = tl.load(s + row[:, None, None] + pos, mask=m2[:, :, None] & (t3 < K) & (pos >= 0) & (pos < L), other=0.0)
    return tl.sum(wt * sv, 2) + tl.load(bp + cl, mask=cm, other=0.0).to(tl.float32)[:, None]


@triton.jit
def _stats(s, b, C, LT, off, L, gi, G, wp, bp, K, eps, BG: tl.constexpr, BL: tl.constexpr, KP: tl.constexpr):
    """GroupNorm's mean and 1/std of the group's conv output: per step mean and squared deviations,
    merged across steps (Chan et al.), as accurate as two passes."""
    l2 = tl.arange(0, BL)[None, :]
    mean = 0.0
    m2sum = 0.0
    count = 0.0
    for c0 in range(0, G, BG):
        cl = c0 + tl.arange(0, BG)
        cm = cl < G
        m2 = cm[:, None] & (l2 < L)
        z = _conv(s, (b * C + gi * G + cl) * LT + off, L, cl, cm, l2, m2, wp, bp, K, KP)
        n = (tl.minimum(G - c0, BG) * L).to(tl.float32)
        step_mean = tl.sum(tl.where(m2, z, 0.0)) / n
        dev = tl.where(m2, z - step_mean, 0.0)
        delta = step_mean - mean
        total = count + n
        mean += delta * (n / total)
        m2sum += tl.sum(dev * dev) + delta * delta * (count * n / total)
        count = total
    return mean, 1.0 / tl.sqrt(m2sum / count + eps)


@triton.jit
def _side(side, H, W, p_h, p_w):
    """Length, offset in the strip buffer and a per-side pointer of strip ``side`` (0: H, 1: W)."""
    return tl.where(side == 0, H, W), side * H, tl.where(side == 0, p_h, p_w)


@triton.jit
def strip_gates_kernel(s, colp, a, C, H, W, n_band, w0, w1, w2, w3, b0, b1, b2, b3, K0, K1, K2, K3,
                       gnh_w, gnh_b, gnw_w, gnw_b, eps, SOFTMAX: tl.constexpr,
                       BG: tl.constexpr, BL: tl.constexpr, KP: tl.constexpr):
    """Gates ``a`` (B, C, H + W) from the strip means; first completes ``s`` with the W strip's means
    (the bands' column sums added up)."""
    b = tl.program_id(0)
    gi = tl.program_id(1)
    wp = _pick(gi, w0, w1, w2, w3)
    bp = _pick(gi, b0, b1, b2, b3)
    K = _pick(gi, K0, K1, K2, K3)
    G = C // 4
    LT = H + W
    l2 = tl.arange(0, BL)[None, :]
    for c0 in range(0, G, BG):
        cg = gi * G + c0 + tl.arange(0, BG)
        m2 = (cg < (gi + 1) * G)[:, None] & (l2 < W)
        acc = tl.zeros([BG, BL], dtype=tl.float32)
        for k in range(n_band):
            acc += tl.load(colp + ((b * n_band + k) * C + cg[:, None]) * W + l2, mask=m2, other=0.0)
        tl.store(s + (b * C + cg[:, None]) * LT + H + l2, acc / H, mask=m2)
    tl.debug_barrier()  # the convs below read neighbours written by other threads
    for side in range(2):
        L, off, gam = _side(side, H, W, gnh_w, gnw_w)
        bet = tl.where(side == 0, gnh_b, gnw_b)
        mean, rstd = _stats(s, b, C, LT, off, L, gi, G, wp, bp, K, eps, BG, BL, KP)
        for c0 in range(0, G, BG):
            cl = c0 + tl.arange(0, BG)
            cm = cl < G
            m2 = cm[:, None] & (l2 < L)
            cg = gi * G + cl
            row = (b * C + cg) * LT + off
            z = _conv(s, row, L, cl, cm, l2, m2, wp, bp, K, KP)
            n = (z - mean) * rstd * tl.load(gam + cg, mask=cm, other=0.0).to(tl.float32)[:, None] \
                + tl.load(bet + cg, mask=cm, other=0.0).to(tl.float32)[:, None]
            if SOFTMAX:  # over the strip's positions
                n = tl.where(m2, n, float("-inf"))
                e = tl.exp(n - tl.max(n, 1)[:, None])
                gate = e / tl.sum(e, 1)[:, None]
            else:
                gate = tl.sigmoid(n)
            tl.store(a + row[:, None] + l2, gate, mask=m2)


@triton.jit
def _pool_share(side, b, C, W, wh, ww, Hp, Wp, cg, l2, m2, dy, rows, cols, y, idx,
                MAX: tl.constexpr, BG: tl.constexpr, BL: tl.constexpr):
    """``a * dL/da`` of the strip gates through PCSA's pooling, given the pooled map's gradient ``dy``.

    Average: each window's gradient / area times x_s's sum over the window's part of this row
    (column). Max: each window's gradient times its maximum, on the row (column) holding it.
    Position l is row h (side 0: window row h // wh) or column w (side 1: window column w // ww).
    """
    acc = tl.zeros([BG, BL], dtype=tl.float32)
    base = (b * C + cg[:, None]) * (Hp * Wp)
    fixed = tl.where(side == 0, l2 // wh, l2 // ww)  # the window row (side 0) or column (side 1)
    valid = m2 & (fixed < tl.where(side == 0, Hp, Wp))
    for k in range(tl.where(side == 0, Wp, Hp)):  # the other window index
        p = base + tl.where(side == 0, fixed * Wp + k, k * Wp + fixed)
        d = tl.load(dy + p, mask=valid, other=0.0)
        if MAX:
            arg = tl.load(idx + p, mask=valid, other=0)
            hit = tl.where(side == 0, arg // W, arg % W) == l2
            acc += tl.where(hit, d * tl.load(y + p, mask=valid, other=0.0), 0.0)
        else:
            part = tl.where(side == 0, ((b * C + cg[:, None]) * (Hp * wh) + l2) * Wp + k,
                            ((b * C + cg[:, None]) * Hp + k) * (Wp * ww) + l2)
            acc += d * tl.load(tl.where(side == 0, rows, cols) + part, mask=valid, other=0.0)
    if not MAX:
        acc = acc / (wh * ww)
    return acc


@triton.jit
def strip_grads_kernel(s, a, a_c, ph, pwp, dy, rows, cols, y, idx, dsx, scratch, pg, P, C, H, W, wh, ww, Hp, Wp,
                       n_band, w0, w1, w2, w3, b0, b1, b2, b3, K0, K1, K2, K3, gnh_w, gnw_w, eps,
                       col_cb, col_gnh, col_gnw, SOFTMAX: tl.constexpr, MAX: tl.constexpr,
                       BG: tl.constexpr, BL: tl.constexpr, KP: tl.constexpr):
    """Backward of the strip chain: ``dsx`` (B, C, H + W), the strip means' gradient divided by the
    strip's averaging length (what dx gets), and the sample's row ``pg[b]`` of gradients for the
    four convs (flattened weights from column 0, biases at ``col_cb``) and both GroupNorms.

    The gates' ``t = a * dL/da`` come from the map's sums ``ph``/``pwp`` (times a_c) and the
    pooling; ``scratch`` (B, 2, C, H + W) holds dL/d(normalised) and then dL/d(conv output).
    """
    b = tl.program_id(0)
    gi = tl.program_id(1)
    wp = _pick(gi, w0, w1, w2, w3)
    bp = _pick(gi, b0, b1, b2, b3)
    K = _pick(gi, K0, K1, K2, K3)
    G = C // 4
    woff = G * _pick(gi, 0, K0, K0 + K1, K0 + K1 + K2)  # the group's first weight in the flat block
    LT = H + W
    l2 = tl.arange(0, BL)[None, :]
    prow = pg + b * P
    for side in range(2):
        L, off, gam = _side(side, H, W, gnh_w, gnw_w)
        col_gn = tl.where(side == 0, col_gnh, col_gnw)
        mean, rstd = _stats(s, b, C, LT, off, L, gi, G, wp, bp, K, eps, BG, BL, KP)
        sum_d = 0.0
        sum_dx = 0.0
        for c0 in range(0, G, BG):
            cl = c0 + tl.arange(0, BG)
            cm = cl < G
            m2 = cm[:, None] & (l2 < L)
            cg = gi * G + cl
            row = (b * C + cg) * LT + off
            xhat = (_conv(s, row, L, cl, cm, l2, m2, wp, bp, K, KP) - mean) * rstd
            if side == 0:
                t = tl.load(ph + (b * C + cg[:, None]) * H + l2, mask=m2, other=0.0)
            else:
                t = tl.zeros([BG, BL], dtype=tl.float32)
                for k in range(n_band):
                    t += tl.load(pwp + ((b * n_band + k) * C + cg[:, None]) * W + l2, mask=m2, other=0.0)
            t = t * tl.load(a_c + b * C + cg, mask=cm, other=0.0)[:, None]
            t += _pool_share(side, b, C, W, wh, ww, Hp, Wp, cg, l2, m2, dy, rows, cols, y, idx, MAX, BG, BL)
            gate = tl.load(a + row[:, None] + l2, mask=m2, other=0.0)
            if SOFTMAX:
                dn = t - gate * tl.sum(t, 1)[:, None]
            else:
                dn = t - t * gate
            dn = tl.where(m2, dn, 0.0)
            tl.store(prow + col_gn + cg, tl.sum(dn * xhat, 1), mask=cm)
            tl.store(prow + col_gn + C + cg, tl.sum(dn, 1), mask=cm)
            dxhat = dn * tl.load(gam + cg, mask=cm, other=0.0).to(tl.float32)[:, None]
            sum_d += tl.sum(dxhat)
            sum_dx += tl.sum(tl.where(m2, dxhat * xhat, 0.0))
            tl.store(scratch + (2 * b * C + cg[:, None]) * LT + off + l2, dxhat, mask=m2)
        tl.debug_barrier()
        inv_n = 1.0 / (G * L)
        for c0 in range(0, G, BG):
            cl = c0 + tl.arange(0, BG)
            cm = cl < G
            m2 = cm[:, None] & (l2 < L)
            cg = gi * G + cl
            xhat = (_conv(s, (b * C + cg) * LT + off, L, cl, cm, l2, m2, wp, bp, K, KP) - mean) * rstd
            dxhat = tl.load(scratch + (2 * b * C + cg[:, None]) * LT + off + l2, mask=m2, other=0.0)
            dz = rstd * (dxhat - sum_d * inv_n - xhat * (sum_dx * inv_n))
            tl.store(scratch + ((2 * b + 1) * C + cg[:, None]) * LT + off + l2, dz, mask=m2)
    tl.debug_barrier()  # the transposed conv below reads neighbours' dz
    t3 = tl.arange(0, KP)[None, None, :]
    for c0 in range(0, G, BG):
        cl = c0 + tl.arange(0, BG)
        cm = cl < G
        cg = gi * G + cl
        wt = tl.load(wp + cl[:, None, None] * K + t3, mask=cm[:, None, None] & (t3 < K), other=0.0).to(tl.float32)
        dw = tl.zeros([BG, KP], dtype=tl.float32)
        db = tl.zeros([BG], dtype=tl.float32)
        for side in range(2):
            L, off, inv_len = _side(side, H, W, 1.0 / W, 1.0 / H)
            m3 = (cm[:, None] & (l2 < L))[:, :, None]
            row = (b * C + cg[:, None, None]) * LT + off
            dz_row = scratch + ((2 * b + 1) * C + cg[:, None, None]) * LT + off
            dz = tl.load(dz_row + l2[:, :, None], mask=m3, other=0.0)
            # ds[l] = sum_t w[t] dz[l - t + K // 2];  dw[t] = sum_l dz[l] s[l + t - K // 2]
            back = l2[:, :, None] - t3 + K // 2
            dz_sh = tl.load(dz_row + back, mask=m3 & (t3 < K) & (back >= 0) & (back < L), other=0.0)
            tl.store(dsx + row + l2[:, :, None], tl.sum(wt * dz_sh, 2)[:, :, None] * inv_len, mask=m3)
            fwd = l2[:, :, None] + t3 - K // 2
            sv = tl.load(s + row + fwd, mask=m3 & (t3 < K) & (fwd >= 0) & (fwd < L), other=0.0)
            dw += tl.sum(dz * sv, 1)
            db += tl.sum(tl.sum(dz, 2), 1)
        t2 = tl.arange(0, KP)[None, :]
        tl.store(prow + woff + cl[:, None] * K + t2, dw, mask=cm[:, None] & (t2 < K))
        tl.store(prow + col_cb + cg, db, mask=cm)

