"""Comparing a sweep: runs grouped by all but the seed, intervals from scipy, the table files,
attention maps; and end to end, a 2 attentions x 2 seeds sweep through compare= and cam=."""
import csv
import json
import logging
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from scipy import stats as scipy_stats

from data import val_sample
from options import modules
from scsa.analysis import stats
from scsa.attention import attention_spec
from scsa.models import list_backbones
from scsa.analysis.cam import (CELL_INCHES, DPI, checkpoint_columns, gate_of, last_attention_block, last_stage,
                      spatial_gate, write_cam)
from scsa.training.cli import expand_shorthands
from scsa.analysis.compare import CSV_FIELDS, comparison_rows, write_comparison
from scsa.analysis.runs import baseline, find_runs, group_runs, recipe


def make_run(sweep: Path, name: str, attention: str, seed: Optional[int], top1: List[float],
             top5: Optional[List[float]] = None, **overrides) -> Path:
    """A run dir as train.py leaves it: .hydra/config.yaml and metrics.jsonl (one line per epoch)."""
    run_dir = sweep / name
    (run_dir / ".hydra").mkdir(parents=True)
    config = OmegaConf.create({
        "model": {"name": "resnet18", "drop_rate": 0.0},
        "attention": {"name": attention, "position": "end", "kwargs": {"kernel": "auto"}},
        "data": {"root": "/data/sample", "workers": 2, "image_size": 32},
        "optim": {"lr": 0.1}, "trainer": {"epochs": len(top1), "device": "auto"},
        "wandb": {"mode": "offline"}, "resume": "auto", "seed": seed})
    for key, value in overrides.items():
        OmegaConf.update(config, key.replace("__", "."), value)
    OmegaConf.save(config, run_dir / ".hydra" / "config.yaml")
    top5 = top5 or [min(100.0, t + 20) for t in top1]
    with (run_dir / "metrics.jsonl").open("w") as f:
        for epoch, (t1, t5) in enumerate(zip(top1, top5)):
            f.write(json.dumps({"epoch": epoch, "train_loss": 1.0, "val_loss": 1.0, "val_top1": t1, "val_top5": t5,
                                "val_images": 100, "lr": 0.1, "img_per_s": 100.0}) + "\n")
    return run_dir


def by_attention(rows: List[Dict]) -> Dict[str, Dict]:
    return {row["attention"]: row for row in rows}


def test_runs_group_by_everything_but_the_seed_and_where_they_ran(tmp_path):
    make_run(tmp_path, "0_none_seed0", "none", 0, [50.0])
    make_run(tmp_path, "1_none_seed1", "none", 1, [52.0], data__workers=8, wandb__mode="disabled",
             trainer__device="cpu", resume="none", attention__kwargs__kernel="torch")
    make_run(tmp_path, "2_se_seed0", "se", 0, [55.0])
    make_run(tmp_path, "3_se_seed1", "se", 1, [56.0])
    make_run(tmp_path, "4_se_lr_seed0", "se", 0, [40.0], optim__lr=0.2)
    make_run(tmp_path, "5_se_data_seed0", "se", 0, [41.0], data__root="/elsewhere")
    groups = group_runs(find_runs(tmp_path))

    assert [(g.attention, [r.name for r in g.runs]) for g in groups] == [
        ("none", ["0_none_seed0", "1_none_seed1"]), ("se", ["2_se_seed0", "3_se_seed1"]),
        ("se", ["4_se_lr_seed0"]), ("se", ["5_se_data_seed0"])]
    assert [g.label for g in groups] == [
        "resnet18 + none", "resnet18 + se",
        "resnet18 + se (optim.lr=0.2)", "resnet18 + se (data.root=/elsewhere)"]
    none, se, se_lr, se_data = groups
    assert baseline(se, groups) is none and baseline(none, groups) is none
    assert baseline(se_lr, groups) is None and baseline(se_data, groups) is None  # no `none` with that recipe
    assert "seed" not in recipe(none.runs[0].config) and recipe(none.runs[0].config)["optim.lr"] == 0.1


def test_attention_options_tell_groups_apart_only_among_the_same_attention(tmp_path):
    make_run(tmp_path, "0", "none", 0, [50.0], attention__kwargs={})
    make_run(tmp_path, "1", "scsa", 0, [51.0], attention__position="mid", attention__kwargs__head_num=1)
    make_run(tmp_path, "2", "scsa", 0, [52.0], attention__position="mid", attention__kwargs__head_num=2)
    make_run(tmp_path, "3", "scsa", 1, [52.5], attention__position="mid", attention__kwargs__head_num=1)
    labels = [g.label for g in group_runs(find_runs(tmp_path))]
    assert labels == ["resnet18 + none", "resnet18 + scsa", "resnet18 + scsa (attention.kwargs.head_num=2)"]


def test_mean_and_std_of_best_and_final_epochs(tmp_path):
    make_run(tmp_path, "0", "none", 0, [50.0, 60.0, 58.0], [90.0, 95.0, 99.0])
    make_run(tmp_path, "1", "none", 1, [62.0, 61.0, 62.0], [96.0, 97.0, 98.0])
    make_run(tmp_path, "2", "none", 2, [55.0, 57.0, 59.0], [91.0, 92.0, 93.0])
    [row], _ = comparison_rows(tmp_path)
    best, best5, final = [60.0, 62.0, 59.0], [95.0, 96.0, 93.0], [58.0, 62.0, 59.0]  # best: first epoch at max
    assert row["n"] == 3 and row["seeds"] == "0;1;2"
    assert row["best_top1_mean"] == pytest.approx(statistics.mean(best))
    assert row["best_top1_std"] == pytest.approx(statistics.stdev(best))
    assert row["best_top5_mean"] == pytest.approx(statistics.mean(best5))  # top-5 of the best top-1 epoch
    assert row["final_top1_mean"] == pytest.approx(statistics.mean(final))
    assert row["final_top1_std"] == pytest.approx(statistics.stdev(final))
    assert row["final_top5_mean"] == pytest.approx(statistics.mean([99.0, 98.0, 93.0]))
    assert row["is_baseline"] and row["delta_best_top1"] is None


def test_paired_interval_over_matching_seeds_is_scipys(tmp_path):
    none = {0: 70.1, 1: 72.4, 2: 69.8, 3: 71.0}
    scsa = {0: 71.0, 1: 73.9, 2: 70.1, 3: 72.6}
    for seed, top1 in none.items():
        make_run(tmp_path, f"none_{seed}", "none", seed, [top1])
    for seed in (2, 0, 3, 1):  # job order differs from seed order: the pairing must follow the seed
        make_run(tmp_path, f"scsa_{seed}", "scsa", seed, [scsa[seed]])
    row = by_attention(comparison_rows(tmp_path)[0])["scsa"]

    seeds = sorted(none)
    expected = scipy_stats.ttest_rel([scsa[s] for s in seeds], [none[s] for s in seeds])
    interval = expected.confidence_interval(0.95)
    assert row["delta_method"] == "paired"
    assert row["delta_best_top1"] == pytest.approx(statistics.mean(scsa.values()) - statistics.mean(none.values()))
    assert (row["delta_best_top1_low"], row["delta_best_top1_high"]) == pytest.approx((interval.low, interval.high))
    assert row["delta_best_top1_p"] == pytest.approx(expected.pvalue)
    unpaired = scipy_stats.ttest_ind(list(scsa.values()), list(none.values()), equal_var=False).confidence_interval()
    assert row["delta_best_top1_high"] - row["delta_best_top1_low"] < 0.5 * (unpaired.high - unpaired.low)


def test_welch_interval_when_the_seeds_differ_is_scipys(tmp_path):
    none, se = {0: 70.0, 1: 71.5, 2: 69.0}, {3: 72.0, 4: 71.0}
    for seed, top1 in none.items():
        make_run(tmp_path, f"none_{seed}", "none", seed, [top1])
    for seed, top1 in se.items():
        make_run(tmp_path, f"se_{seed}", "se", seed, [top1])
    row = by_attention(comparison_rows(tmp_path)[0])["se"]

    expected = scipy_stats.ttest_ind(list(se.values()), list(none.values()), equal_var=False)
    interval = expected.confidence_interval(0.95)
    assert row["delta_method"] == "welch"
    assert (row["delta_best_top1_low"], row["delta_best_top1_high"]) == pytest.approx((interval.low, interval.high))
    assert row["delta_best_top1_p"] == pytest.approx(expected.pvalue)


def test_difference_against_known_numbers():
    paired = stats.difference([3.0, 5.0, 4.0], [1.0, 2.0, 2.0], [0, 1, 2], [0, 1, 2])
    diffs = [2.0, 3.0, 2.0]  # mean 7/3, sd 1/sqrt(3), n 3: half-width t(0.975, 2) * sd / sqrt(3)
    half = scipy_stats.t.ppf(0.975, 2) * statistics.stdev(diffs) / 3 ** 0.5
    assert (paired.estimate, paired.low, paired.high) == pytest.approx((7 / 3, 7 / 3 - half, 7 / 3 + half))
    assert paired.method == "paired"
    assert stats.difference([3.0, 5.0], [1.0, 2.0, 2.0], [0, 1], [0, 1, 2]).method == "welch"
    assert stats.difference([3.0, 5.0], [1.0, 2.0], [0, 0], [0, 0]).method == "welch"  # repeated seeds: no pairs
    single = stats.difference([3.0], [1.0, 2.0], [0], [0, 1])
    assert (single.estimate, single.low, single.high, single.method) == (1.5, None, None, None)
    assert stats.mean_std([4.0]) == (4.0, None)


def test_one_run_per_group_has_n_1_and_no_interval(tmp_path):
    make_run(tmp_path, "0", "none", 0, [50.0, 52.25])
    make_run(tmp_path, "1", "scsa", 0, [51.0, 53.75])
    rows = write_comparison(tmp_path)
    scsa = by_attention(rows)["scsa"]
    assert scsa["n"] == 1 and scsa["best_top1_std"] is None
    assert scsa["delta_best_top1"] == pytest.approx(1.5) and scsa["delta_best_top1_low"] is None
    table = (tmp_path / "comparison.md").read_text()
    assert "| resnet18 | scsa | - | - | - | 53.75 | 73.75 | +1.50 | 53.75 | 73.75 | +1.50 | - | 1 | 2 |" in table
    assert [r["n"] for r in csv.DictReader((tmp_path / "comparison.csv").open())] == ["1", "1"]


def test_a_run_without_metrics_is_skipped_with_a_one_line_warning(tmp_path, caplog):
    make_run(tmp_path, "0", "none", 0, [50.0])
    crashed = make_run(tmp_path, "1", "none", 1, [51.0])
    (crashed / "metrics.jsonl").unlink()
    with caplog.at_level(logging.WARNING, logger="scsa.analysis.runs"):
        [row], _ = comparison_rows(tmp_path)
    assert row["n"] == 1 and row["runs"] == "0"
    [warning] = [r.getMessage() for r in caplog.records]
    assert str(crashed) in warning and "no metrics.jsonl" in warning and "\n" not in warning


def test_no_runs_says_what_to_pass(tmp_path):
    (tmp_path / "0").mkdir()
    with pytest.raises(ValueError, match="no runs with metrics.jsonl under .*: pass the multirun dir"):
        write_comparison(tmp_path)


def save_checkpoint(run_dir: Path, params: int, flops: int) -> None:
    """What compare reads of a train.py checkpoint: params, MACs, classes."""
    (run_dir / "checkpoints").mkdir()
    torch.save({"model": {"w": torch.zeros(2)}, "params": params, "flops": flops, "classes": list("abcdefghij")},
               run_dir / "checkpoints" / "best.pt")


def test_output_files_paper_columns_first(tmp_path):
    for seed in (0, 1):
        save_checkpoint(make_run(tmp_path, f"none_{seed}", "none", seed, [50.0 + seed]), 11_689_512, 1_819_066_368)
        save_checkpoint(make_run(tmp_path, f"se_{seed}", "se", seed, [52.0 + 2 * seed]), 11_700_000, 1_830_000_000)
    write_comparison(tmp_path)
    md = (tmp_path / "comparison.md").read_text().splitlines()
    header = next(line for line in md if line.startswith("| "))
    assert header.startswith("| model | attention | Params (M) | FLOPs (G) | Throughput (img/s) | Top-1 (%) | "
                             "Top-5 (%) | Δ Top-1 [95 % CI] |")
    se_row = "| resnet18 | se | 11.70 | 1.83 | - | 53.00 ± 1.41 | 73.00 ± 1.41 | +2.50 [−3.85, +8.85] |"
    assert any(line.startswith(se_row) for line in md)  # paired t, seeds 0 and 1: scipy's interval
    assert any("not measured (compare.throughput=false)" in line for line in md)
    rows = list(csv.DictReader((tmp_path / "comparison.csv").open()))
    assert list(rows[0]) == CSV_FIELDS and [(r["attention"], r["n"]) for r in rows] == [("none", "2"), ("se", "2")]
    assert [(int(r["params"]), int(r["flops"]), r["num_classes"]) for r in rows] == [
        (11_689_512, 1_819_066_368, "10"), (11_700_000, 1_830_000_000, "10")]
    tex = (tmp_path / "comparison.tex").read_text()
    assert tex.count(r"\toprule") == tex.count(r"\midrule") == tex.count(r"\bottomrule") == 1
    assert r"Method & Params (M) & FLOPs (G) & Throughput (img/s) & Top-1 (\%) & Top-5 (\%)" in tex
    assert r"resnet18 + se & 11.70 & 1.83 & - & 53.00 $\pm$ 1.41 & 73.00 $\pm$ 1.41 & +2.50 [$-$3.85, +8.85] & 2" in tex
    with Image.open(tmp_path / "comparison.png") as png:
        png.load()
        assert png.width >= 600


def test_compare_and_cam_shorthands_name_their_main_key():
    argv = ["compare=/runs/a", "compare.throughput=false", "cam=/runs/b", "images=8", "checkpoint=x.pt"]
    assert expand_shorthands(argv, {"compare": "compare.dir", "cam": "cam.dir"}) == [
        "compare.dir=/runs/a", "compare.throughput=false", "cam.dir=/runs/b", "images=8", "checkpoint=x.pt"]


@pytest.mark.parametrize("name", [a for a in modules() if attention_spec(a).spatial_gate])
def test_spatial_gate_is_what_the_module_multiplies_in(name):
    import scsa

    torch.manual_seed(0)
    module = scsa.create_attention(name, 64, kernel="torch").eval()
    for p in module.parameters():  # away from the init's near-constant gates
        p.data.add_(0.3 * torch.randn_like(p))
    x = torch.rand(2, 64, 9, 7) + 0.5  # positive: the output / input ratio is defined everywhere
    with torch.no_grad():
        out = module(x)
    gate = gate_of(module, x)
    # what is left is per channel (CBAM's and SCSA's channel gates, else 1): constant over the map
    ratio = out / (x * gate)
    torch.testing.assert_close(ratio, ratio[..., :1, :1].expand_as(ratio), rtol=1e-4, atol=1e-6)
    assert gate.std() > 1e-3 and spatial_gate(module, x).shape == (2, 9, 7)
    assert not module.record_gate and module.gate is None  # asked for one forward only


def test_channel_attention_has_no_spatial_gate():
    import scsa

    for name in (a for a in modules() if not attention_spec(a).spatial_gate):
        assert spatial_gate(scsa.create_attention(name, 64), torch.rand(1, 64, 4, 4)) is None


@pytest.mark.parametrize("backbone", list_backbones())
def test_default_layers_are_the_last_stage_and_last_attention_block(backbone):
    import scsa

    with torch.device("meta"):
        model = scsa.create_model(backbone, "se", num_classes=10)
    assert isinstance(model.get_submodule(last_stage(backbone)), torch.nn.Module)
    assert last_attention_block(model).startswith(last_stage(backbone).split(".")[0])
    assert last_stage("resnet18") == "layer4" and last_stage("mobilenetv2") == "features.18"



def wandb_run_record(run_dir: Path) -> Dict:
    """The run record of a run dir's offline W&B log, read with wandb's own local reader."""
    [log] = (run_dir / "wandb").glob("offline-run-*")
    result = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(log)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    return next(json.loads(line)["run"] for line in result.stdout.splitlines() if json.loads(line)["type"] == "run")


@pytest.mark.slow
def test_two_attentions_two_seeds_sweep_then_compare_and_cam(tmp_path, tiny_data, run_cli):
    sweep = tmp_path / "sweep"
    trained = run_cli(["train.py", "--multirun", "attention=none,scsa", "seed=0,1", "model=resnet18",
                       f"data.root={tiny_data}", "data.image_size=32", "data.val_resize=32", "data.batch_size=16",
                       "data.workers=0", "data.loader=torch", "trainer.epochs=1", "trainer.max_steps=2",
                       "wandb.mode=offline", f"hydra.sweep.dir={sweep}"], env_extra={"WANDB_SILENT": "true"})
    assert trained.returncode == 0, trained.stderr[-3000:]
    run_dirs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert sorted(p.name.split("_", 1)[1] for p in run_dirs) == [
        "resnet18_none_seed0", "resnet18_none_seed1", "resnet18_scsa_seed0", "resnet18_scsa_seed1"]
    for run_dir in run_dirs:  # one W&B group per sweep; the seed in name, tags and config
        record, seed = wandb_run_record(run_dir), run_dir.name.rsplit("seed", 1)[1]
        assert record["run_group"] == str(sweep)
        assert record["display_name"].endswith(f"-seed{seed}") and f"seed{seed}" in record["tags"]
        config = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
        assert config.seed == int(seed) and config.attention.name in run_dir.name

    compared = run_cli(["evaluate.py", f"compare={sweep}", "compare.batch_size=4", "compare.warmup=1",
                        "compare.steps=1", "compare.rounds=2"])
    assert compared.returncode == 0, compared.stderr[-3000:]
    for name in ("comparison.md", "comparison.csv", "comparison.tex", "comparison.png"):
        assert (sweep / name).stat().st_size > 0, name
    rows = list(csv.DictReader((sweep / "comparison.csv").open()))
    assert [(r["attention"], r["n"], r["seeds"]) for r in rows] == [("none", "2", "0;1"), ("scsa", "2", "0;1")]
    scsa_row = rows[1]
    assert scsa_row["delta_method"] == "paired" and int(scsa_row["params"]) == 11_212_362
    assert float(scsa_row["delta_best_top1_low"]) <= float(scsa_row["delta_best_top1"]) <= float(
        scsa_row["delta_best_top1_high"])
    assert all(float(r["img_per_s"]) > 0 for r in rows)
    assert "scsa.analysis.benchmark` steps on" in (sweep / "comparison.md").read_text()

    drawn = run_cli(["evaluate.py", f"cam={sweep}", "images=3"])
    assert drawn.returncode == 0, drawn.stderr[-3000:]
    summary = json.loads(drawn.stdout.strip().splitlines()[-1])
    assert summary["columns"] == ["none", "scsa"] and summary["shows"] == ["Grad-CAM at layer4 (1x1)"]
    for png in ("comparison.png", "cam.png"):
        with Image.open(sweep / png) as image:
            image.load()
    with Image.open(sweep / "cam.png") as grid:  # two columns: as wide as the runs' groups
        assert grid.width == round(2 * CELL_INCHES * DPI)

    # listed checkpoints, one column each; in this process (a third command start costs more than the drawing)
    gates = tmp_path / "gates.png"
    summary = write_cam(checkpoint_columns([str(run_dirs[2] / "checkpoints" / "best.pt")]), gates, val_sample,
                        images=2, gate=True, block="layer1.0")
    assert summary["columns"] == ["2_resnet18_scsa_seed0/best"]
    assert summary["shows"] == ["spatial gate at layer1.0 (8x8)"]
    with Image.open(gates) as grid:  # one checkpoint, one column
        assert grid.width == round(CELL_INCHES * DPI)
