"""Attention maps of trained models side by side: Grad-CAM, or the modules' own spatial gates.

``python evaluate.py cam=SWEEP_DIR images=8`` draws one grid: the same val images as rows,
one column per model, each cell the map over the image with the predicted class and its
probability. For a sweep a column is a group of runs that differ only by seed
(``scsa.analysis.runs``), drawn from its lowest seed's ``best.pt``: one column per recipe keeps seven
attentions readable, and the lowest seed pairs the columns by seed; ``cam.checkpoints=[...]``
names the checkpoints (one column each) instead, e.g. every seed of one attention.

Grad-CAM is ``pytorch_grad_cam``'s (the ``grad-cam`` package), for the predicted class, at
the backbone's last stage (its spec's ``last_stage``) unless ``cam.layer`` names another module. With
``cam.gate=true`` a cell shows the spatial gate the attention module applies at one block instead:
SCSA's a_h ⊗ a_w, CBAM's spatial map, CA's a_h ⊗ a_w, EMA's cross-spatial weights (mean over channels
or groups). Modules whose spec says they have one (``spatial_gate``) keep the gate their own forward
multiplied in when asked (``scsa.attention.gate.RecordsGate``): the map is the module's, never a copy.
Models run on the CPU with the eager kernels (``kernel="torch"``): eight images need no GPU.
"""
import contextlib
import logging
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from matplotlib.figure import Figure

from scsa.attention import spec_for
from scsa.analysis.runs import find_runs, group_runs
from scsa.models import backbone_spec
from scsa.trained import TrainedModel, load_trained

log = logging.getLogger(__name__)

CELL_INCHES = 1.6        # one grid cell; the figure is CELL_INCHES * columns wide
TITLE_LINE_INCHES = 0.2  # per line of the title above the grid
CHARS_PER_INCH = 14      # of the 8 pt title, to wrap it to the grid's width
DPI = 100


@dataclass
class Column:
    label: str
    checkpoint: Path


def sweep_columns(sweep_dir: Path) -> List[Column]:
    """One column per group of runs, from its lowest seed's best.pt (else last.pt)."""
    groups = group_runs(find_runs(sweep_dir))
    one_model = len({g.model for g in groups}) == 1
    columns = []
    for group in groups:
        run = next((r for r in group.runs if r.checkpoint() is not None), None)
        if run is None:
            log.warning("skipping %s: its runs have no checkpoints", group.label)
            continue
        columns.append(Column(group.label.replace(f"{group.model} + ", "") if one_model else group.label,
                              run.checkpoint()))
    if not columns:
        raise ValueError(f"no checkpoints under {sweep_dir}: pass a sweep dir whose runs wrote checkpoints/best.pt")
    return columns


def checkpoint_columns(paths: Sequence[str]) -> List[Column]:
    """One column per checkpoint, labelled by its run dir (``<run>/checkpoints/best.pt``)."""
    columns = []
    for path in map(Path, paths):
        if not path.is_file():
            raise ValueError(f"checkpoint '{path}' not found: list .pt files written by train.py in cam.checkpoints")
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        columns.append(Column(f"{run_dir.name}/{path.stem}", path))
    return columns


def last_stage(backbone: str) -> str:
    """Module path of the backbone's last stage (its spec's): ResNet ``layer4``, MobileNetV2's last feature layer."""
    return backbone_spec(backbone).last_stage


def _module(model: nn.Module, path: str, key: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        stages = [name for name, _ in model.named_children()]
        raise ValueError(f"{key}={path} is not a module of the model: use a module path such as "
                         f"{', '.join(stages[-4:])} or layer4.1") from None


def last_attention_block(model: nn.Module) -> str:
    """The last block that carries an attention slot (``.attn``, an Identity for attention=none)."""
    blocks = [name for name, module in model.named_modules() if isinstance(getattr(module, "attn", None), nn.Module)]
    if not blocks:
        raise ValueError("the model has no blocks with an attention slot: name one with cam.block=...")
    return blocks[-1]


# ---- the modules' spatial gates, as their forward computed them ---------------------------------

@contextlib.contextmanager
def recording_gate(module: nn.Module) -> Iterator[List[torch.Tensor]]:
    """Within it, each forward of ``module`` appends the spatial gate it multiplied in (a list that stays
    empty for modules without one: SE, ECA, attention=none)."""
    gates: List[torch.Tensor] = []
    if not spec_for(type(module)).spatial_gate:
        yield gates
        return
    module.record_gate = True
    handle = module.register_forward_hook(lambda m, args, out: gates.append(m.gate))
    try:
        yield gates
    finally:
        handle.remove()
        module.record_gate, module.gate = False, None


def gate_of(module: nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
    """The spatial gate ``module`` multiplies into input ``x`` (broadcastable to it); None for modules
    without one."""
    with recording_gate(module) as gates, torch.no_grad():
        module(x.float())
    return gates[0] if gates else None


def spatial_gate(module: nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
    """``gate_of`` as one (B, H, W) map: the mean over channels (or channel groups)."""
    gate = gate_of(module, x)
    return None if gate is None else gate.mean(1)


# ---- the grid ------------------------------------------------------------------------------------

@dataclass
class Cell:
    heat: Optional[np.ndarray]  # (H, W) in [0, 1], None: nothing to show
    predicted: str
    probability: float
    note: str = ""


def model_cells(trained: TrainedModel, x: torch.Tensor, layer: Optional[str], gate: bool,
                block: Optional[str]) -> Tuple[List[Cell], str]:
    """A cell per image of ``x`` for one model, and what the cells show (module, map size)."""
    model = trained.model
    seen: List[object] = []  # the attention's input (gate) or the layer's output, from the forward below
    if gate:
        path = block or last_attention_block(model)
        module = _module(model, path, "cam.block")
        target = module.attn if isinstance(getattr(module, "attn", None), nn.Module) else module
        handle = target.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    else:
        path = layer or last_stage(trained.config["model"]["name"])
        target = _module(model, path, "cam.layer")
        handle = target.register_forward_hook(lambda _, args, out: seen.append(out))
    try:
        with recording_gate(target) if gate else contextlib.nullcontext([]) as gates, torch.no_grad():
            probs = torch.softmax(model(x).float(), dim=1)
    finally:
        handle.remove()
    if not seen or not isinstance(seen[0], torch.Tensor) or seen[0].dim() != 4:
        raise ValueError(f"{path} gives no (B, C, H, W) map in the model's forward: pick a conv stage or block")
    confidence, predicted = probs.max(dim=1)
    names = [trained.classes[i] for i in predicted.tolist()]
    size = "x".join(str(n) for n in seen[0].shape[-2:])
    if gate:
        what = f"spatial gate at {path} ({size})"
        if not gates:
            return [Cell(None, n, float(p), "no spatial gate") for n, p in zip(names, confidence)], what
        maps = gates[0].float().mean(1)  # over channels (or channel groups)
        heat = F.interpolate(maps[:, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        cells = []
        for h, n, p in zip(heat, names, confidence):
            low, high = float(h.min()), float(h.max())  # the raw range goes in the cell, the colours span it
            cells.append(Cell(((h - low) / max(high - low, 1e-12)).numpy(), n, float(p), f"gate {low:.2f}-{high:.2f}"))
        return cells, what
    from pytorch_grad_cam import GradCAM  # loads OpenCV and scikit-learn (2 s): only when drawing Grad-CAM
    with GradCAM(model=model, target_layers=[target]) as cam:
        heat = cam(input_tensor=x, targets=None)  # targets=None: the predicted class
    return [Cell(h, n, float(p)) for h, n, p in zip(heat, names, confidence)], f"Grad-CAM at {path} ({size})"


def render(truth: List[str], labels: List[str], crops: List[torch.Tensor], columns: List[List[Cell]],
           title: str, out: Path) -> None:
    """Rows = images, columns = models (each over its own val crop); green: predicted right, red: wrong."""
    rows, cols = len(truth), len(columns)
    title = textwrap.fill(title, width=int(CELL_INCHES * cols * CHARS_PER_INCH))
    fig = Figure(figsize=(CELL_INCHES * cols, CELL_INCHES * rows + TITLE_LINE_INCHES * (1 + title.count("\n"))),
                 dpi=DPI, layout="constrained")
    fig.suptitle(title, fontsize=8)
    axes = fig.subplots(rows, cols, squeeze=False)
    for c, (label, crop, cells) in enumerate(zip(labels, crops, columns)):
        for r, cell in enumerate(cells):
            ax = axes[r][c]
            ax.imshow(crop[r].permute(1, 2, 0).numpy())
            if cell.heat is not None:
                ax.imshow(cell.heat, cmap="jet", alpha=0.45, vmin=0.0, vmax=1.0)
            text = f"{cell.predicted} {cell.probability:.0%}" + (f"\n{cell.note}" if cell.note else "")
            ax.set_title((f"{label}\n" if r == 0 else "") + text, fontsize=7,
                         color="green" if cell.predicted == truth[r] else "red")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(truth[r], fontsize=7)
    fig.savefig(out, dpi=DPI)


ValSample = Callable[[Mapping[str, Any], List[str], int], Tuple[torch.Tensor, torch.Tensor, List[int]]]


def write_cam(columns: List[Column], out: Path, sample: ValSample, images: int = 8, layer: Optional[str] = None,
              gate: bool = False, block: Optional[str] = None, ema: bool = False, data_root: Optional[str] = None,
              source: str = "") -> Dict:
    """Draw the grid for ``columns`` into ``out``; return a summary (columns, images, what is shown).

    ``sample(data_config, classes, count)`` reads the val images as the run's val loader presents
    them (``data.val_sample``): the same files for every column, each cropped by its own run's
    settings. ``source`` says in the title where the columns' checkpoints come from.
    """
    if images < 1:
        raise ValueError(f"images={images}: pass images=N with N >= 1")
    first = load_trained(str(columns[0].checkpoint), ema=ema, kernel="torch")
    root = data_root or first.config["data"]["root"]
    crops, grid, shows = [], [], set()
    for column in columns:
        trained = first if column is columns[0] else load_trained(str(column.checkpoint), ema=ema, kernel="torch")
        if trained.classes != first.classes:
            raise ValueError(f"{column.checkpoint} was trained on other classes than {columns[0].checkpoint}: "
                             f"draw runs of one dataset together")
        uint8, x, labels = sample({**trained.config["data"], "root": root}, trained.classes, images)
        cells, what = model_cells(trained, x, layer, gate, block)
        crops.append(uint8)
        grid.append(cells)
        shows.add(what)
    title = " / ".join(sorted(shows)) + (" (EMA weights)" if ema else "") + (f"; {source}" if source else "")
    out.parent.mkdir(parents=True, exist_ok=True)
    render([first.classes[i] for i in labels], [c.label for c in columns], crops, grid, title, out)
    return {"out": str(out), "columns": [c.label for c in columns], "checkpoints": [str(c.checkpoint) for c in columns],
            "images": len(labels), "shows": sorted(shows)}
