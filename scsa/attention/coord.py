"""CA: coordinate attention (Hou et al., CVPR 2021).

Written here rather than taken from timm: timm's ``CoordAttn`` has one bias flag for all
three convs and rounds the hidden width to a multiple of 8; the paper's module has a
bias-free squeeze conv, biased expand convs and width ``max(8, C / 32)``.
"""
import torch
import torch.nn as nn

from scsa.attention.gate import RecordsGate
from scsa.attention.kernels import check_kernel, use_triton
from scsa.attention.registry import register_attention

__all__ = ["CoordAttention"]


class CoordAttention(RecordsGate, nn.Module):
    """``x * a_w * a_h`` from a shared squeeze of the H- and W-direction means."""

    def __init__(self, channels: int, reduction: int = 32, min_channels: int = 8, kernel: str = "auto"):
        super().__init__()
        self.kernel = check_kernel(kernel)  # auto | triton | torch: see scsa.attention.kernels
        hidden = max(min_channels, channels // reduction)
        self.conv1 = nn.Conv2d(channels, hidden, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.act = nn.Hardswish()
        self.conv_h = nn.Conv2d(hidden, channels, kernel_size=1)
        self.conv_w = nn.Conv2d(hidden, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.record_gate and use_triton(self, x):
            from scsa.attention.kernels.coord import coord_attention  # Triton kernels are defined on first use
            return coord_attention(x, self.conv1.weight.flatten(1), self.bn1, self.conv_h.weight.flatten(1),
                                   self.conv_h.bias, self.conv_w.weight.flatten(1), self.conv_w.bias)
        h, w = x.shape[2:]
        x_h = x.mean(3, keepdim=True)  # (B, C, H, 1)
        x_w = x.mean(2, keepdim=True).transpose(2, 3)  # (B, C, W, 1)
        y = self.act(self.bn1(self.conv1(torch.cat([x_h, x_w], dim=2))))
        y_h, y_w = torch.split(y, [h, w], dim=2)
        a_h = torch.sigmoid(self.conv_h(y_h))
        a_w = torch.sigmoid(self.conv_w(y_w.transpose(2, 3)))
        if self.record_gate:
            self.keep_gate(a_h * a_w)
        return x * a_w * a_h


# mid: the CA paper inserts it right after the depthwise 3x3 conv of MobileNetV2's inverted residual
register_attention("ca", CoordAttention, "mid")
