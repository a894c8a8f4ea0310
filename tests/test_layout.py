"""The house rules that keep the rooms apart, checked on the source itself."""
import ast
from pathlib import Path
from typing import Iterator, Tuple

import pytest

REPO = Path(__file__).resolve().parent.parent


def imports(package: str) -> Iterator[Tuple[Path, str]]:
    """(file, imported module) for every import statement under ``package``."""
    for path in sorted((REPO / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                yield from ((path, alias.name) for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                yield path, node.module


def test_the_package_never_imports_the_input_pipelines():
    """data/ builds on scsa (errors, the Loader contract); the other way round would be a cycle."""
    offenders = [f"{path.relative_to(REPO)}: {name}" for path, name in imports("scsa")
                 if name == "data" or name.startswith("data.")]
    assert not offenders


@pytest.mark.parametrize("package", ["scsa", "data"])
def test_collectives_go_through_the_distributed_module(package):
    allowed = {REPO / "scsa" / "engine" / "distributed.py"}
    offenders = [f"{path.relative_to(REPO)}: {name}" for path, name in imports(package)
                 if name.startswith("torch.distributed") and path not in allowed]
    assert not offenders


def test_no_test_imports_train_py_or_another_test_module():
    """Shared fixtures live in conftest.py; helper modules (the reference SCSA, the counting helper) may be imported."""
    offenders = [f"{path.name}: {name}" for path, name in imports("tests")
                 if name == "train" or name.rsplit(".", 1)[-1].startswith("test_") or name.endswith("conftest")]
    assert not offenders
