"""PCSA's small chain in Triton: GroupNorm(1) + q/k/v scales + channel attention + gate, one
kernel each way, one program per sample.

The tokens are the pooled map's N positions; per head, the d x d attention runs in blocks of
rows and columns with an online softmax, as flash attention does, and uses
``mean_N(A @ v) = A @ mean_N(v)``: only one value per channel is attended. The products over
the tokens are ``tl.dot`` in full fp32 (``input_precision="ieee"``, not tf32) over chunks of BN
tokens, on blocks of at least 16 (tl.dot's minimum; padding is zeros).

Attention dropout draws its keep mask from Triton's Philox generator, keyed by the seed and the
element's index in the (B, heads, d, d) matrix: nothing is stored, the backward redraws it,
and ``dropout_mask_kernel`` materialises the same mask for a reference to check against.
"""
import triton
import triton.language as tl


@triton.jit
def _gn_stats(y, b, M, eps, BLOCK: tl.constexpr):
    """GroupNorm(1)'s mean and 1/std over the sample's M = C * N pooled values (two passes)."""
    offs = tl.arange(0, BLOCK)
    total = 0.0
    for o in range(0, M, BLOCK):
        total += tl.sum(tl.load(y + b * M + o + offs, mask=o + offs < M, other=0.0))
    mean = total / M
    sq = 0.0
    for o in range(0, M, BLOCK):
        d = tl.where(o + offs < M, tl.load(y + b * M + o + offs, mask=o + offs < M, other=0.0) - mean, 0.0)
        sq += tl.sum(d * d)
    return mean, 1.0 / tl.sqrt(sq / M + eps)


@triton.jit
def _tokens(y, b, C, N, ch, cm, n0, mean, rstd, gn_w, gn_b, BN: tl.constexpr):
    """Tokens n0 + [0, BN) of rows ``ch``, normalised before (yn) and after (ynn) GroupNorm's affine,
    0 off the map; also their mask."""
    n = n0 + tl.arange(0, BN)[None, :]
    m = cm[:, None] & (n < N)
    yn = tl.where(m, (tl.load(y + (b * C + ch[:, None]) * N + n, mask=m, other=0.0) - mean) * rstd, 0.0)
    gam = tl.load(gn_w + ch, mask=cm, other=0.0).to(tl.float32)[:, None]
    bet = tl.load(gn_b + ch, mask=cm, other=0.0).to(tl.float32)[:, None]
    return yn, tl.where(m, yn * gam + bet, 0.0), m


@triton.jit
def _scale(ynn, m, ch, cm, w, bias, HAS_BIAS: tl.constexpr):
    """A depthwise 1x1 conv (one scale per channel, optional bias) of the tokens, 0 off the map."""
    t = ynn * tl.load(w + ch, mask=cm, other=0.0).to(tl.float32)[:, None]
    if HAS_BIAS:
        t += tl.load(bias + ch, mask=cm, other=0.0).to(tl.float32)[:, None]
    return tl.where(m, t, 0.0)


@triton.jit
def _scores(y, b, C, N, ci, im, cj, jm, mean, rstd, gn_w, gn_b, wq, wk, wv, bq, bk, bv, scale,
            HAS_BIAS: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr, BN: tl.constexpr):
    """The attention logits ``scale * q_i . k_j`` of a (rows ci, columns cj) block over all tokens,
    and ``mean_N(v)`` of the columns."""
    sc = tl.full([BI, BJ], 0.0, tl.float32)
    v_sum = tl.full([BJ], 0.0, tl.float32)
    for n0 in range(0, N, BN):
        yn_i, ynn_i, mi = _tokens(y, b, C, N, ci, im, n0, mean, rstd, gn_w, gn_b, BN)
        yn_j, ynn_j, mj = _tokens(y, b, C, N, cj, jm, n0, mean, rstd, gn_w, gn_b, BN)
        q = _scale(ynn_i, mi, ci, im, wq, bq, HAS_BIAS)
        k = _scale(ynn_j, mj, cj, jm, wk, bk, HAS_BIAS)
        sc += tl.dot(q, tl.trans(k), input_precision="ieee")
        v_sum += tl.sum(ynn_j, 1)
    vbar = v_sum / N * tl.load(wv + cj, mask=jm, other=0.0).to(tl.float32)
    if HAS_BIAS:
        vbar += tl.load(bv + cj, mask=jm, other=0.0).to(tl.float32)
    return sc * scale, vbar


@triton.jit
def _seed(seed_ptr, DROP: tl.constexpr):
    seed = 0
    if DROP:
        seed = tl.load(seed_ptr)
    return seed


@triton.jit
def _keep(seed, b, hd, heads, d, ii, jj, p_drop, DROP: tl.constexpr):
    """Dropout's factor on the attention block (rows ii, columns jj): 0 or 1 / (1 - p)."""
    keep = 1.0
    if DROP:
        r = tl.rand(seed, ((b * heads + hd) * d + ii[:, None]) * d + jj[None, :])
        keep = tl.where(r >= p_drop, 1.0 / (1.0 - p_drop), 0.0)
    return keep


@triton.jit
def dropout_mask_kernel(mask, seed_ptr, d, p_drop, BLOCK: tl.constexpr):
    """The keep mask the channel kernels apply, materialised (row ``pid`` of the (B * heads * d, d) matrix)."""
    row = tl.program_id(0)
    seed = tl.load(seed_ptr)
    for j0 in range(0, d, BLOCK):
        jj = j0 + tl.arange(0, BLOCK)
        r = tl.rand(seed, row * d + jj)
        tl.store(mask + row * d + jj, (r >= p_drop).to(tl.int8), mask=jj < d)


@triton.jit
def channel_gates_kernel(y, a_c, stats, C, N, heads, d, scale, eps, gn_w, gn_b, wq, wk, wv, bq, bk, bv,
                         seed_ptr, p_drop, HAS_BIAS: tl.constexpr, DROP: tl.constexpr, SOFTMAX: tl.constexpr,
                         BI: tl.constexpr, BN: tl.constexpr, BLOCK: tl.constexpr):
    """``a_c`` (B, C) from the pooled map y (B, C, N); ``stats`` (B, 2, C) keeps each attention row's
    log-sum-exp and the logit ``o`` for the backward. ``seed_ptr``: dropout's seed (int64), when DROP."""
    b = tl.program_id(0)
    seed = _seed(seed_ptr, DROP)
    mean, rstd = _gn_stats(y, b, C * N, eps, BLOCK)
    for hd in range(heads):
        for i0 in range(0, d, BI):
            ii = i0 + tl.arange(0, BI)
            im = ii < d
            ci = hd * d + ii
            m_run = tl.full([BI], float("-inf"), tl.float32)
            l_run = tl.full([BI], 0.0, tl.float32)
            o_run = tl.full([BI], 0.0, tl.float32)
            for j0 in range(0, d, BI):
                jj = j0 + tl.arange(0, BI)
                jm = jj < d
                sc, vbar = _scores(y, b, C, N, ci, im, hd * d + jj, jm, mean, rstd, gn_w, gn_b, wq, wk, wv, bq, bk,
                                   bv, scale, HAS_BIAS, BI, BI, BN)
                sc = tl.where(jm[None, :], sc, float("-inf"))
                m_new = tl.maximum(m_run, tl.max(sc, 1))
                p = tl.exp(sc - m_new[:, None])
                alpha = tl.exp(m_run - m_new)
                l_run = l_run * alpha + tl.sum(p, 1)
                keep = _keep(seed, b, hd, heads, d, ii, jj, p_drop, DROP)
                o_run = o_run * alpha + tl.sum(p * keep * vbar[None, :], 1)
                m_run = m_new
            o = o_run / l_run
            tl.store(stats + 2 * b * C + ci, m_run + tl.log(l_run), mask=im)
            tl.store(stats + (2 * b + 1) * C + ci, o, mask=im)
            if not SOFTMAX:
                tl.store(a_c + b * C + ci, 1.0 / (1.0 + tl.exp(-o)), mask=im)
    if SOFTMAX:  # over all channels of the sample
        tl.debug_barrier()
        offs = tl.arange(0, BLOCK)
        top = float("-inf")
        for c0 in range(0, C, BLOCK):
            top = tl.maximum(top, tl.max(tl.load(stats + (2 * b + 1) * C + c0 + offs, mask=c0 + offs < C,
                                                 other=float("-inf")), 0))
        total = 0.0
        for c0 in range(0, C, BLOCK):
            o = tl.load(stats + (2 * b + 1) * C + c0 + offs, mask=c0 + offs < C, other=float("-inf"))
            total += tl.sum(tl.exp(o - top))
        for c0 in range(0, C, BLOCK):
            o = tl.load(stats + (2 * b + 1) * C + c0 + offs, mask=c0 + offs < C, other=float("-inf"))
            tl.store(a_c + b * C + c0 + offs, tl.exp(o - top) / total, mask=c0 + offs < C)


@triton.jit
def _gate_sums(ph, a_c, b, C, H, c0, BI: tl.constexpr, BN: tl.constexpr):
    """``t_c = a_c * dL/da_c`` for channels c0 + [0, BI): the gate times x_s * dout summed over the map."""
    cc = c0 + tl.arange(0, BI)
    hs = tl.arange(0, BN)[None, :]
    t = tl.full([BI], 0.0, tl.float32)
    for h0 in range(0, H, BN):
        t += tl.sum(tl.load(ph + (b * C + cc[:, None]) * H + h0 + hs, mask=(cc[:, None] < C) & (h0 + hs < H),
                            other=0.0), 1)
    return t * tl.load(a_c + b * C + cc, mask=cc < C, other=0.0)


@triton.jit
def _score_grads(sc, vbar, stats, s_do, b, C, ci, im, jm, seed, hd, heads, d, ii, jj, p_drop, DROP: tl.constexpr):
    """Softmax probabilities times dropout's factor, and dL/dS, of one (rows ii, columns jj) block."""
    lse = tl.load(stats + 2 * b * C + ci, mask=im, other=0.0)
    o = tl.load(stats + (2 * b + 1) * C + ci, mask=im, other=0.0)
    do = tl.load(s_do + ci, mask=im, other=0.0)
    prob = tl.where(im[:, None] & jm[None, :], tl.exp(sc - lse[:, None]), 0.0)
    keep = _keep(seed, b, hd, heads, d, ii, jj, p_drop, DROP)
    # o_i = sum_j A_ij keep_ij vbar_j  =>  dS_ij = A_ij do_i (keep_ij vbar_j - o_i)
    return prob * keep * do[:, None], prob * do[:, None] * (keep * vbar[None, :] - o[:, None])


@triton.jit
def channel_grads_kernel(y, a_c, stats, ph, H, dy, scratch, pg, P, C, N, heads, d, scale, eps,
                         gn_w, gn_b, wq, wk, wv, bq, bk, bv, seed_ptr, p_drop, col_gn, col_qkv, col_qkv_b,
                         HAS_BIAS: tl.constexpr, DROP: tl.constexpr, SOFTMAX: tl.constexpr,
                         BI: tl.constexpr, BN: tl.constexpr, BLOCK: tl.constexpr):
    """Backward of the channel chain: dL/dy (B, C, N) and the sample's row ``pg[b]`` of gradients for
    GroupNorm(1) (at ``col_gn``), the q/k/v scales (``col_qkv``) and biases (``col_qkv_b``).

    The gate's gradient comes from ``ph`` (B, C, H): x_s * dout summed over each row, so that
    ``a_c * sum_h ph = a_c * dL/da_c``. ``scratch`` holds, per sample, dL/do (C), then dL/dq and
    dL/dk (C, N each, accumulated over blocks); dL/dk's rows turn into dL/d(normalised tokens).
    """
    b = tl.program_id(0)
    seed = _seed(seed_ptr, DROP)
    M = C * N
    mean, rstd = _gn_stats(y, b, M, eps, BLOCK)
    s_do = scratch + b * (C + 2 * M)
    s_dq = s_do + C
    s_dk = s_dq + M
    prow = pg + b * P
    n2 = tl.arange(0, BN)[None, :]
    # dL/do from t_c = a_c * dL/da_c = a_c * sum_h ph
    total = 0.0
    if SOFTMAX:
        for c0 in range(0, C, BI):
            total += tl.sum(_gate_sums(ph, a_c, b, C, H, c0, BI, BN))
    for c0 in range(0, C, BI):
        cc = c0 + tl.arange(0, BI)
        gate = tl.load(a_c + b * C + cc, mask=cc < C, other=0.0)
        t = _gate_sums(ph, a_c, b, C, H, c0, BI, BN)
        if SOFTMAX:
            do = t - gate * total
        else:
            do = t - t * gate
        tl.store(s_do + cc, do, mask=cc < C)
        for n0 in range(0, N, BN):  # zero the accumulators
            m = (cc < C)[:, None] & (n0 + n2 < N)
            tl.store(s_dq + cc[:, None] * N + n0 + n2, tl.full([BI, BN], 0.0, tl.float32), mask=m)
            tl.store(s_dk + cc[:, None] * N + n0 + n2, tl.full([BI, BN], 0.0, tl.float32), mask=m)
    tl.debug_barrier()
    # dL/dq (row blocks outer) and dL/dk (column blocks outer), accumulated in scratch chunk by chunk
    for hd in range(heads):
        for i0 in range(0, d, BI):
            ii = i0 + tl.arange(0, BI)
            im = ii < d
            ci = hd * d + ii
            for j0 in range(0, d, BI):
                jj = j0 + tl.arange(0, BI)
                jm = jj < d
                cj = hd * d + jj
                sc, vbar = _scores(y, b, C, N, ci, im, cj, jm, mean, rstd, gn_w, gn_b, wq, wk, wv, bq, bk, bv,
                                   scale, HAS_BIAS, BI, BI, BN)
                pk, ds = _score_grads(sc, vbar, stats, s_do, b, C, ci, im, jm, seed, hd, heads, d, ii, jj, p_drop,
                                      DROP)
                ds = ds * scale
                for n0 in range(0, N, BN):
                    yn_j, ynn_j, mj = _tokens(y, b, C, N, cj, jm, n0, mean, rstd, gn_w, gn_b, BN)
                    k = _scale(ynn_j, mj, cj, jm, wk, bk, HAS_BIAS)
                    mi = im[:, None] & (n0 + n2 < N)
                    dq = tl.load(s_dq + ci[:, None] * N + n0 + n2, mask=mi, other=0.0)
                    tl.store(s_dq + ci[:, None] * N + n0 + n2, dq + tl.dot(ds, k, input_precision="ieee"), mask=mi)
    tl.debug_barrier()
    sum_d = 0.0
    sum_dx = 0.0
    for hd in range(heads):
        for j0 in range(0, d, BI):
            jj = j0 + tl.arange(0, BI)
            jm = jj < d
            cj = hd * d + jj
            dvbar = tl.full([BI], 0.0, tl.float32)
            for i0 in range(0, d, BI):
                ii = i0 + tl.arange(0, BI)
                im = ii < d
                ci = hd * d + ii
                sc, vbar = _scores(y, b, C, N, ci, im, cj, jm, mean, rstd, gn_w, gn_b, wq, wk, wv, bq, bk, bv,
                                   scale, HAS_BIAS, BI, BI, BN)
                pk, ds = _score_grads(sc, vbar, stats, s_do, b, C, ci, im, jm, seed, hd, heads, d, ii, jj, p_drop,
                                      DROP)
                dvbar += tl.sum(pk, 0)
                ds_t = tl.trans(ds * scale)
                for n0 in range(0, N, BN):
                    yn_i, ynn_i, mi = _tokens(y, b, C, N, ci, im, n0, mean, rstd, gn_w, gn_b, BN)
                    q = _scale(ynn_i, mi, ci, im, wq, bq, HAS_BIAS)
                    mj = jm[:, None] & (n0 + n2 < N)
                    dk = tl.load(s_dk + cj[:, None] * N + n0 + n2, mask=mj, other=0.0)
                    tl.store(s_dk + cj[:, None] * N + n0 + n2, dk + tl.dot(ds_t, q, input_precision="ieee"), mask=mj)
            tl.debug_barrier()
            # each channel's parameter gradients, and dL/d(normalised tokens) into dL/dk's place
            w_q = tl.load(wq + cj, mask=jm, other=0.0).to(tl.float32)[:, None]
            w_k = tl.load(wk + cj, mask=jm, other=0.0).to(tl.float32)[:, None]
            w_v = tl.load(wv + cj, mask=jm, other=0.0).to(tl.float32)[:, None]
            gam = tl.load(gn_w + cj, mask=jm, other=0.0).to(tl.float32)[:, None]
            g_q = tl.full([BI], 0.0, tl.float32)
            g_k = tl.full([BI], 0.0, tl.float32)
            g_bq = tl.full([BI], 0.0, tl.float32)
            g_bk = tl.full([BI], 0.0, tl.float32)
            ynn_sum = tl.full([BI], 0.0, tl.float32)
            g_gam = tl.full([BI], 0.0, tl.float32)
            g_bet = tl.full([BI], 0.0, tl.float32)
            for n0 in range(0, N, BN):
                yn_j, ynn_j, mj = _tokens(y, b, C, N, cj, jm, n0, mean, rstd, gn_w, gn_b, BN)
                at = cj[:, None] * N + n0 + n2
                dq = tl.load(s_dq + at, mask=mj, other=0.0)
                dk = tl.load(s_dk + at, mask=mj, other=0.0)
                dynn = dq * w_q + dk * w_k + tl.where(mj, dvbar[:, None] / N, 0.0) * w_v
                g_q += tl.sum(dq * ynn_j, 1)
                g_k += tl.sum(dk * ynn_j, 1)
                g_bq += tl.sum(dq, 1)
                g_bk += tl.sum(dk, 1)
                ynn_sum += tl.sum(ynn_j, 1)
                g_gam += tl.sum(dynn * yn_j, 1)
                g_bet += tl.sum(dynn, 1)
                dyn = dynn * gam
                sum_d += tl.sum(dyn)
                sum_dx += tl.sum(dyn * yn_j)
                tl.debug_barrier()  # every thread has read its dL/dk before any overwrites it
                tl.store(s_dk + at, dyn, mask=mj)
            tl.store(prow + col_qkv + cj, g_q, mask=jm)
            tl.store(prow + col_qkv + C + cj, g_k, mask=jm)
            tl.store(prow + col_qkv + 2 * C + cj, dvbar * ynn_sum / N, mask=jm)
            if HAS_BIAS:
                tl.store(prow + col_qkv_b + cj, g_bq, mask=jm)
                tl.store(prow + col_qkv_b + C + cj, g_bk, mask=jm)
                tl.store(prow + col_qkv_b + 2 * C + cj, dvbar, mask=jm)
            tl.store(prow + col_gn + cj, g_gam, mask=jm)
            tl.store(prow + col_gn + C + cj, g_bet, mask=jm)
    tl.debug_barrier()
    # GroupNorm(1)'s backward over the sample
    offs = tl.arange(0, BLOCK)
    for o0 in range(0, M, BLOCK):
        m = o0 + offs < M
        yn = (tl.load(y + b * M + o0 + offs, mask=m, other=0.0) - mean) * rstd
        dyn = tl.load(s_dk + o0 + offs, mask=m, other=0.0)
        tl.store(dy + b * M + o0 + offs, rstd * (dyn - sum_d / M - yn * (sum_dx / M)), mask=m)
