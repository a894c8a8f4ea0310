"""Nothing may lose a long run: resume, preemption, non-finite steps, safe and atomic checkpoints."""
import errno
import json
import os
import signal
from pathlib import Path

import pytest
import torch

from data.dali import dali_available
from scsa.training.checkpoint import keep_epoch_copy, load_checkpoint, previous_path, save_atomic
from scsa.errors import EXIT_PREEMPTED, UserError
from scsa.trained import load_trained
from progress import wait_for_step

# 10 classes x 40 train images at batch 16: 25 steps per epoch, quick on 2 CPU cores.
TRAIN = ["model=resnet18", "attention=none", "data.image_size=32", "data.val_resize=32", "data.batch_size=16",
         "data.workers=0", "optim.lr=0.05", "trainer.deterministic=true"]


def train_args(data_root, run_dir, *extra, loader="torch"):
    return ["train.py", *TRAIN, f"data.loader={loader}", f"data.root={data_root}", f"hydra.run.dir={run_dir}", *extra]


def final_weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]


@pytest.mark.slow
@pytest.mark.parametrize("loader", ["torch", pytest.param("dali", marks=pytest.mark.skipif(
    not dali_available(), reason="needs DALI"))])
def test_sigkill_mid_epoch_then_resume_is_bitwise_identical(tmp_path, tiny_data, run_cli, start_cli, loader):
    reference = run_cli(train_args(tiny_data, tmp_path / "straight", "trainer.epochs=2", loader=loader))
    assert reference.returncode == 0, reference.stderr[-3000:]

    interrupted = tmp_path / "interrupted"
    args = train_args(tiny_data, interrupted, "trainer.epochs=2", "checkpoint.every_steps=1", loader=loader)
    process = start_cli(args)
    wait_for_step(interrupted, 30, process)  # epoch 2, batch 5 of 25
    process.send_signal(signal.SIGKILL)
    process.wait()
    state = torch.load(interrupted / "checkpoints" / "last.pt", weights_only=True)["state"]
    assert state["epoch"] == 1 and 0 < state["batch"] < 25

    resumed = run_cli(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in (interrupted / "train.log").read_text()
    expected, actual = final_weights(tmp_path / "straight"), final_weights(interrupted)
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[k], actual[k]) for k in expected)
    records = [json.loads(line) for line in (interrupted / "metrics.jsonl").read_text().splitlines()]
    straight = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_top1"] for r in records] == [r["val_top1"] for r in straight]
    assert records[-1]["train_loss"] == pytest.approx(straight[-1]["train_loss"], rel=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_signal_checkpoints_and_exits_75(tmp_path, tiny_data, run_cli, start_cli, signum):
    run_dir = tmp_path / "run"
    args = train_args(tiny_data, run_dir, "trainer.epochs=2", "checkpoint.every_steps=1")
    process = start_cli(args)
    wait_for_step(run_dir, 3, process)
    process.send_signal(signum)
    process.send_signal(signum)  # SLURM and torchrun may both deliver it
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == EXIT_PREEMPTED, stderr[-3000:]
    assert "preempted" in stderr and "Traceback" not in stderr
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["state"]
    assert state["step"] >= 3
    resumed = run_cli(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["state"]["step"] == 50


@pytest.mark.slow
def test_diverging_run_stops_naming_the_step_and_never_saves_a_broken_model(tmp_path, tiny_data, run_cli):
    run_dir = tmp_path / "run"
    result = run_cli(train_args(tiny_data, run_dir, "trainer.epochs=1", "optim.lr=1e30",
                                "trainer.max_nonfinite_steps=3", "checkpoint.every_steps=1"))
    assert result.returncode == 2, result.stderr[-3000:]
    error = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and "diverged" in error[0] and "step" in error[0]
    assert "Traceback" not in result.stderr
    assert (run_dir / "train.log").read_text().count("step skipped") == 3
    for checkpoint in (run_dir / "checkpoints").glob("*.pt"):
        weights = torch.load(checkpoint, weights_only=True)["model"]
        assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())


@pytest.mark.slow
def test_truncated_last_checkpoint_falls_back_to_the_previous(tmp_path, tiny_data, run_cli):
    run_dir = tmp_path / "run"
    first = run_cli(train_args(tiny_data, run_dir, "trainer.epochs=2"))
    assert first.returncode == 0, first.stderr[-3000:]
    last = run_dir / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])  # a crash mid-copy, a full disk...
    second = run_cli(train_args(tiny_data, run_dir, "trainer.epochs=3"))
    assert second.returncode == 0, second.stderr[-3000:]
    log = (run_dir / "train.log").read_text()
    assert "skipping checkpoint" in log and "truncated or corrupt" in log
    assert "resumed from" in (run_dir / "train.log").read_text()
    records = [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records == [0, 1, 1, 2]  # epoch 1 is redone from last.prev.pt (the end of epoch 0)


class Payload:
    """Unpickling this runs code: exactly what weights-only loading must refuse."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"model": {}, "config": Payload(marker)}, evil)
    with pytest.raises(UserError, match="not plain weights"):
        load_checkpoint(str(evil))
    with pytest.raises(UserError, match="not plain weights"):
        load_trained(str(evil))
    assert not marker.exists()


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_atomic({"step": 1}, path, keep_previous=True)

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", no_space)
    with pytest.raises(UserError, match="No space left on device.*previous checkpoint is intact"):
        save_atomic({"step": 2}, path, keep_previous=True)
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temp file left behind


def test_keep_previous_rotates(tmp_path):
    path = tmp_path / "last.pt"
    save_atomic({"step": 1}, path, keep_previous=True)
    save_atomic({"step": 2}, path, keep_previous=True)
    assert torch.load(path, weights_only=True) == {"step": 2}
    assert torch.load(previous_path(path), weights_only=True) == {"step": 1}


def test_keep_last_n_epoch_checkpoints(tmp_path):
    last = tmp_path / "last.pt"
    for epoch in range(5):
        save_atomic({"epoch": epoch}, last, keep_previous=True)
        keep_epoch_copy(last, epoch, keep=2)
    assert sorted(p.name for p in tmp_path.glob("epoch_*.pt")) == ["epoch_0003.pt", "epoch_0004.pt"]
    assert torch.load(tmp_path / "epoch_0003.pt", weights_only=True) == {"epoch": 3}  # a link keeps its bytes
    assert torch.load(last, weights_only=True) == {"epoch": 4}
