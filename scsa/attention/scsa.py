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
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["SCSA"]

_STRIP_CONVS = ("local_dwc", "global_dwc_s", "global_dwc_m", "global_dwc_l")
_STRIP_PARAMS = tuple(f"{n}.{p}" for n in _STRIP_CONVS for p in ("weight", "bias")) + (
    "norm_h.weight", "norm_h.bias", "norm_w.weight", "norm_w.bias")
_GN_EPS = 1e-5  # nn.GroupNorm's default, as in the authors' modules


def _gate(z: torch.Tensor, kind: str, dim: int) -> torch.Tensor:
    return torch.sigmoid(z) if kind == "sigmoid" else torch.softmax(z, dim)


def _gate_backward(a: torch.Tensor, t: torch.Tensor, kind: str, dim: int) -> torch.Tensor:
    """Gradient w.r.t. the gate's logits from ``t = a * dL/da`` (no division by ``a``)."""
    if kind == "sigmoid":
        return t - t * a
    return t - a * t.sum(dim, keepdim=True)


class _Graphs:
    """Small fp32 autograd graphs built in the forward and replayed in the backward."""

    def __init__(self, track: bool):
        self.track = track
        self.leaves: Dict[str, torch.Tensor] = {}

    def leaf(self, name: str, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        t = t.detach().to(dtype)
        if self.track:
            t.requires_grad_()
            self.leaves[name] = t
        return t


def _strip_logits(mod: "SCSA", p: Dict[str, torch.Tensor], x_h: torch.Tensor,
                  x_w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """SMSA's logits for both strips: one depthwise conv, kernels zero-padded to the largest.

    The H and W strips share the convs, so they run as one sequence with ``k_max // 2``
    zeros between them: no output position sees both strips.
    """
    k_max = max(mod.group_kernel_sizes)
    pad = k_max // 2
    weight = torch.cat([F.pad(p[f"{n}.weight"], ((k_max - k) // 2,) * 2)
                        for n, k in zip(_STRIP_CONVS, mod.group_kernel_sizes)])
    bias = torch.cat([p[f"{n}.bias"] for n in _STRIP_CONVS])
    h = x_h.shape[-1]
    seq = torch.cat([x_h, x_h.new_zeros(*x_h.shape[:2], pad), x_w], dim=-1)
    z = F.conv1d(seq, weight, bias, padding=pad, groups=mod.channels)
    z_h = F.group_norm(z[..., :h], 4, p["norm_h.weight"], p["norm_h.bias"], _GN_EPS)
    z_w = F.group_norm(z[..., h + pad:], 4, p["norm_w.weight"], p["norm_w.bias"], _GN_EPS)
    return z_h, z_w


def _channel_logits(mod: "SCSA", p: Dict[str, torch.Tensor], y: torch.Tensor, training: bool) -> torch.Tensor:
    """PCSA's logits (B, C): self-attention between channels over the pooled tokens.

    q, k, v are per-channel scales (depthwise 1x1 convs). The mean over tokens is taken
    before ``A @ v`` (it is linear), and SDPA avoids materialising the (d, d) attention map.
    """
    b, c = y.shape[:2]
    y = F.group_norm(y, 1, p["norm.weight"], p["norm.bias"], _GN_EPS).flatten(2)

    def proj(name: str) -> torch.Tensor:
        t = y * p[f"{name}.weight"].view(c, 1)
        if f"{name}.bias" in p:
            t = t + p[f"{name}.bias"].view(c, 1)
        return t.view(b, mod.head_num, c // mod.head_num, -1)

    q, k, v = proj("q"), proj("k"), proj("v")
    # v's token mean repeated to q's width: equal head dims let SDPA take its fused kernel
    v = v.mean(-1, keepdim=True).expand_as(q).contiguous()
    drop = mod.attn_drop_ratio if training else 0.0
    o = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, scale=mod.scaler)
    return o[..., 0].reshape(b, c)


class _SCSAFunction(torch.autograd.Function):
    """``out = x * a_h * a_w * a_c`` with the gates' small graphs kept for the backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, mod: "SCSA", names: Tuple[str, ...], *params: torch.Tensor) -> torch.Tensor:
        graphs = _Graphs(track=True)
        out, state = _forward(mod, x, dict(zip(names, params)), graphs)
        ctx.mod, ctx.names, ctx.graphs, ctx.state = mod, names, graphs, state
        ctx.param_dtypes = [t.dtype for t in params]
        ctx.shape = x.shape
        ctx.save_for_backward(out)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout: torch.Tensor):
        (out,) = ctx.saved_tensors
        dx, grads = _backward(ctx.mod, ctx.graphs, ctx.state, out, dout)
        dparams = [grads.get(n) for n in ctx.names]
        dparams = [g if g is None else g.to(dt) for g, dt in zip(dparams, ctx.param_dtypes)]
        return (dx, None, None, *dparams)


def _forward(mod: "SCSA", x: torch.Tensor, p: Dict[str, torch.Tensor],
             graphs: _Graphs) -> Tuple[torch.Tensor, Optional[dict]]:
    """Shared by the autograd Function and the no-grad path (``graphs.track`` False)."""
    b, c, h, w = x.shape
    xd = x.dtype
    dt = torch.promote_types(xd, torch.float32)  # small tensors: fp32 even under autocast
    wh, ww = mod.pool_window(h, w)
    hp, wp = h // wh, w // ww
    with torch.no_grad():
        # Reductions stay in x's dtype: CPU sums of bf16 accumulate in fp32 anyway, and
        # reductions with an fp32 output dtype are several times slower there.
        x_h, x_w = x.sum(3).to(dt) / w, x.sum(2).to(dt) / h
    with torch.autocast(device_type=x.device.type, enabled=False), torch.set_grad_enabled(graphs.track):
        sp = {n: graphs.leaf(n, t, dt) for n, t in p.items()}
        z_h, z_w = _strip_logits(mod, sp, graphs.leaf("x_h", x_h, dt), graphs.leaf("x_w", x_w, dt))
    with torch.no_grad():
        a_h, a_w = _gate(z_h.detach(), mod.gate_layer, -1), _gate(z_w.detach(), mod.gate_layer, -1)
        xs = x * a_w.to(xd)[:, :, None, :]
        xs.mul_(a_h.to(xd)[..., None])
        crop = xs[:, :, :hp * wh, :wp * ww]
        if mod.down_sample_mode == "avg_pool" or mod.window_size == -1:
            rows = crop.unflatten(3, (wp, ww)).sum(-1)  # (B, C, Hc, Wp): sums over w in a window
            cols = crop.unflatten(2, (hp, wh)).sum(3)  # (B, C, Hp, Wc): sums over h in a window
            y = rows.to(dt).unflatten(2, (hp, wh)).sum(3) / (wh * ww)
            pool = ("avg", rows, cols)
        else:
            y, idx = F.max_pool2d(xs, (wh, ww), (wh, ww), return_indices=True)  # flat h * W + w
            y = y.to(dt)
            pool = ("max", y, idx)
    with torch.autocast(device_type=x.device.type, enabled=False), torch.set_grad_enabled(graphs.track):
        z_c = _channel_logits(mod, sp, graphs.leaf("y", y, dt), mod.training)
    with torch.no_grad():
        a_c = _gate(z_c.detach(), mod.gate_layer, 1)
        out = xs.mul_(a_c.to(xd)[..., None, None])
    if not graphs.track:
        return out, None
    return out, dict(z_h=z_h, z_w=z_w, z_c=z_c, a_h=a_h, a_w=a_w, a_c=a_c, pool=pool, window=(wh, ww))


def _grad(graphs: _Graphs, outputs: List[torch.Tensor], grads: List[torch.Tensor],
          names: Sequence[str]) -> Dict[str, torch.Tensor]:
    names = [n for n in names if n in graphs.leaves]
    found = torch.autograd.grad(outputs, [graphs.leaves[n] for n in names], grads, allow_unused=True)
    return dict(zip(names, found))


def _backward(mod: "SCSA", graphs: _Graphs, s: dict, out: torch.Tensor,
              dout: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    b, c, h, w = out.shape
    kind = mod.gate_layer
    a_h, a_w, a_c = s["a_h"], s["a_w"], s["a_c"]
    dt = a_h.dtype
    wh, ww = s["window"]
    hp, wp = h // wh, w // ww
    hc, wc = hp * wh, wp * ww

    # a * dL/da for the three gates' uses in out = x * a_h * a_w * a_c: sums of dout * out.
    prod = dout * out
    t_h, t_w = prod.sum(3).to(dt), prod.sum(2).to(dt)  # (B, C, H), (B, C, W)
    del prod
    dz_c = _gate_backward(a_c, t_h.sum(-1), kind, 1)
    channel_params = [n for n in graphs.leaves if n not in _STRIP_PARAMS and n not in ("x_h", "x_w")]
    g2 = _grad(graphs, [s["z_c"]], [dz_c], channel_params)
    dy = g2.pop("y")

    # The pooling's use of a_h, a_w (through x_s = x * a_h * a_w) and of x.
    kind_pool, p1, p2 = s["pool"]
    if kind_pool == "avg":
        u = dy / (wh * ww)  # dL/dx_s, constant over each window
        rows, cols = p1.to(dt), p2.to(dt)
        t_h[..., :hc] += (rows.unflatten(2, (hp, wh)) * u[:, :, :, None, :]).sum(-1).flatten(2)
        t_w[..., :wc] += (cols.unflatten(3, (wp, ww)) * u[..., None]).sum(2).flatten(2)
    else:
        y, idx = p1, p2
        contrib = (y * dy).flatten(2)
        idx = idx.flatten(2)
        t_h.scatter_add_(2, idx.div(w, rounding_mode="floor"), contrib)
        t_w.scatter_add_(2, idx.remainder(w), contrib)
    dz_h = _gate_backward(a_h, t_h, kind, -1)
    dz_w = _gate_backward(a_w, t_w, kind, -1)
    g1 = _grad(graphs, [s["z_h"], s["z_w"]], [dz_h, dz_w], ("x_h", "x_w") + _STRIP_PARAMS)
    dx_h, dx_w = g1.pop("x_h"), g1.pop("x_w")

    # dx = a_h * a_w * (a_c * dout + dL/dx_s) + dx_h / W + dx_w / H; dL/dx_s is the
    # pooling's gradient: dy spread over its window (avg) or put at the argmax (max).
    xd = out.dtype
    dx = torch.empty_like(dout)
    ac = a_c.to(xd)[..., None, None]
    if kind_pool == "avg" and hc == h:
        spread = u[..., None].expand(b, c, hp, wp, ww).flatten(3)  # (B, C, Hp, Wc)
        spread = F.pad(spread, (0, w - wc)).to(xd)[:, :, :, None, :]
        torch.addcmul(spread, dout.unflatten(2, (hp, wh)), ac[..., None], out=dx.unflatten(2, (hp, wh)))
    elif kind_pool == "avg":
        torch.mul(dout, ac, out=dx)
        spread = u[..., None].expand(b, c, hp, wp, ww).flatten(3).to(xd)[:, :, :, None, :]
        dx[:, :, :hc, :wc].unflatten(2, (hp, wh)).add_(spread)
    else:
        torch.mul(dout, ac, out=dx)
        bi = torch.arange(b, device=dx.device).view(b, 1, 1)
        ci = torch.arange(c, device=dx.device).view(1, c, 1)
        dx.index_put_((bi, ci, idx.div(w, rounding_mode="floor"), idx.remainder(w)), dy.flatten(2).to(xd),
                      accumulate=True)
    dx.mul_(a_w.to(xd)[:, :, None, :])
    torch.addcmul((dx_h / w).to(xd)[..., None], dx, a_h.to(xd)[..., None], out=dx)
    dx.add_((dx_w / h).to(xd)[:, :, None, :])
    return dx, {**g1, **g2}


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"SCSA({self.channels}) expects (B, {self.channels}, H, W), got {tuple(x.shape)}")
        names, params = zip(*self.named_parameters())
        if torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in params)):
            return _SCSAFunction.apply(x, self, names, *params)
        out, _ = _forward(self, x, dict(zip(names, params)), _Graphs(track=False))
        return out

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
