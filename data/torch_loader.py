"""The torchvision backend: PIL decoding and the train/val presets in worker processes.

Batches stay uint8 until they reach the device (``data.device`` normalises them there), so
only a quarter of float32's bytes cross the host-device link.
"""
import logging
import random
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from timm.data.auto_augment import rand_augment_transform
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torchvision import transforms

log = logging.getLogger(__name__)


class ImageList(Dataset):
    """The listed images with their labels; an unreadable one is replaced by the next.

    A file that fails to decode mid-run is reported with its path and replaced by the next
    sample, so one bad JPEG never ends a run hours in (``python -m data.scan`` lists them
    all up front).
    """

    def __init__(self, root: str, files: Sequence[str], labels: Sequence[int], transform):
        self.root, self.files, self.labels, self.transform = Path(root), list(files), list(labels), transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, item: Union[int, Tuple[int, int]]):
        """``item`` is an index, or (index, seed): then the augmentation draws from that seed alone
        (torch's generator, and Python's and NumPy's, which timm's RandAugment uses)."""
        index, seed = item if isinstance(item, tuple) else (item, None)
        if seed is None:
            return self._load(index)
        python_state, numpy_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                random.seed(seed)
                np.random.seed(seed % 2**32)
                return self._load(index)
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)

    def _load(self, index: int):
        path = self.root / self.files[index]
        try:
            with Image.open(path) as image:
                return self.transform(image.convert("RGB")), self.labels[index]
        except (OSError, ValueError) as e:
            log.warning("skipping unreadable image %s (%s): run `python -m data.scan` to list bad files", path, e)
            return self._load((index + 1) % len(self))


class EpochSampler(DistributedSampler):
    """DistributedSampler that can start mid-epoch and gives every sample its own seed.

    Augmentations then depend on (seed, epoch, index) only, not on worker count or on where
    a run was interrupted: a resumed epoch replays the remaining batches exactly. Each rank
    takes ``floor(N / world_size)`` samples of the epoch's shuffle (the rest wait for a later
    epoch), as DALI's sharded reader does.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas, rank, shuffle=True, seed=seed, drop_last=True)
        self.start = 0  # samples of the epoch already seen

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        base = (self.seed * 1_000_003 + self.epoch) * 1_000_003
        return iter([(i, (base + i) % 2**63) for i in list(super().__iter__())[self.start:]])

    def __len__(self) -> int:
        return self.num_samples - self.start


class ShardSampler(Sampler[int]):
    """Every ``world_size``-th index from ``rank``: each sample on exactly one rank, no padding."""

    def __init__(self, size: int, rank: int, world_size: int):
        self.indices = list(range(rank, size, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def train_transform(image_size: int, scale: Sequence[float], ratio: Sequence[float], hflip: float,
                    randaugment_n: int, randaugment_m: int, fill: int):
    """RandomResizedCrop + flip (the paper's), then timm's RandAugment when ``randaugment_n`` > 0,
    filling uncovered pixels with grey level ``fill``."""
    steps = [transforms.RandomResizedCrop(image_size, scale=tuple(scale), ratio=tuple(ratio), antialias=True),
             transforms.RandomHorizontalFlip(hflip)]
    if randaugment_n > 0:
        steps.append(rand_augment_transform(f"rand-m{randaugment_m}-n{randaugment_n}",
                                            dict(translate_const=int(image_size * 0.45), img_mean=(fill,) * 3)))
    return transforms.Compose([*steps, transforms.PILToTensor()])


def val_transform(image_size: int, val_resize: int):
    """Resize the shorter side to ``val_resize``, centre-crop ``image_size``: uint8 CHW."""
    return transforms.Compose([
        transforms.Resize(val_resize, antialias=True),
        transforms.CenterCrop(image_size),
        transforms.PILToTensor(),
    ])


class TorchLoader:
    """A DataLoader's batches moved to ``device``, and (for training) its position in the epoch."""

    def __init__(self, loader: DataLoader, device: torch.device, epochs: Optional[EpochSampler] = None):
        self.loader, self.device, self.epochs = loader, device, epochs
        self.batch = 0  # batches of the epoch handed out

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        if self.epochs is not None:
            self.epochs.set_epoch(epoch)
            self.epochs.start = self.batch = 0

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": self.epochs.epoch, "batch": self.batch} if self.epochs is not None else {}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        if self.epochs is not None:
            self.epochs.set_epoch(state["epoch"])
            self.batch = state["batch"]
            self.epochs.start = self.batch * self.loader.batch_size

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        for images, labels in self.loader:
            self.batch += 1
            yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)


def build_torch_loader(root: str, files: List[str], labels: List[int], *, train: bool, batch_size: int,
                       image_size: int, val_resize: int, scale: Sequence[float], ratio: Sequence[float],
                       hflip: float, randaugment_n: int, randaugment_m: int, fill: int, workers: int,
                       rank: int, world_size: int, seed: int, device: torch.device) -> TorchLoader:
    """This rank's uint8 NCHW loader for one split (train: shuffled, last partial batch dropped)."""
    transform = (train_transform(image_size, scale, ratio, hflip, randaugment_n, randaugment_m, fill) if train
                 else val_transform(image_size, val_resize))
    dataset = ImageList(root, files, labels, transform)
    epochs = EpochSampler(dataset, world_size, rank, seed) if train else None
    # A generator of its own: starting an epoch then draws nothing from torch's global one, which the
    # engine's random streams (random erasing, dropout) share, so a resumed run replays them exactly.
    loader = DataLoader(dataset, sampler=epochs or ShardSampler(len(dataset), rank, world_size), drop_last=train,
                        batch_size=batch_size, num_workers=workers, pin_memory=device.type == "cuda",
                        persistent_workers=workers > 0, generator=torch.Generator().manual_seed(seed))
    return TorchLoader(loader, device, epochs)
