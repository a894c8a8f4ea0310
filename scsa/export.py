"""A trained model in the formats the field's tools read: timm's hub layout and ONNX.

- ``safetensors``: ``model.safetensors`` + ``config.json`` as ``timm.models.save_for_hf`` writes
  them (architecture, num_classes, label_names, the attention kwargs as ``model_args``, and a
  ``pretrained_cfg`` with the run's preprocessing), loadable by
  ``timm.create_model("local-dir:<folder>")`` or ``timm.create_model("<architecture>",
  pretrained=True, pretrained_cfg_overlay=dict(file=".../model.safetensors"))``. The
  architecture is ``<backbone>_<attention>`` (``scsa.models.registry``), or without attention
  timm's own backbone.
- ``onnx``: ``model.onnx`` (input ``images``, output ``logits``; batch, height and width dynamic) through
  torch's dynamo exporter, its opset read back from the file, then checked against PyTorch with onnxruntime
  on the CPU at two image sizes.
"""
import contextlib
import logging
import os
from pathlib import Path
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Tuple

import numpy as np
import timm
import torch
import torch.nn as nn

from scsa.errors import UserError
from scsa.attention import KERNEL_KWARG, spec_for
from scsa.models import backbone_spec
from scsa.models.factory import import_class
from scsa.models.registry import timm_name
from scsa.trained import TrainedModel, load_trained

__all__ = ["FORMATS", "ExportError", "OnnxExport", "VerificationError", "default_export_dir", "export_checkpoint",
           "export_onnx", "export_safetensors", "timm_model_args", "verify_onnx", "verify_safetensors"]

FORMATS = ("safetensors", "onnx")
ONNX_INPUT, ONNX_OUTPUT = "images", "logits"
# The dynamic-size trace's (height, width): no size derived from it is 1 (SCSA's 7 px windows come twice
# or more on every stage at stride 32) and height != width, so the exporter fixes neither to its traced value.
TRACE_SIZE = (480, 512)


class ExportError(RuntimeError):
    """The export is not what was asked for: a bug or a limit of the exporter, not bad input (exit 1)."""


class VerificationError(ExportError):
    """The exported model's outputs differ from PyTorch's by more than the tolerance."""


class OnnxExport(NamedTuple):
    path: Path
    opset: int                        # read back from the file
    dynamic_axes: List[str]           # of the input, e.g. ["batch", "height", "width"]
    verified_sizes: List[Tuple[int, int]]  # (height, width) onnxruntime was checked at
    max_abs_diff: float               # onnxruntime vs PyTorch, over all verified sizes


@contextlib.contextmanager
def _quiet(*loggers: str, level: int = logging.WARNING) -> Iterator[None]:
    """Only ``level`` and above from these libraries' loggers: their INFO lines (one per deduplicated ONNX
    initializer, one per loaded file) would bury the export's own report."""
    saved = {name: logging.getLogger(name).level for name in loggers}
    for name in loggers:
        logging.getLogger(name).setLevel(level)
    try:
        yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def default_export_dir(checkpoint: Path, ema: bool = False) -> Path:
    """``<dir>/<stem>[_ema]_export`` beside the checkpoint: one folder per set of weights."""
    return checkpoint.parent / f"{checkpoint.stem}{'_ema' if ema else ''}_export"


def timm_model_args(config: Dict[str, Any]) -> Tuple[str, Dict[str, Any]]:
    """The timm architecture of a run's model and the arguments that rebuild it.

    Without attention the backbone is timm's own (its spec's ``timm_plain``): the same modules in the same
    order (MobileNetV2's are named differently, see ``_renamed``). A custom attention class (``attention.cls``)
    has a timm name only when it is registered.
    """
    backbone, attention = config["model"]["name"], config["attention"]["name"]
    if config["attention"].get("cls"):
        spec = spec_for(import_class(config["attention"]["cls"]))
        if spec.position is None:
            raise UserError(f"attention class {config['attention']['cls']} is not registered, so timm has no name "
                            f"for it: export=onnx, or register it (scsa.register_attention) before exporting")
        attention = spec.name
    if attention == "none":
        return backbone_spec(backbone).timm_plain, {}
    kwargs = {k: v for k, v in config["attention"]["kwargs"].items() if k != KERNEL_KWARG and v is not None}
    return timm_name(backbone, attention), {"position": config["attention"]["position"], **kwargs}


def _renamed(state: Dict[str, torch.Tensor], names: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``state``'s tensors under the names of ``names``, tensor by tensor in module order: for the backbones
    whose spec says timm's plain model names the same tensors differently (``plain_renamed``)."""
    shapes = [tuple(t.shape) for t in state.values()], [tuple(t.shape) for t in names.values()]
    if shapes[0] != shapes[1]:
        raise ValueError("the timm architecture's tensors differ from the model's: it is not the same network")
    return dict(zip(names, state.values()))


def _data_config(data: Dict[str, Any]) -> Dict[str, Any]:
    """The run's preprocessing on timm's scale (0-1 mean/std, crop_pct = image_size / val_resize)."""
    size = int(data["image_size"])
    return dict(input_size=(3, size, size), mean=tuple(round(m / 255, 6) for m in data["mean"]),
                std=tuple(round(s / 255, 6) for s in data["std"]), crop_pct=round(size / data["val_resize"], 4),
                interpolation="bilinear", crop_mode="center")


def export_safetensors(trained: TrainedModel, out: Path) -> Dict[str, Path]:
    """Write ``model.safetensors`` and ``config.json`` into ``out`` (timm's hub layout)."""
    name, model_args = timm_model_args(trained.config)
    model = timm.create_model(name, num_classes=len(trained.classes), **model_args)
    state, backbone = trained.model.state_dict(), backbone_spec(trained.config["model"]["name"])
    if name == backbone.timm_plain and backbone.plain_renamed:
        state = _renamed(state, model.state_dict())
    model.load_state_dict(state)  # strict
    timm.models.save_for_hf(model, out, model_config=dict(label_names=list(trained.classes)),
                            data_config=_data_config(trained.config["data"]), safe_serialization=True)
    return {"weights": out / "model.safetensors", "config": out / "config.json"}


def verify_safetensors(out: Path, model: nn.Module) -> None:
    """Load ``out`` the way a timm user does and check every tensor is ``model``'s, bit for bit."""
    with _quiet("timm"):
        loaded = list(timm.create_model(f"local-dir:{out}", pretrained=True).state_dict().values())
    want = list(model.state_dict().values())
    if len(loaded) != len(want) or not all(torch.equal(a, b) for a, b in zip(loaded, want)):
        raise VerificationError(f"timm.create_model('local-dir:{out}', pretrained=True) does not give back the "
                                f"exported weights: the export is wrong")


def _onnx_opset(path: Path) -> int:
    """The default-domain opset the file at ``path`` declares: what a runtime will be asked to support."""
    import onnx  # imported when asked for: most commands never export

    model = onnx.load(str(path), load_external_data=False)
    return next(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx"))


def _verify_sizes(size: int, dynamic_size: bool) -> List[Tuple[int, int]]:
    """(height, width) to check at: the training size, and with dynamic sizes one taller and wider, not square
    (a height/width mix-up shows only there)."""
    return [(size, size), (size + 32, size + 64)] if dynamic_size else [(size, size)]


def export_onnx(trained: TrainedModel, out: Path, opset: int = 18, dynamic_size: bool = True, verify_batch: int = 4,
                atol: float = 1e-4) -> OnnxExport:
    """Write ``out/model.onnx`` (dynamic batch axis; with ``dynamic_size`` dynamic height and width too), check
    it declares ``opset`` and verify it (``verify_onnx``) at the training size and, with ``dynamic_size``, at
    another; an ``ExportError`` when the exporter wrote another opset (the file is removed).

    torch's dynamo exporter traces through ``torch.export``, under which ``torch.compiler.is_compiling()``
    and ``scsa.attention.kernels.exporting()`` hold: every attention module takes its plain-op path,
    never a custom autograd Function or kernel.
    """
    size = int(trained.config["data"]["image_size"])
    path = out / "model.onnx"
    example = torch.randn(2, 3, *(TRACE_SIZE if dynamic_size else (size, size)))
    axes = {0: torch.export.Dim("batch")}
    if dynamic_size:
        axes.update({2: torch.export.Dim("height"), 3: torch.export.Dim("width")})
    # ERROR: a failed opset conversion is logged with its traceback as a warning; the opset check below reports it
    with _quiet("onnx_ir", "onnxscript", level=logging.ERROR):
        torch.onnx.export(trained.model, (example,), str(path), dynamo=True, opset_version=opset,
                          input_names=[ONNX_INPUT], output_names=[ONNX_OUTPUT],
                          dynamic_shapes=(axes,), external_data=False, verbose=False)
    written = _onnx_opset(path)
    if written != opset:
        path.unlink()
        raise ExportError(f"torch's ONNX exporter cannot write opset {opset} for this model (it wrote {written} "
                          f"instead, now removed): use opset {written} (export.opset={written}), or a torch and "
                          f"onnxscript that convert to {opset}")
    generator = torch.Generator().manual_seed(0)
    sizes = _verify_sizes(size, dynamic_size)
    diffs = [verify_onnx(path, trained.model, torch.randn(verify_batch, 3, h, w, generator=generator), atol)
             for h, w in sizes]  # another batch size than the trace's
    return OnnxExport(path, written, ["batch", *(["height", "width"] if dynamic_size else [])], sizes, max(diffs))


def verify_onnx(path: Path, model: nn.Module, images: torch.Tensor, atol: float = 1e-4) -> float:
    """Max abs difference between onnxruntime's (CPU) and ``model``'s eval outputs on ``images``;
    a ``VerificationError`` above ``atol``."""
    import onnxruntime  # imported when asked for: most commands never run it

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run([ONNX_OUTPUT], {ONNX_INPUT: images.numpy()})[0]
    with torch.no_grad():
        want = model.eval()(images).numpy()
    diff = float(np.abs(got - want).max()) if got.shape == want.shape else float("inf")
    if not diff <= atol:
        raise VerificationError(f"'{path}' differs from PyTorch's outputs by up to {diff:.3g} on {tuple(images.shape)} "
                                f"images (tolerance {atol:g}, output shapes {got.shape} vs {want.shape}): the export "
                                f"is wrong, do not deploy it")
    return diff


def _writable_dir(out: Path) -> Path:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the export folder '{out}' ({e.strerror or e}): "
                        f"pass export.out=<a writable folder>") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise UserError(f"the export folder '{out}' is not writable: pass export.out=<a writable folder>")
    return out


def export_checkpoint(checkpoint: str, fmt: str, out: Optional[str] = None, ema: bool = False,
                      **onnx_options: Any) -> Dict[str, Any]:
    """``evaluate.py checkpoint=PATH export=FORMAT``: export the checkpoint's weights (or with ``ema`` its
    EMA's), verify the result, and summarise it. ``onnx_options``: ``export_onnx``'s opset, dynamic_size,
    verify_batch, atol."""
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}: use export=safetensors or export=onnx")
    out_dir = _writable_dir(Path(out) if out else default_export_dir(Path(checkpoint), ema))
    trained = load_trained(checkpoint, ema=ema, kernel="torch")
    summary: Dict[str, Any] = {"export": fmt, "checkpoint": str(checkpoint), "ema": bool(ema), "out": str(out_dir)}
    if fmt == "safetensors":
        name, _ = timm_model_args(trained.config)
        files = export_safetensors(trained, out_dir)
        verify_safetensors(out_dir, trained.model)
        return {**summary, "architecture": name, "files": [str(p) for p in files.values()], "bitwise": True}
    onnx = export_onnx(trained, out_dir, **onnx_options)
    return {**summary, "files": [str(onnx.path)], "opset": onnx.opset, "dynamic_axes": onnx.dynamic_axes,
            "verified_sizes": [list(s) for s in onnx.verified_sizes], "max_abs_diff": onnx.max_abs_diff}
