"""torchrun on CPU (Gloo): one run dir, metrics once, every val image once, ranks in sync."""
import hashlib
import json

import pytest
import torch
from omegaconf import OmegaConf

from data import build_loaders
from tests.conftest import REPO, make_subset, run_cli


@pytest.mark.slow
def test_torchrun_two_ranks_on_cpu(tmp_path):
    data_root = make_subset(tmp_path / "data", 24, 7, classes=9)  # 63 val images: odd
    result = run_cli(["torchrun", "--standalone", "--nproc_per_node=2", str(REPO / "train.py"),
                      "model=resnet18", "attention=none", f"data.root={data_root}", "data.image_size=32",
                      "data.val_resize=32", "data.batch_size=8", "data.workers=0", "data.loader=torch",
                      "trainer.epochs=2", "trainer.max_steps=20"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    run_dirs = [p.parent for p in (tmp_path / "outputs").rglob("metrics.jsonl")]
    assert len(run_dirs) == 1, run_dirs
    assert len(list((tmp_path / "outputs").rglob("config.yaml"))) == 1
    run_dir = run_dirs[0]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1]
    assert all(r["val_images"] == 63 for r in records)
    log = (run_dir / "train.log").read_text()
    assert "world=2" in log and "weights identical on all 2 ranks: True" in log
    assert log.count("epoch 1:") == 1
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["state"]["epoch"] == 2


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_validation_shards_cover_every_image_once(tmp_path, world_size):
    root = make_subset(tmp_path / "d", 1, 7, classes=10)  # 70 val images
    cfg = OmegaConf.load(REPO / "conf" / "data" / "sample.yaml")
    cfg.root, cfg.loader, cfg.workers, cfg.batch_size = str(root), "torch", 0, 4
    seen = []
    for rank in range(world_size):
        loaders = build_loaders(cfg, rank=rank, world_size=world_size, device=torch.device("cpu"), seed=0,
                                channels_last=False)
        for images, labels in loaders.val:
            seen.extend(hashlib.sha1(image.numpy().tobytes()).hexdigest() for image in images)
    assert len(seen) == 70
    assert len(set(seen)) == 70  # no image twice
