"""Backbones: torchvision-equal sizes, attention positions, the public factory."""
import pytest
import timm
import torch
import torchvision

import scsa
from options import modules
from scsa.attention import AttentionSpec
from scsa.complexity import count_macs, count_params
from scsa.models import backbone_spec, list_backbones

TORCHVISION_PARAMS = {"resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032,
                      "resnet101": 44_549_160, "mobilenetv2": 3_504_872}


@pytest.mark.parametrize("name,expected", TORCHVISION_PARAMS.items())
def test_plain_backbones_match_torchvision_param_counts(name, expected):
    assert count_params(scsa.create_model(name)) == expected


def test_resnet50_macs_match_the_papers():
    assert count_macs(scsa.create_model("resnet50"), 224) == pytest.approx(4.09e9, rel=0.01)


@pytest.mark.parametrize("backbone,attention", [
    (b, a) if b in ("resnet18", "mobilenetv2") or a == "scsa" else pytest.param(b, a, marks=pytest.mark.slow)
    for b in list_backbones() for a in ["none", *modules()]])  # the unit tier: two backbones, and SCSA in each
def test_parameters_are_timms_plain_backbone_plus_the_attentions_own(backbone, attention):
    with torch.device("meta"):
        model = scsa.create_model(backbone, attention)
        plain = timm.create_model(backbone_spec(backbone).timm_plain)
    own = sum(p.numel() for name, p in model.named_parameters() if ".attn." in name)
    assert count_params(model) == count_params(plain) + own and (own > 0) == (attention != "none")
    assert [tuple(t.shape) for n, t in model.state_dict().items() if ".attn." not in n] == [
        tuple(t.shape) for t in plain.state_dict().values()]  # the rest is timm's network, tensor by tensor


def test_torchvision_counts_are_what_torchvision_says():
    assert count_params(torchvision.models.resnet50()) == TORCHVISION_PARAMS["resnet50"]
    assert count_params(torchvision.models.mobilenet_v2()) == TORCHVISION_PARAMS["mobilenetv2"]


class Recorder(torch.nn.Module):
    """Stands in for an attention module and records the channels and maps it sees."""

    seen = []

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels

    def forward(self, x):
        Recorder.seen.append(tuple(x.shape[1:]))
        assert x.shape[1] == self.channels
        return x


@pytest.fixture
def recorder(monkeypatch):
    from scsa.attention.registry import _REGISTRY
    monkeypatch.setitem(_REGISTRY, "recorder", AttentionSpec("recorder", Recorder, "end", False, False))
    Recorder.seen = []
    return Recorder


@pytest.mark.parametrize("name,position,first", [
    ("resnet18", "mid", (64, 8, 8)), ("resnet18", "end", (64, 8, 8)),
    ("resnet50", "mid", (64, 8, 8)), ("resnet50", "end", (256, 8, 8)),
    ("mobilenetv2", "mid", (32, 16, 16)), ("mobilenetv2", "end", (16, 16, 16)),
])
def test_attention_sits_at_the_configured_position(recorder, name, position, first):
    model = scsa.create_model(name, "recorder", num_classes=10, position=position).eval()
    recorder.seen.clear()  # of the build's channel check (a class from outside the package)
    model(torch.randn(1, 3, 32, 32))
    blocks = {"resnet18": 8, "resnet50": 16, "mobilenetv2": 17}[name]
    assert len(recorder.seen) == blocks
    assert recorder.seen[0] == first


def test_resnet50_mid_attention_follows_the_strided_conv(recorder):
    model = scsa.create_model("resnet50", "recorder", position="mid").eval()
    recorder.seen.clear()
    model(torch.randn(1, 3, 64, 64))
    # first block of stage 2: width 128 after the stride-2 3x3 conv (map 16 -> 8)
    assert recorder.seen[3] == (128, 8, 8)


def test_last_bn_of_each_residual_branch_starts_at_zero():
    model = scsa.create_model("resnet50")
    assert all(block.bn3.weight.abs().sum() == 0 for stage in (model.layer1, model.layer4) for block in stage)
    mbv2 = scsa.create_model("mobilenetv2")
    blocks = [b for b in mbv2.features if hasattr(b, "has_skip")]
    assert all((b.conv_pwl.bn.weight.abs().sum() == 0) == b.has_skip for b in blocks)


def test_unknown_model_and_position_are_rejected():
    with pytest.raises(ValueError, match="unknown model"):
        scsa.create_model("resnet7")
    with pytest.raises(ValueError, match="position"):
        scsa.create_model("resnet18", "none", position="middle")


def test_your_own_class_in_place_of_a_name():
    from custom_attention import SpatialMask, Widen
    model = scsa.create_model("resnet18", SpatialMask, num_classes=3, position="mid", bias=False)
    assert [type(b.attn) for b in model.layer1] == [SpatialMask] * 2 and model.layer1[0].attn.conv.bias is None
    with pytest.raises(ValueError, match="no default position: pass position='mid' or 'end'"):
        scsa.create_model("resnet18", Widen)
    with pytest.raises(ValueError, match=r"turns a \(2, 64, 4, 4\) map into \(2, 128, 4, 4\).*in = channels out"):
        scsa.create_model("resnet18", Widen, position="mid")
    with pytest.raises(TypeError, match="resnet18_spatial_mask got an unexpected keyword argument 'reduction'"):
        scsa.create_model("resnet18", SpatialMask, position="end", reduction=4)
    # kernel is the one runtime argument: a class without it has one path, so auto/torch are not passed
    scsa.create_model("resnet18", SpatialMask, position="end", kernel="auto")
    with pytest.raises(ValueError, match="has no Triton kernels"):
        scsa.create_model("resnet18", SpatialMask, position="end", kernel="triton")


def test_models_train_a_step_on_cpu():
    model = scsa.create_model("mobilenetv2", num_classes=4)
    loss = model(torch.randn(2, 3, 32, 32)).logsumexp(1).mean()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
