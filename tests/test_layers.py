"""No import runs back up the layers: tools -> train -> model / pipelines -> common.

model/ is pure tensor code and knows nothing of data sources; pipelines/ knows nothing of models or training;
both take their shared counter-based draws from common/. Checked on the sources' import statements (ast), so a
violation anywhere in a module (also inside a function) is found without importing it.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# package -> the project packages it must not import
FORBIDDEN = {
    "common": {"pipelines", "model", "train", "tools"},
    "pipelines": {"model", "train", "tools"},
    "model": {"pipelines", "train", "tools"},
    "train": {"tools"},
}


def project_imports(source: str) -> set[str]:
    """The pirl_trainer packages a module's source imports (the first name after pirl_trainer.)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "pirl_trainer" and len(parts) > 1:
                found.add(parts[1])
    return found


def test_the_scanner_sees_every_form_of_import():
    source = ("import pirl_trainer.model.pirl\nfrom pirl_trainer.train import checkpoint\n"
              "def f():\n    from pirl_trainer import tools\n")
    assert project_imports(source) == {"model", "train", "tools"}
    assert project_imports("from .rng import counter_uniform\nimport torch\n") == set()


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_import_runs_back_up(package):
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        wrong = project_imports(path.read_text()) & FORBIDDEN[package]
        bad += [f"{path.relative_to(ROOT)} imports pirl_trainer.{name}" for name in sorted(wrong)]
    assert not bad, "\n".join(bad)
