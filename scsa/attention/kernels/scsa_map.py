"""SCSA's passes over the big tensor (the feature map): five Triton kernels.

Every kernel runs one program per (sample, block of channels, band of window rows) and walks
the band one map row at a time. A row is loaded as a (channels, window, offset-in-window)
tile, ``w = j * ww + u``, so PCSA's pooling windows fall on a tile axis: window sums and
maxima are plain reductions, with no integer division and no cross-program traffic. The
strides are arguments, so NCHW and channels_last maps (and gradients laid out either way)
are read in place; the compiler finds the contiguous axis from the unit stride. Values are
loaded in the map's dtype and computed in fp32.

Forward: ``strip_sums`` (x), ``pool`` (x), ``gate_out`` (x, out). Backward: ``grad_sums``
(dout, x), ``grad_x`` (dout, dx). The gates, the pooled map and every partial sum are small
fp32 tensors laid out (B, C, ...), contiguous.
"""
import triton
import triton.language as tl


@triton.jit
def _tile(cb, C, W, ww, BC: tl.constexpr, BJ: tl.constexpr, BU: tl.constexpr):
    """Channel indices (1-D and 3-D), window and column indices (3-D) and the in-map mask of a row tile."""
    c = cb * BC + tl.arange(0, BC)
    c3 = c[:, None, None]
    j3 = tl.arange(0, BJ)[None, :, None]
    u3 = tl.arange(0, BU)[None, None, :]
    w3 = j3 * ww + u3
    return c, c3, j3, w3, (c3 < C) & (u3 < ww) & (w3 < W)


@triton.jit
def strip_sums_kernel(x, sxb, sxc, sxh, sxw, s, colp, C, H, W, wh, ww, band_win, n_cb,
                      BC: tl.constexpr, BJ: tl.constexpr, BU: tl.constexpr):
    """SMSA's strip means: ``s[b, c, h] = mean_w x`` (complete) and, per band, the band's column sums
    ``colp[b, band, c, w]`` (the strip kernel adds the bands up)."""
    pid = tl.program_id(0)
    band = tl.program_id(1)
    b = pid // n_cb
    cb = pid % n_cb
    c, c3, j3, w3, m3 = _tile(cb, C, W, ww, BC, BJ, BU)
    xb = x + b.to(tl.int64) * sxb + c3 * sxc + w3 * sxw
    srow = s + (b * C + c) * (H + W)
    col = tl.zeros([BC, BJ, BU], dtype=tl.float32)
    for k in range(band_win):
        for r in range(wh):
            h = (band * band_win + k) * wh + r
            t = tl.load(xb + h * sxh, mask=m3 & (h < H), other=0.0).to(tl.float32)
            col += t
            tl.store(srow + h, tl.sum(tl.sum(t, 2), 1) / W, mask=(c < C) & (h < H))
    tl.store(colp + ((b * tl.num_programs(1) + band) * C + c3) * W + w3, col, mask=m3)


@triton.jit
def pool_kernel(x, sxb, sxc, sxh, sxw, a, y, idx, C, H, W, wh, ww, Hp, Wp, band_win, n_cb,
                MAX: tl.constexpr, BC: tl.constexpr, BJ: tl.constexpr, BU: tl.constexpr):
    """PCSA's pooled map ``y[b, c, i, j]`` of ``x_s = x * a_h * a_w`` (recomputed, never stored);
    for max pooling also the flat index ``h * W + w`` of each window's first maximum."""
    pid = tl.program_id(0)
    band = tl.program_id(1)
    b = pid // n_cb
    cb = pid % n_cb
    c, c3, j3, w3, m3 = _tile(cb, C, W, ww, BC, BJ, BU)
    m3 = m3 & (j3 < Wp)  # the pooling crops the last partial window
    xb = x + b.to(tl.int64) * sxb + c3 * sxc + w3 * sxw
    arow = a + (b * C + c3) * (H + W)
    aw = tl.load(arow + H + w3, mask=m3, other=0.0)
    c2 = c[:, None]
    j2 = tl.arange(0, BJ)[None, :]
    for k in range(band_win):
        i = band * band_win + k
        if MAX:
            acc = tl.full([BC, BJ, BU], float("-inf"), tl.float32)
            arg = tl.zeros([BC, BJ, BU], dtype=tl.int32)
        else:
            acc = tl.zeros([BC, BJ, BU], dtype=tl.float32)
        for r in range(wh):
            h = i * wh + r
            ah = tl.load(arow + h, mask=(c3 < C) & (i < Hp), other=0.0)
            xs = tl.load(xb + h * sxh, mask=m3 & (i < Hp), other=0.0).to(tl.float32) * ah * aw
            if MAX:
                xs = tl.where(m3, xs, float("-inf"))
                take = xs > acc  # strict: a column keeps its first (topmost) maximum
                acc = tl.where(take, xs, acc)
                arg = tl.where(take, h * W + w3, arg)
            else:
                acc += xs
        ym = (c2 < C) & (j2 < Wp) & (i < Hp)
        yoff = ((b * C + c2) * Hp + i) * Wp + j2
        if MAX:
            best = tl.max(acc, 2)
            first = tl.min(tl.where(acc == best[:, :, None], arg, 2147483647), 2)  # row-major first, as PyTorch
            tl.store(y + yoff, best, mask=ym)
            tl.store(idx + yoff, first, mask=ym)
        else:
            tl.store(y + yoff, tl.sum(acc, 2) / (wh * ww), mask=ym)


@triton.jit
def gate_out_kernel(x, sxb, sxc, sxh, sxw, out, sob, soc, soh, sow, a, a_c, C, H, W, wh, ww, band_win, n_cb,
                    BC: tl.constexpr, BJ: tl.constexpr, BU: tl.constexpr):
    """``out = x * a_h * a_w * a_c``, stored in out's dtype."""
    pid = tl.program_id(0)
    band = tl.program_id(1)
    b = pid // n_cb
    cb = pid % n_cb
    c, c3, j3, w3, m3 = _tile(cb, C, W, ww, BC, BJ, BU)
    xb = x + b.to(tl.int64) * sxb + c3 * sxc + w3 * sxw
    ob = out + b.to(tl.int64) * sob + c3 * soc + w3 * sow
    arow = a + (b * C + c3) * (H + W)
    gw = tl.load(arow + H + w3, mask=m3, other=0.0) * tl.load(a_c + b * C + c3, mask=c3 < C, other=0.0)
    for k in range(band_win):
        for r in range(wh):
            h = (band * band_win + k) * wh + r
            m = m3 & (h < H)
            ah = tl.load(arow + h, mask=(c3 < C) & (h < H), other=0.0)
            v = tl.load(xb + h * sxh, mask=m, other=0.0).to(tl.float32) * ah * gw
            tl.store(ob + h * soh, v.to(out.dtype.element_ty), mask=m)


@triton.jit
def grad_sums_kernel(g, sgb, sgc, sgh, sgw, x, sxb, sxc, sxh, sxw, a, ph, pwp, rows, cols,
                     C, H, W, wh, ww, Hp, Wp, band_win, n_cb,
                     MAX: tl.constexpr, BC: tl.constexpr, BJ: tl.constexpr, BU: tl.constexpr):
    """The backward's one reduction pass, over dout and x (x_s recomputed).

    ``ph[b, c, h] = sum_w dout * x_s`` and per band ``pwp[b, band, c, w] = sum_h dout * x_s``: with
    ``a_c`` they are the gates' gradients through ``out = x_s * a_c``. For average pooling also
    x_s's window-row sums ``rows[b, c, h, j]`` and window-column sums ``cols[b, c, i, w]``, which
    turn the pooled map's gradient (not known yet) into the strip gates' share later, on small
    tensors, instead of a second pass over the map.
    """
    pid = tl.program_id(0)
    band = tl.program_id(1)
    b = pid // n_cb
    cb = pid % n_cb
    c, c3, j3, w3, m3 = _tile(cb, C, W, ww, BC, BJ, BU)
    gb = g + b.to(tl.int64) * sgb + c3 * sgc + w3 * sgw
    xb = x + b.to(tl.int64) * sxb + c3 * sxc + w3 * sxw
    arow = a + (b * C + c3) * (H + W)
    aw = tl.load(arow + H + w3, mask=m3, other=0.0)
    c2 = c[:, None]
    j2 = tl.arange(0, BJ)[None, :]
    hc = Hp * wh
    wc = Wp * ww
    pw = tl.zeros([BC, BJ, BU], dtype=tl.float32)
    for k in range(band_win):
        i = band * band_win + k
        win_cols = tl.zeros([BC, BJ, BU], dtype=tl.float32)
        for r in range(wh):
            h = i * wh + r
            m = m3 & (h < H)
            ah = tl.load(arow + h, mask=(c3 < C) & (h < H), other=0.0)
            xs = tl.load(xb + h * sxh, mask=m, other=0.0).to(tl.float32) * ah * aw
            gx = tl.load(gb + h * sgh, mask=m, other=0.0).to(tl.float32) * xs
            pw += gx
            tl.store(ph + (b * C + c) * H + h, tl.sum(tl.sum(gx, 2), 1), mask=(c < C) & (h < H))
            if not MAX:
                tl.store(rows + ((b * C + c2) * hc + h) * Wp + j2, tl.sum(xs, 2),
                         mask=(c2 < C) & (j2 < Wp) & (h < hc))
                win_cols += xs
        if not MAX:
            tl.store(cols + ((b * C + c3) * Hp + i) * wc + w3, win_cols, mask=m3 & (j3 < Wp) & (i < Hp))
    tl.store(pwp + ((b * tl.num_programs(1) + band) * C + c3) * W + w3, pw, mask=m3)


@triton.jit
def grad_x_kernel(g, sgb, sgc, sgh, sgw, dx, sdb, sdc, sdh, sdw, a, a_c, dsx, dy, idx,
                  C, H, W, wh, ww, Hp, Wp, band_win, n_cb,
                  MAX: tl.constexpr, BC: tl.constexpr, BJ: tl.constexpr, BU: tl.constexpr):
    """``dx = (dout * a_c + dL/dx_s from the pooling) * a_h * a_w + the strip means' share``.

    The pooling's share is the pooled map's gradient spread over its window (average) or put
    on the window's maximum (max); the strip means' share ``dsx`` (B, C, H + W) comes from the
    strip kernel, already divided by W (rows) and H (columns).
    """
    pid = tl.program_id(0)
    band = tl.program_id(1)
    b = pid // n_cb
    cb = pid % n_cb
    c, c3, j3, w3, m3 = _tile(cb, C, W, ww, BC, BJ, BU)
    gb = g + b.to(tl.int64) * sgb + c3 * sgc + w3 * sgw
    db = dx + b.to(tl.int64) * sdb + c3 * sdc + w3 * sdw
    arow = a + (b * C + c3) * (H + W)
    drow = dsx + (b * C + c3) * (H + W)
    aw = tl.load(arow + H + w3, mask=m3, other=0.0)
    dsw = tl.load(drow + H + w3, mask=m3, other=0.0)
    ac = tl.load(a_c + b * C + c3, mask=c3 < C, other=0.0)
    inv_area = 1.0 / (wh * ww)
    for k in range(band_win):
        i = band * band_win + k
        pooled = (c3 < C) & (j3 < Wp) & (i < Hp)
        dyv = tl.load(dy + ((b * C + c3) * Hp + i) * Wp + j3, mask=pooled, other=0.0)
        if MAX:
            arg = tl.load(idx + ((b * C + c3) * Hp + i) * Wp + j3, mask=pooled, other=-1)
        for r in range(wh):
            h = i * wh + r
            m = m3 & (h < H)
            ah = tl.load(arow + h, mask=(c3 < C) & (h < H), other=0.0)
            dsh = tl.load(drow + h, mask=(c3 < C) & (h < H), other=0.0)
            if MAX:
                spread = tl.where(arg == h * W + w3, dyv, 0.0)
            else:
                spread = tl.where(pooled, dyv * inv_area, 0.0)
            d = (tl.load(gb + h * sgh, mask=m, other=0.0).to(tl.float32) * ac + spread) * ah * aw + dsh + dsw
            tl.store(db + h * sdh, d.to(dx.dtype.element_ty), mask=m)

