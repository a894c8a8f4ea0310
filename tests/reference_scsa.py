"""SCSA as the spec (and the authors' release) writes it: the plain reference for the tests.

A direct transcription of ``/work/shared/spec/attention.md``: four separate Conv1d, a
materialised ``X_s``, ``AvgPool2d``/``MaxPool2d``, the full ``A @ v``. Slow on purpose; the
fast ``scsa.attention.scsa.SCSA`` must match it. ``window_size`` may be a tuple here so that
a test can build the "window shrunk to the map" reference for small feature maps.
"""
from typing import Sequence, Tuple, Union

import torch
import torch.nn as nn


class ReferenceSCSA(nn.Module):
    def __init__(
            self,
            dim: int,
            head_num: int = 1,
            window_size: Union[int, Tuple[int, int]] = 7,
            group_kernel_sizes: Sequence[int] = (3, 5, 7, 9),
            qkv_bias: bool = False,
            down_sample_mode: str = "avg_pool",
            attn_drop_ratio: float = 0.0,
            gate_layer: str = "sigmoid",
    ):
        super().__init__()
        self.dim = dim
        self.head_num = head_num
        self.head_dim = dim // head_num
        self.scaler = self.head_dim ** -0.5
        self.group_chans = g = dim // 4
        k = group_kernel_sizes
        self.local_dwc = nn.Conv1d(g, g, kernel_size=k[0], padding=k[0] // 2, groups=g)
        self.global_dwc_s = nn.Conv1d(g, g, kernel_size=k[1], padding=k[1] // 2, groups=g)
        self.global_dwc_m = nn.Conv1d(g, g, kernel_size=k[2], padding=k[2] // 2, groups=g)
        self.global_dwc_l = nn.Conv1d(g, g, kernel_size=k[3], padding=k[3] // 2, groups=g)
        self.sa_gate = nn.Softmax(dim=2) if gate_layer == "softmax" else nn.Sigmoid()
        self.norm_h = nn.GroupNorm(4, dim)
        self.norm_w = nn.GroupNorm(4, dim)

        self.norm = nn.GroupNorm(1, dim)
        self.q = nn.Conv2d(dim, dim, kernel_size=1, bias=qkv_bias, groups=dim)
        self.k = nn.Conv2d(dim, dim, kernel_size=1, bias=qkv_bias, groups=dim)
        self.v = nn.Conv2d(dim, dim, kernel_size=1, bias=qkv_bias, groups=dim)
        self.attn_drop = nn.Dropout(attn_drop_ratio)
        self.ca_gate = nn.Softmax(dim=1) if gate_layer == "softmax" else nn.Sigmoid()
        if window_size == -1:
            self.down_func = nn.AdaptiveAvgPool2d((1, 1))
        elif down_sample_mode == "avg_pool":
            self.down_func = nn.AvgPool2d(kernel_size=window_size, stride=window_size)
        else:
            self.down_func = nn.MaxPool2d(kernel_size=window_size, stride=window_size)

    def _strip(self, x: torch.Tensor) -> torch.Tensor:
        l, s, m, g = torch.split(x, self.group_chans, dim=1)
        return torch.cat((self.local_dwc(l), self.global_dwc_s(s), self.global_dwc_m(m), self.global_dwc_l(g)), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h_, w_ = x.size()
        # SMSA
        x_h = x.mean(dim=3)
        x_w = x.mean(dim=2)
        x_h_attn = self.sa_gate(self.norm_h(self._strip(x_h))).view(b, c, h_, 1)
        x_w_attn = self.sa_gate(self.norm_w(self._strip(x_w))).view(b, c, 1, w_)
        x = x * x_h_attn * x_w_attn
        # PCSA
        y = self.down_func(x)
        _, _, h_, w_ = y.size()
        y = self.norm(y)
        q, k, v = self.q(y), self.k(y), self.v(y)
        q = q.reshape(b, self.head_num, self.head_dim, h_ * w_)
        k = k.reshape(b, self.head_num, self.head_dim, h_ * w_)
        v = v.reshape(b, self.head_num, self.head_dim, h_ * w_)
        attn = q @ k.transpose(-2, -1) * self.scaler
        attn = self.attn_drop(attn.softmax(dim=-1))
        attn = attn @ v
        attn = attn.reshape(b, c, h_, w_).mean((2, 3), keepdim=True)
        attn = self.ca_gate(attn)
        return attn * x
