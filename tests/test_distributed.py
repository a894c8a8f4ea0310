"""torchrun on CPU (Gloo): one run dir, metrics once, every val image once, ranks in sync."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List

import pytest
import torch
from omegaconf import OmegaConf

from data import build_loaders
from scsa.training.checkpoint import load_checkpoint


@pytest.mark.slow
def test_torchrun_two_ranks_on_cpu(tmp_path, subset, run_cli, repo):
    """With gradient accumulation: DDP skips the all-reduce (no_sync) on non-update steps."""
    data_root = subset(24, 7, classes=9)  # 63 val images: odd
    result = run_cli(["torchrun", "--standalone", "--nproc_per_node=2", str(repo / "train.py"),
                      "model=resnet18", "attention=none", f"data.root={data_root}", "data.image_size=32",
                      "data.val_resize=32", "data.batch_size=8", "data.workers=0", "data.loader=torch",
                      "trainer.epochs=2", "trainer.max_steps=20", "trainer.accum_steps=2"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    run_dirs = [p.parent for p in (tmp_path / "outputs").rglob("metrics.jsonl")]
    assert len(run_dirs) == 1, run_dirs
    assert len(list((tmp_path / "outputs").rglob("config.yaml"))) == 1
    run_dir = run_dirs[0]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1]
    # 216 train images, global batches of 2 ranks x 8 x 2 = 32: 6 updates per epoch (24 images wait)
    assert [r["step"] for r in records] == [6, 12]
    assert all(r["val_images"] == 63 for r in records)
    log = (run_dir / "train.log").read_text()
    assert "world=2" in log and "weights identical on all 2 ranks: True" in log
    assert log.count("epoch 1:") == 1
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["state"]["epoch"] == 2


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_validation_shards_cover_every_image_once(subset, repo, world_size):
    root = subset(1, 7, classes=10)  # 70 val images
    cfg = OmegaConf.load(repo / "conf" / "data" / "imagenet.yaml")
    cfg.root, cfg.loader, cfg.workers, cfg.batch_size = str(root), "torch", 0, 4
    seen = []
    for rank in range(world_size):
        loaders = build_loaders(cfg, rank=rank, world_size=world_size, device=torch.device("cpu"), seed=0,
                                channels_last=False, train=False)
        for images, labels in loaders.val:
            seen.extend(hashlib.sha1(image.numpy().tobytes()).hexdigest() for image in images)
    assert len(seen) == 70
    assert len(set(seen)) == 70  # no image twice


def child_pids(pid: int) -> List[int]:
    """Direct children of ``pid`` (torchrun's workers), from /proc."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if parent == pid:
            children.append(int(stat.parent.name))
    return children


@pytest.mark.slow
@pytest.mark.parametrize("max_restarts", [0, 1])
def test_a_killed_rank_ends_the_job_in_bounded_time_or_restarts_it_from_the_checkpoint(tmp_path, subset, repo,
                                                                                       max_restarts):
    data_root = subset(24, 7, classes=9)  # 216 train images: 13 steps per epoch
    run_dir = tmp_path / "run"
    job = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         f"--max-restarts={max_restarts}", str(repo / "train.py"), "model=resnet18", "attention=none",
         f"data.root={data_root}", "data.image_size=32", "data.val_resize=32", "data.batch_size=8",
         "data.workers=0", "data.loader=torch", "trainer.epochs=3", "checkpoint.every_steps=2",
         f"hydra.run.dir={run_dir}"],
        cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    try:
        log = run_dir / "train.log"
        deadline = time.monotonic() + 300
        while not (log.is_file() and "epoch 0:" in log.read_text()):
            assert job.poll() is None and time.monotonic() < deadline, "the job ended or stalled before epoch 1"
            time.sleep(0.5)
        workers = child_pids(job.pid)
        assert len(workers) == 2, workers
        os.kill(workers[1], signal.SIGKILL)
        killed = time.monotonic()
        output, _ = job.communicate(timeout=300)
    finally:
        job.kill()
    if max_restarts == 0:
        assert job.returncode != 0
        assert time.monotonic() - killed < 90, "the surviving rank hung"
        assert load_checkpoint(str(run_dir / "checkpoints" / "last.pt"))["state"]["step"] >= 13  # nothing lost
        return
    assert job.returncode == 0, output[-4000:]
    text = log.read_text()
    assert "resumed from" in text and "weights identical on all 2 ranks: True" in text
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sorted({r["epoch"] for r in records}) == [0, 1, 2] and records[-1]["epoch"] == 2
