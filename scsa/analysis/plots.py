"""PNG charts of a run's curves and of a sweep's results.

Figures are built with ``matplotlib.figure.Figure``, not pyplot: it renders with Agg without
switching the process-wide backend, so it works headless and leaves callers' plotting alone.
"""
import json
from pathlib import Path
from typing import Any, Dict, List, Tuple

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


def read_metrics(metrics_jsonl: Path) -> List[Dict[str, Any]]:
    """One record per epoch, in epoch order.

    A run resumed from a checkpoint older than its last log line logs that epoch again;
    the later line wins.
    """
    by_epoch: Dict[int, Dict[str, Any]] = {}
    for number, line in enumerate(Path(metrics_jsonl).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{metrics_jsonl}:{number} is not a JSON line ({e.msg})") from None
        by_epoch[record["epoch"]] = record
    return [by_epoch[epoch] for epoch in sorted(by_epoch)]


def _series(records: List[Dict[str, Any]], key: str) -> Tuple[List[int], List[float]]:
    points = [(r["epoch"], r[key]) for r in records if r.get(key) is not None]
    return [x for x, _ in points], [y for _, y in points]


def _plot_lines(ax: Axes, records: List[Dict[str, Any]], keys: Dict[str, str], ylabel: str) -> None:
    for key, label in keys.items():
        xs, ys = _series(records, key)
        if xs:
            ax.plot(xs, ys, marker="o", markersize=3, label=label)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend()


def plot_curves(metrics_jsonl: Path, out_png: Path) -> None:
    """Loss, validation accuracy and learning rate per epoch, side by side."""
    records = read_metrics(metrics_jsonl)
    if not records:
        raise ValueError(f"{metrics_jsonl} holds no epochs yet")
    fig = Figure(figsize=(15, 4), layout="constrained")
    loss_ax, acc_ax, lr_ax = fig.subplots(1, 3)
    _plot_lines(loss_ax, records, {"train_loss": "train", "val_loss": "val"}, "loss")
    _plot_lines(acc_ax, records, {"val_top1": "val top-1", "val_top5": "val top-5"}, "accuracy (%)")
    _plot_lines(lr_ax, records, {"lr": "lr"}, "learning rate")
    fig.savefig(out_png, dpi=100)


def plot_comparison(rows: List[Dict[str, Any]], out_png: Path) -> None:
    """Best and final val top-1 of each group: mean over its seeds, error bars one sample std.

    Each bar is labelled with its mean (inside, clear of the error bar), each group with its n;
    a group with one run has no error bar.
    """
    labels = [row["label"].replace(f"{row['model']} + ", "") if len({r["model"] for r in rows}) == 1
              else row["label"] for row in rows]
    fig = Figure(figsize=(max(6.0, 1.3 * len(rows)), 4.8), layout="constrained")
    ax = fig.subplots()
    width = 0.4
    for offset, (name, legend) in zip((-width / 2, width / 2), (("best_top1", "best"), ("final_top1", "final"))):
        xs = [i + offset for i in range(len(rows))]
        means = [row[f"{name}_mean"] for row in rows]
        errors = [row[f"{name}_std"] if row[f"{name}_std"] is not None else float("nan") for row in rows]  # nan: none
        bars = ax.bar(xs, means, width, yerr=errors, capsize=4, label=f"{legend} val top-1")
        ax.bar_label(bars, labels=[f"{m:.1f}" for m in means], label_type="center", color="white", fontsize=8)
    low = min(row[f"{name}_mean"] - (row[f"{name}_std"] or 0.0) for row in rows for name in ("best_top1", "final_top1"))
    ax.set_ylim(max(0.0, low - 5.0), None)  # bars of 80-85 % all look alike from 0
    tilt = len(rows) > 4  # level labels would overlap
    ax.set_xticks(range(len(rows)), [f"{label}\n(n={row['n']})" for label, row in zip(labels, rows)],
                  rotation=30 if tilt else 0, ha="right" if tilt else "center")
    ax.set_ylabel("val top-1 (%), mean ± std over seeds")
    fig.legend(loc="outside upper center", ncols=2)
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(out_png, dpi=100)
