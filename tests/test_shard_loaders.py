"""Both backends reading tar shards keep the Loader contract that folders keep: the folder's steps
per epoch, its augmentations and validation images, a bitwise-exact mid-epoch resume. (An epoch
resumed on another number of ranks: test_elastic, over both formats.)"""
import json
import logging
import re

import numpy as np
import pytest
import torch
from formats import as_shards

from data.scan import main as scan_main
from scsa.errors import UserError
from loading import BACKENDS, build, data_cfg

@pytest.mark.parametrize("loader", BACKENDS)
@pytest.mark.parametrize("world_size,batch_size", [(3, 5)])
def test_shards_take_the_folders_steps_per_epoch(repo, subset, loader, world_size, batch_size):
    folder = subset(9, 1, classes=7)  # 63 train images: no batch size or world size here divides them
    counts = []
    for root in (folder, as_shards(folder)):
        ranks = [build(data_cfg(repo, root, loader=loader, batch_size=batch_size), rank, world_size).train
                 for rank in range(world_size)]
        for train in ranks:
            train.set_epoch(0)
        lengths = [len(train) for train in ranks]
        counts.append(([[len(labels) for _, labels in train] for train in ranks], lengths))
    assert counts[0] == counts[1]
    assert counts[0][0] == [[batch_size] * (63 // (world_size * batch_size))] * world_size


def test_torch_shards_give_each_image_the_folders_augmentation(repo, subset):
    """Augmentations are drawn per sample identity, and a shard sample keeps its folder identity."""
    folder = subset(4, 1, classes=4)
    images = {}
    for root in (folder, as_shards(folder)):
        train = build(data_cfg(repo, root, loader="torch", batch_size=2, randaugment_n=2)).train
        train.set_epoch(0)
        images[root] = {int(i): x for batch, _, ids in train.items() for x, i in zip(batch, ids)}
    first, second = images.values()
    assert len(first) == len(second) == 16
    assert first.keys() == second.keys() and all(torch.equal(first[i], second[i]) for i in first)


@pytest.mark.parametrize("loader", BACKENDS)
def test_validation_from_shards_is_the_folders_split_over_ranks(repo, subset, loader):
    folder = subset(1, 7, classes=10)  # 70 val images
    batches = {}
    for root in (folder, as_shards(folder)):
        cfg = data_cfg(repo, root, loader=loader, batch_size=4)
        batches[root] = [[(x, y) for x, y in build(cfg, rank, 2, train=False).val] for rank in range(2)]
    first, second = batches.values()
    assert sum(len(y) for rank in second for _, y in rank) == 70
    for rank_a, rank_b in zip(first, second):
        assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(rank_a, rank_b))


@pytest.mark.parametrize("loader", BACKENDS)
def test_a_damaged_image_in_a_shard_is_named_and_then_listed_in_bad_files(repo, subset, loader, caplog):
    """torch skips it with a warning (as a bad file in a folder), DALI stops with a one-line error naming
    it; ``python -m data.scan`` lists it in the shard folder's bad_files.txt, which both then leave out."""
    root = as_shards(subset(2, 1, classes=4))
    table = np.load(root / "train.npy")
    shard, offset, size = (int(table[k][3]) for k in ("shard", "offset", "size"))
    path = root / "train" / f"shard-{shard:06d}.tar"
    data = bytearray(path.read_bytes())
    data[offset + 20:offset + size] = bytes(size - 20)  # the JPEG's bytes zeroed, the tar intact
    path.write_bytes(bytes(data))
    cfg = data_cfg(repo, root, loader=loader, batch_size=2)
    train = build(cfg).train
    train.set_epoch(0)
    name = f"train/shard-{shard:06d}.tar:train/[^']*.jpg"
    with caplog.at_level(logging.WARNING):
        if loader == "dali":
            with pytest.raises(UserError, match=f"add '{name}' to {root}/bad_files.txt"):
                list(train)
        else:
            assert sum(len(y) for _, y in train) == 8
    assert loader == "dali" or re.search(f"skipping unreadable image {name}", caplog.text)
    with pytest.raises(SystemExit):  # the shard's sha256 differs: exit 2 after listing its bad image
        scan_main([str(root), "--workers", "1"])
    assert re.fullmatch(f"{name}\n", (root / "bad_files.txt").read_text())
    caplog.clear()
    train = build(cfg).train
    train.set_epoch(0)
    with caplog.at_level(logging.WARNING):
        assert sum(len(y) for _, y in train) == 6  # 7 images left: 3 whole batches
    assert "skipping" not in caplog.text


@pytest.mark.slow
def test_train_on_two_gloo_ranks_and_evaluate_from_shards(tmp_path, subset, run_cli, repo):
    """torchrun trains from shards (every val image once per epoch); evaluate.py scores the checkpoint on them.
    (The val batches equal the folder's: test_validation_from_shards_is_the_folders_split_over_ranks.)"""
    shards = as_shards(subset(8, 7, classes=9))  # 63 val images: odd
    result = run_cli(["torchrun", "--standalone", "--nproc_per_node=2", str(repo / "train.py"), "model=resnet18",
                      "attention=none", f"data.root={shards}", "data.image_size=32", "data.val_resize=32",
                      "data.batch_size=4", "data.workers=1", "data.loader=torch", "trainer.epochs=1",
                      "wandb.mode=disabled", f"hydra.run.dir={tmp_path / 'run'}"])
    assert result.returncode == 0, result.stderr[-4000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["val_images"]) for r in records] == [(72 // 8, 63)]
    scored = run_cli(["evaluate.py", f"checkpoint={tmp_path / 'run' / 'checkpoints' / 'last.pt'}",
                      "data.workers=0", f"hydra.run.dir={tmp_path / 'evaluate'}"])  # the run's data.root: shards
    assert scored.returncode == 0, scored.stderr[-3000:]
    assert json.loads(scored.stdout.strip().splitlines()[-1])["images"] == 63
