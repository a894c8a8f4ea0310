"""OmegaConf resolvers used by conf/ (registered on import, before Hydra composes)."""
import os
from datetime import datetime
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from scsa.training.rundir import command_key, resumable_run_dir

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO_ROOT / "conf"


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


def resumable_run(base: str, *, _root_: DictConfig) -> str:
    """``train.py``'s default run dir: the one this exact command's last, unfinished run used (so that
    running the same command again resumes it), else a new ``base/run_subdir()``."""
    key = command_key(_root_.hydra.job.config_name, list(_root_.hydra.overrides.task))
    return resumable_run_dir(base, key, run_subdir())


def config_groups(*groups: str) -> str:
    """The help text's group lines (``group: option, ...``) for the groups a command takes."""
    return "\n".join(f"{g}: {', '.join(sorted(p.stem for p in (CONFIG_DIR / g).glob('*.yaml')))}" for g in groups)


def attention_position(name: str) -> str:
    """The attention module's default place in a block, from its registry entry (``scsa.attention``)."""
    from scsa.attention import default_position  # torch-heavy: only when a config asks
    return default_position(name)


OmegaConf.register_new_resolver("attention_position", attention_position, replace=True)
OmegaConf.register_new_resolver("repo_root", lambda: str(REPO_ROOT), replace=True)
OmegaConf.register_new_resolver("run_subdir", run_subdir, use_cache=True, replace=True)
OmegaConf.register_new_resolver("resumable_run", resumable_run, replace=True)
OmegaConf.register_new_resolver("config_groups", config_groups, replace=True)
