"""Train a backbone with a plug-in attention module: ``python train.py [overrides]``.

config (conf/) -> data (data/) -> model (scsa.models) -> engine (scsa/training)
-> run dir (train.log, metrics.jsonl, W&B, checkpoints/).
"""
import dataclasses
import logging
from pathlib import Path
from typing import Any, Dict, Optional

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from timm.utils import random_seed

import scsa.training.config  # noqa: F401  (registers the resolvers conf/ uses)
from data import build_loaders
from scsa.training.cli import hydra_entry_point, run_task
from scsa.complexity import count_macs, count_params
from scsa.training import distributed, recipe
from scsa.training.checkpoint import find_resume
from scsa.training.precision import Precision, configure_backends
from scsa.training.preemption import Preempted
from scsa.training.trainer import Trainer, TrainerConfig, elastic_accum_steps, updates_per_epoch
from scsa.errors import UserError
from scsa.models import create_model_from_config
from scsa.training.tracking import Tracker
from scsa.training.wandb_run import WandbRun

log = logging.getLogger("train")


def build_model(cfg: DictConfig, num_classes: int) -> torch.nn.Module:
    for key in ("cls", "position"):
        if OmegaConf.is_missing(cfg.attention, key):
            raise UserError(f"attention={cfg.attention.name} needs attention.{key}: e.g. "
                            f"attention.cls=my_pkg.my_attn.MyAttention attention.position=end")
    try:
        return create_model_from_config(cfg.model, cfg.attention, num_classes)
    except (ValueError, TypeError) as e:
        raise UserError(f"cannot build model={cfg.model.name} attention={cfg.attention.name}: {e}") from None


def sweep_group() -> Optional[str]:
    """The sweep a --multirun job belongs to (its sweep dir): the W&B group of all its runs."""
    hydra_cfg = HydraConfig.get()
    return hydra_cfg.sweep.dir if hydra_cfg.mode == RunMode.MULTIRUN else None


def start_tracking(cfg: DictConfig, run_dir: Path, is_main: bool, run_id: Optional[str]) -> Tracker:
    try:
        wandb_run = WandbRun(cfg.wandb.mode, cfg.wandb.project, run_dir, OmegaConf.to_container(cfg, resolve=True),
                             name=f"{cfg.model.name}-{cfg.attention.name}-seed{cfg.seed}",
                             tags=[cfg.model.name, cfg.attention.name, cfg.data.name, f"seed{cfg.seed}"],
                             group=sweep_group(), run_id=run_id, enabled=is_main)
    except ValueError as e:
        raise UserError(f"{e}: set wandb.mode accordingly") from None
    return Tracker(run_dir, is_main, wandb_run)


def train(cfg: DictConfig) -> Dict[str, Any]:
    loop = TrainerConfig.from_config(cfg.trainer, cfg.checkpoint)
    with distributed.process_group(cfg.trainer.device, agreed=(Preempted,)) as (dist_info, device):
        run_dir = Path(HydraConfig.get().runtime.output_dir)  # Hydra made it (the CLI checked it can)
        checkpoint_dir = run_dir / "checkpoints"
        checkpoint_dir.mkdir(exist_ok=True)
        configure_backends(device, cfg.trainer.deterministic)
        random_seed(cfg.seed, dist_info.rank)

        resume_from = find_resume(str(cfg.resume), checkpoint_dir, log.warning)
        # A checkpoint's global batch is kept on any world size that can: accum_steps is scaled.
        accum_steps, adjusted = elastic_accum_steps((resume_from[1].get("loader") or []) if resume_from else [],
                                                    dist_info.world_size, cfg.data.batch_size, loop.accum_steps)
        loop = dataclasses.replace(loop, accum_steps=accum_steps)
        cfg.trainer.accum_steps = accum_steps  # what checkpoints and W&B record is what runs
        loaders = build_loaders(cfg.data, rank=dist_info.rank, world_size=dist_info.world_size, device=device,
                                seed=cfg.seed, channels_last=cfg.trainer.channels_last, accum_steps=accum_steps)

        model = build_model(cfg, num_classes=len(loaders.classes))
        params, macs = count_params(model), count_macs(model, cfg.data.image_size)
        model.to(device, memory_format=torch.channels_last if cfg.trainer.channels_last else torch.preserve_format)

        wandb_run_id = resume_from[1].get("wandb_run_id") if resume_from else None
        tracker = start_tracking(cfg, run_dir, dist_info.is_main, wandb_run_id)
        if adjusted:
            tracker.info("%s", adjusted)
        global_batch = cfg.data.batch_size * dist_info.world_size * loop.accum_steps
        lr = recipe.scaled_lr(cfg.optim, global_batch)
        optimizer = recipe.build_optimizer(cfg.optim, model, lr)
        scheduler = recipe.build_scheduler(cfg.schedule, optimizer, loop.epochs,
                                           updates_per_epoch(len(loaders.train), loop.accum_steps))
        mixup = recipe.build_mixup(cfg.trainer, len(loaders.classes), cfg.data.batch_size)
        meta = {"config": OmegaConf.to_container(cfg, resolve=True), "classes": loaders.classes,
                "params": params, "flops": macs, "wandb_run_id": tracker.wandb.run_id}
        trainer = Trainer(loop, model=model, optimizer=optimizer, scheduler=scheduler,
                          criterion=recipe.build_criterion(cfg.trainer.label_smoothing, mixup),
                          train_loader=loaders.train, val_loader=loaders.val,
                          precision=Precision(cfg.trainer.amp, device), dist=dist_info, device=device, tracker=tracker,
                          checkpoint_dir=checkpoint_dir, meta=meta, mixup=mixup,
                          ema=recipe.build_model_ema(cfg.trainer, model))
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
