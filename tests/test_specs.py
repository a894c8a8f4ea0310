"""The registries and the config groups agree: every ``model=`` x ``attention=`` option builds the model that
``scsa.create_model`` and ``timm.create_model`` build, and trains a step through train.py; your own class
trains through ``attention=custom`` with no edit to the package."""
import os

import pytest
import timm
import torch

import scsa
from custom_attention import SpatialMask
from options import attention_options, config_options, packaged_attentions
from scsa.attention import default_position
from scsa.complexity import count_params
from scsa.models import backbone_spec, create_model_from_config, list_backbones

CUSTOM = ("attention=custom", "attention.cls=custom_attention.SpatialMask", "attention.position=mid")


def test_config_options_are_the_registries():
    assert config_options("model") == sorted(list_backbones())
    assert attention_options() == sorted(packaged_attentions())
    assert "custom" in config_options("attention")


@pytest.mark.slow  # 56 combinations x 3 builds: ~25 s, beyond the unit tier's minute
@pytest.mark.parametrize("attention", attention_options())
def test_every_config_combination_builds_what_the_api_and_timm_build(compose_train, attention):
    for backbone in config_options("model"):
        cfg = compose_train(f"model={backbone}", f"attention={attention}")
        assert cfg.attention.position == default_position(attention)
        name = backbone_spec(backbone).timm_plain if attention == "none" else f"{backbone}_{attention}"
        with torch.device("meta"):  # structure only
            from_yaml = create_model_from_config(cfg.model, cfg.attention, num_classes=10)
            from_api = scsa.create_model(backbone, attention, num_classes=10)
            from_timm = timm.create_model(name, num_classes=10)
        assert repr(from_yaml) == repr(from_api), (backbone, attention)
        if attention != "none":  # without attention timm's own classes build it: the same tensors
            assert repr(from_timm) == repr(from_api), (backbone, attention)
        assert [t.shape for t in from_timm.state_dict().values()] == [t.shape for t in from_api.state_dict().values()]


def test_custom_attention_builds_from_the_config_without_the_kernel_it_does_not_take(compose_train):
    cfg = compose_train(*CUSTOM, "+attention.kwargs.bias=false")
    assert cfg.attention.kwargs.kernel == "auto"  # train.yaml's, for every module: SpatialMask does not take it
    model = create_model_from_config(cfg.model, cfg.attention, num_classes=10)
    assert all(isinstance(block.attn, SpatialMask) and block.attn.conv.bias is None for block in model.layer1)
    assert all(block.attn_mid for block in model.layer1)
    widen = compose_train("attention=custom", "attention.cls=custom_attention.Widen", "attention.position=end")
    with pytest.raises(ValueError, match="channels in = channels out"):
        create_model_from_config(widen.model, widen.attention, num_classes=10)
    typo = compose_train("attention=custom", "attention.cls=custom_attention.Narrow", "attention.position=end")
    with pytest.raises(ValueError, match="cannot import attention class 'custom_attention.Narrow'"):
        create_model_from_config(typo.model, typo.attention, num_classes=10)


def _env_with_tests_on_path(repo) -> dict:
    return {"PYTHONPATH": os.pathsep.join([str(repo), str(repo / "tests")])}


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_every_config_combination_trains_a_step(tmp_path, subset, run_cli):
    """One --multirun process over every model= x attention= option, one step each on 4 images at 32 px."""
    sweep = tmp_path / "sweep"
    models, attentions = config_options("model"), attention_options()
    result = run_cli(["train.py", "--multirun", f"model={','.join(models)}", f"attention={','.join(attentions)}",
                      f"data.root={subset(2, 1, classes=2)}", "data.image_size=32", "data.val_resize=32",
                      "data.batch_size=4", "data.workers=0", "data.loader=torch", "trainer.epochs=1",
                      "trainer.max_steps=1", "trainer.channels_last=false", "wandb.mode=disabled",
                      f"hydra.sweep.dir={sweep}"], timeout=2400)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = {tuple(p.name.split("_seed")[0].split("_", 1)[1].rsplit("_", 1)): p for p in sweep.iterdir() if p.is_dir()}
    assert sorted(runs) == sorted((m, a) for m in models for a in attentions)
    for (backbone, attention), run_dir in runs.items():
        checkpoint = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True, map_location="cpu")
        with torch.device("meta"):
            params = count_params(scsa.create_model(backbone, attention, num_classes=2))
        assert checkpoint["params"] == params and checkpoint["state"]["step"] == 1, (backbone, attention)


@pytest.mark.slow
def test_your_own_attention_trains_through_attention_custom(tmp_path, subset, run_cli, repo):
    data = subset(2, 1, classes=2)
    common = [f"data.root={data}", "data.image_size=32", "data.val_resize=32", "data.batch_size=4", "data.workers=0",
              "data.loader=torch", "trainer.epochs=1", "trainer.max_steps=1", "wandb.mode=disabled"]
    run_dir = tmp_path / "run"
    result = run_cli(["train.py", *CUSTOM, *common, f"hydra.run.dir={run_dir}"],
                     env_extra=_env_with_tests_on_path(repo))
    assert result.returncode == 0, result.stderr[-3000:]
    config = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["config"]["attention"]
    assert config["cls"] == "custom_attention.SpatialMask" and config["position"] == "mid"
    assert "attention=custom" in (run_dir / "train.log").read_text()
    for overrides, message in ((["attention=custom", "attention.cls=custom_attention.Widen", "attention.position=end"],
                                "channels in = channels out"),
                               (["attention=custom", "attention.position=end"], "needs attention.cls")):
        failed = run_cli(["train.py", *overrides, *common, f"hydra.run.dir={tmp_path / 'failed'}"],
                         env_extra=_env_with_tests_on_path(repo))
        assert failed.returncode == 2 and message in failed.stderr, failed.stderr[-2000:]
        assert len(failed.stderr.strip().splitlines()) == 1
