"""A Weights & Biases run for rank 0; on other ranks, or with mode=disabled, a no-op.

wandb is imported only when a run is really created, so disabled runs and non-zero ranks
need no wandb setup and start no wandb-core process. Offline runs never dial out: they are
written to ``run_dir/wandb/offline-run-*`` for ``wandb sync`` to upload later.
"""
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

MODES = ("offline", "online", "disabled")


class WandbRun:
    def __init__(self, mode: str, project: str, run_dir: Path, config: Dict[str, Any], name: str,
                 tags: List[str], group: Optional[str] = None, run_id: Optional[str] = None, enabled: bool = True):
        if mode not in MODES:
            raise ValueError(f"wandb mode '{mode}' is not one of {', '.join(MODES)}")
        self._run = None
        self._run_id: Optional[str] = None
        if not enabled or mode == "disabled":
            return
        if mode == "offline":
            # wandb-core reports its own crashes over the network unless told not to.
            os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
        try:
            import wandb
        except ImportError:
            raise ValueError(f"wandb.mode={mode} needs wandb, which is not installed: "
                             f"pip install -r requirements.txt, or use wandb.mode=disabled") from None

        # mode= outranks WANDB_MODE and offline skips the login, so a stored API key cannot turn
        # an offline run online. finish_previous: Hydra multirun runs its jobs in one process, and
        # the default ("return_previous") would hand a job the run of the one before if that one
        # died unfinished.
        self._run = wandb.init(project=project, name=name, group=group, tags=list(tags), config=config,
                               dir=str(run_dir), mode=mode, id=run_id, resume="allow" if run_id else None,
                               reinit="finish_previous",
                               settings=wandb.Settings(silent=True, console="off"))  # train.log has the console
        self._run_id = self._run.id

    @property
    def run_id(self) -> Optional[str]:
        """The id to store in checkpoints: passing it back on resume continues this W&B run."""
        return self._run_id

    def log(self, metrics: Dict[str, Any], step: int) -> None:
        if self._run is not None:
            self._run.log(metrics, step=step)

    def summary(self, values: Dict[str, Any]) -> None:
        """Set run-level numbers (params, flops, best_top1) shown in the W&B runs table."""
        if self._run is not None:
            self._run.summary.update(values)

    def finish(self, exit_code: int = 0) -> None:
        """Close the run; a non-zero ``exit_code`` marks it failed. Safe to call twice."""
        if self._run is not None:
            self._run.finish(exit_code=exit_code)
            self._run = None


def gpu_memory_gib() -> Optional[float]:
    """Peak memory PyTorch allocated on the current CUDA device, in GiB; None without CUDA."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.max_memory_allocated() / 2**30
