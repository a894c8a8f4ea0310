"""A --multirun comparison sweep over all seven attentions, then evaluate.py compare= and cam= on its folder."""
import csv
import json

import pytest
from PIL import Image

from options import attention_options
from scsa.analysis.cam import CELL_INCHES, DPI

ATTENTIONS = ["none", *(a for a in attention_options() if a != "none")]  # the baseline first


@pytest.mark.slow
def test_sweep_over_every_attention_then_compare(tmp_path, tiny_data, run_cli):
    sweep_dir = tmp_path / "sweep"
    result = run_cli(["train.py", "--multirun", f"attention={','.join(ATTENTIONS)}", "model=resnet18",
                      f"data.root={tiny_data}", "data.image_size=32", "data.val_resize=32", "data.batch_size=16",
                      "data.workers=0", "data.loader=torch", "trainer.epochs=1", "trainer.max_steps=3",
                      "wandb.mode=offline", f"hydra.sweep.dir={sweep_dir}"], env_extra={"WANDB_SILENT": "true"})
    assert result.returncode == 0, result.stderr[-3000:]
    run_dirs = sorted((p for p in sweep_dir.iterdir() if p.is_dir()), key=lambda p: int(p.name.split("_")[0]))
    assert [p.name for p in run_dirs] == [f"{i}_resnet18_{name}_seed0" for i, name in enumerate(ATTENTIONS)]
    for run_dir in run_dirs:
        assert (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert list((run_dir / "wandb").glob("offline-run-*"))  # W&B offline, no network

    compared = run_cli(["evaluate.py", f"compare={sweep_dir}", "compare.batch_size=4", "compare.warmup=1",
                        "compare.steps=1", "compare.rounds=1"])  # every attention's benchmark step, tiny
    assert compared.returncode == 0, compared.stderr[-3000:]
    rows = list(csv.DictReader((sweep_dir / "comparison.csv").open()))
    assert [r["attention"] for r in rows] == ATTENTIONS and all(r["n"] == "1" for r in rows)
    params = {r["attention"]: int(float(r["params"])) for r in rows}
    assert params["none"] == 11_181_642 and params["scsa"] == 11_212_362  # 10 classes: R18 - 1000-class head + 10
    assert all(params[name] > params["none"] for name in ATTENTIONS[1:])
    assert all(0 <= float(r["best_top1_mean"]) <= 100 and float(r["img_per_s"]) > 0 for r in rows)
    assert all(r["delta_best_top1"] and not r["delta_best_top1_low"] for r in rows[1:])  # n=1: no interval
    assert "| resnet18 | se |" in (sweep_dir / "comparison.md").read_text()
    assert r"\bottomrule" in (sweep_dir / "comparison.tex").read_text()
    assert (sweep_dir / "comparison.png").stat().st_size > 1000

    # every module's own spatial gate where it has one (SE, ECA and none: channel gates or nothing)
    drawn = run_cli(["evaluate.py", f"cam={sweep_dir}", "cam.gate=true", "cam.block=layer1.1", "images=2"])
    assert drawn.returncode == 0, drawn.stderr[-3000:]
    summary = json.loads(drawn.stdout.strip().splitlines()[-1])
    assert summary["columns"] == ATTENTIONS and summary["shows"] == ["spatial gate at layer1.1 (8x8)"]
    with Image.open(sweep_dir / "cam.png") as grid:
        grid.load()
        assert grid.width == round(len(ATTENTIONS) * CELL_INCHES * DPI)


@pytest.mark.slow
def test_compare_without_runs_is_a_one_line_error(tmp_path, run_cli):
    result = run_cli(["evaluate.py", f"compare={tmp_path}"])
    assert result.returncode == 2 and "no runs" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
