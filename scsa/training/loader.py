"""The ``Loader`` contract: what the engine needs of an input pipeline, whichever backend it is.

The trainer and the evaluator see only this: they never know which backend runs.
"""
from typing import Any, Dict, Iterator, Protocol, Tuple

import torch


class Loader(Protocol):
    """Batches of one split on this rank, already on the device.

    - iterating yields ``(images, labels)``: float32 ``(B, 3, H, W)`` images normalised by the
      dataset's mean and std (in the run's memory format) and int64 labels; a training loader's
      batches are all full (an epoch's last partial batch is dropped), so every backend takes
      the same number of steps per epoch;
    - ``len()`` is the number of batches left in the current epoch;
    - ``set_epoch(epoch)`` starts epoch ``epoch`` from its first batch;
    - ``state_dict()`` / ``load_state_dict()`` save and restore the position inside an epoch, so
      that a resumed epoch continues with exactly the next batch.
    """

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]: ...

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int) -> None: ...

    def state_dict(self) -> Dict[str, Any]: ...

    def load_state_dict(self, state: Dict[str, Any]) -> None: ...
