"""The installed project claims one top-level name, pirl_trainer: `model`, `train`, `tools` and `pipelines` are
generic names another installed project may hold too."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ("pipelines", "model", "train", "tools")
# Imported by name in the check below; the optional backends import DALI and ffcv only when chosen.
CHECK = """
import importlib, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
bare = sorted(m for m in sys.modules if m.split(".")[0] in {folders!r})
assert not bare, f"modules imported under a bare top-level name: {{bare}}"
for name in {folders!r}:
    try:
        importlib.import_module(name)
    except ImportError:
        continue
    raise AssertionError(f"`import {{name}}` works outside the repository")
print("ok")
"""


def project_modules() -> list[str]:
    """Every module of the four folders as pirl_trainer.<folder>.<module>."""
    names = []
    for folder in FOLDERS:
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            names.append(".".join(("pirl_trainer", *(parts[:-1] if parts[-1] == "__init__" else parts))))
    return names


def test_every_module_imports_under_pirl_trainer_and_no_bare_name_is_installed(tmp_path):
    modules = project_modules()
    assert {"pirl_trainer.train.pirl", "pirl_trainer.tools.make_shards", "pirl_trainer.pipelines.ffcv_loader"} <= set(
        modules)
    done = subprocess.run([sys.executable, "-c", CHECK.format(folders=FOLDERS), *modules], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
