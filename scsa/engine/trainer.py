"""The training loop: epochs of optimiser steps, validation, checkpoints, metrics.

It sees a model, an optimiser, a scheduler and two loaders that yield device batches; it
does not know which backbone, attention or input backend it is running.
"""
import contextlib
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.utils import distribute_bn

from data import Loaders
from scsa.engine.checkpoint import load_checkpoint, save_atomic
from scsa.engine.distributed import DistInfo, all_reduce_sum, replicas_identical
from scsa.engine.evaluator import evaluate
from scsa.engine.precision import Precision
from scsa.tracking import Throughput, Tracker


@dataclass
class TrainState:
    epoch: int = 0          # the next epoch to run
    step: int = 0           # optimiser steps taken so far
    best_top1: float = -1.0


class Trainer:
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, loaders: Loaders,
                 precision: Precision, dist: DistInfo, device: torch.device, tracker: Tracker,
                 checkpoint_dir: Path, cfg: Any, meta: Dict[str, Any]):
        self.model = model                  # the bare module: what checkpoints hold
        self.train_model = model            # compiled and/or DDP-wrapped: what steps run
        self.eval_model = model             # compiled, never DDP-wrapped: ranks validate unequal shards
        self.optimizer, self.scheduler = optimizer, scheduler
        self.loaders, self.precision, self.dist, self.device = loaders, precision, dist, device
        self.tracker, self.checkpoint_dir = tracker, checkpoint_dir
        self.cfg = cfg.trainer
        self.meta = meta                    # config, classes, params, flops: stored in checkpoints
        self.state = TrainState()
        self.accum_steps = int(self.cfg.accum_steps)

    def wrap(self) -> None:
        """SyncBN, torch.compile, then DDP (compile goes inside the DDP wrap)."""
        model = self.model
        if self.dist.distributed and self.cfg.sync_bn:
            model = self.model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        if self.cfg.compile:
            model = torch.compile(model)
        self.eval_model = model
        if self.dist.distributed:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        self.train_model = model

    # ---- checkpoints -------------------------------------------------------------------
    def state_dict(self, metrics: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        return {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.precision.scaler.state_dict(),
            "state": asdict(self.state), "metrics": metrics or {}, **self.meta,
        }

    def save(self, name: str, metrics: Optional[Dict[str, Any]] = None) -> None:
        if self.dist.is_main:
            save_atomic(self.state_dict(metrics), self.checkpoint_dir / name)

    def resume(self, path: str) -> None:
        checkpoint = load_checkpoint(path)
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        self.precision.scaler.load_state_dict(checkpoint["scaler"])
        self.state = TrainState(**checkpoint["state"])
        self.tracker.info("resumed from %s at epoch %d, step %d", path, self.state.epoch, self.state.step)

    # ---- the loop ----------------------------------------------------------------------
    def fit(self) -> Dict[str, Any]:
        start = time.perf_counter()
        last: Dict[str, Any] = {}
        for epoch in range(self.state.epoch, self.cfg.epochs):
            train = self.train_one_epoch(epoch)
            self.scheduler.step(epoch + 1)  # epoch-based schedules; per-step ones moved in step_update
            if self.dist.distributed and not self.cfg.sync_bn:
                distribute_bn(self.model, self.dist.world_size, reduce=True)  # ranks agree on BN stats
            val = evaluate(self.eval_model, self.loaders.val, self.precision, self.device)
            self.state.epoch = epoch + 1
            last = {"epoch": epoch, **train, "val_loss": val["loss"], "val_top1": val["top1"],
                    "val_top5": val["top5"], "val_images": val["images"], "step": self.state.step}
            self.tracker.log_epoch(last)
            is_best = val["top1"] > self.state.best_top1
            self.state.best_top1 = max(self.state.best_top1, val["top1"])
            self.save("last.pt", last)
            if is_best:
                self.save("best.pt", last)
            if self._out_of_steps():
                break
        if self.dist.distributed:
            identical = replicas_identical(self.model)
            self.tracker.info("weights identical on all %d ranks: %s", self.dist.world_size, identical)
        return {**last, "best_top1": self.state.best_top1, "minutes": (time.perf_counter() - start) / 60}

    def _out_of_steps(self) -> bool:
        return self.cfg.max_steps is not None and self.state.step >= self.cfg.max_steps

    def train_one_epoch(self, epoch: int) -> Dict[str, float]:
        self.train_model.train()
        loader = self.loaders.train
        loader.set_epoch(epoch)
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        images_seen = 0
        throughput = Throughput()
        self.tracker.start_bar(len(loader) // self.accum_steps, f"epoch {epoch + 1}/{self.cfg.epochs}")
        for i, (images, labels) in enumerate(loader):
            is_update = (i + 1) % self.accum_steps == 0
            loss = self._forward_backward(images, labels, sync=is_update)
            loss_sum += loss.detach().double() * labels.numel()
            images_seen += labels.numel()
            throughput.add(labels.numel())
            if not is_update:
                continue
            self._optimizer_step()
            self.tracker.update_bar(lr=f"{self._lr():.3g}")
            if self.state.step % self.cfg.log_interval == 0:
                self.tracker.info("epoch %d step %d loss %.4f lr %.4g img/s %.0f", epoch, self.state.step,
                                  loss.item(), self._lr(), throughput.rate * self.dist.world_size)
            if self._out_of_steps():
                break
        self.tracker.close_bar()
        totals = all_reduce_sum(torch.stack([loss_sum, torch.tensor(float(images_seen), device=self.device,
                                                                    dtype=torch.float64)]))
        train_loss = (totals[0] / totals[1].clamp_min(1)).item()
        if not math.isfinite(train_loss):
            self.tracker.info("warning: non-finite train loss in epoch %d", epoch)
        return {"train_loss": train_loss, "lr": self._lr(), "img_per_s": throughput.rate * self.dist.world_size}

    def _forward_backward(self, images: torch.Tensor, labels: torch.Tensor, sync: bool) -> torch.Tensor:
        no_sync = getattr(self.train_model, "no_sync", None)
        context = no_sync() if (no_sync is not None and not sync) else contextlib.nullcontext()
        with context:
            with self.precision.autocast():
                logits = self.train_model(images)
            loss = F.cross_entropy(logits.float(), labels)
            self.precision.scaler.scale(loss / self.accum_steps).backward()
        return loss

    def _optimizer_step(self) -> None:
        scaler = self.precision.scaler
        scaler.step(self.optimizer)
        scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        self.scheduler.step_update(num_updates=self.state.step)

    def _lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]
