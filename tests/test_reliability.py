"""Nothing may lose a long run: resume, preemption, non-finite steps, safe and atomic checkpoints.

The tests named ``..._finding_N`` hold issue 18's findings (README "Reliability").
"""
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from data.dali import dali_available
from data.folder import check_dataset_root
from scsa.training.checkpoint import (find_resume, keep_epoch_copy, load_checkpoint, model_differences, previous_path,
                                      save_atomic)
from scsa.training.distributed import DistInfo
from scsa.training.precision import Precision
from scsa.training.preemption import PreemptionWatcher
from scsa.training.recipe import build_scheduler
from scsa.training.rundir import RunDirLock, set_aside
from scsa.training.trainer import Trainer, TrainerConfig
from scsa.training.tracking import Tracker
from scsa.training.wandb_run import WandbRun
from scsa.errors import EXIT_PREEMPTED, EXIT_USER_ERROR, UserError
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
def test_truncated_last_checkpoint_falls_back_to_the_previous_finding_5_and_6(tmp_path, tiny_data, run_cli):
    run_dir = tmp_path / "run"
    first = run_cli(train_args(tiny_data, run_dir, "trainer.epochs=2"))
    assert first.returncode == 0, first.stderr[-3000:]
    last = run_dir / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])  # a crash mid-copy, a full disk...
    stale = run_dir / "checkpoints" / ".last.pt.abc123.tmp"  # finding 6: what a kill -9 during a write leaves
    stale.write_bytes(b"half a checkpoint")
    second = run_cli(train_args(tiny_data, run_dir, "trainer.epochs=3"))
    assert second.returncode == 0, second.stderr[-3000:]
    log = (run_dir / "train.log").read_text()
    assert "skipping checkpoint" in log and "truncated or corrupt" in log
    assert "resumed from" in (run_dir / "train.log").read_text()
    assert not stale.exists()
    records = [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records == [0, 1, 2]  # epoch 1 is redone from last.prev.pt (the end of epoch 0), its line once


def epochs_logged(run_dir: Path) -> list:
    return [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


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
    with pytest.raises(UserError, match="no space left on .*previous checkpoint is intact"):
        save_atomic({"step": 2}, path, keep_previous=True)
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temp file left behind


def test_keep_previous_rotates(tmp_path):
    path = tmp_path / "last.pt"
    save_atomic({"step": 1}, path, keep_previous=True)
    save_atomic({"step": 2}, path, keep_previous=True)
    assert torch.load(path, weights_only=True) == {"step": 2}
    assert torch.load(previous_path(path), weights_only=True) == {"step": 1}


def test_last_checkpoint_is_never_missing_while_it_rotates(tmp_path, monkeypatch):
    """A kill between the rotation's renames must still find last.pt (the resume looks there first)."""
    path = tmp_path / "last.pt"
    save_atomic({"step": 1}, path, keep_previous=True)
    rename = os.replace
    present = []

    def watched(src, dst):
        present.append(path.exists())
        rename(src, dst)

    monkeypatch.setattr(os, "replace", watched)
    save_atomic({"step": 2}, path, keep_previous=True)
    assert present and all(present)
    assert torch.load(path, weights_only=True) == {"step": 2}
    assert torch.load(previous_path(path), weights_only=True) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.prev.pt", "last.pt"]


def test_keep_last_n_epoch_checkpoints(tmp_path):
    last = tmp_path / "last.pt"
    for epoch in range(5):
        save_atomic({"epoch": epoch}, last, keep_previous=True)
        keep_epoch_copy(last, epoch, keep=2)
    assert sorted(p.name for p in tmp_path.glob("epoch_*.pt")) == ["epoch_0003.pt", "epoch_0004.pt"]
    assert torch.load(tmp_path / "epoch_0003.pt", weights_only=True) == {"epoch": 3}  # a link keeps its bytes
    assert torch.load(last, weights_only=True) == {"epoch": 4}


# ---- issue 18: unit tests --------------------------------------------------------------------------------------
def test_empty_last_checkpoint_falls_back_to_the_previous_finding_7(tmp_path):
    save_atomic({"step": 1}, tmp_path / "last.pt", keep_previous=True)
    save_atomic({"step": 2}, tmp_path / "last.pt", keep_previous=True)
    (tmp_path / "last.pt").write_bytes(b"")
    warnings = []
    path, checkpoint = find_resume("auto", tmp_path, warnings.append)
    assert path.name == "last.prev.pt" and checkpoint == {"step": 1}
    assert len(warnings) == 1 and "empty, truncated or corrupt" in warnings[0]
    with pytest.raises(UserError, match="empty, truncated or corrupt"):
        load_trained(str(tmp_path / "last.pt"))  # evaluate.py's path


@pytest.mark.parametrize("damage", ["truncate", "unsafe"])
def test_checkpoints_of_which_none_loads_stop_the_run_finding_1(tmp_path, damage):
    for name in ("best.pt", "last.pt", "last.prev.pt"):
        save_atomic({"step": 1}, tmp_path / name)
    for name in ("last.pt", "last.prev.pt"):
        if damage == "truncate":
            (tmp_path / name).write_bytes((tmp_path / name).read_bytes()[:100])
        else:
            torch.save({"config": Payload(tmp_path / "pwned")}, tmp_path / name)
    with pytest.raises(UserError) as error:
        find_resume("auto", tmp_path, lambda message: None)
    for fragment in ("best.pt, last.prev.pt, last.pt", "restore a good last.pt", "resume=none", "old-<time>/"):
        assert fragment in str(error.value)
    assert find_resume("none", tmp_path, lambda message: None) is None


def test_set_aside_renames_and_never_deletes(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "best.pt").write_bytes(b"best")
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    aside = set_aside(tmp_path, ["checkpoints", "metrics.jsonl", "curves.png"])
    assert (aside / "checkpoints" / "best.pt").read_bytes() == b"best" and (aside / "metrics.jsonl").is_file()
    assert not (tmp_path / "checkpoints").exists() and set_aside(tmp_path, ["checkpoints"]) is None


def test_a_second_lock_on_a_run_dir_names_the_holder_finding_2(tmp_path):
    held = RunDirLock(tmp_path / "run")
    with pytest.raises(UserError, match=rf"in use by another run \(pid {os.getpid()} on .*\): wait for it"):
        RunDirLock(tmp_path / "run")
    held.release()
    RunDirLock(tmp_path / "run").release()  # free again once released (or once its process is gone)


def test_metrics_agree_with_the_checkpoint_on_resume_finding_5(tmp_path):
    tracker = Tracker(tmp_path, True, WandbRun("disabled", "p", tmp_path, {}, "n", []))
    for epoch in (0, 1, 1, 2):  # a line written, then killed before its checkpoint: epoch 1 again, then 2
        tracker.log_epoch({"epoch": epoch, "step": epoch})
    tracker.keep_epochs(2, None)  # last.pt: two epochs done, mid-epoch save (no record of its own)
    assert epochs_logged(tmp_path) == [0, 1]
    tracker.keep_epochs(3, {"epoch": 2, "step": 9})  # killed after last.pt of epoch 2, before its line
    assert epochs_logged(tmp_path) == [0, 1, 2]
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"epoch": 3, "st')  # the disk filled mid-line, after last.pt of epoch 3
    tracker.keep_epochs(4, {"epoch": 3, "step": 12})
    assert epochs_logged(tmp_path) == [0, 1, 2, 3]


def test_a_metrics_line_that_cannot_be_written_is_one_line(tmp_path):
    (tmp_path / "metrics.jsonl").mkdir()  # any OSError: a full disk, here a folder in the file's place
    tracker = Tracker(tmp_path, True, WandbRun("disabled", "p", tmp_path, {}, "n", []))
    with pytest.raises(UserError, match="could not append to .*metrics.jsonl.*run the same command again"):
        tracker.log_epoch({"epoch": 0, "step": 1})


def closing_after_enospc(*args, **kwargs):  # torch 2.x on a full disk: the zip writer's __exit__ fails next
    try:
        raise OSError(errno.ENOSPC, "No space left on device")
    except OSError:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")


def file_write_failed(*args, **kwargs):  # the text alone, as other torch versions report it
    raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file "
                       "data/0: file write failed")


@pytest.mark.parametrize("full_disk_save", [closing_after_enospc, file_write_failed])
def test_a_full_disk_is_one_line_and_leaves_the_previous_checkpoint(tmp_path, monkeypatch, full_disk_save):
    save_atomic({"step": 1}, tmp_path / "last.pt", keep_previous=True)
    monkeypatch.setattr(torch, "save", full_disk_save)
    with pytest.raises(UserError, match=rf"no space left on '{tmp_path}' writing last.pt .*checkpoint.keep_last"):
        save_atomic({"step": 2}, tmp_path / "last.pt", keep_previous=True)
    assert torch.load(tmp_path / "last.pt", weights_only=True) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_a_full_disk_at_an_epoch_end_logs_no_line_for_it_finding_8(tmp_path, compose_train, monkeypatch):
    cfg = compose_train("trainer.epochs=1", "schedule=step")
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = [(torch.randn(4, 6), torch.randint(0, 3, (4,))) for _ in range(2)]
    checkpoint_dir = tmp_path / "checkpoints"
    trainer = Trainer(TrainerConfig.from_config(cfg.trainer, cfg.checkpoint), model=model, optimizer=optimizer,
                      scheduler=build_scheduler(cfg.schedule, optimizer, 1, len(batches)),
                      criterion=nn.CrossEntropyLoss(), train_loader=Batches(batches), val_loader=batches,
                      precision=Precision("none", torch.device("cpu")), dist=DistInfo(), device=torch.device("cpu"),
                      tracker=Tracker(tmp_path, True, WandbRun("disabled", "p", tmp_path, {}, "n", [])),
                      checkpoint_dir=checkpoint_dir, meta={})
    monkeypatch.setattr(torch, "save", lambda *args, **kwargs: (_ for _ in ()).throw(
        RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")))
    watcher = PreemptionWatcher()
    try:
        with pytest.raises(UserError, match="no space left on"):
            trainer.run_epoch(watcher)
    finally:
        watcher.close()
    assert not (tmp_path / "metrics.jsonl").exists()
    assert not any(checkpoint_dir.iterdir())


class Batches(list):
    """A list of batches with the engine's Loader contract (nothing to resume in it)."""

    def set_epoch(self, epoch: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {}


def test_an_empty_class_folder_is_an_error_naming_it_finding_9(subset):
    root = subset(1, 1, classes=2)
    for split in ("train", "val"):
        (root / split / "zzz").mkdir()
    with pytest.raises(UserError, match=rf"class folder '{root}/train/zzz' holds no images"):
        check_dataset_root(str(root))


def test_a_checkpoint_of_another_model_says_what_differs_finding_10():
    stored = {"model": {"name": "resnet18"}, "attention": {"name": "se", "position": "end",
                                                          "kwargs": {"reduction": 16, "kernel": "auto"}}}
    same = {"model": {"name": "resnet18"}, "attention": {"name": "se", "position": "end",
                                                        "kwargs": {"reduction": 16, "kernel": "torch"}}}
    assert model_differences(stored, same, ["a", "b"], ["a", "b"]) == []  # the kernel is where it runs, not what
    other = {"model": {"name": "resnet50"}, "attention": {"name": "scsa", "position": "mid", "kwargs": {}}}
    differences = model_differences(stored, other, ["a", "b"], ["a", "b", "c"])
    assert differences[:2] == ["model resnet18 vs resnet50", "attention se vs scsa"]
    assert differences[-1] == "2 vs 3 classes"


# ---- issue 18: end to end, on one tiny run (2 classes x 16 images at batch 2: 16 steps an epoch) ---------------------
TINY = ["model=resnet18", "attention=none", "data.image_size=32", "data.val_resize=32", "data.batch_size=2",
        "data.workers=0", "data.loader=torch", "optim.lr=0.05", "trainer.deterministic=true", "trainer.epochs=2",
        "wandb.mode=disabled"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, make_sample, run_in) -> dict:
    """One uninterrupted tiny run: what interrupted runs must end up equal to."""
    base = tmp_path_factory.mktemp("tiny")
    data = make_sample(base / "data", 16, 1, classes=2)
    args = ["train.py", *TINY, f"data.root={data}"]
    result = run_in([*args, f"hydra.run.dir={base}/reference"], base)
    assert result.returncode == 0, result.stderr[-3000:]
    return {"base": base, "data": data, "args": args, "dir": base / "reference"}


def assert_same_weights(run_dir: Path, reference: Path) -> None:
    expected, actual = final_weights(reference), final_weights(run_dir)
    assert expected.keys() == actual.keys() and all(torch.equal(expected[k], actual[k]) for k in expected)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == EXIT_USER_ERROR, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr and lines[-1].startswith("error: "), result.stderr[-3000:]
    assert sum(line.startswith("error: ") for line in lines) == 1
    return lines[-1]


@pytest.mark.slow
def test_kill_9_ten_times_in_one_run_loses_nothing_findings_5_and_6(tiny_run, tmp_path, run_cli, start_cli):
    run_dir = tmp_path / "killed"
    args = [*tiny_run["args"], "checkpoint.every_steps=1", f"hydra.run.dir={run_dir}"]
    moments = random.Random(18)
    total = torch.load(tiny_run["dir"] / "checkpoints" / "last.pt", weights_only=True)["state"]["step"]
    step = 0
    for _ in range(10):  # each after some progress, at a random moment: mid-step, mid-save, mid-line, validating
        process = start_cli(args)
        wait_for_step(run_dir, step + 1, process)
        time.sleep(moments.uniform(0, 0.6))
        process.kill()
        process.wait()
        step = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["state"]["step"]
        assert step < total, "the run finished before the tenth kill"
    result = run_cli(args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert epochs_logged(run_dir) == [0, 1]
    assert not list(run_dir.rglob("*.tmp"))
    assert_same_weights(run_dir, tiny_run["dir"])


@pytest.mark.slow
def test_one_run_per_dir_and_the_same_command_resumes_findings_2_and_3(tiny_run, tmp_path, run_cli, start_cli):
    args = [*tiny_run["args"], "checkpoint.every_steps=1"]  # no run dir pinned: outputs/<date>/<time>
    first = start_cli(args)
    while not list(tmp_path.glob("outputs/*/*/checkpoints/last.pt")):
        assert first.poll() is None, first.communicate()[1][-3000:]
        time.sleep(0.2)
    run_dir = list(tmp_path.glob("outputs/*/*/checkpoints/last.pt"))[0].parent.parent
    first.send_signal(signal.SIGSTOP)  # paused, lock held: the tiny run must not finish while the second one tries
    second = run_cli([*tiny_run["args"], "seed=1", f"hydra.run.dir={run_dir}"])  # another run, same dir
    line = one_error_line(second)
    assert f"run dir '{run_dir}' is in use by another run (pid {first.pid} on " in line
    assert "seed: 0" in (run_dir / ".hydra" / "config.yaml").read_text()

    first.send_signal(signal.SIGTERM)  # delivered as it continues
    first.send_signal(signal.SIGCONT)
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == EXIT_PREEMPTED, stderr[-3000:]
    assert "run the same command again to resume" in stderr

    again = run_cli(args)  # the identical command, from the same folder
    assert again.returncode == 0, again.stderr[-3000:]
    assert [p.parent.parent for p in tmp_path.glob("outputs/*/*/checkpoints/last.pt")] == [run_dir]
    assert "resumed from" in (run_dir / "train.log").read_text()
    assert epochs_logged(run_dir) == [0, 1]
    assert_same_weights(run_dir, tiny_run["dir"])


@pytest.mark.slow
def test_sigterm_during_start_up_exits_75_with_one_line_finding_12(tiny_run, tmp_path, start_cli):
    for delay in (1.0, 3.0):  # during the imports; while Hydra, the data and the model start
        process = start_cli([*tiny_run["args"], f"hydra.run.dir={tmp_path}/run{delay}"])
        time.sleep(delay)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == EXIT_PREEMPTED, stderr[-3000:]
        assert stderr.strip().splitlines()[-1].startswith("preempted: signal 15") and "Traceback" not in stderr


@pytest.mark.slow
def test_a_finished_run_whose_checkpoints_do_not_load_is_not_overwritten_finding_1(tiny_run, tmp_path, run_cli):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run["dir"], run_dir)
    checkpoints = run_dir / "checkpoints"
    for name in ("last.pt", "last.prev.pt"):
        (checkpoints / name).write_bytes((checkpoints / name).read_bytes()[:1000])
    best, metrics = (checkpoints / "best.pt").read_bytes(), (run_dir / "metrics.jsonl").read_text()
    args = [*tiny_run["args"], f"hydra.run.dir={run_dir}"]
    line = one_error_line(run_cli(args))
    assert "neither last.pt nor last.prev.pt loads" in line and "resume=none" in line
    assert (checkpoints / "best.pt").read_bytes() == best and (run_dir / "metrics.jsonl").read_text() == metrics

    again = run_cli([*args, "resume=none", "trainer.epochs=1"])  # start over: the old files are kept aside
    assert again.returncode == 0, again.stderr[-3000:]
    aside, = run_dir.glob("old-*")
    assert (aside / "checkpoints" / "best.pt").read_bytes() == best and (aside / "metrics.jsonl").read_text() == metrics
    assert epochs_logged(run_dir) == [0]


@pytest.mark.slow
def test_resuming_another_models_checkpoint_says_what_differs_finding_10(tiny_run, tmp_path, run_cli, subset):
    last = tiny_run["dir"] / "checkpoints" / "last.pt"
    args = [*tiny_run["args"], f"resume={last}", f"hydra.run.dir={tmp_path}/run", "trainer.epochs=3"]
    assert "attention none vs se" in one_error_line(run_cli([*args, "attention=se"]))
    three_classes = subset(1, 1, classes=3)
    assert "2 vs 3 classes" in one_error_line(run_cli([*args, f"data.root={three_classes}"]))
    tampered = torch.load(last, weights_only=True)
    tampered["config"]["attention"] = {"name": "se", "position": "end", "kwargs": {"reduction": 16}}
    torch.save(tampered, tmp_path / "tampered.pt")
    line = one_error_line(run_cli([*args, f"resume={tmp_path}/tampered.pt", "attention=se"]))
    assert "does not fit this run" in line


# Where mounting is not allowed, torch.save fails in the run's own process as it does on a full disk.
FULL_DISK_SAVE = """import torch

def _full_disk(*args, **kwargs):
    raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")

torch.save = _full_disk
"""


def mount_tmpfs(path: Path, size: str) -> bool:
    """Whether a tmpfs of ``size`` is now mounted on ``path`` (root, where the container allows it)."""
    try:
        return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                              capture_output=True).returncode == 0
    except OSError:  # no mount command
        return False


@pytest.mark.slow
def test_a_full_disk_run_dir_exits_2_with_one_line_finding_8(tiny_run, tmp_path, run_cli, repo):
    """A 5 MB tmpfs run dir: Hydra's files fit, the first checkpoint (~90 MB) does not."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    mounted = mount_tmpfs(run_dir, "5m")
    env = None
    if not mounted:
        (tmp_path / "site").mkdir()
        (tmp_path / "site" / "sitecustomize.py").write_text(FULL_DISK_SAVE)
        env = {"PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(repo)])}
    try:
        line = one_error_line(run_cli([*tiny_run["args"], f"hydra.run.dir={run_dir}"], env_extra=env))
        assert line.startswith(f"error: no space left on '{run_dir / 'checkpoints'}' writing "), line
        assert "checkpoint.keep_last" in line
        assert list((run_dir / "checkpoints").iterdir()) == []  # no temp file, nothing half-written
        metrics = run_dir / "metrics.jsonl"  # no epoch whose checkpoint was not written
        assert not metrics.exists() or epochs_logged(run_dir) == []
    finally:
        if mounted:
            subprocess.run(["umount", str(run_dir)], check=True)
