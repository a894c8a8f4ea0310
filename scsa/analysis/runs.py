"""The runs of a sweep as they lie on disk, grouped into runs that differ only by seed.

A group is one recipe: every key of the run config except the seed and the keys that
say where or how a run executed, not what it trained (``NOT_RECIPE``). Everything else
counts, the data root included: two folders may hold different data, and merging them
would average two experiments into one row, where splitting them only shows two rows.
"""
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from omegaconf import OmegaConf

import scsa.training.config  # noqa: F401  (registers the resolvers that run configs use)
from scsa.analysis.plots import read_metrics

log = logging.getLogger(__name__)

# Keys (and key prefixes) that do not change what a run trains: the seed is what a group
# averages over; the rest are bookkeeping (resume, tracking, checkpoint cadence), the
# device, loader workers, logging, and execution choices that compute the same function
# (compile, memory format, deterministic kernels, the attention kernel implementation).
NOT_RECIPE = ("seed", "resume", "wandb", "checkpoint", "data.workers", "trainer.device", "trainer.log_interval",
              "trainer.compile", "trainer.channels_last", "trainer.deterministic", "attention.kwargs.kernel")


@dataclass
class Run:
    dir: Path
    name: str                      # the run dir relative to the sweep dir
    config: Dict[str, Any]         # resolved run config
    records: List[Dict[str, Any]]  # metrics.jsonl, one record per validated epoch

    @property
    def seed(self) -> Optional[int]:
        return self.config.get("seed")

    @property
    def best(self) -> Dict[str, Any]:
        """The first epoch with the highest val top-1: the epoch ``best.pt`` holds."""
        return max(self.records, key=lambda r: r["val_top1"])

    @property
    def final(self) -> Dict[str, Any]:
        return self.records[-1]

    def checkpoint(self) -> Optional[Path]:
        """``best.pt``, else ``last.pt``, else None."""
        for name in ("best.pt", "last.pt"):
            path = self.dir / "checkpoints" / name
            if path.is_file():
                return path
        return None


@dataclass
class Group:
    recipe: Dict[str, Any]         # flat run config without NOT_RECIPE: the group's identity
    runs: List[Run]                # in seed order
    varies: Dict[str, Any] = field(default_factory=dict)  # recipe keys that tell it from its peers

    @property
    def model(self) -> str:
        return self.recipe.get("model.name", "?")

    @property
    def attention(self) -> str:
        return self.recipe.get("attention.name", "?")

    @property
    def seeds(self) -> List[Optional[int]]:
        return [run.seed for run in self.runs]

    @property
    def label(self) -> str:
        """``resnet18 + scsa``, with the keys that set it apart from the other groups."""
        extra = ", ".join(f"{key}={_show(value)}" for key, value in self.varies.items())
        return f"{self.model} + {self.attention}" + (f" ({extra})" if extra else "")


def flatten(tree: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay values."""
    flat: Dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def recipe(config: Mapping[str, Any]) -> Dict[str, Any]:
    """The keys of a run config that define what it trained (see ``NOT_RECIPE``)."""
    return {key: value for key, value in flatten(config).items()
            if not any(key == skip or key.startswith(skip + ".") for skip in NOT_RECIPE)}


def _show(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def _natural_key(path: str) -> List[Any]:
    """Hydra numbers jobs 0, 1, ..., 10: sort 2 before 10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path)]


def _load_run(sweep_dir: Path, run_dir: Path) -> Optional[Run]:
    name = str(run_dir.relative_to(sweep_dir)) if run_dir != sweep_dir else run_dir.name
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        log.warning("skipping %s: no metrics.jsonl (the run never finished an epoch)", run_dir)
        return None
    records = [r for r in read_metrics(metrics) if r.get("val_top1") is not None]
    if not records:
        log.warning("skipping %s: metrics.jsonl has no validated epoch yet", run_dir)
        return None
    config_path = run_dir / ".hydra" / "config.yaml"
    try:
        config = OmegaConf.to_container(OmegaConf.load(config_path), resolve=True)
    except Exception as e:  # OmegaConf's parse and interpolation errors share no base class with yaml's
        raise ValueError(f"{config_path} does not load ({str(e).splitlines()[0]}): "
                         f"is it a run dir written by train.py?") from None
    return Run(run_dir, name, config, records)


def find_runs(sweep_dir: Path) -> List[Run]:
    """Every run under ``sweep_dir`` (a dir holding ``.hydra/config.yaml``), in job order.

    A run without validated epochs is skipped with a one-line warning naming it.
    """
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise ValueError(f"'{sweep_dir}' is not a folder: pass the multirun dir printed by --multirun")
    run_dirs = sorted({p.parent.parent for p in sweep_dir.rglob("config.yaml") if p.parent.name == ".hydra"},
                      key=lambda p: _natural_key(str(p.relative_to(sweep_dir))))
    runs = [run for run in (_load_run(sweep_dir, d) for d in run_dirs) if run is not None]
    if not runs:
        raise ValueError(f"no runs with metrics.jsonl under {sweep_dir}: pass the multirun dir printed by --multirun")
    return runs


def _same(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def group_runs(runs: List[Run]) -> List[Group]:
    """Runs with the same recipe, in order of each group's first run; runs in seed order."""
    groups: List[Group] = []
    for run in runs:
        flat = recipe(run.config)
        group = next((g for g in groups if _same(g.recipe, flat)), None)
        if group is None:
            groups.append(Group(flat, [run]))
        else:
            group.runs.append(run)
    for group in groups:
        group.runs.sort(key=lambda r: (r.seed is None, r.seed if r.seed is not None else 0))
        group.varies = _distinguishing(group, groups)
    return groups


def _distinguishing(group: Group, groups: List[Group]) -> Dict[str, Any]:
    """The recipe keys where ``group`` departs from the most common value among its peers.

    ``model.*`` keys are compared among groups of the same model, ``attention.*`` among
    groups of the same attention (each module has its own options), the rest among all.
    Ties go to the value seen first, so two recipes never get the same label.
    """
    keys = sorted({key for g in groups for key in g.recipe} - {"model.name", "attention.name"})
    varies = {}
    for key in keys:
        scope = key.split(".", 1)[0]
        peers = [g for g in groups if scope not in ("model", "attention")
                 or g.recipe.get(f"{scope}.name") == group.recipe.get(f"{scope}.name")]
        values = [json.dumps(g.recipe.get(key), sort_keys=True) for g in peers]
        common = max(values, key=values.count)  # max keeps the first of equal counts
        if json.dumps(group.recipe.get(key), sort_keys=True) != common:
            varies[key] = group.recipe.get(key)
    return varies


def baseline(group: Group, groups: List[Group]) -> Optional[Group]:
    """The ``attention=none`` group of the same model and recipe, if there is exactly one."""
    def without_attention(flat: Dict[str, Any]) -> Dict[str, Any]:
        return {k: v for k, v in flat.items() if not k.startswith("attention.")}

    matches = [g for g in groups if g.attention == "none"
               and _same(without_attention(g.recipe), without_attention(group.recipe))]
    return matches[0] if len(matches) == 1 else None
