"""Fused Triton kernels for the attention modules, and the choice between them and the eager path.

Every attention module takes ``kernel``: ``auto``, ``triton`` or ``torch``. ``auto`` runs the eager
PyTorch path unless Triton can run on the tensor (a CUDA tensor with Triton installed); then the
first call of each case runs both paths, checks they agree, times them and keeps the faster
(``autotune``). With ``TRITON_INTERPRET=1`` the Triton kernels also run on CPU tensors, in
Triton's interpreter, and ``auto`` treats CPU tensors like CUDA ones: that is how kernels and
decisions are tested on machines without a GPU.
"""
import importlib.util
import os

import torch

__all__ = ["KERNELS", "check_kernel", "exporting", "interpreting", "triton_available", "use_triton"]

KERNELS = ("auto", "triton", "torch")


def check_kernel(kernel: str) -> str:
    """``kernel`` if it is a known choice, else a ValueError naming the choices."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown attention kernel {kernel!r}: use {', '.join(KERNELS)}")
    return kernel


_TRITON = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    """Whether the ``triton`` package (shipped with CUDA builds of torch) is installed.

    Looked up once, without importing it: a constant that ``torch.compile`` traces through.
    """
    return _TRITON


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (``TRITON_INTERPRET=1``), on CPU tensors too."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def exporting() -> bool:
    """Whether the model is being exported (ONNX, ``torch.export``): then every module runs plain ops,
    which exporters translate, never custom kernels."""
    is_exporting = getattr(torch.compiler, "is_exporting", None)  # torch >= 2.7
    return torch.onnx.is_in_onnx_export() or (is_exporting is not None and is_exporting())


def use_triton(module: torch.nn.Module, x: torch.Tensor) -> bool:
    """Whether ``module`` (its ``kernel`` setting) runs its Triton path on ``x``.

    ``auto`` runs what ``autotune`` decided for the case where Triton can run (CUDA tensors, or CPU
    ones in the interpreter), the eager path elsewhere; ``triton`` insists, and says why it cannot
    run. Under export neither does: exporters take plain ops only.
    """
    kernel = module.kernel
    if kernel == "torch" or exporting():
        return False
    if kernel == "auto":
        if not triton_available() or not (x.is_cuda or (x.device.type == "cpu" and interpreting())):
            return False
        from scsa.attention.kernels.autotune import choose  # imports no Triton
        return choose(module, x) == "triton"
    if not triton_available():
        raise RuntimeError("kernel='triton' needs the triton package (it ships with CUDA builds of torch): "
                           "install it, or use kernel='auto'")
    if not x.is_cuda and not interpreting():
        raise RuntimeError(f"kernel='triton' on a {x.device.type} tensor needs TRITON_INTERPRET=1 (Triton's "
                           "interpreter): set it, move the model to a GPU, or use kernel='auto'")
    return True
