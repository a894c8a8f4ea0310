"""scsa.benchmark's configuration grid: the attention kernel as one of its dimensions."""
import argparse

import pytest

from scsa.benchmark import run


@pytest.mark.slow
def test_kernels_are_a_configuration_dimension():
    args = argparse.Namespace(models="resnet18", attentions="none,se", kernels="torch,auto", amp="none",
                              channels_last="false", compile="false", batch_size=2, image_size=32, warmup=1,
                              steps=1, rounds=1, device="cpu", threads=0)
    results = run(args)
    assert [(r["attention"], r["kernel"]) for r in results] == [("none", None), ("se", "torch"), ("se", "auto")]
    assert all(r["vs_none"] > 0 for r in results) and results[0]["vs_none"] == 1.0
