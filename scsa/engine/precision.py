"""Mixed precision: autocast dtype from ``trainer.amp`` and a GradScaler for fp16 only."""
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
