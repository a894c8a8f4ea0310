"""Score a checkpoint, or compare the runs of a sweep.

``python evaluate.py checkpoint=PATH [ema=true] [throughput=true] [data overrides]`` prints, as its
last stdout line, one JSON object with top1, top5, loss, images, params and flops (MACs per
image at the evaluation resolution), and with throughput=true img_per_s (inference on
synthetic batches of data.batch_size). Only the data's ``val/`` folder is read.
``python evaluate.py compare=MULTIRUN_DIR`` groups the sweep's runs by everything but the seed and
writes comparison.{md,csv,tex,png} into that folder (``scsa.analysis.compare``), then prints the table.
``python evaluate.py cam=MULTIRUN_DIR images=8`` draws Grad-CAM maps (``cam.gate=true``: the
modules' spatial gates) of the val images for each group's model into DIR/cam.png (``scsa.analysis.cam``).
``python evaluate.py checkpoint=PATH export=safetensors|onnx [export.out=DIR]`` writes the model in
timm's hub layout or as ONNX, checks it, and prints a JSON summary as its last line (``scsa.export``).
"""
import json
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

import scsa.training.config  # noqa: F401  (registers the resolvers conf/ uses)
from data import build_loaders, val_sample
from scsa.analysis.benchmark import inference_throughput
from scsa.training.cli import hydra_entry_point, run_task
from scsa.analysis.cam import checkpoint_columns, sweep_columns, write_cam
from scsa.analysis.compare import Throughput, write_comparison
from scsa.complexity import count_macs, count_params
from scsa.training import distributed
from scsa.training.evaluator import evaluate
from scsa.training.precision import Precision
from scsa.errors import UserError
from scsa.export import ExportError, export_checkpoint
from scsa.trained import load_trained


def data_config(cfg: DictConfig, stored: dict) -> DictConfig:
    """The checkpoint's data settings, with this command line's data overrides on top."""
    overrides = [o.split("=", 1)[0].lstrip("+~") for o in HydraConfig.get().overrides.task]
    data = cfg.data if "data" in overrides else OmegaConf.create(stored)
    for key in (o[len("data."):] for o in overrides if o.startswith("data.")):
        OmegaConf.update(data, key, OmegaConf.select(cfg.data, key), force_add=True)
    return data


def compare(cfg: DictConfig) -> None:
    """``compare=DIR``: the sweep's table (a row per group of seeds) and chart, written into DIR."""
    settings = OmegaConf.to_container(cfg.compare)
    sweep_dir, measure = Path(settings.pop("dir")), settings.pop("throughput")
    try:
        write_comparison(sweep_dir, Throughput(**settings, device=cfg.device) if measure else None)
    except ValueError as e:
        raise UserError(str(e)) from None
    print((sweep_dir / "comparison.md").read_text())


def cam(cfg: DictConfig) -> dict:
    """``cam=DIR images=N``: Grad-CAM (or spatial gate) maps of each group's model, into DIR/cam.png."""
    settings = cfg.cam
    try:
        if settings.checkpoints:
            columns, source = checkpoint_columns(list(settings.checkpoints)), "columns: the listed checkpoints"
        else:
            columns, source = sweep_columns(Path(settings.dir)), "columns: each group's lowest-seed checkpoint"
        if not (settings.out or settings.dir):
            raise ValueError("cam.checkpoints=[...] needs cam.out=PATH.png (or cam=DIR to write DIR/cam.png)")
        out = Path(settings.out) if settings.out else Path(settings.dir) / "cam.png"
        summary = write_cam(columns, out, val_sample, cfg.images, settings.layer, settings.gate, settings.block,
                            cfg.ema, settings.data_root, source)
    except ValueError as e:
        raise UserError(str(e)) from None
    print(json.dumps(summary))
    return summary


def score(cfg: DictConfig) -> dict:
    """``checkpoint=PATH``: top-1/top-5 and loss on the val split, params, MACs (and img/s)."""
    trained = load_trained(cfg.checkpoint, ema=cfg.ema)
    with distributed.process_group(cfg.device) as (dist_info, device):
        data = data_config(cfg, trained.config["data"])
        loaders = build_loaders(data, rank=dist_info.rank, world_size=dist_info.world_size, device=device,
                                seed=0, channels_last=False, train=False)
        if loaders.classes != trained.classes:
            raise UserError(f"the data's {len(loaders.classes)} classes differ from the checkpoint's "
                            f"{len(trained.classes)}: evaluate on the dataset the model was trained on")
        model = trained.model.to(device)
        precision = Precision(cfg.amp, device)
        metrics = evaluate(model, loaders.val, precision, device)
        result = {**metrics, "params": count_params(model), "flops": count_macs(model, data.image_size),
                  "model": trained.config["model"]["name"], "attention": trained.config["attention"]["name"],
                  "image_size": data.image_size, "checkpoint": cfg.checkpoint, "ema": bool(cfg.ema)}
        if cfg.throughput:
            result["img_per_s"] = inference_throughput(model, data.batch_size, data.image_size, precision, device)
        if dist_info.is_main:
            print(json.dumps(result))
        return result


def export(cfg: DictConfig) -> dict:
    """``checkpoint=PATH export=safetensors|onnx``: the model for timm, model hubs or ONNX runtimes."""
    if not cfg.checkpoint:
        raise UserError("export=... needs checkpoint=PATH: name the checkpoint to export")
    options = OmegaConf.to_container(cfg.export)
    try:
        summary = export_checkpoint(cfg.checkpoint, options.pop("format"), options.pop("out"), cfg.ema, **options)
    except ExportError as e:
        sys.exit(f"error: {e}")  # exit 1: a wrong export is a bug or the exporter's limit, not bad input
    if summary["export"] == "onnx":
        sizes = " and ".join(f"{h}x{w}" for h, w in summary["verified_sizes"])
        check = (f"opset {summary['opset']}, dynamic {'/'.join(summary['dynamic_axes'])}; onnxruntime vs PyTorch at "
                 f"{sizes}: max abs difference {summary['max_abs_diff']:.2g}")
    else:
        check = "reloaded through timm: bitwise equal"
    print(f"exported {', '.join(summary['files'])} ({check})")
    print(json.dumps(summary))
    return summary


def dispatch(cfg: DictConfig) -> None:
    if cfg.compare.dir:
        return compare(cfg)
    if cfg.cam.dir or cfg.cam.checkpoints:
        return cam(cfg)
    if cfg.get("export"):
        return export(cfg)
    if cfg.checkpoint:
        return score(cfg)
    raise UserError("nothing to do: pass checkpoint=PATH, compare=MULTIRUN_DIR or cam=MULTIRUN_DIR")


@hydra.main(config_path="conf", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_task(lambda: dispatch(cfg))


if __name__ == "__main__":
    hydra_entry_point(main, "evaluate", shorthands={"compare": "compare.dir", "cam": "cam.dir"})
