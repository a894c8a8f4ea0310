"""The training recipe's pieces, each built from the config group that states it: the learning-rate
rule, optimiser and schedule (timm's), the loss, mixup/cutmix and the model EMA."""
from typing import Optional

import torch
import torch.nn as nn
from omegaconf import DictConfig
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.scheduler.scheduler import Scheduler
from timm.utils import ModelEmaV3

from scsa.errors import UserError

# optim.* keys that are not keyword arguments of the optimiser itself
_OPTIM_OWN_KEYS = ("name", "opt", "lr", "lr_base", "lr_base_size", "filter_bias_and_bn", "weight_decay")


def scaled_lr(optim: DictConfig, global_batch: int) -> float:
    """``optim.lr`` if set, else the linear scaling rule: ``lr_base * global_batch / lr_base_size``."""
    return optim.lr if optim.lr is not None else optim.lr_base * global_batch / optim.lr_base_size


def build_optimizer(optim: DictConfig, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """timm's optimiser ``optim.opt``; the group's other keys (momentum, betas, ...) are its arguments."""
    options = {k: v for k, v in optim.items() if k not in _OPTIM_OWN_KEYS}
    return create_optimizer_v2(model, opt=optim.opt, lr=lr, weight_decay=optim.weight_decay,
                               filter_bias_and_bn=optim.filter_bias_and_bn, **options)


def build_scheduler(schedule: DictConfig, optimizer: torch.optim.Optimizer, epochs: int,
                    updates_per_epoch: int) -> Scheduler:
    """timm's scheduler ``schedule.sched`` over ``epochs`` epochs of ``updates_per_epoch`` steps."""
    options = {k: v for k, v in schedule.items() if k not in ("name", "sched")}
    scheduler, _ = create_scheduler_v2(optimizer, sched=schedule.sched, num_epochs=epochs,
                                       updates_per_epoch=updates_per_epoch, **options)
    return scheduler


def build_mixup(trainer: DictConfig, num_classes: int, batch_size: int) -> Optional[Mixup]:
    """timm's Mixup/CutMix (label smoothing folded into its soft targets), or None if both are off."""
    if trainer.mixup <= 0 and trainer.cutmix <= 0:
        return None
    if batch_size % 2:
        raise UserError(f"trainer.mixup/cutmix pair each batch with its reverse and need an even batch "
                        f"(data.batch_size={batch_size}): use an even data.batch_size")
    return Mixup(mixup_alpha=trainer.mixup, cutmix_alpha=trainer.cutmix, prob=trainer.mixup_prob,
                 switch_prob=trainer.mixup_switch_prob, label_smoothing=trainer.label_smoothing,
                 num_classes=num_classes)


def build_criterion(label_smoothing: float, mixup: Optional[Mixup]) -> nn.Module:
    """Soft-target cross-entropy behind mixup (its targets carry the smoothing), else plain cross-entropy."""
    return SoftTargetCrossEntropy() if mixup else nn.CrossEntropyLoss(label_smoothing=label_smoothing)


def build_model_ema(trainer: DictConfig, model: nn.Module) -> Optional[ModelEmaV3]:
    """timm's ModelEmaV3 of ``model``'s weights with ``trainer.model_ema=true``, else None."""
    return ModelEmaV3(model, decay=trainer.model_ema_decay) if trainer.model_ema else None
