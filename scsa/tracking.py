"""What a run leaves behind: metrics.jsonl, log lines, a progress bar. Rank 0 only.

Every other rank gets a tracker that does nothing, so callers never check ranks.
"""
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional

from tqdm import tqdm

log = logging.getLogger("train")


class Tracker:
    def __init__(self, run_dir: Path, enabled: bool):
        self.enabled = enabled
        self.metrics_path = run_dir / "metrics.jsonl"
        self._bar: Optional[tqdm] = None
        if not enabled:
            logging.getLogger().setLevel(logging.WARNING)  # ranks > 0 log warnings only

    def info(self, message: str, *args: Any) -> None:
        if self.enabled:
            log.info(message, *args)

    def warning(self, message: str) -> None:
        log.warning(message)  # every rank: warnings matter wherever they happen

    def log_epoch(self, record: Dict[str, Any]) -> None:
        """Append one epoch's metrics as a JSON line and to train.log."""
        if not self.enabled:
            return
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        log.info("epoch %d: %s", record["epoch"],
                 " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                          for k, v in record.items() if k != "epoch"))

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
    """Images per second over a window of steps."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.start, self.images = time.perf_counter(), 0

    def add(self, images: int) -> None:
        self.images += images

    @property
    def rate(self) -> float:
        return self.images / max(time.perf_counter() - self.start, 1e-9)
