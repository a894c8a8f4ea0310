"""SCSA: spatial and channel synergistic attention (Si et al., arXiv 2407.05128).

``SCSA = PCSA(SMSA(x))``: SMSA gates ``x`` with per-row and per-column weights computed from
multi-scale depthwise convs over the H and W strips; PCSA pools the gated map, runs a
channel self-attention over the pooled tokens and gates the channels. Parameter names and
shapes are the authors', so their checkpoints load with ``strict=True``.

The authors' transcription is memory-bound: it materialises ``x * a_h``, ``x * a_h * a_w``
and the output, and autograd keeps them all. Here two autograd Functions touch the big
tensor: ``_Smsa`` (strip means, the SMSA gates, ``x_s`` and PCSA's pooled map) and ``_Out``
(``out = x_s * a_c``, in place). Everything else works on small fp32 tensors: the SMSA
logits by hand inside ``_Smsa``, PCSA's channel attention in plain autograd between the two.
The backward recovers every gate gradient from ``dout * out`` and the pooling's window
sums, keeps no big intermediate from the forward, and builds dL/dx in one buffer.

Three paths, one function: ``kernel`` picks the fused Triton kernels
(``scsa.attention.kernels.scsa``: 10 launches and 8 passes over the map per forward +
backward; ``auto`` takes them where they agree and are faster), or the eager path above; under ``torch.compile`` the
kernels are custom ops in the graph, and without them, or under export (ONNX,
``torch.export``), a plain-op path runs that exporters and inductor can take.
"""
from typing import Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from scsa.attention.gate import RecordsGate
from scsa.attention.kernels import check_kernel, exporting, use_triton
from scsa.attention.registry import register_attention

__all__ = ["SCSA"]

_STRIP_CONVS = ("local_dwc", "global_dwc_s", "global_dwc_m", "global_dwc_l")
_GN_EPS = 1e-5  # nn.GroupNorm's default, as in the authors' modules


def _gate(z: torch.Tensor, kind: str, dim: int) -> torch.Tensor:
    return torch.sigmoid(z) if kind == "sigmoid" else torch.softmax(z, dim)


def _gate_backward(a: torch.Tensor, t: torch.Tensor, kind: str, dim: int) -> torch.Tensor:
    """Gradient w.r.t. a gate's logits from ``t = a * dL/da``: no division by ``a`` needed."""
    if kind == "sigmoid":
        return t - t * a
    return t - a * t.sum(dim, keepdim=True)


def _merged_kernel(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """The four strip convs' depthwise kernels as one, each zero-padded (centred) to the largest."""
    k_max = max(t.shape[-1] for t in weights)
    return torch.cat([F.pad(t, ((k_max - t.shape[-1]) // 2,) * 2) for t in weights])


def _strip_logits(st: "_State", x_h: torch.Tensor, x_w: torch.Tensor,
                  params: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """SMSA's logits for both strips: one depthwise conv, kernels zero-padded to the largest.

    The H and W strips share the convs, so they run as one sequence with ``k_max // 2``
    zeros between them: no output position sees both strips. No autograd graph: the
    backward is ``_strip_backward``.
    """
    weights, biases, (gn_h_w, gn_h_b, gn_w_w, gn_w_b) = params[0:8:2], params[1:8:2], params[8:]
    weight = _merged_kernel(weights)
    pad = weight.shape[-1] // 2
    b, c, h = x_h.shape
    seq = torch.cat([x_h, x_h.new_zeros(b, c, pad), x_w], dim=-1)
    z = F.conv1d(seq, weight, torch.cat(biases), padding=pad, groups=c)
    z_h, z_w = z[..., :h].contiguous(), z[..., h + pad:].contiguous()
    n_h, mean_h, rstd_h = torch.ops.aten.native_group_norm(z_h, gn_h_w, gn_h_b, b, c, h, 4, _GN_EPS)
    n_w, mean_w, rstd_w = torch.ops.aten.native_group_norm(z_w, gn_w_w, gn_w_b, b, c, z_w.shape[-1], 4, _GN_EPS)
    st.strip = (seq, weight, [t.shape[-1] for t in weights],
                (z_h, mean_h, rstd_h, gn_h_w), (z_w, mean_w, rstd_w, gn_w_w))
    return n_h, n_w


def _strip_backward(st: "_State", dn_h: torch.Tensor, dn_w: torch.Tensor):
    """Gradients of ``_strip_logits`` w.r.t. the strip means and its twelve parameters.

    oneDNN computes a grouped conv's weight gradient as one small GEMM per group, several
    times the forward's cost for these strips; here it is one grouped conv over (channel,
    sample) pairs.
    """
    seq, weight, sizes, norm_h, norm_w = st.strip
    b, c, length = seq.shape
    dz, dnorm = [], []
    for dn, (z, mean, rstd, gamma) in ((dn_h, norm_h), (dn_w, norm_w)):
        dz_i, dgamma, dbeta = torch.ops.aten.native_group_norm_backward(
            dn.contiguous(), z, mean, rstd, gamma, b, c, z.shape[-1], 4, [True, True, True])
        dz.append(dz_i)
        dnorm += [dgamma, dbeta]
    k_max = weight.shape[-1]
    pad = k_max // 2
    h = dz[0].shape[-1]
    dz = torch.cat([dz[0], dz[0].new_zeros(b, c, pad), dz[1]], dim=-1)
    dseq = F.conv1d(dz, weight.flip(-1), padding=pad, groups=c)
    pairs = F.pad(seq, (pad, pad)).transpose(0, 1).reshape(1, c * b, -1)
    dweight = F.conv1d(pairs, dz.transpose(0, 1).reshape(c * b, 1, length), groups=c * b).view(c, b, k_max).sum(1)
    dbias = dz.sum((0, 2))
    g = c // 4
    dconv = []
    for i, k in enumerate(sizes):
        start = (k_max - k) // 2
        dconv += [dweight[i * g:(i + 1) * g, None, start:start + k], dbias[i * g:(i + 1) * g]]
    return dseq[..., :h], dseq[..., h + pad:], dconv + dnorm


class _State:
    """What the two Functions of one SCSA call share.

    The big gradient dL/dx is started in _Out's backward and finished in _Smsa's, which
    autograd runs later (y feeds _Out): no partial big gradients to add up.

    Small per-row/per-column tensors that meet the big one are laid out like it (C innermost
    for channels_last), so broadcasts and reductions run along its contiguous axis.
    """

    def __init__(self, mod: "SCSA", x: torch.Tensor):
        self.kind = mod.gate_layer
        self.window = mod.pool_window(*x.shape[2:])
        self.max_pool = mod.down_sample_mode == "max_pool" and mod.window_size != -1
        self.need_dx = x.requires_grad and torch.is_grad_enabled()
        self.channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        self.xs = self.dx = self.idx = None

    def lay(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Small (B, C, ...) tensor ``t`` in ``dtype``, laid out like the big tensor."""
        t = t.to(dtype)
        return t.movedim(1, -1).contiguous().movedim(-1, 1) if self.channels_last else t

    def sum(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """``t.sum(dim)`` in ``t``'s dtype (for bf16 the CPU kernel still accumulates in fp32)."""
        if not self.channels_last:
            return t.sum(dim)
        shape = list(t.shape)
        shape[dim] = 1
        out = torch.empty([shape[0], *shape[2:], shape[1]], dtype=t.dtype, device=t.device).movedim(-1, 1)
        return torch.sum(t, dim, keepdim=True, out=out).squeeze(dim)


class _Smsa(torch.autograd.Function):
    """x -> PCSA's pooled map of ``x_s = x * a_h * a_w`` (SMSA inside); keeps x_s for _Out.

    Its backward runs after _Out's (y feeds _Out through the channel attention), adds the
    pooling's share to the gate gradients and returns the whole dL/dx.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, st: "_State", *params: torch.Tensor) -> torch.Tensor:
        ctx.st = st
        h, w = x.shape[2:]
        z_h, z_w = _strip_logits(st, st.sum(x, 3).float() / w, st.sum(x, 2).float() / h, params)
        st.a_h, st.a_w = _gate(z_h, st.kind, -1), _gate(z_w, st.kind, -1)
        xs = x * st.lay(st.a_w, x.dtype)[:, :, None, :]
        xs.mul_(st.lay(st.a_h, x.dtype)[..., None])
        st.xs = xs
        (wh, ww) = st.window
        hp, wp = h // wh, w // ww
        if st.max_pool:
            y, st.idx = F.max_pool2d(xs, (wh, ww), (wh, ww), return_indices=True)  # idx: flat h * W + w
            st.y = y = y.float()
            return y
        crop = xs[:, :, :hp * wh, :wp * ww]
        st.rows = st.sum(crop.unflatten(3, (wp, ww)), 4)  # (B, C, Hc, Wp): x_s summed over each window's w
        st.cols = st.sum(crop.unflatten(2, (hp, wh)), 3)  # (B, C, Hp, Wc): x_s summed over each window's h
        return st.rows.float().unflatten(2, (hp, wh)).sum(3) / (wh * ww)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: torch.Tensor):
        st = ctx.st
        b, c, h = st.a_h.shape
        w = st.a_w.shape[-1]
        (wh, ww), hp, wp = st.window, dy.shape[2], dy.shape[3]
        hc, wc = hp * wh, wp * ww
        t_h, t_w = st.t_h, st.t_w  # a * dL/da from out = x_s * a_c; add the pooling's share
        if st.idx is not None:
            idx = st.idx.flatten(2)
            contrib = (st.y * dy).flatten(2)
            t_h = t_h.scatter_add(2, idx.div(w, rounding_mode="floor"), contrib)
            t_w = t_w.scatter_add(2, idx.remainder(w), contrib)
        else:
            u = dy / (wh * ww)  # dL/dx_s, constant over each window
            t_h = t_h + F.pad((st.rows.float().unflatten(2, (hp, wh)) * u[:, :, :, None]).sum(-1).flatten(2),
                              (0, h - hc))
            t_w = t_w + F.pad((st.cols.float().unflatten(3, (wp, ww)) * u[..., None]).sum(2).flatten(2),
                              (0, w - wc))
        g_h, g_w, dparams = _strip_backward(
            st, _gate_backward(st.a_h, t_h, st.kind, -1), _gate_backward(st.a_w, t_w, st.kind, -1))
        dx, st.dx = st.dx, None
        if dx is not None:
            # dx = dout * a_w * a_c so far; add a_w * dL/dx_s, then * a_h, then the strip means' share
            if st.idx is not None:
                hi, wi = idx.div(w, rounding_mode="floor"), idx.remainder(w)
                bi = torch.arange(b, device=dx.device).view(b, 1, 1)
                ci = torch.arange(c, device=dx.device).view(1, c, 1)
                dx.index_put_((bi, ci, hi, wi), (st.a_w.gather(2, wi) * dy.flatten(2)).to(dx.dtype),
                              accumulate=True)
            else:
                spread = u[..., None].expand(b, c, hp, wp, ww).flatten(3)  # (B, C, Hp, Wc)
                spread = st.lay(F.pad(spread, (0, w - wc)) * st.a_w[:, :, None, :], dx.dtype)
                dx[:, :, :hc].unflatten(2, (hp, wh)).add_(spread[:, :, :, None])
            dx.mul_(st.lay(st.a_h, dx.dtype)[..., None])
            dx.add_(st.lay(g_h / w, dx.dtype)[..., None])
            dx.add_(st.lay(g_w / h, dx.dtype)[:, :, None, :])
        return (dx, None, *dparams)


class _Out(torch.autograd.Function):
    """PCSA logits -> ``out = x_s * a_c``, in place in _Smsa's x_s."""

    @staticmethod
    def forward(ctx, z_c: torch.Tensor, st: _State) -> torch.Tensor:
        ctx.st = st
        st.a_c = _gate(z_c, st.kind, 1)
        out, st.xs = st.xs.mul_(st.a_c.to(st.xs.dtype)[..., None, None]), None
        ctx.save_for_backward(out)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout: torch.Tensor):
        st = ctx.st
        (out,) = ctx.saved_tensors
        # a * dL/da for each gate's use in out = x * a_h * a_w * a_c: sums of dout * out.
        prod = dout * out
        st.t_h, st.t_w = st.sum(prod, 3).float(), st.sum(prod, 2).float()
        if st.need_dx:
            st.dx = torch.mul(dout, st.lay(st.a_w * st.a_c[..., None], dout.dtype)[:, :, None, :], out=prod)
        return _gate_backward(st.a_c, st.t_h.sum(-1), st.kind, 1), None


class SCSA(RecordsGate, nn.Module):
    """Spatial and channel synergistic attention; a fast, exact re-implementation.

    Args keep the authors' names so their configs carry over. Two deliberate departures
    from the authors' code, neither changing a result they could produce:

    * maps smaller than the pooling window work: the window shrinks to
      ``min(window, H) x min(window, W)`` (identical output when the map is at least
      ``window x window``; the authors' ``AvgPool2d`` raises there);
    * channel counts the module cannot split (not divisible by 4 or by ``head_num``) raise a
      ``ValueError`` naming the fix at construction, not a shape error mid-forward.

    ``window_size=-1`` pools globally, with the mean in either ``down_sample_mode`` (as the
    authors' code does). The output has the input's dtype and memory format.

    ``kernel``: ``auto`` (the faster of the two where Triton runs and agrees, measured once per
    case; the eager path on CPU), ``triton`` or ``torch``; see ``scsa.attention.kernels``.
    """

    random_options = ("attn_drop_ratio",)  # off while kernel="auto" compares the paths (their masks differ)

    def __init__(
            self,
            channels: int,
            head_num: int = 1,
            window_size: int = 7,
            group_kernel_sizes: Sequence[int] = (3, 5, 7, 9),
            qkv_bias: bool = False,
            down_sample_mode: str = "avg_pool",
            attn_drop_ratio: float = 0.0,
            gate_layer: str = "sigmoid",
            kernel: str = "auto",
    ):
        super().__init__()
        _check_args(channels, head_num, window_size, group_kernel_sizes, down_sample_mode, gate_layer)
        self.channels = channels
        self.head_num = head_num
        self.window_size = window_size
        self.group_kernel_sizes = tuple(int(k) for k in group_kernel_sizes)
        self.down_sample_mode = down_sample_mode
        self.attn_drop_ratio = float(attn_drop_ratio)
        self.gate_layer = gate_layer
        self.kernel = check_kernel(kernel)  # auto | triton | torch: see scsa.attention.kernels
        self.scaler = (channels // head_num) ** -0.5

        g = channels // 4
        for name, k in zip(_STRIP_CONVS, self.group_kernel_sizes):
            self.add_module(name, nn.Conv1d(g, g, kernel_size=k, padding=k // 2, groups=g))
        self.norm_h = nn.GroupNorm(4, channels)
        self.norm_w = nn.GroupNorm(4, channels)
        self.norm = nn.GroupNorm(1, channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1, bias=qkv_bias, groups=channels)
        self.k = nn.Conv2d(channels, channels, kernel_size=1, bias=qkv_bias, groups=channels)
        self.v = nn.Conv2d(channels, channels, kernel_size=1, bias=qkv_bias, groups=channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The authors' init (MMPretrain's ``Kaiming`` for Conv2d); Conv1d/GroupNorm keep PyTorch's."""
        for conv in (self.q, self.k, self.v):
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)

    def pool_window(self, h: int, w: int) -> Tuple[int, int]:
        """PCSA's pooling window for an ``h x w`` map (shrunk to fit small maps)."""
        if self.window_size == -1:
            return h, w
        # sym_min: under export h and w are symbols, and the window follows them (min would fix it at the trace's)
        return torch.sym_min(self.window_size, h), torch.sym_min(self.window_size, w)

    def _channel_logits(self, y: torch.Tensor) -> torch.Tensor:
        """PCSA's logits (B, C): self-attention between channels over the pooled tokens.

        q, k, v are per-channel scales (depthwise 1x1 convs). The token mean is taken before
        ``A @ v`` (it is linear), and SDPA avoids materialising the (d, d) attention map.
        """
        b, c = y.shape[:2]
        y = F.group_norm(y, 1, self.norm.weight.float(), self.norm.bias.float(), _GN_EPS).flatten(2)

        def proj(conv: nn.Conv2d) -> torch.Tensor:
            t = y * conv.weight.float().view(c, 1)
            if conv.bias is not None:
                t = t + conv.bias.float().view(c, 1)
            return t.view(b, self.head_num, c // self.head_num, -1)

        q, k, v = proj(self.q), proj(self.k), proj(self.v)
        # v's token mean repeated to q's width: equal head dims let SDPA take its fused kernel
        v = v.mean(-1, keepdim=True).expand_as(q).contiguous()
        drop = self.attn_drop_ratio if self.training else 0.0
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, scale=self.scaler)
        return o[..., 0].reshape(b, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"SCSA({self.channels}) expects (B, {self.channels}, H, W), got {tuple(x.shape)}")
        if not self.record_gate and use_triton(self, x):
            from scsa.attention.kernels.scsa import scsa_triton  # imports triton: only on this path
            return scsa_triton(self, x)
        if torch.compiler.is_compiling() or exporting() or self.record_gate:
            return self._forward_traceable(x)
        strip_params = [t for n in _STRIP_CONVS for t in (getattr(self, n).weight, getattr(self, n).bias)]
        strip_params += [self.norm_h.weight, self.norm_h.bias, self.norm_w.weight, self.norm_w.bias]
        # The gates are computed in fp32 whatever the autocast state. On CPU a bf16/fp16 map is
        # also converted to fp32 once each way: PyTorch's CPU kernels for reduced-precision
        # broadcasts and reductions are slower than the fp32 ones (2x on a Xeon with AMX), so
        # the conversions pay for themselves. On GPUs the map keeps its dtype.
        reduced = x.dtype in (torch.bfloat16, torch.float16)
        big = x.float() if reduced and x.device.type == "cpu" else x
        st = _State(self, big)
        with torch.autocast(device_type=x.device.type, enabled=False):
            y = _Smsa.apply(big, st, *(t.float() for t in strip_params))
            return _Out.apply(self._channel_logits(y), st).to(x.dtype)

    def _forward_traceable(self, x: torch.Tensor) -> torch.Tensor:
        """The same function in plain tensor ops, for ``torch.compile``.

        The eager path's autograd Functions carry Python state between them, which TorchDynamo
        cannot trace (a graph break per block) and exporters cannot translate (ONNX export runs
        this too); in one graph, inductor fuses the passes over the big tensor by itself. Gates in
        fp32, the big tensor in its own dtype.
        """
        b, c, h, w = x.shape
        with torch.autocast(device_type=x.device.type, enabled=False):
            convs = [getattr(self, n) for n in _STRIP_CONVS]
            weight = _merged_kernel([conv.weight.float() for conv in convs])
            bias = torch.cat([conv.bias.float() for conv in convs])

            def strip_gate(strip: torch.Tensor, norm: nn.GroupNorm) -> torch.Tensor:
                z = F.conv1d(strip.float(), weight, bias, padding=weight.shape[-1] // 2, groups=c)
                return _gate(F.group_norm(z, 4, norm.weight.float(), norm.bias.float(), _GN_EPS), self.gate_layer, -1)

            a_h, a_w = strip_gate(x.mean(3), self.norm_h), strip_gate(x.mean(2), self.norm_w)
            if self.record_gate:  # SMSA's a_h x a_w (PCSA's a_c then scales whole channels)
                self.keep_gate(a_h[..., None] * a_w[:, :, None, :])
            xs = x * a_h.to(x.dtype)[..., None] * a_w.to(x.dtype)[:, :, None, :]
            window = self.pool_window(h, w)
            max_pool = self.window_size != -1 and self.down_sample_mode == "max_pool"
            if exporting():
                y = _window_pool_any_size(xs, window, max_pool)
            elif max_pool:
                y = F.max_pool2d(xs, window, window)
            else:
                y = F.avg_pool2d(xs, window, window)
            a_c = _gate(self._channel_logits(y.float()), self.gate_layer, 1)
            return xs * a_c.to(x.dtype)[..., None, None]

    def extra_repr(self) -> str:
        return (f"{self.channels}, head_num={self.head_num}, window_size={self.window_size}, "
                f"group_kernel_sizes={self.group_kernel_sizes}, down_sample_mode={self.down_sample_mode!r}, "
                f"attn_drop_ratio={self.attn_drop_ratio}, gate_layer={self.gate_layer!r}")


def _window_pool_any_size(x: torch.Tensor, window: Tuple[int, int], max_pool: bool) -> torch.Tensor:
    """``F.avg_pool2d(x, window, window)`` (or max) in ops whose sizes follow the map's, for exporters: ONNX's
    pooling takes a constant kernel, but the window shrinks with maps smaller than ``window_size``. Each axis
    is reduced through a (windows, size) membership mask; rows past the last whole window belong to none."""
    def mask(size, step) -> torch.Tensor:
        positions = torch.arange(size, device=x.device)
        return positions[None, :] // step == torch.arange(size // step, device=x.device)[:, None]

    in_h, in_w = mask(x.shape[2], window[0]), mask(x.shape[3], window[1])
    if not max_pool:
        return torch.einsum("ih,bchw,jw->bcij", in_h.to(x.dtype) / window[0], x, in_w.to(x.dtype) / window[1])
    lowest = torch.finfo(x.dtype).min
    rows = x[:, :, None].masked_fill(~in_h[:, :, None], lowest).amax(3)  # (B, C, Hp, W)
    return rows[:, :, :, None].masked_fill(~in_w, lowest).amax(4)  # (B, C, Hp, Wp)


def _check_args(channels: int, head_num: int, window_size: int, group_kernel_sizes: Sequence[int],
                down_sample_mode: str, gate_layer: str) -> None:
    if channels <= 0 or channels % 4:
        raise ValueError(f"SCSA needs channels divisible by 4 (got {channels}): use a multiple of 4")
    if head_num <= 0 or channels % head_num:
        raise ValueError(f"SCSA needs channels divisible by head_num (got channels={channels}, "
                         f"head_num={head_num}): use a head_num that divides {channels}")
    if window_size != -1 and window_size < 1:
        raise ValueError(f"SCSA window_size must be a positive int or -1 for global pooling (got {window_size})")
    if len(group_kernel_sizes) != 4 or any(int(k) < 1 or int(k) % 2 == 0 for k in group_kernel_sizes):
        raise ValueError(f"SCSA group_kernel_sizes must be four odd sizes (got {tuple(group_kernel_sizes)}), "
                         "e.g. (3, 5, 7, 9)")
    if down_sample_mode not in ("avg_pool", "max_pool"):
        raise ValueError(f"SCSA down_sample_mode must be 'avg_pool' or 'max_pool' (got {down_sample_mode!r})")
    if gate_layer not in ("sigmoid", "softmax"):
        raise ValueError(f"SCSA gate_layer must be 'sigmoid' or 'softmax' (got {gate_layer!r})")


register_attention("scsa", SCSA, "mid")  # where the SCSA authors put it
