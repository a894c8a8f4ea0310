"""ResNet-50-D (He et al., "Bag of Tricks", CVPR 2019): ResNet-50 with a deep stem (three 3x3 convs,
32-32-64 wide) and average-pool downsampling in the shortcuts; timm's ``resnet50d``, with attention in
every block.

``mid`` attention follows the bottleneck's 3x3 conv-bn-act (the SCSA authors' place), ``end`` the last BN
before the add.
"""
from scsa.models.backbone import BackboneSpec, register_backbone
from scsa.models.resnet import Bottleneck, resnet_builder

register_backbone(BackboneSpec(
    "resnet50d", resnet_builder(Bottleneck, (3, 4, 6, 3), stem_width=32, stem_type="deep", avg_down=True),
    timm_plain="resnet50d", first_conv="conv1.0"))
