"""Top-k accuracy counts, summed exactly across ranks."""
from typing import Dict, Sequence

import torch

from scsa.training.distributed import all_reduce_sum


class ClassificationMeter:
    """Sums of loss, top-1/top-5 hits and images over batches; ``compute`` reduces over ranks.

    Sums (not means of means) keep the result exact for any shard sizes, including a rank
    that saw no images.
    """

    def __init__(self, device: torch.device, topk: Sequence[int] = (1, 5)):
        self.topk = tuple(topk)
        self.sums = torch.zeros(2 + len(self.topk), dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, labels: torch.Tensor, loss_sum: torch.Tensor) -> None:
        maxk = min(max(self.topk), logits.shape[1])
        hits = logits.topk(maxk, dim=1).indices.eq(labels[:, None])
        counts = [hits[:, :min(k, maxk)].any(dim=1).sum() for k in self.topk]
        self.sums += torch.stack([loss_sum.double(), torch.tensor(labels.numel(), device=labels.device),
                                  *counts]).to(self.sums)

    def compute(self) -> Dict[str, float]:
        loss, images, *hits = all_reduce_sum(self.sums.clone()).tolist()
        images_safe = max(images, 1.0)
        result = {"loss": loss / images_safe, "images": int(images)}
        result.update({f"top{k}": 100.0 * h / images_safe for k, h in zip(self.topk, hits)})
        return result
