"""Fused Triton kernels for the attention modules, and the choice between them and the eager path.

Every attention module takes ``kernel``: ``auto`` (Triton on CUDA tensors when Triton imports,
the eager PyTorch path otherwise), ``triton`` or ``torch``. With ``TRITON_INTERPRET=1`` the
Triton kernels also run on CPU tensors, in Triton's interpreter: that is how they are tested
on machines without a GPU.
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


def use_triton(kernel: str, x: torch.Tensor) -> bool:
    """Whether a module set to ``kernel`` runs its Triton path on ``x``.

    ``auto`` picks Triton for CUDA tensors only; ``triton`` insists, and says why it cannot run.
    Under export neither does: exporters take plain ops only.
    """
    if kernel == "torch" or exporting():
        return False
    if kernel == "auto":
        return x.is_cuda and triton_available()
    if not triton_available():
        raise RuntimeError("kernel='triton' needs the triton package (it ships with CUDA builds of torch): "
                           "install it, or use kernel='auto'")
    if not x.is_cuda and not interpreting():
        raise RuntimeError(f"kernel='triton' on a {x.device.type} tensor needs TRITON_INTERPRET=1 (Triton's "
                           "interpreter): set it, move the model to a GPU, or use kernel='auto'")
    return True
