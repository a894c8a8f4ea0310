"""One pass over a validation loader: loss, top-1, top-5, images counted."""
from typing import Dict, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from scsa.training.metrics import ClassificationMeter
from scsa.training.precision import Precision


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, precision: Precision, device: torch.device) -> Dict[str, float]:
    """Metrics over every rank's shard (each image counted once across ranks)."""
    model.eval()
    meter = ClassificationMeter(device)
    for images, labels in loader:
        if labels.numel() == 0:
            continue
        with precision.autocast():
            logits = model(images)
        loss_sum = F.cross_entropy(logits.float(), labels, reduction="sum")
        meter.update(logits, labels, loss_sum)
    return meter.compute()
