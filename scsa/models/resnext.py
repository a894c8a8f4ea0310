"""ResNeXt-50 32x4d (Xie et al., CVPR 2017): ResNet-50's bottlenecks with a 32-group 3x3 conv, 4 channels
per group at the first stage; timm's ``resnext50_32x4d``, with attention in every block.

``mid`` attention follows the grouped 3x3 conv-bn-act (the SCSA authors' place in a bottleneck), ``end``
the last BN before the add.
"""
from scsa.models.backbone import BackboneSpec, register_backbone
from scsa.models.resnet import Bottleneck, resnet_builder

register_backbone(BackboneSpec(
    "resnext50_32x4d", resnet_builder(Bottleneck, (3, 4, 6, 3), cardinality=32, base_width=4),
    timm_plain="resnext50_32x4d"))
