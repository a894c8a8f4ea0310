"""SE's Triton path: seven launches and seven passes over the map per forward + backward.

Forward: the squeeze (per-channel means, one pass), the excitation MLP and its sigmoid (one
small kernel), the gate multiply (one pass in, one out). Backward: ``dL/da = sum_n dout * x``
(one pass over each), the MLP's backward (two small kernels: input and weight gradients), and
``dx = dout * a + dL/ds / N`` (one pass in, one out).
"""
from typing import Tuple

import torch

from scsa.attention.kernels import common

__all__ = ["se"]


@torch.library.custom_op("scsa::se_forward", mutates_args=())
def se_forward(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor
               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    s = common.reduce_n(x, scale=1.0 / (x.shape[2] * x.shape[3]))[0]
    hid, a = common.mlp_forward(s[None], w1.float().contiguous(), w2.float().contiguous())
    return common.scale_add(x, a=a), s, hid, a


@se_forward.register_fake
def _(x, w1, w2):
    b, c = x.shape[:2]
    f32 = dict(dtype=torch.float32, device=x.device)
    return common.new_map(x), torch.empty(b, c, **f32), torch.empty(1, b, w1.shape[0], **f32), torch.empty(b, c, **f32)


@torch.library.custom_op("scsa::se_backward", mutates_args=())
def se_backward(dout: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, s: torch.Tensor,
                hid: torch.Tensor, a: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    t = common.reduce_n(dout, x)[0]  # dL/da
    ds, dw1, dw2 = common.mlp_backward(t, a, s[None], hid, w1.float().contiguous(), w2.float().contiguous())
    dx = common.scale_add(dout, a=a, da=ds[0], da_scale=1.0 / (x.shape[2] * x.shape[3]), like=x)
    return dx, dw1.to(w1.dtype), dw2.to(w2.dtype)


@se_backward.register_fake
def _(dout, x, w1, w2, s, hid, a):
    return common.new_map(x), torch.empty_like(w1), torch.empty_like(w2)


common.register_autograd(se_forward, se_backward, differentiable=(0, 1, 2))


def se(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """``x * sigmoid(w2 @ relu(w1 @ mean_hw(x)))`` for ``w1`` (R, C) and ``w2`` (C, R)."""
    return se_forward(x, w1, w2)[0]
