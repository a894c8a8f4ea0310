"""A run dir belongs to one run: its lock, the command's pointer to its unfinished run, old files set aside.

- The lock is ``fcntl.flock`` on ``<run dir>/.lock``: the OS drops it when the process ends,
  kill -9 included, so no stale lock is ever left. The file names the holder (pid, host,
  command) for the error a second run gets. One process per job takes it (rank 0).
- ``outputs/.latest/<command key>`` names the latest run dir of a command (its config and
  overrides, ``resume=`` aside). Until that run finishes (``.finished`` in its dir), the same
  command gets the same run dir again and resumes it; after, a new timestamped one.
"""
import fcntl
import hashlib
import json
import os
import socket
import sys
from datetime import datetime
from pathlib import Path
from typing import Dict, List, Optional

from scsa.errors import UserError

LOCK_FILE = ".lock"
FINISHED_FILE = ".finished"
POINTERS = ".latest"


def holds_lock() -> bool:
    """Whether this process takes the run-dir lock for its job: rank 0 (torchrun's RANK, or srun's)."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0


class RunDirLock:
    """An exclusive lock on a run dir, held until ``release`` or the end of the process."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 4096, 0).decode(errors="replace").strip() or "another process"
            os.close(self._fd)
            raise UserError(f"run dir '{run_dir}' is in use by another run ({holder}): wait for it to end, or pass "
                            f"hydra.run.dir=<another folder> to start a separate run") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"pid {os.getpid()} on {socket.gethostname()}: {' '.join(sys.argv)}".encode(), 0)

    def release(self) -> None:
        os.close(self._fd)  # closing the last descriptor drops the flock


def command_key(config_name: str, overrides: List[str]) -> str:
    """A command's identity: its config and overrides in order, ``resume=...`` aside (it picks how, not what)."""
    kept = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != "resume"]
    return hashlib.sha256(json.dumps([config_name, kept]).encode()).hexdigest()[:16]


_chosen: Dict[str, str] = {}  # one answer per command per process: Hydra resolves the run dir more than once


def resumable_run_dir(base: str, key: str, fresh: str) -> str:
    """``base/<the unfinished run dir the command's pointer names>`` or, if none, ``base/fresh`` (then pointed to)."""
    if key not in _chosen:
        pointer = Path(base) / POINTERS / key
        previous = pointer.read_text().strip() if pointer.is_file() else ""
        if previous and (Path(base) / previous).is_dir() and not (Path(base) / previous / FINISHED_FILE).exists():
            _chosen[key] = previous
        else:
            pointer.parent.mkdir(parents=True, exist_ok=True)
            tmp = pointer.with_name(f".{key}.{os.getpid()}.tmp")
            tmp.write_text(fresh)
            os.replace(tmp, pointer)
            _chosen[key] = fresh
    return str(Path(base) / _chosen[key])


def mark_finished(run_dir: Path) -> None:
    """The run completed: the same command will start a new run dir rather than resume this one."""
    (run_dir / FINISHED_FILE).touch()


def remove_stale_temporaries(checkpoint_dir: Path) -> List[Path]:
    """Delete the ``.*.tmp`` files a killed checkpoint write left (the lock says no writer is alive)."""
    stale = sorted(checkpoint_dir.glob(".*.tmp"))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def set_aside(run_dir: Path, names: List[str]) -> Optional[Path]:
    """Move ``run_dir/<name>`` for each existing name into ``run_dir/old-<time>/``: renamed, never deleted."""
    present = [run_dir / n for n in names if (run_dir / n).exists()]
    if not present:
        return None
    aside = run_dir / f"old-{datetime.now().strftime('%Y%m%d-%H%M%S-%f')}"
    aside.mkdir()
    for path in present:
        os.replace(path, aside / path.name)
    return aside
