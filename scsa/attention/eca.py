"""ECA: efficient channel attention (Wang et al., CVPR 2020)."""
import math
from typing import Union

import torch
from timm.layers import EcaModule

from scsa.attention.kernels import check_kernel, use_triton
from scsa.attention.registry import register_attention

__all__ = ["ECA", "eca_kernel_size"]


def eca_kernel_size(channels: int, k_size: Union[int, str] = "scsa") -> int:
    """The 1D kernel size for ``channels``.

    ``"scsa"``: the SCSA authors' comparison code, ``1 if C < 96 else 3`` (the default);
    ``"auto"``: the ECA paper's adaptive rule, ``t = int(|(log2 C + 1) / 2|)``, made odd;
    an int: that size (odd).
    """
    if k_size == "scsa":
        return 1 if channels < 96 else 3
    if k_size == "auto":
        t = int(abs((math.log2(channels) + 1) / 2))
        return t if t % 2 else t + 1
    if isinstance(k_size, int) and k_size > 0 and k_size % 2:
        return k_size
    raise ValueError(f"ECA k_size must be 'scsa', 'auto' or an odd positive int (got {k_size!r})")


class ECA(EcaModule):
    """``x * sigmoid(conv1d_k(gap(x)))`` along channels, bias-free; timm's ``EcaModule``.

    timm's own adaptive rule never goes below 3, so the size is chosen here and passed as a
    fixed kernel.
    """

    def __init__(self, channels: int, k_size: Union[int, str] = "scsa", kernel: str = "auto"):
        super().__init__(channels=None, kernel_size=eca_kernel_size(channels, k_size))
        self.kernel = check_kernel(kernel)  # auto | triton | torch: see scsa.attention.kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_triton(self, x):
            from scsa.attention.kernels.eca import eca  # Triton kernels are defined on first use
            return eca(x, self.conv.weight)
        return super().forward(x)


register_attention("eca", ECA, "end")  # where the ECA paper put it
