"""MobileNetV2 1.0 (torchvision's layout and parameter count) from timm layers,
with a plug-in attention module in every inverted residual block.

Attention positions: ``mid`` after the 3x3 depthwise conv-BN-ReLU6 (the SCSA authors'
wiring, also where MobileNetV3 puts SE); ``end`` after the projection BN, before the add.
"""
from typing import Callable, Optional

import torch
import torch.nn as nn
from timm.layers import ConvNormAct, make_divisible

AttnFactory = Callable[[int], nn.Module]

# (expansion t, output channels c, repeats n, first stride s), as in the MobileNetV2 paper.
INVERTED_RESIDUAL_SETTING = (
    (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
    (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1),
)


class InvertedResidual(nn.Module):
    """[1x1 expand] -> 3x3 depthwise -> [attention] -> 1x1 project -> [attention] (+ x)."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, expand_ratio: int,
                 attn_layer: Optional[AttnFactory] = None, attn_position: str = "mid"):
        super().__init__()
        if attn_position not in ("mid", "end"):
            raise ValueError(f"unknown attention position '{attn_position}': use 'mid' or 'end'")
        hidden = in_chs * expand_ratio
        self.has_skip = stride == 1 and in_chs == out_chs
        self.attn_mid = attn_position == "mid"
        self.conv_pw = (ConvNormAct(in_chs, hidden, 1, act_layer=nn.ReLU6)
                        if expand_ratio != 1 else nn.Identity())
        self.conv_dw = ConvNormAct(hidden, hidden, 3, stride=stride, groups=hidden, act_layer=nn.ReLU6)
        self.conv_pwl = ConvNormAct(hidden, out_chs, 1, apply_act=False)
        attn_channels = hidden if self.attn_mid else out_chs
        self.attn = attn_layer(attn_channels) if attn_layer is not None else nn.Identity()

    def zero_init_last(self) -> None:
        """Zero the last BN of a residual branch so the block starts as the identity."""
        if self.has_skip:
            nn.init.zeros_(self.conv_pwl.bn.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv_dw(self.conv_pw(x))
        if self.attn_mid:
            out = self.attn(out)
        out = self.conv_pwl(out)
        if not self.attn_mid:
            out = self.attn(out)
        return out + x if self.has_skip else out


class MobileNetV2(nn.Module):
    """``feature_info`` names the last block at each reduction (2, 4, 8, 16, 32), as timm's own
    MobileNetV2 reports them, for ``features_only`` backbones."""

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, drop_rate: float = 0.2,
                 attn_layer: Optional[AttnFactory] = None, attn_position: str = "mid",
                 zero_init_last: bool = True, in_chans: int = 3):
        super().__init__()
        self.num_classes = num_classes
        in_chs = make_divisible(32 * width_mult, 8)
        self.num_features = make_divisible(1280 * max(1.0, width_mult), 8)
        layers = [ConvNormAct(in_chans, in_chs, 3, stride=2, act_layer=nn.ReLU6)]
        stage_ends, reduction = {}, 2  # reduction -> the feature of the last block at it
        for t, c, n, s in INVERTED_RESIDUAL_SETTING:
            out_chs = make_divisible(c * width_mult, 8)
            reduction *= s
            for i in range(n):
                layers.append(InvertedResidual(in_chs, out_chs, s if i == 0 else 1, t, attn_layer, attn_position))
                in_chs = out_chs
                stage_ends[reduction] = dict(num_chs=out_chs, reduction=reduction,
                                             module=f"features.{len(layers) - 1}")
        self.feature_info = list(stage_ends.values())
        layers.append(ConvNormAct(in_chs, self.num_features, 1, act_layer=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(self.num_features, num_classes)
        self.init_weights(zero_init_last)

    def init_weights(self, zero_init_last: bool = True) -> None:
        """torchvision's init (Kaiming fan-out convs, unit norms, N(0, 0.01) classifier)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)) and m.weight is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if zero_init_last:
            for m in self.modules():
                if isinstance(m, InvertedResidual):
                    m.zero_init_last()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.global_pool(self.features(x)).flatten(1)
        return self.fc(self.drop(x))


def build_mobilenetv2(attn_layer: Optional[AttnFactory], attn_position: str, num_classes: int,
                      drop_rate: float = 0.2, in_chans: int = 3) -> MobileNetV2:
    return MobileNetV2(num_classes=num_classes, drop_rate=drop_rate, attn_layer=attn_layer,
                       attn_position=attn_position, in_chans=in_chans)
