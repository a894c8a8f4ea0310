"""timm's training options: each off by default, each on with one override, used end to end."""
import json

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from data import RandomErasingLoader
from data.torch_loader import SafeImageFolder, train_transform
from scsa.engine.trainer import build_mixup, mix_batch
from tests.conftest import SAMPLE, make_subset, run_cli
from tests.test_config import compose_train

OPTIONS_OFF = {
    "trainer.label_smoothing": 0.0, "trainer.mixup": 0.0, "trainer.cutmix": 0.0, "trainer.model_ema": False,
    "trainer.clip_grad": None, "data.randaugment_n": 0, "data.re_prob": 0.0, "optim.filter_bias_and_bn": False,
}


@pytest.mark.parametrize("preset", [None, "paper_resnet50", "paper_resnet101", "paper_mobilenetv2"])
def test_every_option_is_off_by_default_and_in_the_paper_recipes(preset):
    cfg = compose_train(*([f"+experiment={preset}", "data.root=/imagenet"] if preset else []))
    assert {key: OmegaConf.select(cfg, key) for key in OPTIONS_OFF} == OPTIONS_OFF


def test_randaugment_changes_the_crop_and_replays_from_the_sample_seed():
    image = Image.open(next((SAMPLE / "train" / "bag").iterdir())).convert("RGB")
    folder = SafeImageFolder.__new__(SafeImageFolder)  # only the seeding wrapper is under test
    plain, augmented = train_transform(48, (0.5, 1.0), (0.75, 1.33), 0.5), train_transform(
        48, (0.5, 1.0), (0.75, 1.33), 0.5, randaugment_n=2, randaugment_m=9)
    folder._load = lambda index: augmented(image)
    draws = [folder[(0, seed)] for seed in (1, 1, 2)]
    assert torch.equal(draws[0], draws[1])       # same per-sample seed: same ops, same magnitudes
    assert not torch.equal(draws[0], draws[2])
    folder._load = lambda index: plain(image)
    assert not torch.equal(draws[0], folder[(0, 1)])  # RandAugment did something to the same crop


def test_dali_randaugment_runs_and_differs_from_the_plain_pipeline(tmp_path):
    pytest.importorskip("nvidia.dali")
    from data.dali import build_dali_loaders
    root = make_subset(tmp_path / "d", 4, 1, classes=2)
    common = dict(batch_size=8, image_size=32, val_resize=32, mean=[0, 0, 0], std=[1, 1, 1], scale=(1.0, 1.0),
                  ratio=(1.0, 1.0), hflip=0.0, workers=1, rank=0, world_size=1, device=torch.device("cpu"), seed=3)
    plain = next(iter(build_dali_loaders(str(root), **common)[0]))[0]
    augmented = next(iter(build_dali_loaders(str(root), randaugment_n=3, randaugment_m=10, **common)[0]))[0]
    assert augmented.shape == plain.shape == (8, 3, 32, 32)
    assert not torch.equal(plain, augmented)


def test_random_erasing_loader_erases_and_forwards_the_loader_interface():
    class Loader:
        def __iter__(self):
            yield torch.zeros(4, 3, 16, 16), torch.arange(4)

        def __len__(self):
            return 1

        def state_dict(self):
            return {"at": 7}

    loader = RandomErasingLoader(Loader(), probability=1.0, device=torch.device("cpu"))
    images, labels = next(iter(loader))
    assert len(loader) == 1 and loader.state_dict() == {"at": 7}
    assert all((image != 0).any() for image in images)  # every image got a noise rectangle
    assert torch.equal(labels, torch.arange(4))


def test_mixup_batches_soft_targets_and_odd_batches():
    cfg = compose_train("trainer.mixup=0.8", "trainer.cutmix=1.0", "trainer.label_smoothing=0.1").trainer
    mixup = build_mixup(cfg, num_classes=10)
    images, labels = torch.randn(5, 3, 8, 8), torch.tensor([0, 1, 2, 3, 4])
    mixed, targets = mix_batch(mixup, images.clone(), labels)
    assert mixed.shape == (4, 3, 8, 8) and targets.shape == (4, 10)  # odd batch: the last image left out
    assert torch.allclose(targets.sum(1), torch.ones(4))
    single, target = mix_batch(mixup, images[:1].clone(), labels[:1])
    assert torch.equal(single, images[:1]) and target[0, 0] == pytest.approx(0.91)  # smoothed one-hot
    assert build_mixup(compose_train().trainer, 10) is None
    assert mix_batch(None, images, labels) == (images, labels)


@pytest.mark.slow
def test_every_option_on_trains_validates_and_checkpoints_the_ema(tmp_path, tiny_data):
    run_dir = tmp_path / "run"
    result = run_cli(["train.py", "attention=se", f"data.root={tiny_data}", "data.image_size=32",
                      "data.val_resize=32", "data.batch_size=16", "data.workers=1", "trainer.epochs=2",
                      "trainer.label_smoothing=0.1", "trainer.mixup=0.2", "trainer.cutmix=1.0",
                      "trainer.model_ema=true", "trainer.model_ema_decay=0.9", "trainer.clip_grad=5.0",
                      "data.randaugment_n=2", "data.re_prob=0.25", "optim.filter_bias_and_bn=true",
                      "schedule.warmup_epochs=1", f"hydra.run.dir={run_dir}"])
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(r["val_images"] == 70 for r in records)
    assert all({"val_top1_ema", "val_top5_ema", "val_loss_ema"} <= set(r) for r in records)
    checkpoint = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    ema, model = checkpoint["model_ema"], checkpoint["model"]
    assert ema.keys() == model.keys()
    assert any(not torch.equal(ema[k], model[k]) for k in model if model[k].is_floating_point())

    for flag, key in (("ema=true", "val_top1_ema"), ("ema=false", "val_top1")):
        evaluation = run_cli(["evaluate.py", f"checkpoint={run_dir}/checkpoints/last.pt", flag, "data.workers=1"])
        assert evaluation.returncode == 0, evaluation.stderr[-3000:]
        assert json.loads(evaluation.stdout.strip().splitlines()[-1])["top1"] == pytest.approx(records[-1][key])


def test_evaluating_ema_weights_of_a_run_without_them_is_a_one_line_error(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save({"model": {}, "config": {}}, path)
    result = run_cli(["evaluate.py", f"checkpoint={path}", "ema=true"])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].endswith("train with trainer.model_ema=true, or drop ema=true")
