"""SE: squeeze-and-excitation (Hu et al., CVPR 2018), as in the SCSA authors' comparisons."""
import torch
from timm.layers import SEModule

from scsa.attention.kernels import check_kernel, use_triton
from scsa.attention.registry import register_attention

__all__ = ["SE"]


class SE(SEModule):
    """``x * sigmoid(W2 relu(W1 gap(x)))`` with bias-free ``W1: C -> C/r`` and ``W2: C/r -> C``.

    timm's ``SEModule`` with the paper's hidden width (no rounding to a multiple of 8) and
    no biases; the 1x1 convs are the spec's Linear layers. The hidden width is at least 1.
    """

    def __init__(self, channels: int, reduction: int = 16, kernel: str = "auto"):
        super().__init__(channels, rd_channels=max(1, channels // reduction), bias=False)
        self.kernel = check_kernel(kernel)  # auto | triton | torch: see scsa.attention.kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_triton(self, x):
            from scsa.attention.kernels.se import se  # Triton kernels are defined on first use
            return se(x, self.fc1.weight.flatten(1), self.fc2.weight.flatten(1))
        return super().forward(x)


register_attention("se", SE, "end")  # where the SE paper put it
