"""timm's training options: each off by default, each on with one override, used end to end."""
import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from data import randaugment_fill
from data.dali import build_dali_loader, dali_available
from data.device import DeviceLoader
from data.folder import FolderSource
from data.torch_loader import ImageList, build_torch_loader, train_transform
from scsa.training.recipe import build_mixup
from scsa.errors import UserError
from scsa.trained import load_trained

OPTIONS_OFF = {
    "trainer.label_smoothing": 0.0, "trainer.mixup": 0.0, "trainer.cutmix": 0.0, "trainer.model_ema": False,
    "trainer.clip_grad": None, "data.randaugment_n": 0, "data.re_prob": 0.0, "optim.filter_bias_and_bn": False,
}
CPU = torch.device("cpu")


@pytest.mark.parametrize("preset", [None, "paper_resnet50", "paper_resnet101", "paper_mobilenetv2"])
def test_every_option_is_off_by_default_and_in_the_paper_recipes(compose_train, preset):
    cfg = compose_train(*([f"+experiment={preset}", "data.root=/imagenet"] if preset else []))
    assert {key: OmegaConf.select(cfg, key) for key in OPTIONS_OFF} == OPTIONS_OFF


def test_randaugment_changes_the_crop_and_replays_from_the_sample_seed(repo):
    bags = FolderSource(str(repo / "data" / "sample"), "train", ["bag"])
    plain = ImageList(bags, train_transform(48, (0.5, 1.0), (0.75, 1.33), 0.5, 0, 9, 128))
    augmented = ImageList(bags, train_transform(48, (0.5, 1.0), (0.75, 1.33), 0.5, 2, 9, 128))
    draws = [augmented[(0, seed)][0] for seed in (1, 1, 2)]
    assert torch.equal(draws[0], draws[1])       # same per-sample seed: same ops, same magnitudes
    assert not torch.equal(draws[0], draws[2])
    assert not torch.equal(draws[0], plain[(0, 1)][0])  # RandAugment did something to the same crop


def uniform_dataset(root: Path, value: int, n: int = 16) -> Path:
    for split in ("train", "val"):
        (root / split / "a").mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (32, 32), (value,) * 3).save(root / split / "a" / f"{i}.png")
    return root


def randaugment_corners(build, root: Path, fill: int) -> np.ndarray:
    """The corner pixels of strongly RandAugmented copies of one flat image: uncovered by a
    rotation, shear or translation, they show the fill."""
    loader = build(FolderSource(str(root), "train", ["a"]), train=True, batch_size=16, accum_steps=1, image_size=32,
                   val_resize=32,
                   scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0, randaugment_n=3, randaugment_m=10, fill=fill,
                   workers=0, rank=0, world_size=1, seed=0, device=CPU)
    corners = []
    for epoch in range(2):
        loader.set_epoch(epoch)
        for images, _, _ in loader:
            corners.append(images[:, :, [0, 0, -1, -1], [0, -1, 0, -1]].permute(0, 2, 1).reshape(-1, 3))
    return torch.cat(corners).numpy()


def test_randaugment_fills_with_the_same_grey_in_both_loaders(tmp_path):
    root = uniform_dataset(tmp_path / "flat", 100)
    fill = randaugment_fill([60.2, 59.9, 60.0])
    assert fill == 60
    builds = {"torch": build_torch_loader, "dali": functools.partial(build_dali_loader, root=str(root))}
    for name in ("torch", "dali") if dali_available() else ("torch",):
        corners = randaugment_corners(builds[name], root, fill)
        assert (corners == fill).all(1).any(), name  # uncovered corners show exactly the fill
        assert not (corners == 128).all(1).any(), name  # not DALI's own default grey


def test_dali_randaugment_runs_and_differs_from_the_plain_pipeline(subset):
    pytest.importorskip("nvidia.dali")
    root = subset(4, 1, classes=2)
    source = FolderSource(str(root), "train", ["ankle-boot", "bag"])
    common = dict(train=True, batch_size=8, accum_steps=1, image_size=32, val_resize=32, scale=(1.0, 1.0),
                  ratio=(1.0, 1.0), hflip=0.0, randaugment_m=10, fill=128, workers=1, rank=0, world_size=1, device=CPU, seed=3)
    plain = next(iter(build_dali_loader(source, str(root), randaugment_n=0, **common)))[0]
    augmented = next(iter(build_dali_loader(source, str(root), randaugment_n=3, **common)))[0]
    assert augmented.shape == plain.shape == (8, 3, 32, 32)
    assert not torch.equal(plain, augmented)


class ZeroBatches:
    def __iter__(self):
        yield torch.full((4, 3, 16, 16), 100, dtype=torch.uint8), torch.arange(4), torch.arange(4)

    def __len__(self):
        return 1

    def set_epoch(self, epoch):
        pass

    def state_dict(self):
        return {"at": 7}

    def load_state_dict(self, state):
        pass


def test_random_erasing_happens_on_the_normalised_device_batch():
    loader = DeviceLoader(ZeroBatches(), mean=(100, 100, 100), std=(2, 2, 2), device=CPU, channels_last=False,
                          erase_prob=1.0)
    images, labels = next(iter(loader))
    assert len(loader) == 1 and loader.state_dict() == {"at": 7}
    assert images.dtype == torch.float32
    assert all((image != 0).any() for image in images)  # every (normalised to 0) image got a noise rectangle
    assert torch.equal(labels, torch.arange(4))
    plain = next(iter(DeviceLoader(ZeroBatches(), (100,) * 3, (2,) * 3, CPU, channels_last=True)))[0]
    assert (plain == 0).all() and plain.is_contiguous(memory_format=torch.channels_last)


def test_mixup_gives_soft_targets_and_refuses_an_odd_batch(compose_train):
    cfg = compose_train("trainer.mixup=0.8", "trainer.cutmix=1.0", "trainer.label_smoothing=0.1").trainer
    mixup = build_mixup(cfg, num_classes=10, batch_size=4)
    mixed, targets = mixup(torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3]))
    assert mixed.shape == (4, 3, 8, 8) and targets.shape == (4, 10)
    assert torch.allclose(targets.sum(1), torch.ones(4))
    with pytest.raises(UserError, match="even data.batch_size"):
        build_mixup(cfg, num_classes=10, batch_size=5)
    assert build_mixup(compose_train().trainer, 10, 5) is None


@pytest.mark.slow
def test_every_option_on_trains_validates_and_checkpoints_the_ema(tmp_path, tiny_data, run_cli):
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


def test_ema_weights_of_a_run_without_them_are_a_clear_error(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save({"model": {}, "config": {}, "classes": []}, path)
    with pytest.raises(UserError, match="train with trainer.model_ema=true, or drop ema=true"):
        load_trained(str(path), ema=True)
