"""The torchvision input pipeline: ImageFolder + the train/val presets, uint8 batches.

Workers decode and crop; normalisation happens on the device (timm's PrefetchLoader),
so only uint8 crosses the host-device link.
"""
import logging
import random
from pathlib import Path
from typing import Collection, Iterator, List, Sequence, Tuple, Union

import numpy as np
import torch
from timm.data.auto_augment import rand_augment_transform
from torch.utils.data import DataLoader, DistributedSampler, Sampler
from torchvision import datasets, transforms

log = logging.getLogger(__name__)
FILL_RGB = (124, 116, 104)  # RandAugment fills uncovered pixels with the ImageNet mean


class SafeImageFolder(datasets.ImageFolder):
    """ImageFolder that skips listed bad files and survives an unreadable one.

    A file that fails to decode mid-run is reported with its path and replaced by the next
    sample, so one bad JPEG never ends a run hours in (``python -m data.scan`` lists them
    all up front).
    """

    def __init__(self, root: str, transform, skip_files: Collection[str] = ()):
        base = Path(root).parent
        skip = {str(base / f) for f in skip_files}
        super().__init__(root, transform=transform, is_valid_file=lambda p: (
            p.lower().endswith(datasets.folder.IMG_EXTENSIONS) and p not in skip))

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
        try:
            return super().__getitem__(index)
        except (OSError, ValueError) as e:
            log.warning("skipping unreadable image %s (%s): run `python -m data.scan` to list bad files",
                        self.samples[index][0], e)
            return self._load((index + 1) % len(self))


class EpochSampler(DistributedSampler):
    """DistributedSampler that can start mid-epoch and gives every sample its own seed.

    Augmentations then depend on (seed, epoch, index) only, not on worker count or on where
    a run was interrupted: a resumed epoch replays the remaining batches exactly.
    """

    def __init__(self, dataset, num_replicas: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas, rank, shuffle=True, seed=seed)
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        super().set_epoch(epoch)
        self.start = start

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
                    randaugment_n: int = 0, randaugment_m: int = 9):
    """RandomResizedCrop + flip (the paper's), then timm's RandAugment when ``randaugment_n`` > 0."""
    steps = [transforms.RandomResizedCrop(image_size, scale=tuple(scale), ratio=tuple(ratio), antialias=True),
             transforms.RandomHorizontalFlip(hflip)]
    if randaugment_n > 0:
        steps.append(rand_augment_transform(f"rand-m{randaugment_m}-n{randaugment_n}",
                                            dict(translate_const=int(image_size * 0.45), img_mean=FILL_RGB)))
    return transforms.Compose([*steps, transforms.PILToTensor()])


def val_transform(image_size: int, val_resize: int):
    return transforms.Compose([
        transforms.Resize(val_resize, antialias=True),
        transforms.CenterCrop(image_size),
        transforms.PILToTensor(),
    ])


def build_torch_loaders(root: str, *, batch_size: int, image_size: int, val_resize: int,
                        scale: Sequence[float], ratio: Sequence[float], hflip: float, workers: int,
                        rank: int, world_size: int, seed: int, pin_memory: bool, randaugment_n: int = 0,
                        randaugment_m: int = 9,
                        skip_files: Collection[str] = ()) -> Tuple[DataLoader, DataLoader, List[str]]:
    """uint8 NCHW train/val loaders sharded over ``world_size`` ranks, and the class names."""
    augment = train_transform(image_size, scale, ratio, hflip, randaugment_n, randaugment_m)
    train_set = SafeImageFolder(f"{root}/train", augment, skip_files)
    val_set = SafeImageFolder(f"{root}/val", val_transform(image_size, val_resize), skip_files)
    common = dict(batch_size=batch_size, num_workers=workers, pin_memory=pin_memory,
                  persistent_workers=workers > 0)
    train = DataLoader(train_set, sampler=EpochSampler(train_set, world_size, rank, seed), drop_last=True, **common)
    val = DataLoader(val_set, sampler=ShardSampler(len(val_set), rank, world_size), **common)
    return train, val, train_set.classes
