"""The training loop: epochs of optimiser steps, validation, checkpoints, metrics.

It is handed everything it works with, built: the model, optimiser, scheduler, loss, mixup and
model EMA, two ``Loader``s, the precision, the distributed context and a tracker. It does not
know which backbone, attention or input backend it is running, and reads no config beyond its
own ``TrainerConfig``. Its state can be saved at any step boundary and resumed from there
(mid-epoch included).
"""
import contextlib
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn
from omegaconf import DictConfig
from timm.data import Mixup
from timm.scheduler.scheduler import Scheduler
from timm.utils import ModelEmaV3

from scsa.attention.kernels.autotune import decide_kernels, kernel_decisions
from scsa.training import distributed
from scsa.training.checkpoint import keep_epoch_copy, save_atomic
from scsa.training.distributed import DistInfo
from scsa.training.evaluator import evaluate
from scsa.training.loader import Loader
from scsa.training.precision import Precision
from scsa.training.preemption import Preempted, PreemptionWatcher
from scsa.training.rng import get_rng_state, set_rng_state
from scsa.errors import UserError
from scsa.training.tracking import Throughput, Tracker


@dataclass(frozen=True)
class TrainerConfig:
    """The loop's own settings: ``trainer.*`` and ``checkpoint.*`` of the run config (conf/train.yaml)."""
    epochs: int
    max_steps: Optional[int]      # stop after this many optimiser steps in total
    accum_steps: int              # batches per optimiser step
    clip_grad: Optional[float]    # max global gradient norm
    max_nonfinite_steps: int      # skipped steps in a row before the run stops
    log_interval: int             # steps between train-loss lines
    compile: bool
    sync_bn: bool
    every_steps: int              # also checkpoint every N steps (0: off)
    every_minutes: float          # also checkpoint every N minutes (0: off)
    keep_last: int                # keep the last N epochs' checkpoints (0: off)

    def __post_init__(self):
        if self.accum_steps < 1:
            raise UserError(f"trainer.accum_steps={self.accum_steps}: use a positive int (1 = no accumulation)")

    @classmethod
    def from_config(cls, trainer: DictConfig, checkpoint: DictConfig) -> "TrainerConfig":
        merged = {**trainer, **checkpoint}
        return cls(**{f.name: merged[f.name] for f in fields(cls)})


def timed(loader: Iterable) -> Iterator[Tuple[torch.Tensor, torch.Tensor, float]]:
    """The loader's batches, each with the seconds spent waiting for it."""
    batches = iter(loader)
    while True:
        start = time.perf_counter()
        try:
            images, labels = next(batches)
        except StopIteration:
            return
        yield images, labels, time.perf_counter() - start


@dataclass
class TrainState:
    epoch: int = 0            # the epoch in progress (or the next to run)
    batch: int = 0            # loader batches of that epoch already consumed on this rank
    epoch_steps: int = 0      # optimiser updates of that epoch so far (skipped ones included)
    step: int = 0             # optimiser steps taken so far
    loss_sum: float = 0.0     # this rank's summed train loss over the epoch's images so far
    images: int = 0           # this rank's train images so far in the epoch
    best_top1: float = -1.0
    skipped_steps: int = 0    # steps skipped for a non-finite loss or gradient


def updates_per_epoch(batches: int, accum_steps: int) -> int:
    """Optimiser steps in an epoch of ``batches`` batches: whole groups of ``accum_steps`` (a train
    loader's epoch is whole global batches, so there is no rest)."""
    return batches // accum_steps


def elastic_accum_steps(loader_states: List[Dict[str, Any]], world_size: int, batch_size: int,
                        accum_steps: int) -> Tuple[int, Optional[str]]:
    """The accumulation steps that keep a checkpoint's global batch on this world size, and a line
    saying what was adjusted (None if nothing was). ``loader_states``: the checkpoint's, one per rank."""
    saved = loader_states[0] if loader_states else {}
    if "global_batch" not in saved:  # written before the global batch was recorded: nothing to keep
        return accum_steps, None
    global_batch = saved["global_batch"]
    if world_size * batch_size * accum_steps == global_batch:
        return accum_steps, None
    per_rank, rest = divmod(global_batch, world_size * batch_size)
    if rest or per_rank == 0:
        rows = global_batch // batch_size if global_batch % batch_size == 0 else 0
        worlds = [str(w) for w in range(1, rows + 1) if rows % w == 0]
        fix = (f"run on {', '.join(worlds)} ranks" if worlds
               else f"use data.batch_size={saved['batch_size']}, as the checkpoint did")
        saved_accum = global_batch // (saved["world_size"] * saved["batch_size"])
        raise UserError(f"the checkpoint's global batch of {global_batch} samples ({saved['world_size']} ranks x "
                        f"data.batch_size={saved['batch_size']} x trainer.accum_steps={saved_accum}) cannot be kept "
                        f"on {world_size} ranks x data.batch_size={batch_size}: {fix}")
    return per_rank, (f"resuming a {saved['world_size']}-rank checkpoint on {world_size} ranks: trainer.accum_steps "
                      f"{accum_steps} -> {per_rank} keeps the global batch of {global_batch} samples (the same "
                      f"optimiser steps and lr schedule)")


class Trainer:
    def __init__(self, cfg: TrainerConfig, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: Scheduler, criterion: nn.Module, train_loader: Loader, val_loader: Loader,
                 precision: Precision, dist: DistInfo, device: torch.device, tracker: Tracker,
                 checkpoint_dir: Path, meta: Dict[str, Any], mixup: Optional[Mixup] = None,
                 ema: Optional[ModelEmaV3] = None):
        self.cfg = cfg
        self.model = model                  # the bare module: what checkpoints hold
        self.train_model = model            # compiled and/or DDP-wrapped: what steps run
        self.eval_model = model             # compiled, never DDP-wrapped: ranks validate unequal shards
        self.optimizer, self.scheduler, self.criterion = optimizer, scheduler, criterion
        self.train_loader, self.val_loader = train_loader, val_loader
        self.precision, self.dist, self.device = precision, dist, device
        self.tracker, self.checkpoint_dir = tracker, checkpoint_dir
        self.meta = meta                    # config, classes, params, flops: stored in checkpoints
        self.mixup, self.ema = mixup, ema
        self.state = TrainState()
        self.nonfinite_in_a_row = 0
        self.last_save = time.monotonic()
        self.kernels_logged = False  # kernel=auto's decisions go to the tracker after this process's first step

    def wrap(self) -> None:
        """SyncBN, torch.compile, then DDP (compile goes inside the DDP wrap)."""
        model = self.model
        if self.dist.distributed and self.cfg.sync_bn:
            if self.device.type != "cuda":
                raise UserError(f"trainer.sync_bn=true needs CUDA (torch's SyncBatchNorm has no {self.device.type} "
                                "kernels): leave it false there; BN statistics are still averaged across ranks "
                                "before each validation")
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
            "state": asdict(self.state), "rng": get_rng_state(), "metrics": metrics or {}, **self.meta,
            **({"model_ema": self.ema.module.state_dict()} if self.ema else {}),
        }

    def save(self, name: str, metrics: Optional[Dict[str, Any]] = None) -> bool:
        """Write a checkpoint from rank 0; every rank calls this (loader positions are gathered).
        False if it was not written because the weights are not finite."""
        loader_states = distributed.gather_objects(self.train_loader.state_dict())
        if not all(torch.isfinite(t).all() for t in self.model.state_dict().values() if t.is_floating_point()):
            self.tracker.warning(f"not writing {name}: the model has non-finite weights at step {self.state.step}")
            return False
        if self.dist.is_main:
            save_atomic({**self.state_dict(metrics), "loader": loader_states}, self.checkpoint_dir / name,
                        keep_previous=name == "last.pt")
        self.last_save = time.monotonic()
        return True

    def resume(self, path: Path, checkpoint: Dict[str, Any]) -> None:
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        self.precision.scaler.load_state_dict(checkpoint["scaler"])
        if self.ema:  # a checkpoint written without EMA starts the average from the loaded weights
            self.ema.module.load_state_dict(checkpoint.get("model_ema", checkpoint["model"]))
        self.state = TrainState(**checkpoint["state"])
        set_rng_state(checkpoint["rng"])
        loader_states = checkpoint.get("loader") or []
        if loader_states and "samples_done" not in loader_states[0]:  # an earlier version's position by index
            if self.state.batch:
                raise UserError(f"{path} was written mid-epoch by an earlier version, whose loader position "
                                f"this one cannot use: resume from an end-of-epoch checkpoint (resume=PATH), or "
                                f"resume=none")
        elif loader_states:  # the position is the same on every rank; a rank's own also has its random states
            own = self.dist.rank if len(loader_states) == self.dist.world_size else 0
            self.train_loader.load_state_dict(loader_states[own])
            self.state.batch = self.state.epoch_steps * self.cfg.accum_steps
        self.tracker.info("resumed from %s at epoch %d, batch %d, step %d", path, self.state.epoch,
                          self.state.batch, self.state.step)

    # ---- the loop ----------------------------------------------------------------------
    def fit(self) -> Dict[str, Any]:
        start = time.perf_counter()
        last: Dict[str, Any] = {}
        watcher = PreemptionWatcher()
        try:
            while not self.finished:
                last = self.run_epoch(watcher)
                if self._out_of_steps():
                    break
        finally:
            watcher.close()
        if self.dist.distributed:
            identical = distributed.replicas_identical(self.model)
            self.tracker.info("weights identical on all %d ranks: %s", self.dist.world_size, identical)
        return {**last, "best_top1": self.state.best_top1, "minutes": (time.perf_counter() - start) / 60}

    def run_epoch(self, watcher: PreemptionWatcher) -> Dict[str, Any]:
        epoch = self.state.epoch
        train = self.train_one_epoch(epoch, watcher)
        if not self.cfg.sync_bn:  # ranks agree on BN stats
            for model in (self.model, self.ema.module) if self.ema else (self.model,):
                distributed.average_batchnorm(model, self.dist.world_size)
        val = evaluate(self.eval_model, self.val_loader, self.precision, self.device)
        self.scheduler.step(epoch + 1)  # epoch-based schedules; per-step ones move in step_update
        self.state.epoch, self.state.batch, self.state.epoch_steps = epoch + 1, 0, 0
        self.state.loss_sum, self.state.images = 0.0, 0
        record = {"epoch": epoch, **train, "val_loss": val["loss"], "val_top1": val["top1"],
                  "val_top5": val["top5"], "val_images": val["images"], "step": self.state.step,
                  "skipped_steps": self.state.skipped_steps}
        if self.ema:
            val_ema = evaluate(self.ema.module, self.val_loader, self.precision, self.device)
            record.update(val_loss_ema=val_ema["loss"], val_top1_ema=val_ema["top1"], val_top5_ema=val_ema["top5"])
        is_best = val["top1"] > self.state.best_top1
        self.state.best_top1 = max(self.state.best_top1, val["top1"])
        # best.pt, last.pt, then the epoch's line: a kill between any two redoes the epoch (best.pt included) from
        # the previous last.pt, or finds last.pt's own record to restore the line on resume (Tracker.keep_epochs);
        # a line never names an epoch that no checkpoint holds.
        if is_best:
            self.save("best.pt", record)
        if self.save("last.pt", record) and self.cfg.keep_last and self.dist.is_main:
            keep_epoch_copy(self.checkpoint_dir / "last.pt", epoch, self.cfg.keep_last)
        self.tracker.log_epoch(record)
        return record

    @property
    def finished(self) -> bool:
        """All epochs done, or the step budget spent at an epoch boundary: nothing left to train."""
        return self.state.epoch >= self.cfg.epochs or (self._out_of_steps() and self.state.batch == 0)

    def _out_of_steps(self) -> bool:
        return self.cfg.max_steps is not None and self.state.step >= self.cfg.max_steps

    def train_one_epoch(self, epoch: int, watcher: PreemptionWatcher) -> Dict[str, float]:
        self.train_model.train()
        loader = self.train_loader
        if self.state.batch == 0:  # a resumed epoch is already positioned (load_state_dict)
            loader.set_epoch(epoch)
        epoch_batches = self.state.batch + len(loader)
        if epoch_batches % self.cfg.accum_steps:  # a short last group would carry gradients into the next epoch
            raise RuntimeError(f"the train loader's epoch has {epoch_batches} batches, not whole groups of "
                               f"trainer.accum_steps={self.cfg.accum_steps}: it breaks the Loader contract")
        throughput = Throughput()
        self.tracker.start_bar(updates_per_epoch(epoch_batches, self.cfg.accum_steps),
                               f"epoch {epoch + 1}/{self.cfg.epochs}", initial=self.state.batch // self.cfg.accum_steps)
        pending_loss, pending_images = torch.zeros((), dtype=torch.float64, device=self.device), 0
        try:
            for images, labels, wait in timed(loader):
                # Groups of accum_steps batches; the loader's epoch is whole groups (whole global
                # batches), so every update has all of them and nothing carries over into the next epoch.
                self.state.batch += 1
                is_update = self.state.batch % self.cfg.accum_steps == 0
                images, targets = self.mixup(images, labels) if self.mixup else (images, labels)
                loss = self._forward_backward(images, targets, sync=is_update)
                if not self.kernels_logged:
                    self.kernels_logged = True
                    self.tracker.log_kernels(kernel_decisions())
                pending_loss += loss.double() * len(images)
                pending_images += len(images)
                throughput.add(len(images), wait)
                if not is_update:
                    continue
                nonfinite, preempt = self._step_flags(loss, self._clip_gradients(), watcher)
                self.state.epoch_steps += 1
                if nonfinite:
                    self._skip_step()
                else:
                    self._optimizer_step(pending_loss.item(), pending_images)
                    self._log_step(epoch, loss, throughput)
                pending_loss.zero_()
                pending_images = 0
                if preempt:
                    self.save("last.pt")
                    raise Preempted(f"signal {watcher.received}: checkpoint written at step {self.state.step}")
                if self._periodic_save_due():
                    self.save("last.pt")
                if self._out_of_steps():
                    break
        finally:
            self.tracker.close_bar()
        totals = distributed.all_reduce_sum(torch.tensor([self.state.loss_sum, float(self.state.images)],
                                                         dtype=torch.float64, device=self.device))
        return {"train_loss": (totals[0] / totals[1].clamp_min(1)).item(), "lr": self._lr(),
                "img_per_s": throughput.rate * self.dist.world_size}

    def _log_step(self, epoch: int, loss: torch.Tensor, throughput: Throughput) -> None:
        self.tracker.update_bar(loss=f"{loss.item():.3f}", lr=f"{self._lr():.3g}")
        if self.state.step % self.cfg.log_interval:
            return
        rate, data = throughput.rate * self.dist.world_size, throughput.data_fraction
        self.tracker.info("epoch %d step %d loss %.4f lr %.4g img/s %.0f data %.0f%%", epoch, self.state.step,
                          loss.item(), self._lr(), rate, 100 * data)
        self.tracker.log_step({"loss": loss.item(), "lr": self._lr(), "img_per_s": rate, "data_fraction": data},
                              self.state.step)

    def _forward_backward(self, images: torch.Tensor, targets: torch.Tensor, sync: bool) -> torch.Tensor:
        """Forward and backward of one micro-batch of an update over ``accum_steps`` micro-batches;
        DDP all-reduces gradients only on the update's last one (``sync``)."""
        no_sync = getattr(self.train_model, "no_sync", None)
        context = no_sync() if (no_sync is not None and not sync) else contextlib.nullcontext()
        with context:
            with self.precision.autocast():
                if self.cfg.compile and not self.kernels_logged:  # decide before the graph is traced
                    decide_kernels(self.model, images)
                logits = self.train_model(images)
            loss = self.criterion(logits.float(), targets)
            self.precision.scaler.scale(loss / self.cfg.accum_steps).backward()
        return loss.detach()

    def _clip_gradients(self) -> torch.Tensor:
        """The global gradient norm (after DDP's all-reduce, so equal on all ranks), clipped if asked."""
        self.precision.scaler.unscale_(self.optimizer)
        max_norm = self.cfg.clip_grad if self.cfg.clip_grad is not None else float("inf")
        return nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)

    def _step_flags(self, loss: torch.Tensor, grad_norm: torch.Tensor, watcher: PreemptionWatcher):
        """(skip this step, stop for preemption), agreed by all ranks in one small all-reduce."""
        nonfinite = ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
        if self.precision.scaler.is_enabled():
            nonfinite = torch.zeros_like(nonfinite)  # fp16: GradScaler skips such steps itself
        flags = torch.stack([nonfinite.to(torch.int32),
                             torch.tensor(int(watcher.received is not None), device=loss.device)])
        nonfinite_flag, preempt_flag = distributed.all_reduce_max(flags).tolist()
        return bool(nonfinite_flag), bool(preempt_flag)

    def _optimizer_step(self, loss_sum: float, images: int) -> None:
        scaler = self.precision.scaler
        scaler.step(self.optimizer)
        scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        self.state.loss_sum += loss_sum
        self.state.images += images
        self.nonfinite_in_a_row = 0
        if self.ema:
            self.ema.update(self.model, step=self.state.step)
        self.scheduler.step_update(num_updates=self.state.step)

    def _skip_step(self) -> None:
        """Drop a step whose loss or gradient is not finite; stop after too many in a row."""
        self.optimizer.zero_grad(set_to_none=True)
        self.precision.scaler.update()
        self.state.skipped_steps += 1
        self.nonfinite_in_a_row += 1
        self.tracker.info("warning: non-finite loss or gradient at step %d (epoch %d, batch %d): step skipped "
                          "(%d in a row)", self.state.step, self.state.epoch, self.state.batch,
                          self.nonfinite_in_a_row)
        if self.nonfinite_in_a_row >= self.cfg.max_nonfinite_steps:
            raise UserError(f"training diverged: {self.nonfinite_in_a_row} non-finite losses/gradients in a row "
                            f"up to step {self.state.step} (epoch {self.state.epoch}, batch {self.state.batch}): "
                            f"lower optim.lr or set trainer.clip_grad (checkpoints with finite weights stay in "
                            f"{self.checkpoint_dir})")

    def _periodic_save_due(self) -> bool:
        if self.cfg.every_steps and self.state.step % self.cfg.every_steps == 0:
            return True
        if self.cfg.every_minutes:  # rank 0's clock decides for everyone
            due = torch.tensor(int(time.monotonic() - self.last_save >= 60 * self.cfg.every_minutes),
                               device=self.device)
            return bool(distributed.broadcast_from_main(due).item())
        return False

    def _lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]
