"""Configs compose, the authors' recipes are exact, the learning-rate rule holds."""
import pytest
from hydra import compose, initialize_config_dir

import scsa.config  # noqa: F401  (resolvers)
from scsa.cli import CONFIG_DIR
from train import scaled_lr

MEAN, STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]


def compose_train(*overrides):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def test_defaults_train_scsa_resnet18_on_the_sample():
    cfg = compose_train()
    assert (cfg.model.name, cfg.attention.name, cfg.data.name) == ("resnet18", "scsa", "sample")
    assert cfg.attention.position == "mid"
    assert cfg.resume == "auto"


@pytest.mark.parametrize("name,model,batch,lr,wd,epochs,drop", [
    ("paper_resnet50", "resnet50", 128, 0.05, 1e-4, 100, 0.0),
    ("paper_resnet101", "resnet101", 128, 0.05, 1e-4, 100, 0.1),
    ("paper_mobilenetv2", "mobilenetv2", 96, 0.045, 4e-5, 400, 0.0),
])
def test_paper_recipes(name, model, batch, lr, wd, epochs, drop):
    cfg = compose_train(f"+experiment={name}", "data.root=/imagenet")
    assert cfg.model.name == model and cfg.attention.name == "scsa"
    assert cfg.attention.kwargs.attn_drop_ratio == drop
    assert cfg.data.batch_size == batch
    assert scaled_lr(cfg.optim, global_batch=batch) == pytest.approx(lr)
    assert (cfg.optim.opt, cfg.optim.momentum, cfg.optim.weight_decay) == ("momentum", 0.9, wd)
    assert cfg.optim.filter_bias_and_bn is False  # weight decay on every parameter
    assert cfg.trainer.epochs == epochs and cfg.trainer.amp == "fp16" and cfg.seed == 0
    assert (cfg.data.image_size, cfg.data.val_resize, list(cfg.data.scale), cfg.data.hflip) == (224, 256, [0.08, 1.0], 0.5)
    assert list(cfg.data.mean) == MEAN and list(cfg.data.std) == STD
    assert cfg.schedule.warmup_epochs == 0
    if model == "mobilenetv2":
        assert (cfg.schedule.sched, cfg.schedule.decay_epochs, cfg.schedule.decay_rate) == ("step", 1, 0.98)
    else:
        assert cfg.schedule.sched == "multistep"
        assert (list(cfg.schedule.decay_milestones), cfg.schedule.decay_rate) == ([30, 60, 90], 0.1)


def test_linear_scaling_rule_and_explicit_lr():
    cfg = compose_train("+experiment=paper_resnet50", "data.root=/x")
    assert scaled_lr(cfg.optim, global_batch=8 * 128) == pytest.approx(0.4)
    assert scaled_lr(compose_train("optim.lr=0.3").optim, global_batch=1024) == 0.3


@pytest.mark.parametrize("attention", ["none", "scsa", "se", "cbam", "eca", "ca", "ema"])
def test_every_attention_config_builds_its_model(attention):
    import scsa
    cfg = compose_train(f"attention={attention}", "model=resnet50")
    model = scsa.create_model("resnet50", cfg.attention.name, num_classes=10, position=cfg.attention.position,
                              **cfg.attention.kwargs)
    assert model.layer1[0].attn_mid == (cfg.attention.position == "mid")
