"""How an attention module shows the spatial gate it applies: it keeps it when asked.

The attention maps (``evaluate.py cam=... cam.gate=true``) read the gate the module's own forward
computed, so a map can never drift from what the module does.
"""
from typing import Optional

import torch

__all__ = ["RecordsGate"]


class RecordsGate:
    """Mixin for modules that multiply a spatial gate into their input.

    Set ``record_gate = True`` and the next forward keeps, as ``gate``, the gate it multiplied in
    (detached, broadcastable to the input; per channel where the gate differs per channel). It then
    runs its plain PyTorch path: the fused kernels never materialise the gate.
    """

    record_gate: bool = False
    gate: Optional[torch.Tensor] = None

    def keep_gate(self, gate: torch.Tensor) -> None:
        if self.record_gate:
            self.gate = gate.detach()
