"""Bad input and bad configuration: one line on stderr, exit code 2, no traceback."""
import os
import sys

import pytest

from tests.conftest import make_subset, run_cli

FAST = ["trainer.epochs=1", "trainer.max_steps=1", "data.loader=torch", "data.workers=0", "attention=none"]


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith("error: ") and "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_missing_data_root(tmp_path):
    result = run_cli(["train.py", *FAST, f"data.root={tmp_path}/nowhere", f"hydra.run.dir={tmp_path}/run"])
    assert_one_line_error(result, "nowhere", "does not exist", "data.root")


def test_empty_data_root(tmp_path):
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "val").mkdir()
    result = run_cli(["train.py", *FAST, f"data.root={tmp_path}/empty", f"hydra.run.dir={tmp_path}/run"])
    assert_one_line_error(result, "holds no images")


def test_train_and_val_class_mismatch(tmp_path):
    root = make_subset(tmp_path / "d", 2, 2, classes=3)
    (root / "val" / "coat").rename(root / "val" / "coats")
    result = run_cli(["train.py", *FAST, f"data.root={root}", f"hydra.run.dir={tmp_path}/run"])
    assert_one_line_error(result, "class folders differ", "coats")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_run_dir_as_user(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    result = run_cli(["train.py", *FAST, f"hydra.run.dir={locked}/run"])
    assert_one_line_error(result, "not writable")


def test_unwritable_run_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the run dir should go")
    result = run_cli(["train.py", *FAST, f"hydra.run.dir={blocker}/run"])
    assert_one_line_error(result, "hydra.run.dir")


@pytest.mark.parametrize("override,fragment", [
    ("trainer.no_such_key=1", "no_such_key"),
    ("model=resnet7", "resnet7"),
    ("attention=squeeze", "squeeze"),
    ("trainer.epochs=[", "epochs"),
    ("trainer.accum_steps=0", "accum_steps"),
])
def test_unknown_config_option(tmp_path, override, fragment):
    result = run_cli(["train.py", override, f"hydra.run.dir={tmp_path}/run"])
    assert_one_line_error(result, fragment)


def test_imagenet_without_root(tmp_path):
    result = run_cli(["train.py", *FAST, "data=imagenet", f"hydra.run.dir={tmp_path}/run"])
    assert_one_line_error(result, "data.root")


def test_bad_amp_value(tmp_path, tiny_data):
    result = run_cli(["train.py", *FAST, "trainer.amp=fp8", f"data.root={tiny_data}", f"hydra.run.dir={tmp_path}/r"])
    assert_one_line_error(result, "trainer.amp", "fp8")


def test_evaluate_missing_checkpoint(tmp_path):
    result = run_cli(["evaluate.py", f"checkpoint={tmp_path}/missing.pt"])
    assert_one_line_error(result, "missing.pt", "not found")


def test_evaluate_truncated_checkpoint(tmp_path):
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"PK\x03\x04 not really a checkpoint")
    result = run_cli(["evaluate.py", f"checkpoint={broken}"])
    assert_one_line_error(result, "truncated or corrupt")


def test_attention_option_that_cannot_build(tmp_path, tiny_data):
    result = run_cli(["train.py", *FAST[:-1], "attention=scsa", "attention.kwargs.head_num=3",
                      f"data.root={tiny_data}", f"hydra.run.dir={tmp_path}/run"])
    assert_one_line_error(result, "head_num")


@pytest.mark.slow
def test_corrupt_image_is_named_with_the_fix_and_the_fix_works(tmp_path):
    pytest.importorskip("nvidia.dali")
    root = make_subset(tmp_path / "d", 4, 2, classes=3)
    bad = sorted((root / "train" / "bag").iterdir())[0]
    bad.write_bytes(bad.read_bytes()[:200])  # a truncated JPEG
    args = ["train.py", "trainer.epochs=1", "attention=none", "data.workers=1", "data.batch_size=4",
            "data.image_size=32", "data.val_resize=32", f"data.root={root}", "resume=none"]

    result = run_cli([*args, "data.loader=dali", f"hydra.run.dir={tmp_path}/dali"])
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    error = result.stderr.strip().splitlines()[-1]  # after the progress bar and the decoder's own log line
    assert error.startswith("error: cannot read ") and f"{root}/train/bag/{bad.name}" in error
    assert "bad_files.txt" in error and "python -m data.scan" in error

    result = run_cli([*args, "data.loader=torch", f"hydra.run.dir={tmp_path}/torch"])  # skips it, says which
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"skipping unreadable image {bad}" in result.stderr + (tmp_path / "torch" / "train.log").read_text()

    assert run_cli([sys.executable, "-m", "data.scan", str(root), "--workers=1"]).returncode == 0
    assert (root / "bad_files.txt").read_text().split() == [f"train/bag/{bad.name}"]
    result = run_cli([*args, "data.loader=dali", f"hydra.run.dir={tmp_path}/dali"])
    assert result.returncode == 0, result.stderr[-2000:]
