"""EMA: efficient multi-scale attention (Ouyang et al., ICASSP 2023), after the authors' code."""
import torch
import torch.nn as nn

from scsa.attention.gate import RecordsGate
from scsa.attention.kernels import check_kernel, use_triton
from scsa.attention.registry import register_attention

__all__ = ["EMA"]


class EMA(RecordsGate, nn.Module):
    """Channel groups folded into the batch; a 1x1 branch (directional gates + GroupNorm) and a
    3x3 branch weight each other's pixels through a softmax over channels (cross-spatial step).
    """

    def __init__(self, channels: int, factor: int = 32, kernel: str = "auto"):
        super().__init__()
        self.kernel = check_kernel(kernel)  # auto | triton | torch: see scsa.attention.kernels
        if factor <= 0 or channels % factor:
            raise ValueError(f"EMA needs channels divisible by factor={factor} (got {channels}): "
                             f"use a multiple of {factor} or a factor that divides {channels}")
        self.groups = factor
        cg = channels // factor
        self.gn = nn.GroupNorm(cg, cg)
        self.conv1x1 = nn.Conv2d(cg, cg, kernel_size=1)
        self.conv3x3 = nn.Conv2d(cg, cg, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.record_gate and use_triton(self, x):
            from scsa.attention.kernels.ema import ema  # Triton kernels are defined on first use
            return ema(x, self.conv1x1.weight.flatten(1), self.conv1x1.bias, self.gn.weight, self.gn.bias,
                       self.conv3x3.weight, self.conv3x3.bias, self.groups, self.gn.eps)
        b, c, h, w = x.shape
        g = x.reshape(b * self.groups, -1, h, w)
        x_h = g.mean(3, keepdim=True)
        x_w = g.mean(2, keepdim=True).transpose(2, 3)
        x_h, x_w = torch.split(self.conv1x1(torch.cat([x_h, x_w], dim=2)), [h, w], dim=2)
        x1 = self.gn(g * x_h.sigmoid() * x_w.transpose(2, 3).sigmoid())
        x2 = self.conv3x3(g)
        w1 = torch.softmax(x1.mean((2, 3)), dim=-1).unsqueeze(1)  # (BG, 1, C/G)
        w2 = torch.softmax(x2.mean((2, 3)), dim=-1).unsqueeze(1)
        weights = w1 @ x2.flatten(2) + w2 @ x1.flatten(2)  # (BG, 1, HW)
        gate = weights.view(-1, 1, h, w).sigmoid()  # one spatial map per channel group
        if self.record_gate:
            self.keep_gate(gate.view(b, self.groups, h, w).repeat_interleave(c // self.groups, dim=1))
        return (g * gate).reshape(b, c, h, w)


# mid: EMA extends CA and its paper compares the two, so it takes CA's place (the paper does not spell one out)
register_attention("ema", EMA, "mid")
