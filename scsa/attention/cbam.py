"""CBAM: convolutional block attention module (Woo et al., ECCV 2018)."""
import torch
import torch.nn as nn
from timm.layers.cbam import ChannelAttn

from scsa.attention.gate import RecordsGate
from scsa.attention.kernels import check_kernel, use_triton
from scsa.attention.registry import register_attention

__all__ = ["CBAM"]


class SpatialGate(nn.Module):
    """``x * sigmoid(conv([mean_C x, max_C x]))``; timm's ``SpatialAttn`` adds a BatchNorm, the paper does not."""

    def __init__(self, kernel_size: int = 7):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        """The (B, 1, H, W) gate for ``x``."""
        return torch.sigmoid(self.conv(torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weights(x)


class CBAM(RecordsGate, nn.Module):
    """Channel gate (a shared bias-free MLP over avg- and max-pooled x, width ``max(C/r, min_channels)``)
    then spatial gate. The channel gate is timm's ``ChannelAttn``. Its spatial gate follows the channel
    gate: the recorded ``gate`` is the (B, 1, H, W) map.
    """

    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7, min_channels: int = 8,
                 kernel: str = "auto"):
        super().__init__()
        self.kernel = check_kernel(kernel)  # auto | triton | torch: see scsa.attention.kernels
        self.channel = ChannelAttn(channels, rd_channels=max(channels // reduction, min_channels), mlp_bias=False)
        self.spatial = SpatialGate(kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.record_gate and use_triton(self, x):
            from scsa.attention.kernels.cbam import cbam  # Triton kernels are defined on first use
            return cbam(x, self.channel.fc1.weight.flatten(1), self.channel.fc2.weight.flatten(1),
                        self.spatial.conv.weight)
        y = self.channel(x)
        gate = self.spatial.weights(y)
        self.keep_gate(gate)
        return y * gate


register_attention("cbam", CBAM, "end")  # where the CBAM paper put it
