"""End to end through the command line: train.py, then evaluate.py on its checkpoint."""
import json
import math
import shutil

import pytest
import torch


@pytest.mark.slow
def test_train_then_evaluate_on_a_folder_with_only_val(tmp_path, tiny_data, run_cli):
    run_dir = tmp_path / "run"
    result = run_cli(["train.py", "model=resnet18", "attention=none", f"data.root={tiny_data}",
                      "data.image_size=32", "data.val_resize=32", "data.batch_size=16", "data.workers=0",
                      "data.loader=torch", "trainer.epochs=3", "optim.lr=0.05", f"hydra.run.dir={run_dir}"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "done: best val top-1" in result.stdout

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1, 2]
    for record in records:
        assert {"epoch", "train_loss", "val_loss", "val_top1", "val_top5", "val_images", "lr",
                "img_per_s"} <= set(record)
        assert record["val_images"] == 70
    assert (run_dir / "train.log").read_text().count("epoch 2:") == 1
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert max(r["val_top1"] for r in records) > 20.0  # 10 classes: chance is 10 %

    for name in ("last.pt", "best.pt"):
        checkpoint = torch.load(run_dir / "checkpoints" / name, weights_only=True)
        assert checkpoint["config"]["model"]["name"] == "resnet18"
    shutil.rmtree(tiny_data / "train")  # scoring reads val/ only
    evaluation = run_cli(["evaluate.py", f"checkpoint={run_dir}/checkpoints/last.pt", "data.workers=0",
                          "data.loader=torch", "throughput=true"])
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    report = json.loads(evaluation.stdout.strip().splitlines()[-1])
    assert report["top1"] == pytest.approx(records[-1]["val_top1"], abs=1e-9)
    assert report["top5"] == pytest.approx(records[-1]["val_top5"], abs=1e-9)
    assert report["images"] == 70
    assert report["params"] == 11_181_642  # ResNet-18 with a 10-class head
    assert report["flops"] == pytest.approx(0.0375e9, rel=0.05)  # MACs at 32 px
    assert report["img_per_s"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_trains_on_cpu_with_a_grad_scaler_for_fp16_only(tmp_path, subset, run_cli, amp):
    root = subset(4, 1, classes=4)  # 16 train images: 4 steps of 4
    run_dir = tmp_path / "run"
    result = run_cli(["train.py", "model=resnet18", "attention=scsa", f"data.root={root}", "data.image_size=32",
                      "data.val_resize=32", "data.batch_size=4", "data.workers=0", "data.loader=torch",
                      "trainer.epochs=1", f"trainer.amp={amp}", f"hydra.run.dir={run_dir}"])
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert checkpoint["state"]["step"] == 4 and checkpoint["state"]["skipped_steps"] == 0
    assert math.isfinite(checkpoint["metrics"]["train_loss"])
    assert ("scale" in checkpoint["scaler"]) == (amp == "fp16")  # loss scaling: fp16 only
