"""Checkpoints: atomic writes, safe (weights-only) loads, and which one a run resumes."""
import errno
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
    ``keep_previous`` the one it replaces stays as ``<name>.prev.pt``. ``path`` exists at
    every instant once written: a kill between the two renames still finds it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous and path.exists():
            link_atomically(path, previous_path(path))
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        Path(tmp).unlink(missing_ok=True)
        cause = failed_write(e)
        if cause is None:
            raise
        if cause.errno in (errno.ENOSPC, errno.EDQUOT):
            free = shutil.disk_usage(path.parent).free / 2 ** 20
            raise UserError(f"no space left on '{path.parent}' writing {path.name} ({free:.0f} MiB free): free space "
                            f"there, or keep fewer checkpoints (checkpoint.keep_last); the previous checkpoint is "
                            f"intact") from None
        raise UserError(f"could not write checkpoint '{path}' ({cause.strerror or cause}): fix the permissions "
                        f"there; the previous checkpoint is intact") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def failed_write(error: Optional[BaseException]) -> Optional[OSError]:
    """The OSError behind a failed checkpoint write, or None if the failure was not a write.

    On a full disk ``torch.save``'s zip writer raises a RuntimeError ("unexpected pos") while closing,
    with the ENOSPC as its context; some versions say only "file write failed", taken as a full disk.
    """
    while error is not None:
        if isinstance(error, OSError):
            return error
        if isinstance(error, RuntimeError) and "file write failed" in str(error):
            return OSError(errno.ENOSPC, str(error))
        error = error.__cause__ or error.__context__
    return None


def link_atomically(source: Path, target: Path) -> None:
    """Make ``target`` the bytes of ``source`` in one rename, ``source`` untouched.

    A hard link (no second write) or, where the file system has none, a copy, made under a temp
    name: a kill leaves that ``.*.tmp``, which the next start removes, never a partial ``target``.
    """
    staged = target.with_name(f".{target.name}.tmp")
    staged.unlink(missing_ok=True)
    try:
        os.link(source, staged)
    except OSError:
        shutil.copyfile(source, staged)
    os.replace(staged, target)


def keep_epoch_copy(last: Path, epoch: int, keep: int) -> None:
    """Keep ``last`` as ``epoch_<N>.pt`` and delete all but the newest ``keep`` of those.

    A hard link where the file system has them: no second write (``last`` is replaced by a
    rename at the next save, so the link keeps this epoch's bytes).
    """
    link_atomically(last, last.with_name(f"epoch_{epoch:04d}.pt"))
    for old in sorted(last.parent.glob("epoch_*.pt"))[:-keep]:
        old.unlink()


def load_latest(candidates: List[Path], warn: Callable[[str], None]) -> Optional[Tuple[Path, Dict[str, Any]]]:
    """The first of ``candidates`` that exists and loads; one that does not load is reported and skipped."""
    for path in candidates:
        if path.is_file():
            try:
                return path, load_checkpoint(str(path))
            except UserError as e:
                warn(f"skipping {e}")
    return None


def find_resume(resume: str, checkpoint_dir: Path, warn: Callable[[str], None]
                ) -> Optional[Tuple[Path, Dict[str, Any]]]:
    """What ``resume`` names: ``auto``, this run dir's newest loadable checkpoint (or None where it holds none:
    a fresh start); ``none``, None; else the checkpoint at that path.

    ``auto`` never starts over where there is progress: checkpoints of which none loads are an error.
    """
    if resume == "none":
        return None
    if resume != "auto":
        return Path(resume), load_checkpoint(resume)
    last = checkpoint_dir / "last.pt"
    found = load_latest([last, previous_path(last)], warn)
    present = sorted(p.name for p in checkpoint_dir.glob("*.pt"))
    if found is None and present:
        raise UserError(f"'{checkpoint_dir}' holds {', '.join(present)} but neither last.pt nor last.prev.pt loads "
                        f"(see the warnings above): restore a good last.pt there to resume, or pass resume=none to "
                        f"start over (the old files are kept, moved into an old-<time>/ folder)")
    return found


def model_differences(stored: Dict[str, Any], config: Dict[str, Any], stored_classes: List[str],
                      classes: List[str]) -> List[str]:
    """How a checkpoint's model (its run config and classes) differs from this run's: backbone, attention, classes."""
    def architecture(cfg: Dict[str, Any]) -> Dict[str, Any]:
        attention = cfg["attention"]
        kwargs = {k: v for k, v in attention.get("kwargs", {}).items() if k != "kernel"}  # where it runs, not what
        return {"model": cfg["model"]["name"], "attention": attention["name"],
                "attention.position": attention.get("position"), "attention.kwargs": kwargs}
    old, new = architecture(stored), architecture(config)
    differences = [f"{key} {old[key]} vs {new[key]}" for key in old if old[key] != new[key]]
    if stored_classes != classes:
        differences.append(f"{len(stored_classes)} vs {len(classes)} classes" if len(stored_classes) != len(classes)
                           else "the class names or their order")
    return differences
