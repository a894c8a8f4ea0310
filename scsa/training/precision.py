"""Numerics: autocast dtype from ``trainer.amp``, a GradScaler for fp16 only, and the backends' math modes."""
import contextlib
from typing import Optional

import torch

from scsa.errors import UserError

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}


class Precision:
    def __init__(self, amp: str, device: torch.device):
        if amp == "auto":  # bf16 where it is fast (GPUs); CPUs without bf16 units emulate it slowly
            amp = "bf16" if device.type == "cuda" else "none"
        if amp not in AMP_DTYPES:
            raise UserError(f"unknown trainer.amp '{amp}': use auto, bf16, fp16 or none")
        self.device_type = device.type
        self.dtype: Optional[torch.dtype] = AMP_DTYPES[amp]
        # bf16 keeps fp32's exponent range, so only fp16 needs loss scaling.
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)


def configure_backends(device: torch.device, deterministic: bool) -> None:
    """Deterministic algorithms when asked; else, on CUDA, cuDNN autotuning and TF32 matmuls and
    convolutions (NVIDIA's own training defaults: fp32 range, 10-bit mantissa products)."""
    if deterministic:
        torch.use_deterministic_algorithms(True)
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
