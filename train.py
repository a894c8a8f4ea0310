"""Train a backbone with a plug-in attention module: ``python train.py [overrides]``.

config (conf/) -> data (data/) -> model (scsa.models) -> engine (scsa/training)
-> run dir (train.log, metrics.jsonl, W&B, checkpoints/).
"""
import os
import signal
import sys


def preempted_during_start_up(signum: int, frame: object) -> None:
    """SIGTERM/SIGUSR1 before the trainer watches for them (imports, data, model): nothing to save yet.

    ``os._exit``: an exception raised here could land inside any import or library call, and be caught
    there; the run-dir lock goes with the process, and nothing has been trained.
    """
    print(f"preempted: signal {signum} during start-up, before any step; run the same command again to resume",
          file=sys.stderr, flush=True)
    os._exit(75)  # scsa.errors.EXIT_PREEMPTED (not imported yet: this handler must be in place first)


for _signum in (signal.SIGTERM, signal.SIGUSR1):
    signal.signal(_signum, preempted_during_start_up)

import dataclasses  # noqa: E402  (the handler above goes first)
import logging  # noqa: E402
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

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
from scsa.training.checkpoint import find_resume, model_differences
from scsa.training.precision import Precision, configure_backends
from scsa.training.preemption import Preempted
from scsa.training.rundir import mark_finished, remove_stale_temporaries, set_aside
from scsa.training.trainer import Trainer, TrainerConfig, elastic_accum_steps, updates_per_epoch
from scsa.errors import UserError
from scsa.models import create_model_from_config
from scsa.trained import first_line
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


def check_resumable(path: Path, checkpoint: Dict[str, Any], cfg: DictConfig, classes: List[str]) -> None:
    """Resume only a checkpoint of this run's model: else one line saying what differs."""
    if "config" not in checkpoint or "model" not in checkpoint:
        raise UserError(f"'{path}' is not a train.py checkpoint (no model/config): pass checkpoints/last.pt of a run")
    differences = model_differences(checkpoint["config"], OmegaConf.to_container(cfg, resolve=True),
                                    list(checkpoint.get("classes", [])), classes)
    if differences:
        raise UserError(f"checkpoint '{path}' is of another model ({'; '.join(differences)}): resume it with the "
                        f"settings it was trained with, or pass resume=none to start over")


def resume_trainer(trainer: Trainer, path: Path, checkpoint: Dict[str, Any]) -> None:
    try:
        trainer.resume(path, checkpoint)
    except (RuntimeError, KeyError, ValueError) as e:
        raise UserError(f"checkpoint '{path}' does not fit this run ({first_line(e)}): resume it with the settings "
                        f"it was trained with, or pass resume=none to start over") from None


def prepare_run_dir(run_dir: Path, resume_from: Optional[Tuple[Path, Dict[str, Any]]]) -> None:
    """Rank 0, before anything is written: the files of a run this one does not continue are set aside (a fresh
    start, resume=none, or another dir's checkpoint), and stale temporaries of a killed save are deleted."""
    checkpoint_dir = run_dir / "checkpoints"
    continuing = resume_from is not None and resume_from[0].resolve().parent == checkpoint_dir.resolve()
    if not continuing:
        aside = set_aside(run_dir, ["checkpoints", "metrics.jsonl", "curves.png"])
        if aside:
            log.warning("this run does not continue the one in %s: its files were moved into %s", run_dir, aside)
    checkpoint_dir.mkdir(exist_ok=True)
    for path in remove_stale_temporaries(checkpoint_dir):
        log.info("removed %s, left by a checkpoint write that was killed", path.name)


def train(cfg: DictConfig) -> Dict[str, Any]:
    loop = TrainerConfig.from_config(cfg.trainer, cfg.checkpoint)
    with distributed.process_group(cfg.trainer.device, agreed=(Preempted,)) as (dist_info, device):
        run_dir = Path(HydraConfig.get().runtime.output_dir)  # Hydra made it (the CLI checked it can)
        checkpoint_dir = run_dir / "checkpoints"
        resume_from = find_resume(str(cfg.resume), checkpoint_dir, log.warning)
        if dist_info.is_main:  # the other ranks read no file there (resume_from is loaded) and write none
            prepare_run_dir(run_dir, resume_from)
        configure_backends(device, cfg.trainer.deterministic)
        random_seed(cfg.seed, dist_info.rank)

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

        if resume_from:
            check_resumable(*resume_from, cfg, loaders.classes)
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
            resume_trainer(trainer, *resume_from)
            at_epoch_end = trainer.state.batch == 0  # then the checkpoint holds its epoch's line
            tracker.keep_epochs(trainer.state.epoch, resume_from[1].get("metrics") if at_epoch_end else None)
        trainer.wrap()
        tracker.info("model=%s attention=%s params=%d MACs=%.3gG device=%s world=%d loader=%s "
                     "global batch=%d lr=%.4g run dir=%s", cfg.model.name, cfg.attention.name, params, macs / 1e9,
                     device, dist_info.world_size, loaders.backend, global_batch, lr, run_dir)
        if trainer.finished:
            tracker.info("the run in %s already finished (epoch %d of %d, step %d): nothing to train; pass "
                         "hydra.run.dir=<a new folder> for a new run", run_dir, trainer.state.epoch, loop.epochs,
                         trainer.state.step)
        exit_code = 1
        try:
            summary = trainer.fit()
            exit_code = 0
        finally:
            tracker.finish({"params": params, "flops": macs, "best_top1": trainer.state.best_top1}, exit_code)
        if dist_info.is_main:
            mark_finished(run_dir)
            print(f"done: best val top-1 {summary['best_top1']:.2f}% | last val top-1 {summary.get('val_top1', 0):.2f}%"
                  f" top-5 {summary.get('val_top5', 0):.2f}% | {summary['minutes']:.1f} min | run dir {run_dir}")
        return summary


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_task(lambda: train(cfg))


if __name__ == "__main__":
    hydra_entry_point(main, "train")
