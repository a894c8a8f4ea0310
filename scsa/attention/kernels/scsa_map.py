"""SCSA's passes over the big tensor (the feature map): five Triton kernels.

Every kernel runs one program per (sample, block of channels, band of window rows). A step
loads a (channels, rows of a window row, window, offset in the window) tile: row
``h = i * wh + r`` of window row i, column ``w = j * ww + u``. PCSA's pooling windows so fall
on tile axes, and window sums and maxima are plain reductions, with no integer division and
no traffic between programs; windows taller than BR rows take several steps. The strides
are arguments, so NCHW and channels_last maps (and gradients laid out either way) are read
in place; the compiler finds the contiguous axis from the unit stride. Values are loaded in
the map's dtype and computed in fp32.

Forward: ``strip_sums`` (x), ``pool`` (x), ``gate_out`` (x, out). Backward: ``grad_sums``
(dout, x), ``grad_x`` (dout, dx). The gates, the pooled map and every partial sum are small
fp32 tensors laid out (B, C, ...), contiguous.
"""
import triton
import triton.language as tl


@triton.jit
def _tile(cb, C, W, ww, BC: tl.constexpr, BR: tl.constexpr, BJ: tl.constexpr, BU: tl.constexpr):
    """Channels (1-D, then 4-D as the others), rows within a step, windows and columns of a tile, and
    its mask for a full window row inside the map (rows past the window or H are masked per step)."""
    c = cb * BC + tl.arange(0, BC)
    c4 = c[:, None, None, None]
    r4 = tl.arange(0, BR)[None, :, None, None]
    j4 = tl.arange(0, BJ)[None, None, :, None]
    u4 = tl.arange(0, BU)[None, None, None, :]
    w4 = j4 * ww + u4
    return c, c4, r4, j4, w4, (c4 < C) & (u4 < ww) & (w4 < W)


@triton.jit
def _columns(c, C, W, ww, BJ: tl.constexpr, BU: tl.constexpr):
    """The tile's (channels, window, offset) view without the row axis, for per-column results."""
    c3 = c[:, None, None]
    j3 = tl.arange(0, BJ)[None, :, None]
    w3 = j3 * ww + tl.arange(0, BU)[None, None, :]
    return c3, j3, w3, (c3 < C) & (w3 - j3 * ww < ww) & (w3 < W)


@triton.jit
def strip_sums_kernel(x, sxb, sxc, sxh, sxw, s, colp, C, H, W, wh, ww, band_win, n_cb,
                      BC: tl.constexpr, BR: tl.constexpr, BJ: tl.constexpr, BU: tl.constexpr):
    """SMSA's strip means: ``s[b, c, h] = mean_w x`` (complete) and, per band, the band's column sums
    ``colp[b, band, c, w]`` (the strip kernel adds the bands up)."""
    pid = tl.program_id(0)
    band = tl.program_id(1)
    b = pid // n_cb
    cb = pid % n_cb
    c, c4, r4, j4, w4, m4 = _tile(cb, C, W, ww, BC, BR, BJ, BU)
    xb = x + b.to(tl.int64) * sxb + c4 * sxc + w4 * sxw
    c2 = c[:, None]
    r2 = tl.arange(0, BR)[None, :]
    srow = s + (b * C + c2) * (H + W)
    col = tl.full([BC, BJ, BU], 0.0, tl.float32)
    for k in range(band_win):
        for r0 in range(0, wh, BR):
            h0 = (band * band_win + k) * wh + r0
            t = tl.load(xb + (h0 + r4) * sxh, mask=m4 & (r0 + r4 < wh) & (h0 + r4 < H), other=0.0).to(tl.float32)
            col += tl.sum(t, 1)
            tl.store(srow + h0 + r2, tl.sum(tl.sum(t, 3), 2) / W, mask=(c2 < C) & (r0 + r2 < wh) & (h0 + r2 < H))
    c3, j3, w3, m3 = _columns(c, C, W, ww, BJ, BU)
    tl.store(colp + ((b * tl.num_programs(1) + band) * C + c3) * W + w3, col, mask=m3)


@triton.jit
def pool_kernel(x, sxb, sxc, sxh, sxw, a, y, idx, C, H, W, wh, ww, Hp, Wp, band_win, n_cb,
                MAX: tl.constexpr, BC: tl.constexpr, BR: tl.constexpr, BJ: tl.constexpr, BU: tl.constexpr):
    """PCSA's pooled map ``y[b, c, i, j]`` of ``x_s = x * a_h * a_w`` (recomputed, never stored);
    for max pooling also the flat index ``h * W + w`` of each window's first maximum."""
    pid = tl.program_id(0)
    band = tl.program_id(1)
    b = pid // n_cb
    cb = pid % n_cb
    c, c4, r4, j4, w4, m4 = _tile(cb, C, W, ww, BC, BR, BJ, BU)
    m4 = m4 & (j4 < Wp)  # the pooling crops the last partial window column
    xb = x + b.to(tl.int64) * sxb + c4 * sxc + w4 * sxw
    arow = a + (b * C + c4) * (H + W)
    aw = tl.load(arow + H + w4, mask=m4, other=0.0)
    c2 = c[:, None]
    j2 = tl.arange(0, BJ)[None, :]
    for k in range(band_win):
        i = band * band_win + k
        if MAX:
            best = tl.full([BC, BJ], float("-inf"), tl.float32)
            first = tl.full([BC, BJ], 0, tl.int32)
        else:
            acc = tl.full([BC, BJ], 0.0, tl.float32)
        for r0 in range(0, wh, BR):
            h4 = i * wh + r0 + r4
            rm = (r0 + r4 < wh) & (i < Hp)
            ah = tl.load(arow + h4, mask=(c4 < C) & rm, other=0.0)
            m = m4 & rm
            xs = tl.load(xb + h4 * sxh, mask=m, other=0.0).to(tl.float32) * ah * aw
            if MAX:
                xs = tl.where(m, xs, float("-inf"))
                step = tl.max(tl.max(xs, 3), 1)
                # the first maximum in row-major order (as PyTorch): the smallest flat index reaching it
                at = tl.min(tl.min(tl.where(xs == step[:, None, :, None], h4 * W + w4, 2147483647), 3), 1)
                first = tl.where(step > best, at, first)  # strict: an earlier step keeps a tie
                best = tl.maximum(best, step)
            else:
                acc += tl.sum(tl.sum(xs, 3), 1)
        ym = (c2 < C) & (j2 < Wp) & (i < Hp)
        yoff = ((b * C + c2) * Hp + i) * Wp + j2
        if MAX:
            tl.store(y + yoff, best, mask=ym)
            tl.store(idx + yoff, first, mask=ym)
        else:
            tl.store(y + yoff, acc / (wh * ww), mask=ym)


@triton.jit
def gate_out_kernel(x, sxb, sxc, sxh, sxw, out, sob, soc, soh, sow, a, a_c, C, H, W, wh, ww, band_win, n_cb,
                    BC: tl.constexpr, BR: tl.constexpr, BJ: tl.constexpr, BU: tl.constexpr):
    """``out = x * a_h * a_w * a_c``, stored in out's dtype."""
    pid = tl.program_id(0)
    band = tl.program_id(1)
    b = pid // n_cb
    cb = pid % n_cb
    c, c4, r4, j4, w4, m4 = _tile(cb, C, W, ww, BC, BR, BJ, BU)
    xb = x + b.to(tl.int64) * sxb + c4 * sxc + w4 * sxw
    ob = out + b.to(tl.int64) * sob + c4 * soc + w4 * sow
    arow = a + (b * C + c4) * (H + W)
    gw = tl.load(arow + H + w4, mask=m4, other=0.0) * tl.load(a_c + b * C + c4, mask=c4 < C, other=0.0)
    for k in range(band_win):
        for r0 in range(0, wh, BR):
            h4 = (band * band_win + k) * wh + r0 + r4
            rm = (r0 + r4 < wh) & (h4 < H)
            ah = tl.load(arow + h4, mask=(c4 < C) & rm, other=0.0)
            m = m4 & rm
            v = tl.load(xb + h4 * sxh, mask=m, other=0.0).to(tl.float32) * ah * gw
            tl.store(ob + h4 * soh, v.to(out.dtype.element_ty), mask=m)


@triton.jit
def grad_sums_kernel(g, sgb, sgc, sgh, sgw, x, sxb, sxc, sxh, sxw, a, ph, pwp, rows, cols,
                     C, H, W, wh, ww, Hp, Wp, band_win, n_cb,
                     MAX: tl.constexpr, BC: tl.constexpr, BR: tl.constexpr, BJ: tl.constexpr, BU: tl.constexpr):
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
    c, c4, r4, j4, w4, m4 = _tile(cb, C, W, ww, BC, BR, BJ, BU)
    gb = g + b.to(tl.int64) * sgb + c4 * sgc + w4 * sgw
    xb = x + b.to(tl.int64) * sxb + c4 * sxc + w4 * sxw
    arow = a + (b * C + c4) * (H + W)
    aw = tl.load(arow + H + w4, mask=m4, other=0.0)
    c2 = c[:, None]
    r2 = tl.arange(0, BR)[None, :]
    c3, j3, w3, m3 = _columns(c, C, W, ww, BJ, BU)
    r3 = tl.arange(0, BR)[None, :, None]
    hc = Hp * wh
    pw = tl.full([BC, BJ, BU], 0.0, tl.float32)
    for k in range(band_win):
        i = band * band_win + k
        win_cols = tl.full([BC, BJ, BU], 0.0, tl.float32)
        for r0 in range(0, wh, BR):
            h0 = i * wh + r0
            rm = (r0 + r4 < wh) & (h0 + r4 < H)
            ah = tl.load(arow + h0 + r4, mask=(c4 < C) & rm, other=0.0)
            m = m4 & rm
            xs = tl.load(xb + (h0 + r4) * sxh, mask=m, other=0.0).to(tl.float32) * ah * aw
            gx = tl.load(gb + (h0 + r4) * sgh, mask=m, other=0.0).to(tl.float32) * xs
            pw += tl.sum(gx, 1)
            tl.store(ph + (b * C + c2) * H + h0 + r2, tl.sum(tl.sum(gx, 3), 2),
                     mask=(c2 < C) & (r0 + r2 < wh) & (h0 + r2 < H))
            if not MAX:
                j3r = tl.arange(0, BJ)[None, None, :]
                tl.store(rows + ((b * C + c3) * hc + h0 + r3) * Wp + j3r, tl.sum(xs, 3),
                         mask=(c3 < C) & (r0 + r3 < wh) & (h0 + r3 < hc) & (j3r < Wp))
                win_cols += tl.sum(xs, 1)
        if not MAX:
            tl.store(cols + ((b * C + c3) * Hp + i) * (Wp * ww) + w3, win_cols, mask=m3 & (j3 < Wp) & (i < Hp))
    tl.store(pwp + ((b * tl.num_programs(1) + band) * C + c3) * W + w3, pw, mask=m3)


@triton.jit
def grad_x_kernel(g, sgb, sgc, sgh, sgw, dx, sdb, sdc, sdh, sdw, a, a_c, dsx, dy, idx,
                  C, H, W, wh, ww, Hp, Wp, band_win, n_cb,
                  MAX: tl.constexpr, BC: tl.constexpr, BR: tl.constexpr, BJ: tl.constexpr, BU: tl.constexpr):
    """``dx = (dout * a_c + dL/dx_s from the pooling) * a_h * a_w + the strip means' share``.

    The pooling's share is the pooled map's gradient spread over its window (average) or put
    on the window's maximum (max); the strip means' share ``dsx`` (B, C, H + W) comes from the
    strip kernel, already divided by W (rows) and H (columns).
    """
    pid = tl.program_id(0)
    band = tl.program_id(1)
    b = pid // n_cb
    cb = pid % n_cb
    c, c4, r4, j4, w4, m4 = _tile(cb, C, W, ww, BC, BR, BJ, BU)
    gb = g + b.to(tl.int64) * sgb + c4 * sgc + w4 * sgw
    db = dx + b.to(tl.int64) * sdb + c4 * sdc + w4 * sdw
    arow = a + (b * C + c4) * (H + W)
    drow = dsx + (b * C + c4) * (H + W)
    aw = tl.load(arow + H + w4, mask=m4, other=0.0)
    dsw = tl.load(drow + H + w4, mask=m4, other=0.0)
    ac = tl.load(a_c + b * C + c4, mask=c4 < C, other=0.0)
    inv_area = 1.0 / (wh * ww)
    for k in range(band_win):
        i = band * band_win + k
        pooled = (c4 < C) & (j4 < Wp) & (i < Hp)
        dyv = tl.load(dy + ((b * C + c4) * Hp + i) * Wp + j4, mask=pooled, other=0.0)
        if MAX:
            arg = tl.load(idx + ((b * C + c4) * Hp + i) * Wp + j4, mask=pooled, other=-1)
        else:
            dyv = dyv * inv_area  # spread evenly over the window (0 outside the pooled crop)
        for r0 in range(0, wh, BR):
            h4 = i * wh + r0 + r4
            rm = (c4 < C) & (r0 + r4 < wh) & (h4 < H)
            ah = tl.load(arow + h4, mask=rm, other=0.0)
            dsh = tl.load(drow + h4, mask=rm, other=0.0)
            m = m4 & rm
            if MAX:
                spread = tl.where(arg == h4 * W + w4, dyv, 0.0)
            else:
                spread = dyv
            d = (tl.load(gb + h4 * sgh, mask=m, other=0.0).to(tl.float32) * ac + spread) * ah * aw + dsh + dsw
            tl.store(db + h4 * sdh, d.to(dx.dtype.element_ty), mask=m)
