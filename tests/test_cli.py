"""Bad input and bad configuration: one line on stderr, exit code 2, no traceback.

The checks themselves are unit-tested in process; a few slow tests run the commands to show
that the whole path (Hydra, the task, the exit code) keeps the promise.
"""
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException

from scsa.training.cli import check_run_dir, hydra_error, run_task
from scsa.training.config import CONFIG_DIR
from scsa.training.schema import check_config
from scsa.training.precision import Precision
from scsa.errors import EXIT_USER_ERROR, UserError
from scsa.models import create_model_from_config
from scsa.trained import load_trained

FAST = ["trainer.epochs=1", "trainer.max_steps=1", "data.loader=torch", "data.workers=0", "attention=none"]


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-2000:]
    assert lines[0].startswith("error: ")
    return lines[0]


def assert_one_line_error(result, *fragments):
    assert result.returncode == EXIT_USER_ERROR, result.stderr[-2000:]
    line = one_line(result.stderr)
    for fragment in fragments:
        assert fragment in line, line


def exits_with_one_line(capsys, call, *fragments) -> None:
    with pytest.raises(SystemExit) as exit_info:
        call()
    assert exit_info.value.code == EXIT_USER_ERROR
    line = one_line(capsys.readouterr().err)
    for fragment in fragments:
        assert fragment in line, line


@pytest.mark.parametrize("override,fragment", [
    ("trainer.no_such_key=1", "unknown key 'trainer.no_such_key'"),
    ("trainer.lable_smoothing=0.1", "did you mean 'trainer.label_smoothing'?"),
    ("model=resnet7", "use one of mobilenetv2, resnet101"),
    ("attention=squeeze", "squeeze"),
    ("trainer.epochs=[", "epochs"),
])
def test_overrides_that_do_not_compose(compose_train, override, fragment):
    with pytest.raises(HydraException) as error:
        compose_train(override)
    line = hydra_error(error.value, "train")
    assert fragment in line and "\n" not in line, line


@pytest.mark.parametrize("override,fragment", [  # issue 18, findings 10 and 11: each value checked before anything
    ("+trainer.lable_smoothing=0.1", "unknown key 'trainer.lable_smoothing'; did you mean 'trainer.label_smoothing'?"),
    ("+foo=1", "unknown key 'foo'"),
    ("trainer.epochs=abc", "trainer.epochs=abc: input should be a valid integer"),
    ("trainer.epochs=0", "trainer.epochs=0: input should be greater than or equal to 1"),
    ("data.batch_size=0", "data.batch_size=0: input should be greater than or equal to 1"),
    ("data.batch_size=-1", "data.batch_size=-1"),
    ("optim.lr=-0.1", "optim.lr=-0.1: input should be greater than 0"),
    ("data.hflip=1.5", "data.hflip=1.5: input should be less than or equal to 1"),
    ("trainer.amp=fp8", "trainer.amp=fp8"),
    ("wandb.mode=cloud", "wandb.mode=cloud"),
    ("model.name=resnet7", "unknown backbone"),
    ("+attention.kwargs.head_numm=2", "did you mean 'attention.kwargs.head_num'?"),
    ("+optim.nesterovv=true", "did you mean 'optim.nesterov'?"),
    ("+schedule.cycle_limitt=2", "did you mean 'schedule.cycle_limit'?"),
    ("optim.opt=sgdd", "optim.opt=sgdd"),
])
def test_every_train_value_is_checked(compose_train, override, fragment):
    with pytest.raises(UserError) as error:
        check_config(compose_train(override), "train")
    assert fragment in str(error.value), str(error.value)


@pytest.mark.parametrize("overrides", [[], ["attention=ca", "+experiment=paper_mobilenetv2", "data.root=/x"],
                                       ["optim=adamw", "+optim.betas=[0.9,0.99]"], ["+schedule.cycle_limit=2"],
                                       ["attention=cbam", "attention.kwargs.reduction=8"]])
def test_valid_configs_pass_the_schema(compose_train, overrides):
    check_config(compose_train(*overrides), "train")


@pytest.mark.parametrize("override,fragment", [("images=abc", "images=abc"), ("images=0", "images=0"),
                                               ("export=onnx", None), ("+export.opsett=3", "unknown key")])
def test_every_evaluate_value_is_checked(override, fragment):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=["export=onnx", override] if "export." in override
                      else [override])
    if fragment is None:
        check_config(cfg, "evaluate")
        return
    with pytest.raises(UserError, match=fragment):
        check_config(cfg, "evaluate")


def test_a_run_dir_under_a_file_cannot_be_created(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the run dir should go")  # unwritable whoever runs the test, root too
    with pytest.raises(UserError, match=r"cannot be created.*hydra.run.dir=<a writable folder>"):
        check_run_dir(blocker / "run")


def test_user_errors_and_missing_values_in_a_task_end_in_one_line(capsys, compose_train):
    def raise_user_error():
        raise UserError("data.root 'x' does not exist: point data.root at a folder")

    exits_with_one_line(capsys, lambda: run_task(raise_user_error), "does not exist")
    cfg = compose_train("data=imagenet")
    exits_with_one_line(capsys, lambda: run_task(lambda: cfg.data.root), "data.root")


def test_bad_amp_value():
    with pytest.raises(UserError, match="unknown trainer.amp 'fp8': use auto, bf16, fp16 or none"):
        Precision("fp8", torch.device("cpu"))


def test_attention_option_that_cannot_build_names_it(compose_train):
    cfg = compose_train("attention=scsa", "attention.kwargs.head_num=3")
    with pytest.raises(ValueError, match="head_num"):
        create_model_from_config(cfg.model, cfg.attention, 10)


def test_missing_and_truncated_checkpoints(tmp_path):
    with pytest.raises(UserError, match="missing.pt' not found"):
        load_trained(str(tmp_path / "missing.pt"))
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"PK\x03\x04 not really a checkpoint")
    with pytest.raises(UserError, match="truncated or corrupt"):
        load_trained(str(broken))
    torch.save({"weights": {}}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="is not a train.py checkpoint"):
        load_trained(str(tmp_path / "other.pt"))


@pytest.mark.slow
def test_commands_exit_2_with_one_line(tmp_path, run_cli):
    assert_one_line_error(run_cli(["train.py", *FAST, f"data.root={tmp_path}/nowhere"]), "nowhere", "does not exist")
    assert_one_line_error(run_cli(["train.py", "trainer.no_such_key=1"]), "no_such_key")
    assert_one_line_error(run_cli(["train.py", "+trainer.lable_smoothing=0.1"]), "trainer.label_smoothing")
    assert_one_line_error(run_cli(["train.py", "trainer.epochs=abc"]), "trainer.epochs=abc")
    assert_one_line_error(run_cli(["evaluate.py", f"cam={tmp_path}", "images=abc"]), "images=abc")
    help_text = run_cli(["train.py", "--help"]).stdout
    assert "attention: ca, cbam" in help_text and "export" not in help_text
    assert "export: onnx, safetensors" in run_cli(["evaluate.py", "--help"]).stdout
    assert_one_line_error(run_cli(["train.py", *FAST, "trainer.accum_steps=0"]), "accum_steps")
    assert_one_line_error(run_cli(["train.py", *FAST, "data=imagenet"]), "data.root")
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert_one_line_error(run_cli(["train.py", *FAST, f"hydra.run.dir={blocker}/run"]), "hydra.run.dir")
    assert_one_line_error(run_cli(["evaluate.py", f"checkpoint={tmp_path}/missing.pt"]), "missing.pt", "not found")
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").rglob("*.pt"))


@pytest.mark.slow
def test_corrupt_image_is_named_with_the_fix_and_the_fix_works(tmp_path, subset, run_cli):
    pytest.importorskip("nvidia.dali")
    root = subset(4, 2, classes=3)
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
    # named as bad_files.txt lists it (relative to data.root)
    assert f"skipping unreadable image train/bag/{bad.name}" in result.stderr + (tmp_path / "torch" / "train.log").read_text()

    assert run_cli([sys.executable, "-m", "data.scan", str(root), "--workers=1"]).returncode == 0
    assert (root / "bad_files.txt").read_text().split() == [f"train/bag/{bad.name}"]
    result = run_cli([*args, "data.loader=dali", f"hydra.run.dir={tmp_path}/dali"])
    assert result.returncode == 0, result.stderr[-2000:]
