"""Preemption: SIGTERM / SIGUSR1 ask for a checkpoint at the next step boundary.

A handler only sets a flag (it may fire twice: once from SLURM, once from torchrun); the
trainer acts on it between steps, where the state is consistent, after the ranks agree on it.
"""
import signal
from types import FrameType
from typing import Optional

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """Raised after the preemption checkpoint is written; the entry point exits 75."""


class PreemptionWatcher:
    def __init__(self):
        self.received: Optional[int] = None
        self._previous = {s: signal.signal(s, self._handle) for s in PREEMPTION_SIGNALS}

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        self.received = signum

    def close(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
