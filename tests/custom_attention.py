"""An attention module from outside the package, as a user writes one: a plain ``nn.Module`` taking
``channels``, no ``kernel``. ``tests/conftest.py`` registers it, so every registry-driven test covers it."""
import torch
import torch.nn as nn

from scsa.attention import RecordsGate


class SpatialMask(RecordsGate, nn.Module):
    """``x * sigmoid(w . x + b)``: one spatial map from a 1x1 conv over the channels."""

    def __init__(self, channels: int, bias: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(channels, 1, kernel_size=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.conv(x))
        self.keep_gate(gate)
        return x * gate


class Widen(nn.Module):
    """Not an attention module: it doubles the channels (what the channel check refuses)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, 2 * channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)
