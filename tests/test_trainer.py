"""The training engine on its own: toy models and fixed batches, so that what an update
should do can be computed by hand."""
import copy

import pytest
import torch
import torch.nn as nn

from scsa.training.distributed import DistInfo
from scsa.training.precision import Precision
from scsa.training.preemption import PreemptionWatcher
from scsa.training.recipe import build_scheduler
from scsa.training.trainer import Trainer, TrainerConfig
from scsa.errors import UserError
from scsa.training.tracking import Tracker
from scsa.training.wandb_run import WandbRun


class FixedBatches:
    """A train loader over fixed batches, keeping the engine's Loader contract."""

    def __init__(self, batches):
        self.batches, self.start = batches, 0

    def set_epoch(self, epoch: int) -> None:
        self.start = 0

    def state_dict(self) -> dict:
        return {"start": self.start}

    def load_state_dict(self, state: dict) -> None:
        self.start = state["start"]

    def __len__(self) -> int:
        return len(self.batches) - self.start

    def __iter__(self):
        return iter(self.batches[self.start:])


@pytest.fixture
def tiny_trainer(tmp_path, compose_train):
    def build(model, batches, *overrides, dist=DistInfo()) -> Trainer:
        cfg = compose_train("optim.lr=0.5", "optim.momentum=0", "optim.weight_decay=0", "trainer.epochs=1",
                            "schedule=step", "checkpoint.every_steps=0", "checkpoint.every_minutes=0", *overrides)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        tracker = Tracker(tmp_path, True, WandbRun("disabled", "p", tmp_path, {}, "n", []))
        return Trainer(TrainerConfig.from_config(cfg.trainer, cfg.checkpoint), model=model, optimizer=optimizer,
                       scheduler=build_scheduler(cfg.schedule, optimizer, 1, len(batches)),
                       criterion=nn.CrossEntropyLoss(), train_loader=FixedBatches(batches), val_loader=[],
                       precision=Precision("none", torch.device("cpu")), dist=dist, device=torch.device("cpu"),
                       tracker=tracker, checkpoint_dir=tmp_path, meta={})
    return build


def train_one_epoch(trainer: Trainer) -> None:
    watcher = PreemptionWatcher()
    try:
        trainer.train_one_epoch(0, watcher)
    finally:
        watcher.close()


def test_each_update_is_the_mean_gradient_of_a_whole_group(tiny_trainer):
    torch.manual_seed(0)
    batches = [(torch.randn(4, 6), torch.randint(0, 3, (4,))) for _ in range(6)]  # groups of 2: 2 + 2 + 2
    model = nn.Linear(6, 3)  # no BatchNorm: accumulated and whole-group gradients agree exactly
    expected = copy.deepcopy(model)

    trainer = tiny_trainer(model, batches, "trainer.accum_steps=2")
    train_one_epoch(trainer)

    for group in (batches[0:2], batches[2:4], batches[4:6]):
        images, labels = torch.cat([b[0] for b in group]), torch.cat([b[1] for b in group])
        expected.zero_grad()
        nn.functional.cross_entropy(expected(images), labels).backward()
        with torch.no_grad():
            for p in expected.parameters():
                p -= 0.5 * p.grad
    assert trainer.state.step == trainer.state.epoch_steps == 3
    assert all(p.grad is None for p in model.parameters())  # nothing carried into the next epoch
    for got, want in zip(model.parameters(), expected.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_loader_with_a_short_last_group_is_refused_before_it_carries_gradients_over(tiny_trainer):
    batches = [(torch.randn(4, 6), torch.randint(0, 3, (4,))) for _ in range(5)]  # groups of 2: 2 + 2 + 1
    trainer = tiny_trainer(nn.Linear(6, 3), batches, "trainer.accum_steps=2")
    with pytest.raises(RuntimeError, match="not whole groups of trainer.accum_steps=2"):
        train_one_epoch(trainer)
    assert trainer.state.step == 0


def test_sync_bn_off_the_gpu_is_a_clear_error(tiny_trainer):
    batches = [(torch.randn(4, 6), torch.randint(0, 3, (4,)))]
    trainer = tiny_trainer(nn.Sequential(nn.BatchNorm1d(6), nn.Linear(6, 3)), batches,
                           "trainer.sync_bn=true", dist=DistInfo(rank=0, world_size=2))
    with pytest.raises(UserError, match="trainer.sync_bn=true needs CUDA"):
        trainer.wrap()


def test_compiled_training_takes_the_same_steps_as_eager(tiny_trainer):
    torch.manual_seed(0)
    batches = [(torch.randn(4, 6), torch.randint(0, 3, (4,))) for _ in range(3)]
    eager_model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    compiled_model = copy.deepcopy(eager_model)
    for model, overrides in ((eager_model, ()), (compiled_model, ("trainer.compile=true",))):
        trainer = tiny_trainer(model, batches, *overrides)
        trainer.wrap()
        train_one_epoch(trainer)
    assert trainer.train_model is not compiled_model  # the step ran through torch.compile's wrapper
    for got, want in zip(compiled_model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_accum_steps_below_one_is_a_clear_error(compose_train):
    cfg = compose_train("trainer.accum_steps=0")
    with pytest.raises(UserError, match="trainer.accum_steps=0: use a positive int"):
        TrainerConfig.from_config(cfg.trainer, cfg.checkpoint)


def test_a_resumed_epoch_continues_from_the_loaders_position_and_the_next_starts_over(tiny_trainer):
    torch.manual_seed(0)
    batches = [(torch.randn(4, 6), torch.randint(0, 3, (4,))) for _ in range(4)]
    trainer = tiny_trainer(nn.Linear(6, 3), batches)
    trainer.train_loader.load_state_dict({"start": 3})
    trainer.state.batch = 3
    train_one_epoch(trainer)
    assert trainer.state.step == 1  # only the last batch was left
    trainer.state.batch = 0
    train_one_epoch(trainer)
    assert trainer.state.step == 5  # set_epoch: the whole next epoch
