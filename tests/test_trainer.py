"""The training engine on its own: toy models and fixed batches, so that what an update
should do can be computed by hand."""
import copy

import pytest
import torch
import torch.nn as nn

from data import Loaders
from scsa.engine.distributed import DistInfo
from scsa.engine.precision import Precision
from scsa.engine.preemption import PreemptionWatcher
from scsa.engine.trainer import Trainer
from scsa.errors import UserError
from scsa.tracking import Tracker
from scsa.wandb_run import WandbRun
from tests.test_config import compose_train
from train import build_scheduler


class FixedBatches:
    """A train loader over fixed batches, with the loader interface the trainer uses."""

    def __init__(self, batches):
        self.batches, self.start = batches, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.start = start_batch

    def __len__(self) -> int:
        return len(self.batches) - self.start

    def __iter__(self):
        return iter(self.batches[self.start:])


def tiny_trainer(tmp_path, model, batches, *overrides, dist=DistInfo()) -> Trainer:
    cfg = compose_train("optim.lr=0.5", "optim.momentum=0", "optim.weight_decay=0", "trainer.epochs=1",
                        "schedule=step", "checkpoint.every_steps=0", "checkpoint.every_minutes=0", *overrides)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    loaders = Loaders(FixedBatches(batches), None, ["a", "b", "c"], "fixed")
    tracker = Tracker(tmp_path, True, WandbRun("disabled", "p", tmp_path, {}, "n", []))
    return Trainer(model, optimizer, build_scheduler(cfg, optimizer, len(batches)), loaders,
                   Precision("none", torch.device("cpu")), dist, torch.device("cpu"), tracker, tmp_path, cfg, {})


def train_one_epoch(trainer: Trainer) -> None:
    watcher = PreemptionWatcher()
    try:
        trainer.train_one_epoch(0, watcher)
    finally:
        watcher.close()


def test_each_update_is_the_mean_gradient_of_its_group_and_the_short_group_is_not_dropped(tmp_path):
    torch.manual_seed(0)
    batches = [(torch.randn(4, 6), torch.randint(0, 3, (4,))) for _ in range(5)]  # groups of 2: 2 + 2 + 1
    model = nn.Linear(6, 3)  # no BatchNorm: accumulated and whole-group gradients agree exactly
    expected = copy.deepcopy(model)

    trainer = tiny_trainer(tmp_path, model, batches, "trainer.accum_steps=2")
    train_one_epoch(trainer)

    for group in (batches[0:2], batches[2:4], batches[4:5]):
        images, labels = torch.cat([b[0] for b in group]), torch.cat([b[1] for b in group])
        expected.zero_grad()
        nn.functional.cross_entropy(expected(images), labels).backward()
        with torch.no_grad():
            for p in expected.parameters():
                p -= 0.5 * p.grad
    assert trainer.state.step == 3
    assert all(p.grad is None for p in model.parameters())  # nothing carried into the next epoch
    for got, want in zip(model.parameters(), expected.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_sync_bn_off_the_gpu_is_a_clear_error(tmp_path):
    batches = [(torch.randn(4, 6), torch.randint(0, 3, (4,)))]
    trainer = tiny_trainer(tmp_path, nn.Sequential(nn.BatchNorm1d(6), nn.Linear(6, 3)), batches,
                           "trainer.sync_bn=true", dist=DistInfo(rank=0, world_size=2))
    with pytest.raises(UserError, match="trainer.sync_bn=true needs CUDA"):
        trainer.wrap()


def test_compiled_training_takes_the_same_steps_as_eager(tmp_path):
    torch.manual_seed(0)
    batches = [(torch.randn(4, 6), torch.randint(0, 3, (4,))) for _ in range(3)]
    eager_model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    compiled_model = copy.deepcopy(eager_model)
    for model, overrides in ((eager_model, ()), (compiled_model, ("trainer.compile=true",))):
        trainer = tiny_trainer(tmp_path, model, batches, *overrides)
        trainer.wrap()
        train_one_epoch(trainer)
    assert trainer.train_model is not compiled_model  # the step ran through torch.compile's wrapper
    for got, want in zip(compiled_model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
