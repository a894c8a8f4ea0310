"""``build_loaders(cfg)``: train and val iterables with one batch interface.

Whichever backend runs (DALI or torchvision), a loader yields ``(images, labels)`` already on
the device: normalised float NCHW images and int64 labels, ``len()`` batches left in the
epoch on this rank, ``set_epoch(epoch, start_batch)`` and ``state_dict()``/``load_state_dict()``
for whatever position the backend keeps itself. Validation shards cover every image exactly once.
"""
from dataclasses import dataclass
from typing import Iterator, List, Tuple

import torch
from omegaconf import DictConfig
from timm.data.loader import PrefetchLoader
from timm.data.random_erasing import RandomErasing

from data.folder import check_dataset_root, read_bad_files
from data.torch_loader import build_torch_loaders
from scsa.errors import UserError


@dataclass
class Loaders:
    train: "DeviceLoader"
    val: "DeviceLoader"
    classes: List[str]
    backend: str


class DeviceLoader:
    """A torch DataLoader whose batches arrive normalised on the device (prefetched on CUDA)."""

    def __init__(self, loader: torch.utils.data.DataLoader, mean, std, device: torch.device, channels_last: bool):
        self.sampler = loader.sampler
        self.batch_size = loader.batch_size
        self.channels_last = channels_last
        self.prefetcher = PrefetchLoader(loader, mean=[m / 255 for m in mean], std=[s / 255 for s in std],
                                         device=device)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Start ``epoch`` at batch ``start_batch`` (a resumed epoch skips what it has seen)."""
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch, start_batch * self.batch_size)

    def state_dict(self) -> dict:
        return {}  # the position is (epoch, start_batch), which the trainer keeps

    def load_state_dict(self, state: dict) -> None:
        pass

    def __len__(self) -> int:
        return len(self.prefetcher)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        for images, labels in self.prefetcher:
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            yield images, labels


class RandomErasingLoader:
    """timm's random erasing on a loader's normalised device batches (either backend)."""

    def __init__(self, loader, probability: float, device: torch.device):
        self.loader = loader
        self.erase = RandomErasing(probability, mode="pixel", device=device)

    def __getattr__(self, name: str):
        return getattr(self.loader, name)  # set_epoch, state_dict, load_state_dict, ...

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        for images, labels in self.loader:
            yield self.erase(images), labels


def resolve_backend(requested: str) -> str:
    """``auto`` picks DALI where it is installed, else torchvision."""
    if requested not in ("auto", "dali", "torch"):
        raise UserError(f"unknown data.loader '{requested}': use auto, dali or torch")
    if requested == "torch":
        return "torch"
    try:
        from data.dali import dali_available
    except ImportError:
        dali_available = lambda: False  # noqa: E731
    if dali_available():
        return "dali"
    if requested == "dali":
        raise UserError("data.loader=dali but NVIDIA DALI is not installed: pip install -r requirements.txt, "
                        "or use data.loader=torch")
    return "torch"


def build_loaders(cfg: DictConfig, *, rank: int, world_size: int, device: torch.device,
                  seed: int, channels_last: bool) -> Loaders:
    """Validate ``cfg.root`` and build this rank's train/val loaders."""
    classes = check_dataset_root(cfg.root)
    skip_files = read_bad_files(cfg.root)
    backend = resolve_backend(cfg.loader)
    common = dict(batch_size=cfg.batch_size, image_size=cfg.image_size, val_resize=cfg.val_resize,
                  scale=tuple(cfg.scale), ratio=tuple(cfg.ratio), hflip=cfg.hflip, workers=cfg.workers,
                  rank=rank, world_size=world_size, seed=seed, skip_files=skip_files,
                  randaugment_n=cfg.get("randaugment_n", 0), randaugment_m=cfg.get("randaugment_m", 9))
    if backend == "dali":
        from data.dali import build_dali_loaders
        train, val = build_dali_loaders(cfg.root, mean=cfg.mean, std=cfg.std, device=device,
                                        channels_last=channels_last, **common)
    else:
        train, val, _ = build_torch_loaders(cfg.root, pin_memory=device.type == "cuda", **common)
        train, val = (DeviceLoader(loader, cfg.mean, cfg.std, device, channels_last) for loader in (train, val))
    if cfg.get("re_prob", 0) > 0:
        train = RandomErasingLoader(train, cfg.re_prob, device)
    return Loaders(train, val, classes, backend)
