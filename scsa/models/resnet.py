"""ResNets from timm's ``ResNet`` with blocks that carry a plug-in attention module.

The attention sits at one of two places in the residual branch:
``mid``: after the block's spatial conv-bn-act (the SCSA authors' wiring);
``end``: after the last BN, before the residual add (the SE/CBAM/ECA papers' wiring).
"""
from typing import Callable, Optional

import torch
import torch.nn as nn
from timm.models import resnet as timm_resnet

AttnFactory = Callable[[int], nn.Module]


def _attention(attn_layer: Optional[AttnFactory], channels: int) -> nn.Module:
    return attn_layer(channels) if attn_layer is not None else nn.Identity()


def _check_position(position: str) -> None:
    if position not in ("mid", "end"):
        raise ValueError(f"unknown attention position '{position}': use 'mid' or 'end'")


class BasicBlock(timm_resnet.BasicBlock):
    """timm's BasicBlock; ``mid`` attention follows conv1-bn1-relu."""

    def __init__(self, *args, attn_layer: Optional[AttnFactory] = None, attn_position: str = "end", **kwargs):
        super().__init__(*args, **kwargs)
        _check_position(attn_position)
        self.attn_mid = attn_position == "mid"
        channels = self.conv1.out_channels if self.attn_mid else self.conv2.out_channels
        self.attn = _attention(attn_layer, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.aa(self.act1(self.drop_block(self.bn1(self.conv1(x)))))
        if self.attn_mid:
            x = self.attn(x)
        x = self.bn2(self.conv2(x))
        if not self.attn_mid:
            x = self.attn(x)
        if self.drop_path is not None:
            x = self.drop_path(x)
        return self.act2(x + shortcut)


class Bottleneck(timm_resnet.Bottleneck):
    """timm's Bottleneck; ``mid`` attention follows conv2(3x3, strided)-bn2-relu."""

    def __init__(self, *args, attn_layer: Optional[AttnFactory] = None, attn_position: str = "end", **kwargs):
        super().__init__(*args, **kwargs)
        _check_position(attn_position)
        self.attn_mid = attn_position == "mid"
        channels = self.conv2.out_channels if self.attn_mid else self.conv3.out_channels
        self.attn = _attention(attn_layer, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.aa(self.act2(self.drop_block(self.bn2(self.conv2(x)))))
        if self.attn_mid:
            x = self.attn(x)
        x = self.bn3(self.conv3(x))
        if not self.attn_mid:
            x = self.attn(x)
        if self.drop_path is not None:
            x = self.drop_path(x)
        return self.act3(x + shortcut)


RESNET_LAYOUTS = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
}


def build_resnet(name: str, attn_layer: Optional[AttnFactory], attn_position: str, num_classes: int,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0, in_chans: int = 3) -> timm_resnet.ResNet:
    """torchvision-equivalent ResNet (same parameter count) with attention in every block."""
    block, layers = RESNET_LAYOUTS[name]
    return timm_resnet.ResNet(
        block, layers, num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate,
        drop_path_rate=drop_path_rate,
        block_args=dict(attn_layer=attn_layer, attn_position=attn_position),
    )
