"""One table for a sweep: each run's model, attention, cost and best accuracy.

Reads what runs leave on disk (``.hydra/config.yaml``, ``metrics.jsonl``, checkpoints), so it
works on finished, crashed and still-running sweeps alike.
"""
import csv
import re
import statistics
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from omegaconf import OmegaConf

from scsa.plots import plot_comparison, read_metrics


def _fmt(scale: float, spec: str) -> Callable[[Any], str]:
    return lambda value: "-" if value is None else format(value / scale, spec)


# (row key = CSV column with the raw number, markdown header, markdown format)
COLUMNS: List[Tuple[str, str, Callable[[Any], str]]] = [
    ("model", "model", str),
    ("attention", "attention", str),
    ("params", "params (M)", _fmt(1e6, ".2f")),
    ("flops", "FLOPs (G)", _fmt(1e9, ".2f")),
    ("img_per_s", "img/s", _fmt(1, ".0f")),
    ("best_top1", "best top-1", _fmt(1, ".2f")),
    ("top5", "top-5", _fmt(1, ".2f")),
    ("epochs", "epochs", str),
    ("run", "run", str),
]


def _natural_key(path: Path) -> List[Any]:
    """Hydra numbers jobs 0, 1, ..., 10: sort 2 before 10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def _complexity(run_dir: Path) -> Dict[str, Optional[int]]:
    """Params and MACs per image, as train.py stored them in the run's checkpoints."""
    for name in ("best.pt", "last.pt"):
        path = run_dir / "checkpoints" / name
        if path.is_file():
            # mmap: read two ints without pulling the weights and optimiser state into memory
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            return {"params": checkpoint.get("params"), "flops": checkpoint.get("flops")}
    return {"params": None, "flops": None}


def _row(sweep_dir: Path, run_dir: Path) -> Dict[str, Any]:
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    records = read_metrics(run_dir / "metrics.jsonl")
    scored = [r for r in records if r.get("val_top1") is not None]
    best = max(scored, key=lambda r: r["val_top1"]) if scored else {}  # first epoch to reach it, as best.pt
    speeds = [r["img_per_s"] for r in records if r.get("img_per_s") is not None]
    return {
        "model": OmegaConf.select(cfg, "model.name"),
        "attention": OmegaConf.select(cfg, "attention.name"),
        **_complexity(run_dir),
        "img_per_s": statistics.median(speeds) if speeds else None,
        "best_top1": best.get("val_top1"),
        "top5": best.get("val_top5"),
        "epochs": len(records),
        "run": str(run_dir.relative_to(sweep_dir)),
    }


def collect_runs(sweep_dir: Path) -> List[Dict[str, Any]]:
    """A row per run under ``sweep_dir`` that has a ``metrics.jsonl`` and a Hydra config, in job order."""
    sweep_dir = Path(sweep_dir)
    run_dirs = sorted((p.parent for p in sweep_dir.rglob("metrics.jsonl")
                       if (p.parent / ".hydra" / "config.yaml").is_file()),
                      key=lambda p: _natural_key(p.relative_to(sweep_dir)))
    if not run_dirs:
        raise ValueError(f"no runs with metrics.jsonl under {sweep_dir}: pass the multirun dir printed by --multirun")
    return [_row(sweep_dir, run_dir) for run_dir in run_dirs]


def _write_markdown(rows: List[Dict[str, Any]], path: Path) -> None:
    lines = ["| " + " | ".join(header for _, header, _ in COLUMNS) + " |",
             "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(fmt(row[key]) for key, _, fmt in COLUMNS) + " |" for row in rows]
    path.write_text("\n".join(lines) + "\n")


def _write_csv(rows: List[Dict[str, Any]], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[key for key, _, _ in COLUMNS])
        writer.writeheader()
        writer.writerows(rows)


def write_comparison(sweep_dir: Path) -> List[Dict[str, Any]]:
    """Write comparison.md, comparison.csv and comparison.png into ``sweep_dir``; return the rows."""
    sweep_dir = Path(sweep_dir)
    rows = collect_runs(sweep_dir)
    _write_markdown(rows, sweep_dir / "comparison.md")
    _write_csv(rows, sweep_dir / "comparison.csv")
    plot_comparison([row for row in rows if row["best_top1"] is not None], sweep_dir / "comparison.png")
    return rows
