"""``build_loaders(cfg)``: this rank's train and val loaders, whichever backend runs.

Either backend (DALI or torchvision) reads the same file list and yields uint8 batches on the
device; ``DeviceLoader`` turns them into what the engine's ``Loader`` contract promises
(``scsa.training.loader``). Validation shards cover every image exactly once.
"""
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import List, Mapping, Optional, Tuple

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image

from data.device import DeviceLoader, normalise
from data.folder import check_dataset_root, list_images
from data.torch_loader import build_torch_loader, val_transform
from scsa.training.loader import Loader
from scsa.errors import UserError

BACKENDS = ("auto", "dali", "torch")


@dataclass
class Loaders:
    train: Optional[Loader]   # None when only val was asked for
    val: Loader
    classes: List[str]
    backend: str              # dali | torch


def resolve_backend(requested: str) -> str:
    """``auto`` picks DALI where it is installed, else torchvision."""
    if requested not in BACKENDS:
        raise UserError(f"unknown data.loader '{requested}': use {', '.join(BACKENDS)}")
    if requested == "torch":
        return "torch"
    from data.dali import dali_available
    if dali_available():
        return "dali"
    if requested == "dali":
        raise UserError("data.loader=dali but NVIDIA DALI is not installed: pip install -r requirements.txt, "
                        "or use data.loader=torch")
    return "torch"


def randaugment_fill(mean: List[float]) -> int:
    """The grey level RandAugment fills uncovered pixels with in both backends: the mean's
    average (DALI's RandAugment takes one fill value for all channels)."""
    return round(statistics.fmean(mean))


def build_loaders(cfg: DictConfig, *, rank: int, world_size: int, device: torch.device, seed: int,
                  channels_last: bool, train: bool = True) -> Loaders:
    """Validate ``cfg.root`` and build this rank's loaders (the val one only, with ``train=False``)."""
    splits = ("train", "val") if train else ("val",)
    classes = check_dataset_root(cfg.root, splits)
    backend = resolve_backend(cfg.loader)
    if backend == "dali":
        from data.dali import build_dali_loader as build
    else:
        build = build_torch_loader
    common = dict(batch_size=cfg.batch_size, image_size=cfg.image_size, val_resize=cfg.val_resize,
                  scale=tuple(cfg.scale), ratio=tuple(cfg.ratio), hflip=cfg.hflip, randaugment_n=cfg.randaugment_n,
                  randaugment_m=cfg.randaugment_m, fill=randaugment_fill(cfg.mean), workers=cfg.workers,
                  rank=rank, world_size=world_size, seed=seed, device=device)

    def loader(split: str) -> DeviceLoader:
        files, labels = list_images(cfg.root, split, classes)
        return DeviceLoader(build(cfg.root, files, labels, train=split == "train", **common), cfg.mean, cfg.std,
                            device, channels_last, erase_prob=cfg.re_prob if split == "train" else 0.0)

    loaders = Loaders(loader("train") if train else None, loader("val"), classes, backend)
    if train and len(loaders.train) == 0:
        raise UserError(f"'{cfg.root}/train' has too few images for one full batch of data.batch_size="
                        f"{cfg.batch_size} on each of {world_size} ranks: lower data.batch_size")
    return loaders


def val_sample(data: Mapping, classes: List[str], count: int) -> Tuple[torch.Tensor, torch.Tensor, List[int]]:
    """``count`` images spread evenly over ``data.root``'s val split (so over its classes) as the val
    loader presents them: uint8 crops, the normalised float32 batch, and their labels. For looking
    at a few images (attention maps), not for scoring."""
    root = data["root"]
    if not (Path(root) / "val").is_dir():
        raise ValueError(f"'{root}' has no val/ folder: pass cam.data_root=<the dataset the runs trained on>")
    files, labels = list_images(root, "val", classes)
    if not files:
        raise ValueError(f"'{root}/val' holds no images of the run's classes: pass cam.data_root=<its dataset>")
    picks = np.unique(np.linspace(0, len(files) - 1, min(count, len(files))).round().astype(int))
    crop = val_transform(data["image_size"], data["val_resize"])
    crops = []
    for i in picks:
        with Image.open(Path(root) / files[i]) as image:
            crops.append(crop(image.convert("RGB")))
    uint8 = torch.stack(crops)
    mean, std = (torch.tensor(data[k], dtype=torch.float32).view(1, 3, 1, 1) for k in ("mean", "std"))
    return uint8, normalise(uint8, mean, std), [labels[i] for i in picks]
