"""Configs compose, the authors' recipes are exact, every setting has one source."""
import pytest
from omegaconf import OmegaConf
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from scsa.training.recipe import scaled_lr

MEAN, STD = [255 * m for m in IMAGENET_DEFAULT_MEAN], [255 * s for s in IMAGENET_DEFAULT_STD]


def test_defaults_train_scsa_resnet18_on_the_sample(compose_train):
    cfg = compose_train()
    assert (cfg.model.name, cfg.attention.name, cfg.data.name) == ("resnet18", "scsa", "sample")
    assert cfg.attention.position == "mid"
    assert cfg.attention.kwargs.kernel == "auto"
    assert cfg.resume == "auto"


@pytest.mark.parametrize("name,model,batch,lr,wd,epochs,drop", [
    ("paper_resnet50", "resnet50", 128, 0.05, 1e-4, 100, 0.0),
    ("paper_resnet101", "resnet101", 128, 0.05, 1e-4, 100, 0.1),
    ("paper_mobilenetv2", "mobilenetv2", 96, 0.045, 4e-5, 400, 0.0),
])
def test_paper_recipes(compose_train, name, model, batch, lr, wd, epochs, drop):
    cfg = compose_train(f"+experiment={name}", "data.root=/imagenet")
    assert cfg.model.name == model and cfg.attention.name == "scsa"
    assert cfg.attention.kwargs.attn_drop_ratio == drop
    assert cfg.data.batch_size == batch
    assert scaled_lr(cfg.optim, global_batch=batch) == pytest.approx(lr)
    assert (cfg.optim.opt, cfg.optim.momentum, cfg.optim.weight_decay) == ("momentum", 0.9, wd)
    assert cfg.optim.filter_bias_and_bn is False  # weight decay on every parameter
    assert cfg.trainer.epochs == epochs and cfg.trainer.amp == "fp16" and cfg.seed == 0
    assert (cfg.data.image_size, cfg.data.val_resize, cfg.data.hflip) == (224, 256, 0.5)
    assert list(cfg.data.scale) == [0.08, 1.0]
    assert list(cfg.data.ratio) == pytest.approx([3 / 4, 4 / 3])
    assert list(cfg.data.mean) == pytest.approx(MEAN) and list(cfg.data.std) == pytest.approx(STD)
    assert cfg.schedule.warmup_epochs == 0
    if model == "mobilenetv2":
        assert (cfg.schedule.sched, cfg.schedule.decay_epochs, cfg.schedule.decay_rate) == ("step", 1, 0.98)
    else:
        assert cfg.schedule.sched == "multistep"
        assert (list(cfg.schedule.decay_milestones), cfg.schedule.decay_rate) == ([30, 60, 90], 0.1)


def test_linear_scaling_rule_and_explicit_lr(compose_train):
    cfg = compose_train("+experiment=paper_resnet50", "data.root=/x")
    assert scaled_lr(cfg.optim, global_batch=8 * 128) == pytest.approx(0.4)
    assert scaled_lr(compose_train("optim.lr=0.3").optim, global_batch=1024) == 0.3


def test_data_presets_inherit_the_imagenet_recipe(compose_train):
    imagenet = compose_train("data=imagenet", "data.root=/x").data
    sample = compose_train().data
    different = {k for k in imagenet if OmegaConf.select(imagenet, k) != OmegaConf.select(sample, k)}
    assert different == {"name", "root", "batch_size", "workers", "image_size", "val_resize", "scale"}
    assert list(sample.mean) == list(imagenet.mean)
