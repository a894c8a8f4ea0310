"""timm's registry: every backbone x attention as `<backbone>_<attention>`, and its feature backbones."""
import pytest
import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

import scsa
from scsa.models import registry
from scsa.models.registry import MODEL_DEFAULTS, MODEL_NAMES

BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "mobilenetv2")
ATTENTIONS = ("scsa", "se", "cbam", "eca", "ca", "ema")
GRID = [(b, a) for b in BACKBONES for a in ATTENTIONS]
# the deeper ResNets repeat the same blocks: full suite only
GRID_TIERED = [pytest.param(b, a, marks=pytest.mark.slow) if b in ("resnet34", "resnet101") else (b, a)
               for b, a in GRID]
# stage features (index 0-4 of features_only): channels at reductions 2, 4, 8, 16, 32
STAGE_CHANNELS = {"resnet18": (64, 64, 128, 256, 512), "resnet34": (64, 64, 128, 256, 512),
                  "resnet50": (64, 256, 512, 1024, 2048), "resnet101": (64, 256, 512, 1024, 2048),
                  "mobilenetv2": (16, 24, 32, 96, 320)}  # timm's own mobilenetv2_100 reports the same


def test_every_backbone_and_attention_is_a_timm_model():
    assert sorted(MODEL_NAMES) == sorted(f"{b}_{a}" for b, a in GRID)
    assert sorted(timm.list_models("*_scsa")) == sorted(f"{b}_scsa" for b in BACKBONES)
    assert set(MODEL_NAMES) <= set(timm.list_models())
    assert timm.models.model_entrypoint("resnet50").__module__ == "timm.models.resnet"  # plain ones stay timm's


def test_a_name_timm_already_has_is_refused(monkeypatch):
    monkeypatch.setattr(registry, "timm_name", lambda backbone, attention: "resnet50")
    with pytest.raises(RuntimeError, match="timm already has a model named 'resnet50'"):
        registry._register("resnet50", "scsa")
    assert timm.models.model_entrypoint("resnet50").__module__ == "timm.models.resnet"


def _shapes(model: torch.nn.Module) -> dict:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _positions(model: torch.nn.Module) -> list:
    return [m.attn_mid for m in model.modules() if hasattr(m, "attn_mid")]


@pytest.mark.parametrize("backbone,attention", GRID_TIERED)
def test_timm_builds_what_create_model_builds(backbone, attention):
    with torch.device("meta"):  # structure only: no memory, no init
        ours = scsa.create_model(backbone, attention, num_classes=10, **MODEL_DEFAULTS.get((backbone, attention), {}))
        theirs = timm.create_model(f"{backbone}_{attention}", num_classes=10)
    assert _shapes(theirs) == _shapes(ours)
    assert sum(p.numel() for p in theirs.parameters()) == sum(p.numel() for p in ours.parameters())
    assert _positions(theirs) == _positions(ours) and len(set(_positions(ours))) == 1


def test_same_seed_same_weights_and_attention_kwargs_pass_through():
    torch.manual_seed(0)
    ours = scsa.create_model("resnet18", "scsa", num_classes=10, head_num=2, window_size=-1)
    torch.manual_seed(0)
    theirs = timm.create_model("resnet18_scsa", num_classes=10, head_num=2, window_size=-1)
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()))
    assert {(m.head_num, m.window_size) for m in theirs.modules() if isinstance(m, scsa.attention.SCSA)} == {(2, -1)}
    with torch.device("meta"):
        end = timm.create_model("resnet50_eca", position="mid")
    assert set(_positions(end)) == {True}  # eca's default is end


@pytest.mark.parametrize("backbone", BACKBONES)
def test_pretrained_cfg_is_imagenet_preprocessing_and_names_real_modules(backbone):
    with torch.device("meta"):
        model = timm.create_model(f"{backbone}_se")
    cfg = model.pretrained_cfg
    assert cfg["architecture"] == f"{backbone}_se"
    assert tuple(cfg["mean"]) == IMAGENET_DEFAULT_MEAN and tuple(cfg["std"]) == IMAGENET_DEFAULT_STD
    assert tuple(cfg["input_size"]) == (3, 224, 224) and cfg["crop_pct"] == 0.875
    assert cfg["interpolation"] == "bilinear" and cfg["num_classes"] == 1000
    assert isinstance(model.get_submodule(cfg["classifier"]), torch.nn.Linear)
    assert isinstance(model.get_submodule(cfg["first_conv"]), torch.nn.Conv2d)
    assert model.get_submodule(cfg["first_conv"]).in_channels == 3


@pytest.mark.parametrize("name", ["resnet18_eca", "mobilenetv2_se",
                                  pytest.param("resnet50_scsa", marks=pytest.mark.slow),
                                  pytest.param("mobilenetv2_scsa", marks=pytest.mark.slow)])
def test_features_only_gives_the_stages_at_224(name):
    backbone = name.split("_")[0]
    model = timm.create_model(name, features_only=True).eval()
    assert model.feature_info.channels() == list(STAGE_CHANNELS[backbone])
    assert model.feature_info.reduction() == [2, 4, 8, 16, 32]
    with torch.no_grad():
        features = model(torch.randn(1, 3, 224, 224))
    assert [tuple(f.shape) for f in features] == [(1, c, 224 // r, 224 // r) for c, r in
                                                   zip(STAGE_CHANNELS[backbone], (2, 4, 8, 16, 32))]


def test_out_indices_pick_stages():
    model = timm.create_model("mobilenetv2_eca", features_only=True, out_indices=(2, 4)).eval()
    assert model.feature_info.channels() == [32, 320] and model.feature_info.reduction() == [8, 32]
    with torch.no_grad():
        assert [tuple(f.shape) for f in model(torch.randn(1, 3, 64, 64))] == [(1, 32, 8, 8), (1, 320, 2, 2)]


def test_mobilenetv2_feature_info_matches_timms_own():
    ours = [(d["num_chs"], d["reduction"]) for d in scsa.create_model("mobilenetv2").feature_info]
    with torch.device("meta"):
        theirs = [(d["num_chs"], d["reduction"]) for d in timm.create_model("mobilenetv2_100").feature_info]
    assert ours == theirs
