"""Shared fixtures: small real datasets cut from the built-in sample, and CLI runners."""
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "data" / "sample"


def make_subset(dest: Path, train_per_class: int, val_per_class: int, classes: int = 10) -> Path:
    """Copy the first images of the first ``classes`` sample classes into ``dest``."""
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for class_dir in sorted((SAMPLE / split).iterdir())[:classes]:
            out = dest / split / class_dir.name
            out.mkdir(parents=True)
            for image in sorted(class_dir.iterdir())[:count]:
                shutil.copy(image, out / image.name)
    return dest


@pytest.fixture
def tiny_data(tmp_path: Path) -> Path:
    """10 classes x (40 train, 7 val) real images: 70 val images, a size no world size divides."""
    return make_subset(tmp_path / "tiny", 40, 7)


def run_cli(args: List[str], cwd: Path = REPO, env_extra: dict = None, timeout: float = 600,
            ) -> subprocess.CompletedProcess:
    """Run a command of the project (``train.py ...``) the way a user does."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2", **(env_extra or {})}
    if args[0].endswith(".py"):
        args = [sys.executable, str(REPO / args[0]), *args[1:]]
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
