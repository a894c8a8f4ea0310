"""timm's registry: every backbone x attention as `<backbone>_<attention>`, and its feature backbones."""
import pytest
import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

import scsa
from options import modules
from scsa.models import backbone_spec, list_backbones, registry

GRID = [(b, a) for b in list_backbones() for a in modules()]
SMALL = ("resnet18", "mobilenetv2")  # the others repeat the same blocks, wider or deeper: full suite only
GRID_TIERED = [(b, a) if b in SMALL else pytest.param(b, a, marks=pytest.mark.slow) for b, a in GRID]


def test_every_backbone_and_attention_is_a_timm_model():
    assert sorted(registry.model_names()) == sorted(f"{b}_{a}" for b, a in GRID)
    assert sorted(timm.list_models("*_scsa")) == sorted(f"{b}_scsa" for b in list_backbones())
    assert set(registry.model_names()) <= set(timm.list_models())
    assert timm.models.model_entrypoint("resnet50").__module__ == "timm.models.resnet"  # plain ones stay timm's


def test_a_name_timm_already_has_is_refused(monkeypatch):
    monkeypatch.setattr(registry, "timm_name", lambda backbone, attention: "resnet50")
    with pytest.raises(RuntimeError, match="timm already has a model named 'resnet50'"):
        registry._register(backbone_spec("resnet50"), "scsa")
    assert timm.models.model_entrypoint("resnet50").__module__ == "timm.models.resnet"


def _shapes(model: torch.nn.Module) -> dict:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _positions(model: torch.nn.Module) -> list:
    return [m.attn_mid for m in model.modules() if hasattr(m, "attn_mid")]


@pytest.mark.parametrize("backbone,attention", GRID_TIERED)
def test_timm_builds_what_create_model_builds(backbone, attention):
    with torch.device("meta"):  # structure only: no memory, no init
        ours = scsa.create_model(backbone, attention, num_classes=10)
        theirs = timm.create_model(f"{backbone}_{attention}", num_classes=10)
    assert _shapes(theirs) == _shapes(ours)
    assert repr(theirs) == repr(ours)  # the modules' settings too (the backbone's attention defaults)
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


def test_backbone_attention_defaults_apply_to_every_entry_point_and_yield_to_a_keyword():
    with torch.device("meta"):
        for model in (scsa.create_model("mobilenetv2", "ema"), timm.create_model("mobilenetv2_ema")):
            assert {m.groups for m in model.modules() if isinstance(m, scsa.attention.EMA)} == {16}
        model = scsa.create_model("mobilenetv2", "ema", factor=8)
        assert {m.groups for m in model.modules() if isinstance(m, scsa.attention.EMA)} == {8}
        model = scsa.create_model("resnet18", "ema")
        assert {m.groups for m in model.modules() if isinstance(m, scsa.attention.EMA)} == {32}


@pytest.mark.parametrize("backbone", list_backbones())
def test_pretrained_cfg_is_imagenet_preprocessing_and_names_real_modules(backbone):
    with torch.device("meta"):
        model = timm.create_model(f"{backbone}_se")
        plain = timm.create_model(backbone_spec(backbone).timm_plain)
    cfg = model.pretrained_cfg
    assert cfg["architecture"] == f"{backbone}_se"
    assert tuple(cfg["mean"]) == IMAGENET_DEFAULT_MEAN and tuple(cfg["std"]) == IMAGENET_DEFAULT_STD
    assert tuple(cfg["input_size"]) == (3, 224, 224) and cfg["crop_pct"] == 0.875
    assert cfg["interpolation"] == "bilinear" and cfg["num_classes"] == 1000
    assert isinstance(model.get_submodule(cfg["classifier"]), torch.nn.Linear)
    assert isinstance(model.get_submodule(cfg["first_conv"]), torch.nn.Conv2d)
    assert model.get_submodule(cfg["first_conv"]).in_channels == 3
    if not backbone_spec(backbone).plain_renamed:  # the same module names as timm's own
        assert (cfg["first_conv"], cfg["classifier"]) == (plain.pretrained_cfg["first_conv"],
                                                          plain.pretrained_cfg["classifier"])


def _stages(model: torch.nn.Module) -> list:
    return [(d["num_chs"], d["reduction"]) for d in model.feature_info.get_dicts()]


@pytest.mark.parametrize("backbone", list_backbones())
def test_features_only_gives_the_stages_timms_own_backbone_gives(backbone):
    """Channels and reductions as timm's plain model reports them, maps of that size (shapes only, at 64 px)."""
    with torch.device("meta"):
        plain = timm.create_model(backbone_spec(backbone).timm_plain, features_only=True)
        model = timm.create_model(f"{backbone}_se", features_only=True).eval()
        features = model(torch.randn(1, 3, 64, 64))
    assert _stages(model) == _stages(plain)
    assert [tuple(f.shape) for f in features] == [(1, c, 64 // r, 64 // r) for c, r in _stages(plain)]


@pytest.mark.parametrize("backbone", SMALL)
@pytest.mark.parametrize("output_stride", [8, 16])
def test_output_stride_dilates_like_timms_own(backbone, output_stride):
    with torch.device("meta"):
        plain = timm.create_model(backbone_spec(backbone).timm_plain, features_only=True, output_stride=output_stride)
        model = timm.create_model(f"{backbone}_ca", features_only=True, output_stride=output_stride).eval()
        got, want = model(torch.randn(1, 3, 64, 64)), plain.eval()(torch.randn(1, 3, 64, 64))
    assert _stages(model) == _stages(plain) and max(model.feature_info.reduction()) == output_stride
    assert [f.shape for f in got] == [f.shape for f in want]
    dilations = [m.dilation for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    assert dilations == [m.dilation for m in plain.modules()
                         if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]


def test_the_issues_feature_backbone_call():
    with torch.device("meta"):  # structure only (the maps' shapes at an output stride: the test above)
        model = timm.create_model("resnet50_scsa", drop_path_rate=0.1, output_stride=16, features_only=True)
    assert model.feature_info.reduction() == [2, 4, 8, 16, 16]
    assert model.feature_info.channels() == [64, 256, 512, 1024, 2048]
    assert max(m.drop_prob for m in model.modules() if isinstance(m, timm.layers.DropPath)) == pytest.approx(0.1)


@pytest.mark.parametrize("backbone", SMALL)
def test_drop_path_and_global_pool_mean_what_they_mean_in_timm(backbone):
    with torch.device("meta"):
        model = timm.create_model(f"{backbone}_eca", drop_path_rate=0.2)
        plain = timm.create_model(backbone_spec(backbone).timm_plain, drop_path_rate=0.2)
    rates = [m.drop_prob for m in model.modules() if isinstance(m, timm.layers.DropPath)]
    assert rates and rates == [m.drop_prob for m in plain.modules() if isinstance(m, timm.layers.DropPath)]
    with torch.device("meta"):
        pooled = timm.create_model(f"{backbone}_eca", global_pool="", num_classes=0).eval()
        assert pooled(torch.randn(1, 3, 64, 64)).shape == (1, pooled.num_features, 2, 2)
        assert timm.create_model(f"{backbone}_eca", global_pool="max", num_classes=3).eval()(
            torch.randn(1, 3, 64, 64)).shape == (1, 3)


def test_an_unknown_keyword_names_the_model_and_the_keyword():
    with pytest.raises(TypeError, match="resnet50_scsa got an unexpected keyword argument 'drop_path'"):
        timm.create_model("resnet50_scsa", drop_path=0.1)
    with pytest.raises(TypeError, match="resnet18 got an unexpected keyword argument 'head_num'"):
        scsa.create_model("resnet18", "none", head_num=2)
    with pytest.raises(ValueError, match="output_stride=4 is not supported"):
        timm.create_model("mobilenetv2_se", output_stride=4)


def test_out_indices_pick_stages():
    model = timm.create_model("mobilenetv2_eca", features_only=True, out_indices=(2, 4)).eval()
    assert model.feature_info.channels() == [32, 320] and model.feature_info.reduction() == [8, 32]
    with torch.no_grad():
        assert [tuple(f.shape) for f in model(torch.randn(1, 3, 64, 64))] == [(1, 32, 8, 8), (1, 320, 2, 2)]
