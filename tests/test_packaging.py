"""The library as others install it: pyproject.toml, hubconf.py, and timm's own scripts on its models."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from setuptools import find_packages

from scsa.models.registry import MODEL_NAMES

REPO = Path(__file__).resolve().parent.parent


def load_hubconf():
    """The checkout's hubconf.py as torch.hub imports it: a module of its own."""
    spec = importlib.util.spec_from_file_location("hubconf", REPO / "hubconf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_distribution_holds_every_scsa_package_and_nothing_else():
    """A folder under scsa/ without __init__.py would be left out of the wheel; data/, tests/ ... must stay out."""
    find = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    packages = set(find_packages(str(REPO), include=find["include"]))
    with_code = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "scsa").rglob("*.py")
                 if "__pycache__" not in p.parts}
    assert packages == with_code
    assert {p.split(".")[0] for p in packages} == {"scsa"}


def test_hubconf_serves_every_registered_model_and_forwards_timm_arguments(tmp_path):
    hub = load_hubconf()
    entries = {name for name in dir(hub) if callable(getattr(hub, name)) and not name.startswith("_")}
    assert entries == set(MODEL_NAMES)  # what torch.hub.list shows
    assert all(importlib.util.find_spec(d) for d in hub.dependencies)
    model = torch.hub.load(str(REPO), "resnet18_se", source="local", num_classes=3)
    assert model.fc.out_features == 3 and repr(model) == repr(timm.create_model("resnet18_se", num_classes=3))
    weights = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    save_file(weights, tmp_path / "model.safetensors")  # what evaluate.py export=safetensors writes
    loaded = torch.hub.load(str(REPO), "resnet18_se", source="local", pretrained=True,
                            pretrained_cfg_overlay=dict(file=str(tmp_path / "model.safetensors")))
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in weights.items())


def copy_checkout(dest: Path) -> Path:
    """The checkout's files as a clone has them (tracked, and untracked but not ignored): no build leftovers."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True,
                            check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    return dest


def user_env() -> dict:
    """The environment without PYTHONPATH: only what the venv installed can be imported."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def venv_with(tmp_path: Path, *pip_args: str) -> Path:
    """A fresh venv that sees this Python's packages (torch, timm: nothing downloaded), with ``pip install
    pip_args`` run in it; its python."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    installed = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q",
                                *pip_args], capture_output=True, text=True, cwd=tmp_path)
    assert installed.returncode == 0, installed.stderr[-3000:]
    return python


USER_SCRIPT = """
import importlib.metadata, json, sys, sysconfig
import scsa, timm, torch
site = sysconfig.get_paths()["purelib"]
report = dict(site=site, scsa=scsa.__file__, version=scsa.__version__, metadata_version=importlib.metadata.version("scsa"),
              tops=sorted({f.parts[0] for f in importlib.metadata.files("scsa")}), onnx="onnx" in sys.modules,
              export=callable(scsa.export.export_onnx), attentions=scsa.list_attentions())
hub = torch.hub.load(sys.argv[1], "resnet18_se", source="local", num_classes=3)
report["hub"] = [type(hub).__name__, hub.fc.out_features]
print(json.dumps(report), flush=True)
backbone = timm.create_model("resnet50_scsa", drop_path_rate=0.1, output_stride=16, features_only=True)
report["reduction"] = backbone.feature_info.reduction()
report["shapes"] = [list(f.shape) for f in backbone(torch.randn(1, 3, 64, 64))]
print(json.dumps(report))
"""


@pytest.mark.slow
def test_pip_install_gives_the_library_from_any_directory(tmp_path):
    checkout = copy_checkout(tmp_path / "checkout")
    python = venv_with(tmp_path, str(checkout))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = subprocess.run([str(python), "-c", USER_SCRIPT, str(checkout)], cwd=elsewhere, capture_output=True,
                            text=True, env=user_env())
    lines = result.stdout.strip().splitlines()
    assert lines, result.stderr[-3000:]
    report = json.loads(lines[-1])
    site = Path(report["site"])
    assert Path(report["scsa"]).is_relative_to(site)  # the installed copy, not a checkout
    assert report["tops"] == ["scsa", f"scsa-{report['version']}.dist-info"]  # no data/, tests/, conf/ ...
    assert not any((site / name).exists() for name in ("data", "tests", "benchmarks", "conf", "launch"))
    assert report["metadata_version"] == report["version"]
    assert not report["onnx"] and report["export"]  # export without importing onnx
    assert report["hub"] == ["ResNet", 3]
    # timm's arguments through the registry (drop_path_rate, output_stride: the backbone-spec work)
    assert result.returncode == 0, result.stderr[-3000:]
    assert report["reduction"] == [2, 4, 8, 16, 16]
    assert report["shapes"][-1] == [1, 2048, 4, 4]


@pytest.mark.slow
def test_an_editable_install_imports_the_checkout(tmp_path):
    checkout = copy_checkout(tmp_path / "checkout")
    python = venv_with(tmp_path, "-e", str(checkout))
    script = ("import importlib.util, scsa, timm; timm.create_model('resnet18_eca'); "
              "print(scsa.__file__, importlib.util.find_spec('data'))")
    result = subprocess.run([str(python), "-c", script], cwd=tmp_path, capture_output=True, text=True,
                            env=user_env())
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == [str(checkout / "scsa" / "__init__.py"), "None"]  # the checkout's data/ stays out


# The README's route into timm's own scripts, which have no flag that imports a package before building the model
RUN_WITH_SCSA = "import runpy, sys, scsa; sys.argv.pop(0); runpy.run_path(sys.argv[0], run_name='__main__')"
TIMM_SCRIPTS = os.environ.get("TIMM_SCRIPTS")  # a clone of huggingface/pytorch-image-models: train.py, validate.py
needs_timm_scripts = pytest.mark.skipif(not TIMM_SCRIPTS, reason="set TIMM_SCRIPTS=<a pytorch-image-models clone> "
                                        "to run timm's train.py and validate.py on scsa's models")


def run_timm_script(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-c", RUN_WITH_SCSA, str(Path(TIMM_SCRIPTS) / script), *args], cwd=cwd,
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
@needs_timm_scripts
def test_timms_validate_py_scores_an_exported_model(tmp_path, subset):
    root = subset(0, 4, classes=3)
    model = timm.create_model("resnet18_se", num_classes=3)
    save_file(model.state_dict(), tmp_path / "model.safetensors")  # as evaluate.py export=safetensors writes it
    run_timm_script("validate.py", str(root), "--split", "val", "--model", "resnet18_se", "--num-classes", "3",
                    "--checkpoint", str(tmp_path / "model.safetensors"), "--img-size", "32", "-b", "4", "-j", "0",
                    "--device", "cpu", "--results-file", str(tmp_path / "results.json"), "--results-format", "json",
                    cwd=tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["model"] == "resnet18_se" and results["param_count"] == round(
        sum(p.numel() for p in model.parameters()) / 1e6, 2)


@pytest.mark.slow
@needs_timm_scripts
def test_timms_train_py_trains_a_registered_model(tmp_path, subset):
    root = subset(4, 2, classes=3)
    run_timm_script("train.py", str(root), "--val-split", "val", "--model", "resnet18_scsa", "--num-classes", "3",
                    "--img-size", "32", "-b", "4", "-j", "0", "--device", "cpu", "--epochs", "1", "--warmup-epochs",
                    "0", "--output", str(tmp_path / "out"), "--experiment", "run", cwd=tmp_path)
    checkpoint = torch.load(tmp_path / "out" / "run" / "last.pth.tar", map_location="cpu", weights_only=False)
    assert checkpoint["arch"] == "resnet18_scsa" and checkpoint["epoch"] == 0
    assert any(".attn." in k for k in checkpoint["state_dict"])
