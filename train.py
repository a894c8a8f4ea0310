"""Train a backbone with a plug-in attention module: ``python train.py [overrides]``.

config (conf/) -> data (data/) -> model (scsa.create_model) -> engine (scsa/engine)
-> run dir (train.log, metrics.jsonl, checkpoints/).
"""
import logging
import tempfile
from pathlib import Path
from typing import Any, Dict

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import random_seed

import scsa.config  # noqa: F401  (registers the resolvers conf/ uses)
from data import build_loaders
from scsa.cli import hydra_entry_point, run_task
from scsa.complexity import count_macs, count_params
from scsa.models import create_model_from_config
from scsa.engine import distributed
from scsa.engine.checkpoint import load_checkpoint, load_latest, previous_path
from scsa.engine.precision import Precision
from scsa.engine.preemption import Preempted
from scsa.engine.trainer import Trainer, updates_per_epoch
from scsa.errors import UserError
from scsa.tracking import Tracker
from scsa.wandb_run import WandbRun

log = logging.getLogger("train")


def scaled_lr(optim: DictConfig, global_batch: int) -> float:
    """``optim.lr`` if set, else the linear scaling rule: lr_base * global_batch / lr_base_size."""
    return optim.lr if optim.lr is not None else optim.lr_base * global_batch / optim.lr_base_size


def build_model(cfg: DictConfig, num_classes: int) -> torch.nn.Module:
    try:
        return create_model_from_config(cfg.model, cfg.attention, num_classes)
    except (ValueError, TypeError) as e:
        raise UserError(f"cannot build model={cfg.model.name} attention={cfg.attention.name}: {e}") from None


def build_optimizer(cfg: DictConfig, model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    options = {k: v for k, v in cfg.optim.items() if k not in ("name", "opt", "lr", "lr_base", "lr_base_size",
                                                               "filter_bias_and_bn", "weight_decay")}
    return create_optimizer_v2(model, opt=cfg.optim.opt, lr=lr, weight_decay=cfg.optim.weight_decay,
                               filter_bias_and_bn=cfg.optim.filter_bias_and_bn, **options)


def build_scheduler(cfg: DictConfig, optimizer: torch.optim.Optimizer, updates_per_epoch: int):
    options = {k: v for k, v in cfg.schedule.items() if k not in ("name", "sched")}
    scheduler, _ = create_scheduler_v2(optimizer, sched=cfg.schedule.sched, num_epochs=cfg.trainer.epochs,
                                       updates_per_epoch=updates_per_epoch, **options)
    return scheduler


def find_resume_checkpoint(resume: str, checkpoint_dir: Path) -> "tuple[Path, dict] | None":
    """``auto``: this run dir's newest loadable checkpoint; ``none``; or an explicit path."""
    if resume == "none":
        return None
    if resume == "auto":
        last = checkpoint_dir / "last.pt"
        return load_latest([last, previous_path(last)], log.warning)
    return Path(resume), load_checkpoint(resume)


def check_writable(run_dir: Path) -> Path:
    checkpoint_dir = run_dir / "checkpoints"
    try:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=checkpoint_dir):  # a unique name: every rank probes the same dir
            pass
    except OSError as e:
        raise UserError(f"run dir '{run_dir}' is not writable ({e.strerror}): "
                        f"pass hydra.run.dir=<a writable folder>") from None
    return checkpoint_dir


def configure_backends(trainer: DictConfig, seed: int, rank: int, device: torch.device) -> None:
    random_seed(seed, rank)
    if trainer.deterministic:
        torch.use_deterministic_algorithms(True)
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def sweep_group() -> "str | None":
    """The sweep a --multirun job belongs to (its sweep dir): the W&B group of all its runs."""
    hydra_cfg = HydraConfig.get()
    return hydra_cfg.sweep.dir if hydra_cfg.mode == RunMode.MULTIRUN else None


def start_tracking(cfg: DictConfig, run_dir: Path, is_main: bool, run_id: "str | None") -> Tracker:
    try:
        wandb_run = WandbRun(cfg.wandb.mode, cfg.wandb.project, run_dir, OmegaConf.to_container(cfg, resolve=True),
                             name=f"{cfg.model.name}-{cfg.attention.name}-seed{cfg.seed}",
                             tags=[cfg.model.name, cfg.attention.name, cfg.data.name, f"seed{cfg.seed}"],
                             group=sweep_group(), run_id=run_id, enabled=is_main)
    except ValueError as e:
        raise UserError(f"{e}: set wandb.mode accordingly") from None
    return Tracker(run_dir, is_main, wandb_run)


def train(cfg: DictConfig) -> Dict[str, Any]:
    if cfg.trainer.accum_steps < 1:
        raise UserError(f"trainer.accum_steps={cfg.trainer.accum_steps}: use a positive int (1 = no accumulation)")
    with distributed.process_group(cfg.trainer.device, agreed=(Preempted,)) as (dist_info, device):
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        checkpoint_dir = check_writable(run_dir)
        configure_backends(cfg.trainer, cfg.seed, dist_info.rank, device)
        loaders = build_loaders(cfg.data, rank=dist_info.rank, world_size=dist_info.world_size, device=device,
                                seed=cfg.seed, channels_last=cfg.trainer.channels_last)
        model = build_model(cfg, num_classes=len(loaders.classes))
        params, macs = count_params(model), count_macs(model, cfg.data.image_size)
        model.to(device, memory_format=torch.channels_last if cfg.trainer.channels_last else torch.preserve_format)
        resume_from = find_resume_checkpoint(str(cfg.resume), checkpoint_dir)
        tracker = start_tracking(cfg, run_dir, dist_info.is_main, resume_from[1].get("wandb_run_id") if resume_from else None)

        global_batch = cfg.data.batch_size * dist_info.world_size * cfg.trainer.accum_steps
        lr = scaled_lr(cfg.optim, global_batch)
        optimizer = build_optimizer(cfg, model, lr)
        updates = updates_per_epoch(len(loaders.train), cfg.trainer.accum_steps)
        scheduler = build_scheduler(cfg, optimizer, updates)
        meta = {"config": OmegaConf.to_container(cfg, resolve=True), "classes": loaders.classes,
                "params": params, "flops": macs, "wandb_run_id": tracker.wandb.run_id}
        trainer = Trainer(model, optimizer, scheduler, loaders, Precision(cfg.trainer.amp, device), dist_info,
                          device, tracker, checkpoint_dir, cfg, meta)
        if resume_from:
            trainer.resume(*resume_from)
        trainer.wrap()
        tracker.info("model=%s attention=%s params=%d MACs=%.3gG device=%s world=%d loader=%s "
                     "global batch=%d lr=%.4g run dir=%s", cfg.model.name, cfg.attention.name, params, macs / 1e9,
                     device, dist_info.world_size, loaders.backend, global_batch, lr, run_dir)
        exit_code = 1
        try:
            summary = trainer.fit()
            exit_code = 0
        finally:
            tracker.finish({"params": params, "flops": macs, "best_top1": trainer.state.best_top1}, exit_code)
        if dist_info.is_main:
            print(f"done: best val top-1 {summary['best_top1']:.2f}% | last val top-1 {summary.get('val_top1', 0):.2f}%"
                  f" top-5 {summary.get('val_top5', 0):.2f}% | {summary['minutes']:.1f} min | run dir {run_dir}")
        return summary


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_task(lambda: train(cfg))


if __name__ == "__main__":
    hydra_entry_point(main, config_name="train")
