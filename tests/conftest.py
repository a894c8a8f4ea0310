"""Shared fixtures: small real datasets cut from the built-in sample, configs, CLI runners.

Tests write only under their temporary folders: commands run with a temporary working
directory, so default run dirs (``outputs/...``) land there too.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, List, Optional

import torch

# Without a GPU, kernel="triton" runs the Triton kernels on CPU tensors in Triton's interpreter.
# Triton reads TRITON_INTERPRET when it is first imported (its library functions are defined
# then), and importing scsa imports it: so Triton is imported here with it set. It is then unset
# again: with it, kernel="auto" runs both paths on CPU tensors to choose one (interpreted, seconds
# per case), so only the tests of kernels and of that choice set it (`interpret` fixture).
if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton  # noqa: F401
    except ImportError:
        pass
    del os.environ["TRITON_INTERPRET"]

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

import scsa.training.config  # noqa: F401  (registers the resolvers conf/ uses)
from custom_attention import SpatialMask
from formats import as_shards
from scsa.attention import register_attention
from scsa.training.cli import CONFIG_DIR

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "data" / "sample"

# An attention module from outside the package, registered as a user would: every test that
# parametrises over the registry covers it too, with no list to edit.
register_attention("spatial_mask", SpatialMask, "end")


def copy_sample(dest: Path, train_per_class: int, val_per_class: int, classes: int = 10) -> Path:
    """The first images of the first ``classes`` sample classes, copied into ``dest``."""
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for class_dir in sorted((SAMPLE / split).iterdir())[:classes]:
            out = dest / split / class_dir.name
            out.mkdir(parents=True)
            for image in sorted(class_dir.iterdir())[:count]:
                shutil.copy(image, out / image.name)
    return dest


RUN_OUTPUTS = ("outputs", "multirun", "wandb")  # git-ignored folders the commands write by default


def checkout_files() -> set:
    """Untracked files in the checkout, ignored run outputs included: what a test might leave behind."""
    listed = subprocess.run(["git", "ls-files", "--others", "--exclude-standard"], cwd=REPO, capture_output=True,
                            text=True)
    outputs = {str(p.relative_to(REPO)) for folder in RUN_OUTPUTS for p in (REPO / folder).rglob("*") if p.is_file()}
    return set(listed.stdout.split()) | outputs


@pytest.fixture(scope="session", autouse=True)
def tests_write_only_under_tmp():
    """Fail the session if a test wrote into the checkout (tests write only under temporary folders)."""
    before = checkout_files()
    yield
    left = sorted(p for p in checkout_files() - before if "__pycache__" not in p)
    assert not left, f"tests wrote into the checkout: {left[:10]}"


@pytest.fixture
def interpret(monkeypatch) -> None:
    """TRITON_INTERPRET=1 for this test on a machine without a GPU (then kernels run on CPU tensors)."""
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def subset(tmp_path: Path) -> Callable[..., Path]:
    """``subset(train_per_class, val_per_class, classes=10)``: a dataset root under tmp_path."""
    made = iter(range(1_000))

    def make(train_per_class: int, val_per_class: int, classes: int = 10) -> Path:
        return copy_sample(tmp_path / f"data{next(made)}", train_per_class, val_per_class, classes)
    return make


DATA_FORMATS = ["folder", "shards"]  # how a dataset root can be stored: tests over `dataset` run once per format


@pytest.fixture(params=DATA_FORMATS)
def dataset(request, subset) -> Callable[..., Path]:
    """``dataset(train_per_class, val_per_class, classes=10)``: a ``subset`` root in each stored format."""
    def make(train_per_class: int, val_per_class: int, classes: int = 10) -> Path:
        root = subset(train_per_class, val_per_class, classes)
        return as_shards(root) if request.param == "shards" else root
    return make


@pytest.fixture
def tiny_data(subset) -> Path:
    """10 classes x (40 train, 7 val) real images: 70 val images, a size no world size divides."""
    return subset(40, 7)


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture
def compose_train() -> Callable[..., DictConfig]:
    """``compose_train(*overrides)``: conf/train.yaml composed as Hydra does for ``train.py``."""
    def compose_with(*overrides: str) -> DictConfig:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            return compose(config_name="train", overrides=list(overrides))
    return compose_with


def command(args: List[str]) -> List[str]:
    """``train.py ...`` as the python command a user types; other commands unchanged."""
    return [sys.executable, str(REPO / args[0]), *args[1:]] if args[0].endswith(".py") else args


def command_env(extra: Optional[dict] = None) -> dict:
    # PYTHONPATH: `python -m data.scan` and friends find the project from any working directory
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2", "PYTHONPATH": str(REPO),
            **(extra or {})}


@pytest.fixture(scope="session")
def make_sample() -> Callable[..., Path]:
    """``make_sample(dest, train_per_class, val_per_class, classes=10)``: ``subset`` for fixtures wider than a test."""
    return copy_sample


@pytest.fixture(scope="session")
def run_in() -> Callable[..., subprocess.CompletedProcess]:
    """``run_in(args, cwd, timeout=600)``: ``run_cli`` in any folder, for fixtures wider than a test."""
    def run(args: List[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run(command(args), cwd=cwd, env=command_env(), capture_output=True, text=True,
                              timeout=timeout)
    return run


@pytest.fixture
def run_cli(tmp_path: Path) -> Callable[..., subprocess.CompletedProcess]:
    """``run_cli(args, cwd=tmp_path, env_extra=None, timeout=600)``: run a project command as a user does."""
    def run(args: List[str], cwd: Path = tmp_path, env_extra: Optional[dict] = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run(command(args), cwd=cwd, env=command_env(env_extra), capture_output=True, text=True,
                              timeout=timeout)
    return run


@pytest.fixture
def start_cli(tmp_path: Path) -> Callable[..., subprocess.Popen]:
    """``start_cli(args)``: a project command started in the background (to signal or kill it)."""
    def start(args: List[str], env_extra: Optional[dict] = None) -> subprocess.Popen:
        return subprocess.Popen(command(args), cwd=tmp_path, env=command_env(env_extra), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    return start
