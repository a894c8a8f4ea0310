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
    allowed = {REPO / "scsa" / "training" / "distributed.py"}
    offenders = [f"{path.relative_to(REPO)}: {name}" for path, name in imports(package)
                 if name.startswith("torch.distributed") and path not in allowed]
    assert not offenders


def test_no_test_imports_train_py_or_another_test_module():
    """Shared fixtures live in conftest.py; helper modules (the reference SCSA, the counting helper) may be imported."""
    offenders = [f"{path.name}: {name}" for path, name in imports("tests")
                 if name == "train" or name.rsplit(".", 1)[-1].startswith("test_") or name.endswith("conftest")]
    assert not offenders


LIBRARY = ("scsa/__init__.py", "scsa/errors.py", "scsa/complexity.py", "scsa/export.py", "scsa/trained.py",
           "scsa/attention", "scsa/models")


def test_the_library_never_imports_training_or_analysis():
    """``import scsa`` is for model users: it must not pull in the trainer, Hydra, W&B or the analysis tools."""
    def sources(part: str):
        path = REPO / part
        return [path] if path.is_file() else sorted(path.rglob("*.py"))

    forbidden = ("scsa.training", "scsa.analysis", "hydra", "omegaconf", "wandb", "nvidia.dali", "data")
    offenders = [f"{path.relative_to(REPO)}: {node_name}" for part in LIBRARY for path in sources(part)
                 for node_name in _module_imports(path)
                 if any(node_name == f or node_name.startswith(f + ".") for f in forbidden)]
    assert not offenders


def _module_imports(path: Path) -> Iterator[str]:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            yield node.module
