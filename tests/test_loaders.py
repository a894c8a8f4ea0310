"""The engine's Loader contract, kept alike by both backends (torchvision and DALI)."""
import io
import shutil

import pytest
import torch

from data.dali import dali_available
from scsa.training.rng import get_rng_state, set_rng_state
from scsa.errors import UserError
from loading import BACKENDS, build, data_cfg

@pytest.mark.parametrize("world_size,batch_size", [(1, 8), (2, 8), (3, 5)])
def test_both_backends_take_the_same_steps_per_epoch(repo, subset, world_size, batch_size):
    if not dali_available():
        pytest.skip("needs DALI")
    root = subset(9, 1, classes=7)  # 63 train images: no batch size or world size here divides them
    counts = {}
    for loader in ("torch", "dali"):
        cfg = data_cfg(repo, root, loader=loader, batch_size=batch_size)
        ranks = [build(cfg, rank, world_size).train for rank in range(world_size)]
        for epoch in range(2):
            for train in ranks:
                train.set_epoch(epoch)
            counts[loader, epoch] = [[len(labels) for _, labels in train] for train in ranks]
    expected = [[batch_size] * (63 // world_size // batch_size)] * world_size  # full batches only
    assert all(count == expected for count in counts.values()), counts


@pytest.mark.parametrize("loader", BACKENDS)
def test_batches_keep_the_contract(repo, subset, loader):
    root = subset(4, 1, classes=3)
    loaders = build(data_cfg(repo, root, loader=loader, batch_size=4))
    loaders.train.set_epoch(0)
    images, labels = next(iter(loaders.train))
    assert images.dtype == torch.float32 and images.shape == (4, 3, 16, 16)
    assert images.is_contiguous(memory_format=torch.channels_last)
    assert labels.dtype == torch.int64 and -3 < images.mean() < 3  # normalised, not 0-255
    assert loaders.classes == ["ankle-boot", "bag", "coat"]


def saved(state):
    """``state`` after a round trip through a weights-only checkpoint."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("loader", BACKENDS)
def test_a_mid_epoch_resume_is_bitwise_exact(repo, dataset, request, loader):
    # DALI's RandAugment takes seconds to build: its state in a resume is checked once, on folders
    randaugment = 2 if loader == "torch" or request.node.callspec.params["dataset"] == "folder" else 0
    cfg = data_cfg(repo, dataset(6, 1, classes=4), loader=loader, batch_size=4, randaugment_n=randaugment, re_prob=0.5)
    torch.manual_seed(0)  # random erasing draws from Python's and torch's generators, which a resume restores
    straight = build(cfg).train
    straight.set_epoch(0)
    list(straight)  # resume in the second epoch: a reshuffled one
    straight.set_epoch(1)
    batches = iter(straight)
    next(batches)
    state, rng = saved(straight.state_dict()), saved(get_rng_state())
    rest = list(batches)
    straight.set_epoch(2)
    next_epoch = list(straight)

    torch.manual_seed(1)
    resumed = build(cfg).train
    resumed.load_state_dict(state)
    set_rng_state(rng)
    assert len(resumed) == len(rest) == 5
    for (x0, y0), (x1, y1) in zip(rest, resumed):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)
    resumed.set_epoch(2)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(next_epoch, resumed))


@pytest.mark.parametrize("loader", BACKENDS)
def test_validation_needs_only_the_val_folder(repo, subset, loader):
    root = subset(1, 3, classes=2)
    shutil.rmtree(root / "train")
    loaders = build(data_cfg(repo, root, loader=loader), train=False)
    assert loaders.train is None and loaders.classes == ["ankle-boot", "bag"]
    assert sorted(torch.cat([labels for _, labels in loaders.val]).tolist()) == [0, 0, 0, 1, 1, 1]
    with pytest.raises(UserError, match="has no train/ folder"):
        build(data_cfg(repo, root, loader=loader))


def test_bad_roots_are_one_line_errors_naming_the_fix(repo, subset, tmp_path):
    with pytest.raises(UserError, match="does not exist: point data.root at a folder with train/ and val/"):
        build(data_cfg(repo, tmp_path / "nowhere"))
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "val").mkdir()
    with pytest.raises(UserError, match="holds no images"):
        build(data_cfg(repo, tmp_path / "empty"))
    root = subset(2, 2, classes=3)
    (root / "val" / "coat").rename(root / "val" / "coats")
    with pytest.raises(UserError, match=r"class folders differ .*coats"):
        build(data_cfg(repo, root))
    with pytest.raises(UserError, match="too few images for one full global batch"):
        build(data_cfg(repo, subset(1, 1, classes=2), loader="torch", batch_size=3))
    with pytest.raises(UserError, match="unknown data.loader 'pil': use auto, dali, torch"):
        build(data_cfg(repo, subset(1, 1, classes=2), loader="pil"))
