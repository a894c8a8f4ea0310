"""Backbones: torchvision-equal sizes, attention positions, the public factory."""
import pytest
import torch
import torchvision

import scsa
from scsa.complexity import count_macs, count_params

TORCHVISION_PARAMS = {"resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032,
                      "resnet101": 44_549_160, "mobilenetv2": 3_504_872}


@pytest.mark.parametrize("name,expected", TORCHVISION_PARAMS.items())
def test_plain_backbones_match_torchvision_param_counts(name, expected):
    assert count_params(scsa.create_model(name)) == expected


def test_resnet50_macs_match_the_papers():
    assert count_macs(scsa.create_model("resnet50"), 224) == pytest.approx(4.09e9, rel=0.01)


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
    from scsa.attention import _REGISTRY
    monkeypatch.setitem(_REGISTRY, "recorder", _REGISTRY["none"]._replace(factory=Recorder))
    Recorder.seen = []
    return Recorder


@pytest.mark.parametrize("name,position,first", [
    ("resnet18", "mid", (64, 8, 8)), ("resnet18", "end", (64, 8, 8)),
    ("resnet50", "mid", (64, 8, 8)), ("resnet50", "end", (256, 8, 8)),
    ("mobilenetv2", "mid", (32, 16, 16)), ("mobilenetv2", "end", (16, 16, 16)),
])
def test_attention_sits_at_the_configured_position(recorder, name, position, first):
    model = scsa.create_model(name, "recorder", num_classes=10, position=position).eval()
    model(torch.randn(1, 3, 32, 32))
    blocks = {"resnet18": 8, "resnet50": 16, "mobilenetv2": 17}[name]
    assert len(recorder.seen) == blocks
    assert recorder.seen[0] == first


def test_resnet50_mid_attention_follows_the_strided_conv(recorder):
    scsa.create_model("resnet50", "recorder", position="mid").eval()(torch.randn(1, 3, 64, 64))
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


def test_models_train_a_step_on_cpu():
    model = scsa.create_model("mobilenetv2", num_classes=4)
    loss = model(torch.randn(2, 3, 32, 32)).logsumexp(1).mean()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
