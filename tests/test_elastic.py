"""One sample order for any world size: an epoch interrupted on one number of ranks continues on
another, and after bad files are listed, by sample identity (read from the ids the loaders yield)."""
import json
import signal

import pytest
import torch
from progress import wait_for_step

from data import open_sources
from data.dali import dali_available
from data.order import epoch_order
from scsa.errors import UserError
from scsa.training.trainer import elastic_accum_steps
from loading import BACKENDS, build, data_cfg

BATCH = 3
ACCUM = {1: 4, 2: 2}  # world size -> accumulation steps: a global batch of 12 either way
STEPS = 5             # 60 train images / 12


def train_loaders(cfg, world_size):
    return [build(cfg, rank, world_size, accum_steps=ACCUM[world_size], channels_last=False).train
            for rank in range(world_size)]


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
    cfg = data_cfg(repo, root, loader=loader, batch_size=BATCH)
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
    ranks = {loader: train_loaders(data_cfg(repo, root, loader=loader, batch_size=BATCH), 2)[0] for loader in ("torch", "dali")}
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
    cfg = data_cfg(repo, root, loader=loader, batch_size=BATCH)
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


@pytest.mark.slow
@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_a_run_preempted_on_one_world_size_ends_at_the_same_step_on_another(tmp_path, subset, run_cli, start_cli,
                                                                          repo, before, after):
    root = subset(16, 2, classes=10)  # 160 train images, global batch 16: 10 steps per epoch
    run_dir = tmp_path / "run"
    accum = {1: 2, 2: 1}  # x 8 images x world size: 16
    args = ["model=resnet18", "attention=none", f"data.root={root}", "data.image_size=32", "data.val_resize=32",
            "data.batch_size=8", "data.workers=0", "data.loader=torch", "trainer.epochs=2",
            f"trainer.accum_steps={accum[before]}", "checkpoint.every_steps=1", f"hydra.run.dir={run_dir}"]

    def command(world_size):
        if world_size == 1:
            return ["train.py", *args]
        return ["torchrun", "--standalone", f"--nproc_per_node={world_size}", str(repo / "train.py"), *args]

    process = start_cli(command(before), env_extra={"OMP_NUM_THREADS": "1"})
    wait_for_step(run_dir, 13, process)  # in the second epoch
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=300)
    checkpoint = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert checkpoint["state"]["epoch"] == 1 and 0 < checkpoint["state"]["epoch_steps"] < 10

    if after == 1:  # a batch size that cannot keep the global batch of 16: one line
        refused = run_cli([*command(1), "data.batch_size=5"])
        errors = [line for line in refused.stderr.splitlines() if line.strip()]
        assert refused.returncode == 2 and len(errors) == 1, refused.stderr[-3000:]
        assert "global batch of 16 samples" in errors[0] and "use data.batch_size=8" in errors[0]
    resumed = run_cli(command(after), env_extra={"OMP_NUM_THREADS": "1"})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = (run_dir / "train.log").read_text()
    assert f"trainer.accum_steps {accum[before]} -> {accum[after]} keeps the global batch of 16" in log
    final = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert final["state"]["step"] == 20 and final["state"]["epoch"] == 2  # the uninterrupted run's
    assert final["config"]["trainer"]["accum_steps"] == accum[after]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [10, 20]


@pytest.mark.slow
@pytest.mark.skipif(not dali_available(), reason="needs DALI")
def test_a_corrupt_image_listed_in_bad_files_then_the_same_command_finishes_the_run(tmp_path, subset, run_cli):
    root = subset(8, 2, classes=10)  # 80 train images, batches of 8: 10 steps
    source = open_sources(str(root), ("train",))["train"]
    middle = source.name(int(epoch_order(source.ids, seed=0, epoch=0)[44]))  # read in step 6
    image = root / middle
    image.write_bytes(image.read_bytes()[:300])  # truncated: PIL and DALI both fail on it
    run_dir = tmp_path / "run"
    args = ["train.py", "model=resnet18", "attention=none", f"data.root={root}", "data.image_size=32",
            "data.val_resize=32", "data.batch_size=8", "data.workers=0", "data.loader=dali", "trainer.epochs=1",
            "seed=0", "checkpoint.every_steps=1", f"hydra.run.dir={run_dir}"]
    failed = run_cli(args)
    assert failed.returncode == 2, failed.stderr[-3000:]
    error = [line for line in failed.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and middle in error[0] and "bad_files.txt" in error[0] and "same command" in error[0]
    interrupted_at = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["state"]["step"]
    assert 0 < interrupted_at < 10

    (root / "bad_files.txt").write_text(f"{middle}\n")
    resumed = run_cli(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in (run_dir / "train.log").read_text()
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["state"]
    assert state["epoch"] == 1 and state["step"] == 9  # 79 images: 9 whole batches
