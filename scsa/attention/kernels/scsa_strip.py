"""SMSA's small chain in Triton: both strips' depthwise conv1d + GroupNorm(4) + gate, one kernel
each way, one program per sample.

GroupNorm(4)'s groups are the four conv groups (C/4 channels each). A program walks the
sample's channels in steps of BG channels of every group at once: a tile row is one (group,
channel) pair and carries its group's conv (weights, bias, kernel size, picked at run time,
so the kernel is compiled once); per-group sums reduce the tile reshaped to (4, ...). The
forward keeps GroupNorm's normalised values and 1/std (small) for the backward.

Strips live in one (B, C, H + W) fp32 buffer: the H strip at [0, H), the W strip at [H, H + W).
"""
import triton
import triton.language as tl


@triton.jit
def _pick(gi, v0, v1, v2, v3):
    """``(v0, v1, v2, v3)[gi]`` for run-time group indices (pointers or ints)."""
    return tl.where(gi == 0, v0, tl.where(gi == 1, v1, tl.where(gi == 2, v2, v3)))


@triton.jit
def _group_sum(t, BG: tl.constexpr, BL: tl.constexpr):
    """Per-group sums (4,) of a step's (4 * BG, BL) tile."""
    return tl.sum(tl.reshape(t, [4, BG * BL]), 1)


@triton.jit
def _per_row(v, BG: tl.constexpr):
    """Per-group values (4,) spread to a step's rows (4 * BG,)."""
    return tl.reshape(tl.broadcast_to(v[:, None], [4, BG]), [4 * BG])


@triton.jit
def _conv(s, row, L, cl, cm, l2, m2, wp, bp, K, KP: tl.constexpr):
    """(R, BL) conv of the strips at ``s + row + l`` (zero padded), each row with its group's weights
    ``wp`` (G, 1, K), bias ``bp`` and kernel size ``K``."""
    t3 = tl.arange(0, KP)[None, None, :]
    k3 = K[:, None, None]
    wt = tl.load(wp[:, None, None] + cl[:, None, None] * k3 + t3, mask=cm[:, None, None] & (t3 < k3),
                 other=0.0).to(tl.float32)
    pos = l2[:, :, None] + t3 - k3 // 2
    sv = tl.load(s + row[:, None, None] + pos, mask=m2[:, :, None] & (t3 < k3) & (pos >= 0) & (pos < L), other=0.0)
    return tl.sum(wt * sv, 2) + tl.load(bp + cl, mask=cm, other=0.0).to(tl.float32)[:, None]


@triton.jit
def _side(side, H, W, p_h, p_w):
    """Length, offset in the strip buffer and a per-side pointer of strip ``side`` (0: H, 1: W)."""
    return tl.where(side == 0, H, W), side * H, tl.where(side == 0, p_h, p_w)


@triton.jit
def strip_gates_kernel(s, colp, a, xhat, rstd, C, H, W, n_band, w0, w1, w2, w3, b0, b1, b2, b3, K0, K1, K2, K3,
                       gnh_w, gnh_b, gnw_w, gnw_b, eps, SOFTMAX: tl.constexpr,
                       BG: tl.constexpr, BL: tl.constexpr, KP: tl.constexpr):
    """Gates ``a`` (B, C, H + W) from the strip means; first completes ``s`` with the W strip's means
    (the bands' column sums added up). Keeps GroupNorm's normalised values ``xhat`` (B, C, H + W)
    and ``rstd`` (B, 2, 4) for the backward."""
    b = tl.program_id(0)
    G = C // 4
    LT = H + W
    l2 = tl.arange(0, BL)[None, :]
    for c0 in range(0, C, 4 * BG):
        c = c0 + tl.arange(0, 4 * BG)
        m2 = (c < C)[:, None] & (l2 < W)
        acc = tl.full([4 * BG, BL], 0.0, tl.float32)
        for k in range(n_band):
            acc += tl.load(colp + ((b * n_band + k) * C + c[:, None]) * W + l2, mask=m2, other=0.0)
        tl.store(s + (b * C + c[:, None]) * LT + H + l2, acc / H, mask=m2)
    tl.debug_barrier()  # the convs below read neighbours written by other threads
    grp = tl.arange(0, 4 * BG) // BG  # row r: channel c0 + r % BG of group r // BG
    wp = _pick(grp, w0, w1, w2, w3)
    bp = _pick(grp, b0, b1, b2, b3)
    K = _pick(grp, K0, K1, K2, K3)
    for side in range(2):
        L, off, gam = _side(side, H, W, gnh_w, gnw_w)
        bet = tl.where(side == 0, gnh_b, gnw_b)
        # the conv, kept in xhat for now, and each group's statistics: per step mean and squared
        # deviations, merged across steps (Chan et al.), as accurate as two passes
        mean = tl.full([4], 0.0, tl.float32)
        m2sum = tl.full([4], 0.0, tl.float32)
        count = 0.0
        for c0 in range(0, G, BG):
            cl = c0 + tl.arange(0, 4 * BG) % BG
            cm = cl < G
            m2 = cm[:, None] & (l2 < L)
            row = (b * C + grp * G + cl) * LT + off
            z = tl.where(m2, _conv(s, row, L, cl, cm, l2, m2, wp, bp, K, KP), 0.0)
            tl.store(xhat + row[:, None] + l2, z, mask=m2)
            n = (tl.minimum(G - c0, BG) * L).to(tl.float32)
            step_mean = _group_sum(z, BG, BL) / n
            dev = tl.where(m2, z - _per_row(step_mean, BG)[:, None], 0.0)
            delta = step_mean - mean
            total = count + n
            mean += delta * (n / total)
            m2sum += _group_sum(dev * dev, BG, BL) + delta * delta * (count * n / total)
            count = total
        inv_std = 1.0 / tl.sqrt(m2sum / count + eps)
        tl.store(rstd + (b * 2 + side) * 4 + tl.arange(0, 4), inv_std)
        mean_r = _per_row(mean, BG)[:, None]
        inv_std_r = _per_row(inv_std, BG)[:, None]
        tl.debug_barrier()
        for c0 in range(0, G, BG):
            cl = c0 + tl.arange(0, 4 * BG) % BG
            cm = cl < G
            m2 = cm[:, None] & (l2 < L)
            cg = grp * G + cl
            ptr = (b * C + cg[:, None]) * LT + off + l2
            xh = (tl.load(xhat + ptr, mask=m2, other=0.0) - mean_r) * inv_std_r
            tl.debug_barrier()  # every thread has read its z before any overwrites it
            tl.store(xhat + ptr, xh, mask=m2)
            n = xh * tl.load(gam + cg, mask=cm, other=0.0).to(tl.float32)[:, None] \
                + tl.load(bet + cg, mask=cm, other=0.0).to(tl.float32)[:, None]
            if SOFTMAX:  # over the strip's positions
                n = tl.where(m2, n, float("-inf"))
                e = tl.exp(n - tl.max(n, 1)[:, None])
                gate = e / tl.sum(e, 1)[:, None]
            else:
                gate = 1.0 / (1.0 + tl.exp(-n))
            tl.store(a + ptr, gate, mask=m2)


@triton.jit
def _pool_share(side, b, C, W, wh, ww, Hp, Wp, cg, l2, m2, dy, rows, cols, y, idx,
                MAX: tl.constexpr, BR: tl.constexpr, BL: tl.constexpr):
    """``a * dL/da`` of the strip gates through PCSA's pooling, given the pooled map's gradient ``dy``.

    Average: each window's gradient / area times x_s's sum over the window's part of this row
    (column). Max: each window's gradient times its maximum, on the row (column) holding it.
    Position l is row h (side 0: window row h // wh) or column w (side 1: window column w // ww).
    """
    acc = tl.full([BR, BL], 0.0, tl.float32)
    chan = b * C + cg[:, None]
    fixed = tl.where(side == 0, l2 // wh, l2 // ww)  # the window row (side 0) or column (side 1)
    valid = m2 & (fixed < tl.where(side == 0, Hp, Wp))
    # the windows along the other axis: pooled-map offsets p0 + k * p_step; x_s's partial sums q0 + k * q_step
    p0 = chan * (Hp * Wp) + tl.where(side == 0, fixed * Wp, fixed)
    p_step = tl.where(side == 0, 1, Wp)
    q0 = tl.where(side == 0, rows + (chan * (Hp * wh) + l2) * Wp, cols + chan * (Hp * Wp * ww) + l2)
    q_step = tl.where(side == 0, 1, Wp * ww)
    for k in range(tl.where(side == 0, Wp, Hp)):
        d = tl.load(dy + p0 + k * p_step, mask=valid, other=0.0)
        if MAX:
            arg = tl.load(idx + p0 + k * p_step, mask=valid, other=0)
            hit = tl.where(side == 0, arg // W, arg % W) == l2
            acc += tl.where(hit, d * tl.load(y + p0 + k * p_step, mask=valid, other=0.0), 0.0)
        else:
            acc += d * tl.load(q0 + k * q_step, mask=valid, other=0.0)
    if not MAX:
        acc = acc / (wh * ww)
    return acc


@triton.jit
def strip_grads_kernel(s, a, xhat, rstd, a_c, ph, pwp, dy, rows, cols, y, idx, dsx, scratch, pg, P, C, H, W,
                       wh, ww, Hp, Wp, n_band, w0, w1, w2, w3, K0, K1, K2, K3, gnh_w, gnw_w,
                       col_cb, col_gnh, col_gnw, SOFTMAX: tl.constexpr, MAX: tl.constexpr,
                       BG: tl.constexpr, BL: tl.constexpr, KP: tl.constexpr):
    """Backward of the strip chain: ``dsx`` (B, C, H + W), the strip means' gradient divided by the
    strip's averaging length (what dx gets), and the sample's row ``pg[b]`` of gradients for the
    four convs (flattened weights from column 0, biases at ``col_cb``) and both GroupNorms.

    The gates' ``t = a * dL/da`` come from the map's sums ``ph``/``pwp`` (times a_c) and the
    pooling; GroupNorm's ``xhat`` and ``rstd`` from the forward; ``scratch`` (B, 2, C, H + W) holds
    dL/d(normalised) and then dL/d(conv output).
    """
    b = tl.program_id(0)
    G = C // 4
    LT = H + W
    l2 = tl.arange(0, BL)[None, :]
    prow = pg + b * P
    grp = tl.arange(0, 4 * BG) // BG  # row r: channel c0 + r % BG of group r // BG
    for side in range(2):
        L, off, gam = _side(side, H, W, gnh_w, gnw_w)
        col_gn = tl.where(side == 0, col_gnh, col_gnw)
        inv_std = tl.load(rstd + (b * 2 + side) * 4 + grp)[:, None]
        sum_d = tl.full([4], 0.0, tl.float32)
        sum_dx = tl.full([4], 0.0, tl.float32)
        for c0 in range(0, G, BG):
            cl = c0 + tl.arange(0, 4 * BG) % BG
            cm = cl < G
            m2 = cm[:, None] & (l2 < L)
            cg = grp * G + cl
            ptr = (b * C + cg[:, None]) * LT + off + l2
            xh = tl.load(xhat + ptr, mask=m2, other=0.0)
            if side == 0:
                t = tl.load(ph + (b * C + cg[:, None]) * H + l2, mask=m2, other=0.0)
            else:
                t = tl.full([4 * BG, BL], 0.0, tl.float32)
                for k in range(n_band):
                    t += tl.load(pwp + ((b * n_band + k) * C + cg[:, None]) * W + l2, mask=m2, other=0.0)
            t = t * tl.load(a_c + b * C + cg, mask=cm, other=0.0)[:, None]
            t += _pool_share(side, b, C, W, wh, ww, Hp, Wp, cg, l2, m2, dy, rows, cols, y, idx, MAX, 4 * BG, BL)
            gate = tl.load(a + ptr, mask=m2, other=0.0)
            if SOFTMAX:
                dn = t - gate * tl.sum(t, 1)[:, None]
            else:
                dn = t - t * gate
            dn = tl.where(m2, dn, 0.0)
            tl.store(prow + col_gn + cg, tl.sum(dn * xh, 1), mask=cm)
            tl.store(prow + col_gn + C + cg, tl.sum(dn, 1), mask=cm)
            dxhat = dn * tl.load(gam + cg, mask=cm, other=0.0).to(tl.float32)[:, None]
            sum_d += _group_sum(dxhat, BG, BL)
            sum_dx += _group_sum(dxhat * xh, BG, BL)
            tl.store(scratch + (2 * b * C + cg[:, None]) * LT + off + l2, dxhat, mask=m2)
        tl.debug_barrier()
        mean_d = _per_row(sum_d, BG)[:, None] / (G * L)
        mean_dx = _per_row(sum_dx, BG)[:, None] / (G * L)
        for c0 in range(0, G, BG):
            cl = c0 + tl.arange(0, 4 * BG) % BG
            cm = cl < G
            m2 = cm[:, None] & (l2 < L)
            ptr = (b * C + grp[:, None] * G + cl[:, None]) * LT + off + l2
            xh = tl.load(xhat + ptr, mask=m2, other=0.0)
            dxhat = tl.load(scratch + b * C * LT + ptr, mask=m2, other=0.0)
            tl.store(scratch + (b + 1) * C * LT + ptr, inv_std * (dxhat - mean_d - xh * mean_dx), mask=m2)
    tl.debug_barrier()  # the transposed conv below reads neighbours' dz
    t3 = tl.arange(0, KP)[None, None, :]
    wp = _pick(grp, w0, w1, w2, w3)[:, None, None]
    K = _pick(grp, K0, K1, K2, K3)
    k3 = K[:, None, None]
    woff = G * _pick(grp, 0, K0, K0 + K1, K0 + K1 + K2)  # each row's group's first weight in the flat block
    for c0 in range(0, G, BG):
        cl = c0 + tl.arange(0, 4 * BG) % BG
        cm = cl < G
        cg = grp * G + cl
        wt = tl.load(wp + cl[:, None, None] * k3 + t3, mask=cm[:, None, None] & (t3 < k3), other=0.0).to(tl.float32)
        dw = tl.full([4 * BG, KP], 0.0, tl.float32)
        db = tl.full([4 * BG], 0.0, tl.float32)
        for side in range(2):
            L, off, inv_len = _side(side, H, W, 1.0 / W, 1.0 / H)
            m3 = (cm[:, None] & (l2 < L))[:, :, None]
            row = (b * C + cg[:, None, None]) * LT + off
            dz_row = scratch + ((2 * b + 1) * C + cg[:, None, None]) * LT + off
            dz = tl.load(dz_row + l2[:, :, None], mask=m3, other=0.0)
            # ds[l] = sum_t w[t] dz[l - t + K // 2];  dw[t] = sum_l dz[l] s[l + t - K // 2]
            back = l2[:, :, None] - t3 + k3 // 2
            dz_sh = tl.load(dz_row + back, mask=m3 & (t3 < k3) & (back >= 0) & (back < L), other=0.0)
            tl.store(dsx + row + l2[:, :, None], tl.sum(wt * dz_sh, 2)[:, :, None] * inv_len, mask=m3)
            fwd = l2[:, :, None] + t3 - k3 // 2
            sv = tl.load(s + row + fwd, mask=m3 & (t3 < k3) & (fwd >= 0) & (fwd < L), other=0.0)
            dw += tl.sum(dz * sv, 1)
            db += tl.sum(tl.sum(dz, 2), 1)
        t2 = tl.arange(0, KP)[None, :]
        tl.store(prow + woff[:, None] + cl[:, None] * K[:, None] + t2, dw, mask=cm[:, None] & (t2 < K[:, None]))
        tl.store(prow + col_cb + cg, db, mask=cm)
