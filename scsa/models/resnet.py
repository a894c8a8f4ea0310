"""ResNets from timm's ``ResNet`` with blocks that carry a plug-in attention module.

The attention sits at one of two places in the residual branch:
``mid``: after the block's spatial conv-bn-act (the SCSA authors' wiring);
``end``: after the last BN, before the residual add (the SE/CBAM/ECA papers' wiring).
"""
from typing import Any, Callable, Optional, Sequence, Type, Union

import torch
import torch.nn as nn
from timm.models import resnet as timm_resnet

from scsa.attention import check_position
from scsa.models.backbone import AttnFactory, BackboneSpec, register_backbone


def _attention(attn_layer: Optional[AttnFactory], channels: int) -> nn.Module:
    return attn_layer(channels) if attn_layer is not None else nn.Identity()


class BasicBlock(timm_resnet.BasicBlock):
    """timm's BasicBlock; ``mid`` attention follows conv1-bn1-relu."""

    def __init__(self, *args, attn_layer: Optional[AttnFactory] = None, attn_position: str = "end", **kwargs):
        super().__init__(*args, **kwargs)
        check_position(attn_position)
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
        check_position(attn_position)
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


def resnet_builder(block: Type[Union[BasicBlock, Bottleneck]], layers: Sequence[int],
                   **arch: Any) -> Callable[..., nn.Module]:
    """A ``BackboneSpec.build`` for timm's ``ResNet(block, layers, **arch)`` with attention in every block
    (``arch``: timm's ResNet variants, e.g. ``cardinality``, ``stem_type``, ``avg_down``)."""
    def build(attn_layer: Optional[AttnFactory], attn_position: str, **timm_args: Any) -> timm_resnet.ResNet:
        return timm_resnet.ResNet(block, tuple(layers), **arch, **timm_args,
                                  block_args=dict(attn_layer=attn_layer, attn_position=attn_position))
    return build


# torchvision-equivalent ResNets (same parameter counts), timm's names
for _name, _block, _layers in (("resnet18", BasicBlock, (2, 2, 2, 2)), ("resnet34", BasicBlock, (3, 4, 6, 3)),
                               ("resnet50", Bottleneck, (3, 4, 6, 3)), ("resnet101", Bottleneck, (3, 4, 23, 3))):
    register_backbone(BackboneSpec(_name, resnet_builder(_block, _layers), timm_plain=_name))
