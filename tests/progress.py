"""Waiting for a training command started in the background to reach a point."""
import subprocess
import time
from pathlib import Path

import torch


def wait_for_step(run_dir: Path, step: int, process: subprocess.Popen, timeout: float = 900) -> None:
    """Block until a checkpoint at or past ``step`` exists (mid-epoch checkpoints every step)."""
    last = run_dir / "checkpoints" / "last.pt"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1][-3000:]
        if last.is_file():
            try:
                if torch.load(last, weights_only=True)["state"]["step"] >= step:
                    return
            except Exception:
                pass  # being replaced right now
        time.sleep(0.2)
    raise TimeoutError(f"no checkpoint at step {step}")
