"""The one layer between a backend's uint8 batches and the engine's ``Loader`` contract.

Both backends (``TorchLoader``, ``DaliLoader``) keep the rest of that contract (length, epochs,
position) but hand over uint8 ``(B, 3, H, W)`` images on the device, with labels and sample ids
(``data.order.sample_id``); here, for either of them
alike, they become float32 normalised by the dataset's mean and std, in the requested memory
format, and (training only) randomly erased with timm's ``RandomErasing``.
"""
from typing import Dict, Iterator, Optional, Sequence, Tuple

import torch
from timm.data.random_erasing import RandomErasing

from scsa.training.loader import Loader


def normalise(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 images as float32 ``(x - mean) / std`` (0-255 ``mean``/``std``, shaped to broadcast)."""
    return images.float().sub_(mean).div_(std)


class DeviceLoader:
    """A backend's batches as normalised float32 images (0-255 ``mean``/``std``, RGB) and int64 labels."""

    def __init__(self, backend: Loader, mean: Sequence[float], std: Sequence[float], device: torch.device,
                 channels_last: bool, erase_prob: float = 0.0):
        self.backend = backend
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.erase: Optional[RandomErasing] = (RandomErasing(erase_prob, mode="pixel", device=device)
                                               if erase_prob > 0 else None)

    def __len__(self) -> int:
        return len(self.backend)

    def set_epoch(self, epoch: int) -> None:
        self.backend.set_epoch(epoch)

    def state_dict(self) -> Dict:
        return self.backend.state_dict()

    def load_state_dict(self, state: Dict) -> None:
        self.backend.load_state_dict(state)

    def items(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``(images, labels, ids)``: the batches with their samples' ids (int64 views of the uint64
        ``sample_id``s), to check which samples a run saw."""
        for images, labels, ids in self.backend:
            images = normalise(images.contiguous(memory_format=self.memory_format), self.mean, self.std)
            if self.erase is not None:
                images = self.erase(images)
            yield images, labels, ids

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        return ((images, labels) for images, labels, _ in self.items())
