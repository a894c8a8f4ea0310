"""What a run leaves behind: metrics.jsonl, train.log lines, a progress bar, W&B, curves.png, kernels.json.

Rank 0 only: every other rank gets a tracker that does nothing, so callers never check ranks.
"""
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from tqdm import tqdm

from scsa.analysis.plots import plot_curves
from scsa.attention.kernels.autotune import format_decisions
from scsa.errors import UserError
from scsa.training.wandb_run import WandbRun, gpu_memory_gib

log = logging.getLogger("train")


class Tracker:
    def __init__(self, run_dir: Path, enabled: bool, wandb_run: WandbRun):
        self.enabled = enabled
        self.run_dir = run_dir
        self.metrics_path = run_dir / "metrics.jsonl"
        self.wandb = wandb_run
        self._bar: Optional[tqdm] = None
        if not enabled:
            logging.getLogger().setLevel(logging.WARNING)  # ranks > 0 log warnings only

    def log_step(self, metrics: Dict[str, float], step: int) -> None:
        self.wandb.log({f"train/{k}": v for k, v in metrics.items()}, step=step)

    def info(self, message: str, *args: Any) -> None:
        if self.enabled:
            log.info(message, *args)

    def warning(self, message: str) -> None:
        log.warning(message)  # every rank: warnings matter wherever they happen

    def log_epoch(self, record: Dict[str, Any]) -> None:
        """Append one epoch's metrics as a JSON line and to train.log."""
        if not self.enabled:
            return
        try:
            with self.metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:  # a full disk: the checkpoint written just before holds this line (keep_epochs)
            raise UserError(f"could not append to '{self.metrics_path}' ({e.strerror or e}): free space there (or "
                            f"fix what the error names), then run the same command again to resume") from None
        memory = gpu_memory_gib()
        self.wandb.log({f"epoch/{k}": v for k, v in record.items()}
                       | ({"epoch/gpu_mem_gib": memory} if memory is not None else {}), step=record["step"])
        log.info("epoch %d: %s", record["epoch"],
                 " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                          for k, v in record.items() if k != "epoch"))

    def log_kernels(self, decisions: List[Dict[str, Any]]) -> None:
        """``kernel=auto``'s decisions (``scsa.kernel_decisions()``): a table in train.log, kernels.json, and
        the chosen path per module and shape in the W&B summary."""
        if not self.enabled or not decisions:
            return
        (self.run_dir / "kernels.json").write_text(json.dumps(decisions, indent=1) + "\n")
        log.info("kernel=auto decisions (%d cases, %.1f s deciding):\n%s", len(decisions),
                 sum(d["decide_ms"] for d in decisions) / 1000, format_decisions(decisions))
        self.wandb.summary({f"kernel/{d['module']}/{'x'.join(map(str, d['shape']))}": d["chosen"] for d in decisions})

    def keep_epochs(self, epochs: int, record: Optional[Dict[str, Any]]) -> None:
        """On resume, make metrics.jsonl agree with the checkpoint: one line for each of its ``epochs`` completed
        epochs, no more (a kill may have come between a line and the next checkpoint). ``record``: the
        checkpoint's own epoch line, if it was written at an epoch's end (its line may not be on disk yet)."""
        if not self.enabled:
            return
        lines = self.metrics_path.read_text().splitlines() if self.metrics_path.is_file() else []
        by_epoch = {r["epoch"]: r for r in filter(None, map(parse_line, lines)) if r["epoch"] < epochs}
        if record:
            by_epoch[record["epoch"]] = record
        tmp = self.metrics_path.with_name(self.metrics_path.name + ".tmp")
        tmp.write_text("".join(json.dumps(by_epoch[e]) + "\n" for e in sorted(by_epoch)))
        tmp.replace(self.metrics_path)

    def finish(self, summary: Dict[str, Any], exit_code: int) -> None:
        """Close the W&B run and draw curves.png from metrics.jsonl."""
        self.wandb.summary(summary)
        self.wandb.finish(exit_code)
        if self.enabled and self.metrics_path.is_file():
            plot_curves(self.metrics_path, self.run_dir / "curves.png")

    def start_bar(self, total: int, desc: str, initial: int = 0) -> None:
        if self.enabled:
            self._bar = tqdm(total=total, initial=initial, desc=desc, file=sys.stderr, dynamic_ncols=True,
                             mininterval=1.0, leave=False)

    def update_bar(self, **postfix: Any) -> None:
        if self._bar is not None:
            self._bar.set_postfix(postfix, refresh=False)
            self._bar.update()

    def close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class Throughput:
    """Images per second, and the share of time spent waiting for input."""

    def __init__(self):
        self.start, self.images, self.data_seconds = time.perf_counter(), 0, 0.0

    def add(self, images: int, data_seconds: float) -> None:
        self.images += images
        self.data_seconds += data_seconds

    @property
    def data_fraction(self) -> float:
        return self.data_seconds / max(time.perf_counter() - self.start, 1e-9)

    @property
    def rate(self) -> float:
        return self.images / max(time.perf_counter() - self.start, 1e-9)


def parse_line(line: str) -> Optional[Dict[str, Any]]:
    """One metrics.jsonl record, or None for an empty line or one a full disk cut short (a crash followed it)."""
    try:
        return json.loads(line) if line else None
    except json.JSONDecodeError:
        return None
