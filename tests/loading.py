"""Building loaders in tests: one data config and one ``build_loaders`` call for every loader test file."""
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig, OmegaConf

from data import Loaders, build_loaders
from data.dali import dali_available

CPU = torch.device("cpu")
BACKENDS = ["torch", pytest.param("dali", marks=pytest.mark.skipif(not dali_available(), reason="needs DALI"))]


def data_cfg(repo: Path, root: Path, **overrides) -> DictConfig:
    """conf/data/imagenet.yaml at ``root``, at 16 px, with no worker processes."""
    cfg = OmegaConf.load(repo / "conf" / "data" / "imagenet.yaml")
    cfg.update({"root": str(root), "workers": 0, "batch_size": 8, "image_size": 16, "val_resize": 16, **overrides})
    return cfg


def build(cfg: DictConfig, rank: int = 0, world_size: int = 1, train: bool = True, accum_steps: int = 1,
          channels_last: bool = True) -> Loaders:
    return build_loaders(cfg, rank=rank, world_size=world_size, device=CPU, seed=0, channels_last=channels_last,
                         train=train, accum_steps=accum_steps)
