"""A sweep's comparison table: one row per group of runs that differ only by seed.

Each row: the SCSA paper's columns first (Params, FLOPs, Throughput, Top-1, Top-5), then the
difference to the ``none`` group of the same model and recipe with its 95 % interval
(``scsa.analysis.stats``), final-epoch accuracy, peak memory and the run count. Written into the
sweep dir as comparison.md, .csv (raw numbers), .tex (booktabs) and .png (bars with error bars).

Accuracy comes from what runs leave on disk (``metrics.jsonl``), so finished, crashed and
still-running sweeps all compare. Throughput does not: the per-epoch img/s of a run mixes
in its input pipeline and whatever else the machine did meanwhile, so every group's model
is timed again here with ``scsa.analysis.benchmark`` (synthetic data, one batch size and precision
for all, interleaved rounds, medians).
"""
import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from scsa.analysis import stats
from scsa.analysis.benchmark import device_name, interleaved, training_step
from scsa.training.distributed import pick_device
from scsa.models import create_model_from_config
from scsa.analysis.plots import plot_comparison
from scsa.analysis.runs import Group, Run, baseline, find_runs, group_runs

METRICS = ("best_top1", "best_top5", "final_top1", "final_top5")
DELTAS = ("best_top1", "final_top1")  # metrics whose difference to `none` gets an interval
CONFIDENCE = 0.95


@dataclass
class Throughput:
    """How ``compare`` times the groups' training steps (``compare.*`` in conf/evaluate.yaml)."""
    batch_size: int = 32
    image_size: Optional[int] = None   # None: each group's data.image_size
    amp: str = "auto"                  # auto: bf16 on CUDA, none on CPU (as trainer.amp)
    channels_last: bool = True
    warmup: int = 2
    steps: int = 5                     # steps per timed round
    rounds: int = 3
    device: str = "auto"


def _metric(run: Run, name: str) -> float:
    when, what = name.split("_")
    return (run.best if when == "best" else run.final)["val_" + what]


def _checkpoint_facts(run: Run) -> Dict[str, Any]:
    """Params, MACs per image and class count, as train.py stored them in the run's checkpoint."""
    path = run.checkpoint()
    if path is None:
        return {"params": None, "flops": None, "num_classes": None}
    # mmap: read a few fields without pulling the weights and optimiser state into memory
    checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    classes = checkpoint.get("classes")
    return {"params": checkpoint.get("params"), "flops": checkpoint.get("flops"),
            "num_classes": len(classes) if classes is not None else None}


def _row(group: Group, groups: List[Group]) -> Dict[str, Any]:
    epochs = sorted({len(run.records) for run in group.runs})
    row: Dict[str, Any] = {"model": group.model, "attention": group.attention, "label": group.label,
                           "recipe": "; ".join(f"{k}={v}" for k, v in group.varies.items()),
                           "n": len(group.runs), "seeds": ";".join(str(s) for s in group.seeds),
                           **_checkpoint_facts(group.runs[0]), "img_per_s": None, "peak_mem_gib": None}
    for name in METRICS:
        row[f"{name}_mean"], row[f"{name}_std"] = stats.mean_std([_metric(run, name) for run in group.runs])
    base = baseline(group, groups)
    row["is_baseline"] = base is group
    row["baseline"] = base.label if base is not None and base is not group else None
    row["delta_method"] = None
    for name in DELTAS:
        diff = None
        if row["baseline"] is not None:
            diff = stats.difference([_metric(r, name) for r in group.runs], [_metric(r, name) for r in base.runs],
                                    group.seeds, base.seeds, CONFIDENCE)
            row["delta_method"] = diff.method
        row[f"delta_{name}"] = diff.estimate if diff else None
        row[f"delta_{name}_low"] = diff.low if diff else None
        row[f"delta_{name}_high"] = diff.high if diff else None
        row[f"delta_{name}_p"] = diff.p_value if diff else None
    row["epochs"] = str(epochs[0]) if len(epochs) == 1 else f"{epochs[0]}-{epochs[-1]}"
    row["runs"] = ";".join(run.name for run in group.runs)
    return row


def _step_builder(group: Group, num_classes: int, image_size: int, settings: Throughput,
                  device: torch.device) -> Callable[[], Callable[[], None]]:
    """Builds the group's own model (attention options, class count) into a benchmark step."""
    config = group.runs[0].config

    def build() -> Callable[[], None]:
        model = create_model_from_config(config["model"], config["attention"], num_classes, kernel="auto")
        return training_step(model, settings.amp, settings.channels_last, False, settings.batch_size, image_size,
                             device, num_classes)
    return build


def measure_throughput(groups: List[Group], rows: List[Dict[str, Any]], settings: Throughput) -> str:
    """Fill ``img_per_s`` and ``peak_mem_gib`` of ``rows`` by timing each group's model;
    return a sentence naming the device and settings."""
    device = pick_device(settings.device, 0)
    sizes = [settings.image_size or g.recipe["data.image_size"] for g in groups]
    builders = [_step_builder(g, row["num_classes"] or 1000, size, settings, device)
                for g, row, size in zip(groups, rows, sizes)]
    timings = interleaved(builders, settings.warmup, settings.steps, settings.rounds, device)
    for row, (seconds, peak) in zip(rows, timings):
        row["img_per_s"], row["peak_mem_gib"] = settings.batch_size / seconds, peak
    amp = settings.amp if settings.amp != "auto" else ("bf16" if device.type == "cuda" else "none")
    return (f"training img/s of `scsa.analysis.benchmark` steps on {device_name(device)}, torch {torch.__version__}: "
            f"synthetic batch {settings.batch_size} at {'/'.join(str(s) for s in sorted(set(sizes)))} px, "
            f"amp {amp}, channels_last {settings.channels_last}, SGD; {settings.warmup} warm-up steps, then "
            f"the median of {settings.rounds} interleaved rounds of {settings.steps} steps"
            + ("" if device.type == "cuda" else "; peak memory is CUDA's (none on CPU)"))


def comparison_rows(sweep_dir: Path, throughput: Optional[Throughput] = None) -> Tuple[List[Dict[str, Any]], str]:
    """The table's rows (one per group) and a sentence on how throughput was measured."""
    groups = group_runs(find_runs(sweep_dir))
    rows = [_row(group, groups) for group in groups]
    if throughput is None:
        return rows, "not measured (compare.throughput=false)"
    return rows, measure_throughput(groups, rows, throughput)


# ---- writers -------------------------------------------------------------------------------------

def _num(value: Optional[float], spec: str, scale: float = 1.0) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value / scale, spec)


def _mean_std(row: Dict[str, Any], name: str, pm: str) -> str:
    mean, std = row[f"{name}_mean"], row[f"{name}_std"]
    return _num(mean, ".2f") + (f"{pm}{std:.2f}" if std is not None else "")


def _delta(row: Dict[str, Any], name: str, minus: str = "−") -> str:
    if row["is_baseline"]:
        return "(baseline)"
    estimate = row[f"delta_{name}"]
    if estimate is None:
        return "-"
    text = f"{estimate:+.2f}"
    if row[f"delta_{name}_low"] is not None:
        text += f" [{row[f'delta_{name}_low']:+.2f}, {row[f'delta_{name}_high']:+.2f}]"
    return text.replace("-", minus)


def _header(rows: List[Dict[str, Any]], throughput_note: str) -> List[str]:
    methods = sorted({row["delta_method"] for row in rows if row["delta_method"]})
    how = {"paired": "paired t over the seeds both groups ran", "welch": "Welch's t (the seeds differ)"}
    return [
        "Runs grouped by their config except the seed (and where/how they ran): n runs per row. "
        "Top-1/Top-5: the best val epoch (best.pt), mean ± sample std over the seeds; final: the last epoch.",
        f"Δ: mean difference to `none` of the same model and recipe, [95 % CI] "
        f"({'; '.join(how[m] for m in methods) if methods else 'needs 2+ runs per group'}; scipy.stats).",
        f"FLOPs: multiply-accumulates per image at the run's resolution. Throughput: {throughput_note}.",
    ]


def _recipe_column(rows: List[Dict[str, Any]]) -> bool:
    return any(row["recipe"] for row in rows)


def write_markdown(rows: List[Dict[str, Any]], throughput_note: str, path: Path) -> None:
    columns = [("model", lambda r: r["model"]), ("attention", lambda r: r["attention"])]
    if _recipe_column(rows):
        columns.append(("recipe", lambda r: r["recipe"] or "-"))
    columns += [
        ("Params (M)", lambda r: _num(r["params"], ".2f", 1e6)),
        ("FLOPs (G)", lambda r: _num(r["flops"], "#.3g", 1e9)),
        ("Throughput (img/s)", lambda r: _num(r["img_per_s"], ".0f")),
        ("Top-1 (%)", lambda r: _mean_std(r, "best_top1", " ± ")),
        ("Top-5 (%)", lambda r: _mean_std(r, "best_top5", " ± ")),
        ("Δ Top-1 [95 % CI]", lambda r: _delta(r, "best_top1")),
        ("final Top-1 (%)", lambda r: _mean_std(r, "final_top1", " ± ")),
        ("final Top-5 (%)", lambda r: _mean_std(r, "final_top5", " ± ")),
        ("Δ final Top-1 [95 % CI]", lambda r: _delta(r, "final_top1")),
        ("peak mem (GiB)", lambda r: _num(r["peak_mem_gib"], ".2f")),
        ("n", lambda r: str(r["n"])),
        ("epochs", lambda r: r["epochs"]),
    ]
    lines = [*_header(rows, throughput_note), "",
             "| " + " | ".join(name for name, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row) for _, cell in columns) + " |" for row in rows]
    path.write_text("\n".join(lines) + "\n")


CSV_FIELDS = ["model", "attention", "recipe", "n", "seeds", "params", "flops", "img_per_s", "peak_mem_gib",
              *(f"{m}_{s}" for m in METRICS for s in ("mean", "std")),
              *(f"delta_{m}{s}" for m in DELTAS for s in ("", "_low", "_high", "_p")),
              "delta_method", "baseline", "num_classes", "epochs", "runs"]


def write_csv(rows: List[Dict[str, Any]], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _tex(text: str) -> str:
    for char, escaped in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#"),
                          ("{", r"\{"), ("}", r"\}"), ("$", r"\$")):
        text = text.replace(char, escaped)
    return text


def write_latex(rows: List[Dict[str, Any]], throughput_note: str, path: Path) -> None:
    """A booktabs tabular (``\\usepackage{booktabs}``), the header sentences as comments."""
    def method(row: Dict[str, Any]) -> str:
        return _tex(row["label"].replace(" + none", ""))

    lines = [f"% {line}" for line in _header(rows, throughput_note)]
    lines += [r"\begin{tabular}{lrrrrrrr}", r"\toprule",
              r"Method & Params (M) & FLOPs (G) & Throughput (img/s) & Top-1 (\%) & Top-5 (\%) & "
              r"$\Delta$ Top-1 [95\,\% CI] & $n$ \\", r"\midrule"]
    for row in rows:
        cells = [method(row), _num(row["params"], ".2f", 1e6), _num(row["flops"], "#.3g", 1e9),
                 _num(row["img_per_s"], ".0f"), _mean_std(row, "best_top1", r" $\pm$ "),
                 _mean_std(row, "best_top5", r" $\pm$ "), _delta(row, "best_top1", minus="$-$"), str(row["n"])]
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    path.write_text("\n".join(lines) + "\n")


def write_comparison(sweep_dir: Path, throughput: Optional[Throughput] = None) -> List[Dict[str, Any]]:
    """Write comparison.{md,csv,tex,png} into ``sweep_dir``; return the rows.

    ``throughput``: how to time the groups' training steps; None skips the measurement.
    """
    sweep_dir = Path(sweep_dir)
    rows, note = comparison_rows(sweep_dir, throughput)
    write_markdown(rows, note, sweep_dir / "comparison.md")
    write_csv(rows, sweep_dir / "comparison.csv")
    write_latex(rows, note, sweep_dir / "comparison.tex")
    plot_comparison(rows, sweep_dir / "comparison.png")
    return rows

