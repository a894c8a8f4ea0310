"""MobileNetV2 1.0 (torchvision's layout and parameter count) from timm layers,
with a plug-in attention module in every inverted residual block.

Attention positions: ``mid`` after the 3x3 depthwise conv-BN-ReLU6 (the SCSA authors'
wiring, also where MobileNetV3 puts SE); ``end`` after the projection BN, before the add.
"""
from typing import Any, Optional

import torch
import torch.nn as nn
from timm.layers import ConvNormAct, DropPath, create_classifier, make_divisible

from scsa.attention import check_position
from scsa.models.backbone import AttnFactory, BackboneSpec, register_backbone

# (expansion t, output channels c, repeats n, first stride s), as in the MobileNetV2 paper.
INVERTED_RESIDUAL_SETTING = (
    (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
    (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1),
)


class InvertedResidual(nn.Module):
    """[1x1 expand] -> 3x3 depthwise -> [attention] -> 1x1 project -> [attention] (+ x)."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, expand_ratio: int,
                 attn_layer: Optional[AttnFactory] = None, attn_position: str = "mid", dilation: int = 1,
                 drop_path_rate: float = 0.0):
        super().__init__()
        check_position(attn_position)
        hidden = in_chs * expand_ratio
        self.has_skip = stride == 1 and in_chs == out_chs
        self.attn_mid = attn_position == "mid"
        self.conv_pw = (ConvNormAct(in_chs, hidden, 1, act_layer=nn.ReLU6)
                        if expand_ratio != 1 else nn.Identity())
        self.conv_dw = ConvNormAct(hidden, hidden, 3, stride=stride, dilation=dilation, groups=hidden,
                                   act_layer=nn.ReLU6)
        self.conv_pwl = ConvNormAct(hidden, out_chs, 1, apply_act=False)
        attn_channels = hidden if self.attn_mid else out_chs
        self.attn = attn_layer(attn_channels) if attn_layer is not None else nn.Identity()
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate else nn.Identity()  # on the skip only

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
        return self.drop_path(out) + x if self.has_skip else out


class MobileNetV2(nn.Module):
    """``feature_info`` names the last block of each stage that ends at a stride (2, 4, 8, 16, 32), as timm's
    own MobileNetV2 reports them, for ``features_only`` backbones.

    timm's arguments, with its meaning: ``output_stride`` 8 or 16 turns the later strides into dilations
    (the reductions stop there), ``drop_path_rate`` rises linearly over the blocks to that rate on the
    residual branches, ``global_pool`` is timm's ``SelectAdaptivePool2d`` type ('' keeps the map).
    """

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, drop_rate: float = 0.2,
                 attn_layer: Optional[AttnFactory] = None, attn_position: str = "mid",
                 zero_init_last: bool = True, in_chans: int = 3, output_stride: int = 32,
                 drop_path_rate: float = 0.0, global_pool: str = "avg"):
        super().__init__()
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride={output_stride} is not supported: use 8, 16 or 32")
        self.num_classes = num_classes
        in_chs = make_divisible(32 * width_mult, 8)
        self.num_features = make_divisible(1280 * max(1.0, width_mult), 8)
        layers = [ConvNormAct(in_chans, in_chs, 3, stride=2, act_layer=nn.ReLU6)]
        self.feature_info = []
        reduction, dilation = 2, 1
        blocks, done = sum(n for _, _, n, _ in INVERTED_RESIDUAL_SETTING), 0
        for stage, (t, c, n, s) in enumerate(INVERTED_RESIDUAL_SETTING):
            out_chs = make_divisible(c * width_mult, 8)
            next_dilation = dilation
            if s > 1 and reduction * s > output_stride:  # as timm's EfficientNetBuilder: a dilation from here on
                next_dilation, s = dilation * s, 1
            reduction *= s
            for i in range(n):
                layers.append(InvertedResidual(in_chs, out_chs, s if i == 0 else 1, t, attn_layer, attn_position,
                                               dilation=dilation, drop_path_rate=drop_path_rate * done / blocks))
                dilation, in_chs, done = next_dilation, out_chs, done + 1
            last = stage + 1 == len(INVERTED_RESIDUAL_SETTING)
            if last or INVERTED_RESIDUAL_SETTING[stage + 1][3] > 1:
                self.feature_info.append(dict(num_chs=out_chs, reduction=reduction,
                                              module=f"features.{len(layers) - 1}"))
        layers.append(ConvNormAct(in_chs, self.num_features, 1, act_layer=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool)
        self.drop = nn.Dropout(drop_rate)
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

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str = "avg") -> None:
        """timm's: a fresh head for ``num_classes`` (0: none, the pooled features out)."""
        self.num_classes = num_classes
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.drop(self.global_pool(x))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def build_mobilenetv2(attn_layer: Optional[AttnFactory], attn_position: str, **timm_args: Any) -> MobileNetV2:
    return MobileNetV2(attn_layer=attn_layer, attn_position=attn_position, **timm_args)


register_backbone(BackboneSpec(
    "mobilenetv2", build_mobilenetv2, timm_plain="mobilenetv2_100", first_conv="features.0.conv",
    last_stage="features.18",
    feature_cfg=dict(flatten_sequential=True),  # the stages are children of one nn.Sequential (`features`)
    plain_renamed=True,  # timm's mobilenetv2_100: conv_stem, blocks.*, conv_head, classifier
    attention_defaults={"ema": dict(factor=16)},  # EMA's 32 groups do not divide the 144-channel blocks
))
