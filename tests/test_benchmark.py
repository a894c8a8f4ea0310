"""scsa.analysis.benchmark's configuration grid (the attention kernel as one of its dimensions), and the GPU script."""
import argparse
import os
import re
import subprocess
from pathlib import Path

import torch

import scsa.analysis.benchmark as benchmark


def test_kernels_are_a_configuration_dimension(monkeypatch):
    built = []

    def fake_make_step(model, attention, amp, channels_last, compile_model, batch_size, image_size, device, kernel):
        built.append((attention, kernel))
        return lambda: None

    monkeypatch.setattr(benchmark, "make_step", fake_make_step)
    args = argparse.Namespace(models="resnet18", attentions="none,se", kernels="torch,auto", amp="none",
                              channels_last="false", compile="false", batch_size=2, image_size=32, warmup=1,
                              steps=1, rounds=1, device="cpu", threads=0)
    results = benchmark.run(args)
    assert built == [("none", "auto"), ("se", "torch"), ("se", "auto")]  # attention=none timed once
    assert [(r["attention"], r["kernel"]) for r in results] == [("none", None), ("se", "torch"), ("se", "auto")]
    assert "| se | torch |" in benchmark.markdown(results)


def test_make_step_builds_the_attention_with_the_kernel(monkeypatch):
    models = []
    monkeypatch.setattr(benchmark, "training_step", lambda model, *args: models.append(model))
    benchmark.make_step("resnet18", "se", "none", False, False, 2, 32, torch.device("cpu"), kernel="torch")
    assert {m.kernel for m in models[0].modules() if hasattr(m, "kernel")} == {"torch"}


def test_gpu_check_script_parses_and_fits_the_session():
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    assert os.access(script, os.X_OK)
    budget = re.search(r"^BUDGET=\$\{BUDGET:-(\d+)\}", script.read_text(), re.M)
    assert budget and int(budget.group(1)) < 8 * 60  # the session's limit
