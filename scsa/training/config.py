"""OmegaConf resolvers used by conf/ (registered on import, before Hydra composes)."""
import os
from datetime import datetime
from pathlib import Path

from omegaconf import OmegaConf

REPO_ROOT = Path(__file__).resolve().parents[2]


def run_subdir() -> str:
    """A run-dir name every rank of one job agrees on.

    ``${now:}`` resolves per process, so torchrun ranks would split into several dirs. torchrun
    sets TORCHELASTIC_RUN_ID (its --rdzv-id, a fresh id for --standalone) on every rank: key
    the dir on it, which also makes a restarted or requeued job find its checkpoints.
    """
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if run_id and run_id != "none":
        return f"torchrun/{run_id}"
    return datetime.now().strftime("%Y-%m-%d/%H-%M-%S")


def attention_position(name: str) -> str:
    """The attention module's default place in a block, from its registry entry (``scsa.attention``)."""
    from scsa.attention import default_position  # torch-heavy: only when a config asks
    return default_position(name)


OmegaConf.register_new_resolver("attention_position", attention_position, replace=True)
OmegaConf.register_new_resolver("repo_root", lambda: str(REPO_ROOT), replace=True)
OmegaConf.register_new_resolver("run_subdir", run_subdir, use_cache=True, replace=True)
