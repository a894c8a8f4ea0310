"""Checkpoints: atomic writes and safe (weights-only) loads."""
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from scsa.errors import UserError
from scsa.trained import load_checkpoint


def previous_path(path: Path) -> Path:
    return path.with_name(path.stem + ".prev" + path.suffix)


def save_atomic(state: Dict[str, Any], path: Path, keep_previous: bool = False) -> None:
    """Write to a temp file in the same folder, fsync, then rename over ``path``.

    A crash or a full disk mid-write leaves the previous checkpoint intact; with
    ``keep_previous`` the one it replaces stays as ``<name>.prev.pt``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous and path.exists():
            os.replace(path, previous_path(path))
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise UserError(f"could not write checkpoint '{path}' ({e.strerror or e}): free space or fix permissions "
                        f"there; the previous checkpoint is intact") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def keep_epoch_copy(last: Path, epoch: int, keep: int) -> None:
    """Keep ``last`` as ``epoch_<N>.pt`` and delete all but the newest ``keep`` of those.

    A hard link where the file system has them: no second write (``last`` is replaced by a
    rename at the next save, so the link keeps this epoch's bytes).
    """
    kept = last.with_name(f"epoch_{epoch:04d}.pt")
    kept.unlink(missing_ok=True)
    try:
        os.link(last, kept)
    except OSError:
        shutil.copyfile(last, kept)
    for old in sorted(last.parent.glob("epoch_*.pt"))[:-keep]:
        old.unlink()


def load_latest(candidates: List[Path], warn: Callable[[str], None]) -> Optional[Tuple[Path, Dict[str, Any]]]:
    """The first of ``candidates`` that exists and loads; a corrupt one is reported and skipped."""
    for path in candidates:
        if path.is_file():
            try:
                return path, load_checkpoint(str(path))
            except UserError as e:
                warn(f"skipping {e}")
    return None


def find_resume(resume: str, checkpoint_dir: Path, warn: Callable[[str], None]
                ) -> Optional[Tuple[Path, Dict[str, Any]]]:
    """What ``resume`` names: ``auto``, this run dir's newest loadable checkpoint (or None: a fresh
    start); ``none``, None; else the checkpoint at that path."""
    if resume == "none":
        return None
    if resume == "auto":
        last = checkpoint_dir / "last.pt"
        return load_latest([last, previous_path(last)], warn)
    return Path(resume), load_checkpoint(resume)
