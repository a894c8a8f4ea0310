"""The ``Loader`` contract: what the engine needs of an input pipeline, whichever backend it is.

The trainer and the evaluator see only this: they never know which backend runs.
"""
from typing import Any, Dict, Iterator, Protocol, Tuple

import torch


class Loader(Protocol):
    """Batches of one split on this rank, already on the device.

    - iterating yields ``(images, labels)``: float32 ``(B, 3, H, W)`` images normalised by the
      dataset's mean and std (in the run's memory format) and int64 labels;
    - a training loader's epoch is whole global batches (world size x B x accumulation steps;
      the rest of the samples is dropped), its batches are all full, and every update of the
      engine's gradient accumulation gets all of its micro-batches: so every backend and every
      world size with the same global batch takes the same optimiser steps per epoch;
    - ``len()`` is this rank's number of batches left in the current epoch, at any point of it
      (a multiple of the accumulation steps for a training loader at an update boundary); once
      an epoch is consumed, the next one is current;
    - ``set_epoch(epoch)`` starts epoch ``epoch`` from its first batch;
    - ``state_dict()`` / ``load_state_dict()`` save and restore the position inside an epoch, so
      that a resumed epoch continues with exactly the next batch. The position is the same on
      every rank (global samples consumed, and the last one's identity), so a state saved on one
      world size continues the same epoch on another that keeps the global batch.
    """

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]: ...

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int) -> None: ...

    def state_dict(self) -> Dict[str, Any]: ...

    def load_state_dict(self, state: Dict[str, Any]) -> None: ...
