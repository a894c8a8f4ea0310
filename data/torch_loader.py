"""The torchvision backend: PIL decoding and the train/val presets in worker processes.

Batches stay uint8 until they reach the device (``data.device`` normalises them there), so
only a quarter of float32's bytes cross the host-device link.
"""
import io
import logging
import random
from typing import Dict, Iterator, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from timm.data.auto_augment import rand_augment_transform
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms

from data.order import Source
from data.sampling import TrainOrder, val_indices

log = logging.getLogger(__name__)


class ImageList(Dataset):
    """A source's samples as (image, label, id); an unreadable one is replaced by the next.

    A file that fails to decode mid-run is reported with its name and replaced by the next
    sample, so one bad JPEG never ends a run hours in (``python -m data.scan`` lists them
    all up front).
    """

    def __init__(self, source: Source, transform):
        self.source, self.transform = source, transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, item: Union[int, Tuple[int, int]]):
        """``item`` is an index, or (index, seed): then the augmentation draws from that seed alone
        (torch's generator, and Python's and NumPy's, which timm's RandAugment uses)."""
        index, seed = item if isinstance(item, tuple) else (item, None)
        if seed is None:
            return self._load(index)
        python_state, numpy_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                # the CPU generator alone: torch.manual_seed would also queue a CUDA seeding (with a captured
                # stack) in every worker, 0.2-0.3 ms a sample against ~1 us here
                torch.default_generator.manual_seed(seed)
                random.seed(seed)
                np.random.seed(seed % 2**32)
                return self._load(index)
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)

    def _load(self, index: int):
        try:
            with Image.open(io.BytesIO(self.source.read(index))) as image:
                sample = self.transform(image.convert("RGB"))
        except (OSError, ValueError) as e:
            log.warning("skipping unreadable image %s (%s): run `python -m data.scan` to list bad files",
                        self.source.name(index), e)
            return self._load((index + 1) % len(self))
        return sample, int(self.source.labels[index]), int(self.source.ids[index].view(np.int64))


class OrderSampler(Sampler[Tuple[int, int]]):
    """This rank's samples of the epoch from the current position (``TrainOrder``), each with its
    augmentation seed: a resumed epoch replays the remaining batches exactly."""

    def __init__(self, order: TrainOrder):
        self.order = order

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        indices = self.order.plan().ravel()
        return iter(zip(indices.tolist(), self.order.augment_seeds(indices).tolist()))

    def __len__(self) -> int:
        return len(self.order) * self.order.batch_size


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
    """A DataLoader's ``(images, labels, ids)`` batches moved to ``device``; for training, its
    position in the epoch is ``order``'s (``len()``: this rank's batches left in the epoch)."""

    def __init__(self, loader: DataLoader, device: torch.device, order: Optional[TrainOrder] = None):
        self.loader, self.device, self.order = loader, device, order

    def __len__(self) -> int:
        return len(self.order) if self.order is not None else len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        if self.order is not None:
            self.order.set_epoch(epoch)

    def state_dict(self) -> Dict[str, int]:
        return self.order.state_dict() if self.order is not None else {}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        if self.order is not None:
            self.order.load_state_dict(state)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for images, labels, ids in self.loader:
            if self.order is not None:
                self.order.consumed()
            yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True), ids
        if self.order is not None:
            self.order.finished()


def build_torch_loader(source: Source, *, train: bool, batch_size: int, accum_steps: int, image_size: int,
                       val_resize: int, scale: Sequence[float], ratio: Sequence[float], hflip: float,
                       randaugment_n: int, randaugment_m: int, fill: int, workers: int, rank: int, world_size: int,
                       seed: int, device: torch.device) -> TorchLoader:
    """This rank's uint8 NCHW loader for one split (train: the global order, whole global batches)."""
    transform = (train_transform(image_size, scale, ratio, hflip, randaugment_n, randaugment_m, fill) if train
                 else val_transform(image_size, val_resize))
    order = TrainOrder(source, seed=seed, rank=rank, world_size=world_size, batch_size=batch_size,
                       accum_steps=accum_steps) if train else None
    # A generator of its own: starting an epoch then draws nothing from torch's global one, which the
    # engine's random streams (random erasing, dropout) share, so a resumed run replays them exactly.
    sampler = OrderSampler(order) if train else val_indices(len(source), rank, world_size).tolist()
    loader = DataLoader(ImageList(source, transform), sampler=sampler, batch_size=batch_size, num_workers=workers,
                        pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                        generator=torch.Generator().manual_seed(seed))
    return TorchLoader(loader, device, order)
