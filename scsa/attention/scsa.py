"""SCSA: spatial and channel synergistic attention (Si et al., arXiv 2407.05128).

``SCSA = PCSA(SMSA(x))``: SMSA gates ``x`` with per-row and per-column weights computed from
multi-scale depthwise convs over the H and W strips; PCSA pools the gated map, runs a
channel self-attention over the pooled tokens and gates the channels. Parameter names and
shapes are the authors', so their checkpoints load with ``strict=True``.

The authors' transcription is memory-bound: it materialises ``x * a_h``, ``x * a_h * a_w``
and the output, and autograd keeps them all. Here the whole module is one autograd
Function over the big tensor. Everything that depends on the feature map only through
small statistics (strip means, pooled map) is a small autograd graph in fp32; the big
tensor is touched by a handful of broadcast ops, and the backward recovers every gate
gradient from ``dout * out`` plus the pooling's window sums, so it needs no intermediate
big tensor from the forward.
"""
from typing import Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

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


class _DepthwiseConv1d(torch.autograd.Function):
    """Depthwise ``conv1d`` with 'same' padding.

    oneDNN computes a grouped conv's weight gradient as one small GEMM per group, which for
    these (B, C, L) strips costs several times the forward. Here it is one grouped conv over
    (channel, sample) pairs instead.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return F.conv1d(x, weight, bias, padding=weight.shape[-1] // 2, groups=weight.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        b, c, length = x.shape
        pad = weight.shape[-1] // 2
        grad_x = F.conv1d(grad, weight.flip(-1), padding=pad, groups=c)
        pairs = F.pad(x, (pad, pad)).transpose(0, 1).reshape(1, c * b, -1)
        grad_w = F.conv1d(pairs, grad.transpose(0, 1).reshape(c * b, 1, length), groups=c * b)
        return grad_x, grad_w.view(c, b, -1).sum(1, keepdim=True), grad.sum((0, 2))


class _State:
    """What the three Functions of one SCSA call share.

    The big gradient dL/dx is assembled across their backwards, which autograd runs in
    reverse order (_Out, _Pool, _Strips: each one's outputs feed the next one's inputs),
    and returned once, by _Strips: no partial big gradients to add up.

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


class _Strips(torch.autograd.Function):
    """x -> its means over W and over H (fp32); the backward finishes dL/dx."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, st: _State) -> Tuple[torch.Tensor, torch.Tensor]:
        ctx.st = st
        h, w = x.shape[2:]
        return st.sum(x, 3).float() / w, st.sum(x, 2).float() / h

    @staticmethod
    @once_differentiable
    def backward(ctx, g_h: torch.Tensor, g_w: torch.Tensor):
        st = ctx.st
        dx, st.dx = st.dx, None
        h, w = dx.shape[2:]
        dx.mul_(st.lay(st.a_h, dx.dtype)[..., None])
        dx.add_(st.lay(g_h / w, dx.dtype)[..., None])
        dx.add_(st.lay(g_w / h, dx.dtype)[:, :, None, :])
        return dx, None


class _Pool(torch.autograd.Function):
    """(x, SMSA logits) -> PCSA's pooled map of ``x_s = x * a_h * a_w``; x_s is kept for _Out."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, z_h: torch.Tensor, z_w: torch.Tensor, st: _State) -> torch.Tensor:
        ctx.st = st
        st.a_h, st.a_w = _gate(z_h, st.kind, -1), _gate(z_w, st.kind, -1)
        xs = x * st.lay(st.a_w, x.dtype)[:, :, None, :]
        xs.mul_(st.lay(st.a_h, x.dtype)[..., None])
        st.xs = xs
        (wh, ww), (h, w) = st.window, x.shape[2:]
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
        if st.dx is not None:  # dx = dout * a_w * a_c so far; add a_w * dL/dx_s (a_h comes last)
            dx = st.dx
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
        return None, _gate_backward(st.a_h, t_h, st.kind, -1), _gate_backward(st.a_w, t_w, st.kind, -1), None


class _Out(torch.autograd.Function):
    """PCSA logits -> ``out = x_s * a_c``, in place in _Pool's x_s."""

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


class SCSA(nn.Module):
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
    """

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
        return min(self.window_size, h), min(self.window_size, w)

    def _strip_logits(self, x_h: torch.Tensor, x_w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """SMSA's logits for both strips: one depthwise conv, kernels zero-padded to the largest.

        The H and W strips share the convs, so they run as one sequence with ``k_max // 2``
        zeros between them: no output position sees both strips.
        """
        k_max = max(self.group_kernel_sizes)
        pad = k_max // 2
        convs = [getattr(self, n) for n in _STRIP_CONVS]
        weight = torch.cat([F.pad(m.weight, ((k_max - m.kernel_size[0]) // 2,) * 2) for m in convs])
        bias = torch.cat([m.bias for m in convs])
        h = x_h.shape[-1]
        seq = torch.cat([x_h, x_h.new_zeros(*x_h.shape[:2], pad), x_w], dim=-1)
        z = _DepthwiseConv1d.apply(seq, weight.float(), bias.float())
        z_h = F.group_norm(z[..., :h], 4, self.norm_h.weight.float(), self.norm_h.bias.float(), _GN_EPS)
        z_w = F.group_norm(z[..., h + pad:], 4, self.norm_w.weight.float(), self.norm_w.bias.float(), _GN_EPS)
        return z_h, z_w

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
        st = _State(self, x)
        # The gates are computed in fp32 whatever the autocast state; the big tensor keeps x's dtype.
        with torch.autocast(device_type=x.device.type, enabled=False):
            x_h, x_w = _Strips.apply(x, st)
            z_h, z_w = self._strip_logits(x_h, x_w)
            y = _Pool.apply(x, z_h, z_w, st)
            return _Out.apply(self._channel_logits(y), st)

    def extra_repr(self) -> str:
        return (f"{self.channels}, head_num={self.head_num}, window_size={self.window_size}, "
                f"group_kernel_sizes={self.group_kernel_sizes}, down_sample_mode={self.down_sample_mode!r}, "
                f"attn_drop_ratio={self.attn_drop_ratio}, gate_layer={self.gate_layer!r}")


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
