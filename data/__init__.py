"""``build_loaders(cfg)``: this rank's train and val loaders, whichever backend runs.

``open_sources`` is the one place that turns ``data.root`` into ``Source``s (``data.order``); either
backend (DALI or torchvision) reads a source in the same global order (``data.sampling``) and yields
uint8 batches on the device; ``DeviceLoader`` turns them into what the engine's ``Loader`` contract
promises (``scsa.training.loader``). Validation shards cover every image exactly once.
"""
import functools
import io
import statistics
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image

from data.device import DeviceLoader, normalise
from data.folder import FolderSource, check_dataset_root
from data.order import Source
from data.shards import is_shard_root, open_shard_sources
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


def open_sources(root: str, splits: Sequence[str]) -> Dict[str, Source]:
    """``root``'s ``splits`` as ``Source``s (checked: one-line errors), all with the same classes: a shard
    folder (``manifest.json``, ``python -m data.make_shards``) or an ImageFolder root."""
    if is_shard_root(root):
        return open_shard_sources(root, splits)
    classes = check_dataset_root(root, splits)
    return {split: FolderSource(root, split, classes) for split in splits}


def build_loaders(cfg: DictConfig, *, rank: int, world_size: int, device: torch.device, seed: int,
                  channels_last: bool, train: bool = True, accum_steps: int = 1) -> Loaders:
    """Validate ``cfg.root`` and build this rank's loaders (the val one only, with ``train=False``).
    An epoch of the train loader is whole global batches of world_size x batch_size x accum_steps."""
    sources = open_sources(cfg.root, ("train", "val") if train else ("val",))
    backend = resolve_backend(cfg.loader)
    if backend == "dali":
        from data.dali import build_dali_loader
        build = functools.partial(build_dali_loader, root=cfg.root)
    else:
        build = build_torch_loader
    common = dict(batch_size=cfg.batch_size, accum_steps=accum_steps, image_size=cfg.image_size,
                  val_resize=cfg.val_resize, scale=tuple(cfg.scale), ratio=tuple(cfg.ratio), hflip=cfg.hflip,
                  randaugment_n=cfg.randaugment_n, randaugment_m=cfg.randaugment_m, fill=randaugment_fill(cfg.mean),
                  workers=cfg.workers, rank=rank, world_size=world_size, seed=seed, device=device)

    def loader(split: str) -> DeviceLoader:
        return DeviceLoader(build(sources[split], train=split == "train", **common), cfg.mean, cfg.std,
                            device, channels_last, erase_prob=cfg.re_prob if split == "train" else 0.0)

    loaders = Loaders(loader("train") if train else None, loader("val"), sources["val"].classes, backend)
    if train and len(loaders.train) == 0:
        raise UserError(f"'{cfg.root}/train' has too few images for one full global batch of data.batch_size="
                        f"{cfg.batch_size} x {world_size} ranks x trainer.accum_steps={accum_steps}: "
                        f"lower data.batch_size")
    return loaders


def val_sample(data: Mapping, classes: List[str], count: int) -> Tuple[torch.Tensor, torch.Tensor, List[int]]:
    """``count`` images spread evenly over ``data.root``'s val split (so over its classes) as the val
    loader presents them: uint8 crops, the normalised float32 batch, and their labels. For looking
    at a few images (attention maps), not for scoring."""
    root = data["root"]
    try:
        source = open_sources(root, ("val",))["val"]
    except UserError as e:
        raise ValueError(f"{e}, or pass cam.data_root=<the dataset the runs trained on>") from None
    names = [source.classes[label] for label in source.labels]
    ours = np.flatnonzero(np.isin(names, classes))
    if not ours.size:
        raise ValueError(f"'{root}/val' holds no images of the run's classes: pass cam.data_root=<its dataset>")
    picks = ours[np.unique(np.linspace(0, len(ours) - 1, min(count, len(ours))).round().astype(int))]
    crop = val_transform(data["image_size"], data["val_resize"])
    crops = []
    for i in picks:
        with Image.open(io.BytesIO(source.read(i))) as image:
            crops.append(crop(image.convert("RGB")))
    uint8 = torch.stack(crops)
    mean, std = (torch.tensor(data[k], dtype=torch.float32).view(1, 3, 1, 1) for k in ("mean", "std"))
    return uint8, normalise(uint8, mean, std), [classes.index(names[i]) for i in picks]
