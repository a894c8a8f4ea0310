"""One sample order for any world size: an epoch interrupted on one number of ranks continues on
another, and after bad files are listed, by sample identity (read from the ids the loaders yield)."""
import pytest
import torch
from omegaconf import OmegaConf

from data import build_loaders, open_sources
from data.dali import dali_available
from scsa.errors import UserError
from scsa.training.trainer import elastic_accum_steps

CPU = torch.device("cpu")
BACKENDS = ["torch", pytest.param("dali", marks=pytest.mark.skipif(not dali_available(), reason="needs DALI"))]
BATCH = 3
ACCUM = {1: 4, 2: 2}  # world size -> accumulation steps: a global batch of 12 either way
STEPS = 5             # 60 train images / 12


def data_cfg(repo, root, loader):
    cfg = OmegaConf.load(repo / "conf" / "data" / "imagenet.yaml")
    cfg.update({"root": str(root), "loader": loader, "workers": 0, "batch_size": BATCH, "image_size": 16,
                "val_resize": 16})
    return cfg


def train_loaders(cfg, world_size):
    return [build_loaders(cfg, rank=rank, world_size=world_size, device=CPU, seed=0, channels_last=False,
                          accum_steps=ACCUM[world_size]).train for rank in range(world_size)]


def consume(ranks, steps=None):
    """Run the ranks in lockstep for ``steps`` optimiser steps (None: to the epoch's end); the
    global order of the ids they read (micro-batch by micro-batch, rank by rank) and the steps."""
    accum = ACCUM[len(ranks)]
    batches = [loader.items() for loader in ranks]
    seen, micro = [], 0
    while steps is None or micro < steps * accum:
        try:
            row = [next(b)[2].tolist() for b in batches]
        except StopIteration:
            break
        seen += [i for ids in row for i in ids]
        micro += 1
        assert len({len(loader) for loader in ranks}) == 1  # every rank has as many batches left
    assert micro % accum == 0
    return seen, micro // accum


def train_ids(root):
    return sorted(open_sources(str(root), ("train",))["train"].ids.view("int64").tolist())


def epoch_loaders(cfg, world_size, epoch=1):
    """Train loaders of every rank, at the start of ``epoch`` (1: a reshuffled epoch, not the first)."""
    ranks = train_loaders(cfg, world_size)
    for train in ranks:
        train.set_epoch(epoch)
    return ranks


@pytest.mark.parametrize("loader", BACKENDS)
@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_an_epoch_interrupted_on_one_world_size_continues_on_another(repo, dataset, loader, before, after):
    root = dataset(6, 1, classes=10)  # 60 train images
    cfg = data_cfg(repo, root, loader)
    straight, steps = consume(epoch_loaders(cfg, before))
    assert steps == STEPS and sorted(straight) == train_ids(root)  # every image once

    interrupted = epoch_loaders(cfg, before)
    first, done = consume(interrupted, steps=2)
    states = [train.state_dict() for train in interrupted]
    assert all({k: v for k, v in s.items() if k != "dali"} == {k: v for k, v in states[0].items() if k != "dali"}
               for s in states)  # the position is the same on every rank
    resumed = train_loaders(cfg, after)
    for train in resumed:
        train.load_state_dict(states[0])
    assert len(resumed[0]) == (STEPS - done) * ACCUM[after]
    rest, more = consume(resumed)
    assert done + more == STEPS
    assert first + rest == straight  # the same global order: every image once, none twice


@pytest.mark.skipif(not dali_available(), reason="needs DALI")
def test_len_means_the_same_in_both_backends_at_every_point_of_an_epoch(repo, subset):
    root = subset(6, 1, classes=10)
    ranks = {loader: train_loaders(data_cfg(repo, root, loader), 2)[0] for loader in ("torch", "dali")}
    for epoch in range(2):
        batches = {name: iter(loader) for name, loader in ranks.items()}
        lengths = []
        for _ in range(STEPS * ACCUM[2]):
            lengths.append({name: len(loader) for name, loader in ranks.items()})
            for it in batches.values():
                next(it)
        assert [length["torch"] for length in lengths] == [length["dali"] for length in lengths] == list(
            range(STEPS * ACCUM[2], 0, -1))
        assert all(list(it) == [] for it in batches.values())
        assert {name: len(loader) for name, loader in ranks.items()} == {"torch": 10, "dali": 10}  # the next epoch
    state = ranks["torch"].state_dict()
    assert state["epoch"] == 2 and state["samples_done"] == 0


@pytest.mark.parametrize("loader", BACKENDS)
def test_files_listed_as_bad_after_a_checkpoint_are_left_out_and_the_epoch_continues(repo, subset, loader):
    root = subset(6, 1, classes=10)
    cfg = data_cfg(repo, root, loader)
    straight, _ = consume(train_loaders(cfg, 1))
    interrupted = train_loaders(cfg, 1)
    first, done = consume(interrupted, steps=2)
    saved = interrupted[0].state_dict()
    source = open_sources(str(root), ("train",))["train"]
    names = dict(zip(source.ids.view("int64").tolist(), (source.name(i) for i in range(len(source)))))
    bad = [first[3], first[-1], straight[40]]  # two consumed already (the last one among them), one to come
    (root / "bad_files.txt").write_text("".join(f"{names[i]}\n" for i in bad))
    resumed = train_loaders(cfg, 1)
    resumed[0].load_state_dict(saved)
    rest, more = consume(resumed)
    remaining = [i for i in straight[len(first):] if i not in bad]  # 35 images: 2 whole global batches
    assert rest == remaining[:24] and done + more == 4


def test_a_world_size_that_cannot_keep_the_global_batch_is_one_line_naming_those_that_can():
    saved = [{"global_batch": 48, "world_size": 2, "batch_size": 8}] * 2
    assert elastic_accum_steps(saved, 2, 8, 3) == (3, None)
    accum, line = elastic_accum_steps(saved, 1, 8, 3)
    assert accum == 6 and "trainer.accum_steps 3 -> 6 keeps the global batch of 48" in line
    with pytest.raises(UserError) as error:
        elastic_accum_steps(saved, 4, 8, 3)
    assert str(error.value) == ("the checkpoint's global batch of 48 samples (2 ranks x data.batch_size=8 x "
                                "trainer.accum_steps=3) cannot be kept on 4 ranks x data.batch_size=8: run on "
                                "1, 2, 3, 6 ranks")
    with pytest.raises(UserError, match="use data.batch_size=8, as the checkpoint did"):
        elastic_accum_steps(saved, 1, 5, 3)
