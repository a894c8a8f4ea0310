"""What runs leave for people to read: curves and W&B runs (sweep comparisons: test_compare.py).

W&B runs offline only, in a subprocess with every wandb folder in tmp: nothing touches the
network or the user's wandb setup, and the run is read back with wandb's own reader.
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Dict, List

import pytest

from scsa.analysis.plots import plot_curves

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_metrics(path: Path, top1: List[float], img_per_s: List[float]) -> None:
    with path.open("w") as f:
        for epoch, (acc, speed) in enumerate(zip(top1, img_per_s)):
            f.write(json.dumps({"epoch": epoch, "train_loss": 3.0 - epoch, "val_loss": 2.5 - epoch, "val_top1": acc,
                                "val_top5": acc + 20, "lr": 0.1 / (epoch + 1), "img_per_s": speed}) + "\n")


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert path.stat().st_size > 1024


def test_plot_curves_writes_png(tmp_path):
    write_metrics(tmp_path / "metrics.jsonl", [10.0, 25.5, 31.0], [900.0, 1000.0, 1100.0])
    plot_curves(tmp_path / "metrics.jsonl", tmp_path / "curves.png")
    assert_png(tmp_path / "curves.png")


def test_disabled_wandb_run_is_a_noop_that_never_imports_wandb(monkeypatch, tmp_path):
    # sys.modules can't tell (timm imports wandb when it can), so make wandb unimportable instead
    from scsa.training.wandb_run import WandbRun

    monkeypatch.setitem(sys.modules, "wandb", None)
    for run in (WandbRun("disabled", "p", tmp_path / "run", {}, "n", []),
                WandbRun("offline", "p", tmp_path / "run", {}, "n", [], run_id="abc", enabled=False)):
        run.log({"loss": 1.0}, step=0)
        run.summary({"params": 1})
        run.finish()
        assert run.run_id is None
    assert not (tmp_path / "run").exists()


def test_unknown_wandb_mode_is_refused():
    from scsa.training.wandb_run import WandbRun

    with pytest.raises(ValueError, match="not one of offline, online, disabled"):
        WandbRun("dryrun", "p", Path("unused"), {}, "n", [])


@pytest.fixture
def wandb_env(tmp_path) -> Dict[str, str]:
    """No API key, every wandb folder in tmp, and WANDB_MODE=online that mode="offline" must outrank."""
    env = {k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"}
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        env[var] = str(tmp_path / var.lower())
        Path(env[var]).mkdir()
    env.update(WANDB_SILENT="true", WANDB_MODE="online")
    return env


# A fresh run, then a resume that passes the stored id back as the trainer will (one process
# here to save a start-up: the id is all a resume carries over).
LOG_AND_RESUME = """
    import sys
    from pathlib import Path
    from scsa.training.wandb_run import WandbRun
    run_id = None
    for first_step in (0, 2):
        run = WandbRun("offline", "scsa-test", Path(sys.argv[1]), {"lr": 0.1, "model": {"name": "resnet18"}},
                       "r18-scsa", ["scsa"], run_id=run_id)
        for step in (first_step, first_step + 1):
            run.log({"train_loss": 2.0 - step / 4, "val_top1": 10.0 * step}, step=step)
        run.summary({"params": 11689512, "best_top1": 10.0 * (first_step + 1)})
        run.finish()
        run_id = run.run_id
        print(run_id)
"""


def inspect(offline_run: Path, env: Dict[str, str], *args: str) -> str:
    """Read a run's .wandb transaction log with ``wandb leet inspect`` (local, no network)."""
    result = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", *args, str(offline_run)],
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def records(offline_run: Path, env: Dict[str, str]) -> Dict[str, List[Dict[str, Any]]]:
    """The log's records by type ("run", "history", ...)."""
    by_type: Dict[str, List[Dict[str, Any]]] = {}
    for line in inspect(offline_run, env).splitlines():
        record = json.loads(line)
        by_type.setdefault(record["type"], []).append(record[record["type"]])
    return by_type


def steps(offline_run_records: Dict[str, List[Dict[str, Any]]]) -> Dict[int, tuple]:
    return {h["step"]["num"]: (h["item"]["train_loss"], h["item"]["val_top1"]) for h in offline_run_records["history"]}


@pytest.mark.slow
def test_offline_wandb_run_holds_config_metrics_summary_and_resumes(tmp_path, wandb_env, repo):
    run_dir = tmp_path / "run"
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(LOG_AND_RESUME), str(run_dir)], cwd=repo,
                            env=wandb_env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    run_id, resumed_id = result.stdout.split()
    assert resumed_id == run_id
    # offline-run-<start second>-<id>, with a -1 suffix when both start within the same second
    first, second = sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}*"))

    summary = json.loads(inspect(first, wandb_env, "--summary"))
    assert summary["run_id"] == run_id and summary["state"] == "finished"
    assert summary["config"] == {"lr": 0.1, "model": {"name": "resnet18"}}
    assert (summary["project"], summary["name"], summary["tags"]) == ("scsa-test", "r18-scsa", ["scsa"])
    assert summary["summary"]["params"] == 11689512 and summary["summary"]["best_top1"] == 10.0
    assert steps(records(first, wandb_env)) == {0: (2.0, 0.0), 1: (1.75, 10.0)}

    # the resume is a second log file of the same run: `wandb sync` uploads both into it, in order
    resumed = records(second, wandb_env)
    [run_record] = resumed["run"]
    assert run_record["run_id"] == run_id and run_record["resume"] is True
    assert steps(resumed) == {2: (1.5, 20.0), 3: (1.25, 30.0)}
