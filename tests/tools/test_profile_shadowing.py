"""tools/profile.py against the standard library's `profile`: a script run as `python tools/NAME.py` has tools/ as
sys.path[0], where tools/profile.py is what `import profile` finds; cProfile (torch._dynamo imports it) needs the
standard library's module, which the file hands the name over to. No project module edits sys.path to get there."""
import ast
import importlib.metadata
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

from pirl_trainer.tools import profile as profile_script
from pirl_trainer.tools.profiling import cli

REPO = Path(__file__).resolve().parents[2]
FOLDERS = ("pipelines", "model", "train", "tools")
STANDARD_PROFILE = Path(sysconfig.get_path("stdlib")) / "profile.py"
# Imports cProfile first (as torch._dynamo does), then `profile`, and reports which files they came from.
PROBE = """
import cProfile, importlib.machinery, json, profile, sys
print(json.dumps({
    "path0": sys.path[0],
    "found_first": importlib.machinery.PathFinder.find_spec("profile", [sys.path[0]]).origin,
    "profile_file": profile.__file__,
    "has_profile_and_run": callable(profile.Profile) and callable(profile.run),
    "cprofile_run_doc": cProfile.run.__doc__,
    "profile_run_doc": profile.run.__doc__,
}))
"""
SYS_PATH_MUTATORS = {"append", "insert", "extend", "pop", "remove", "clear", "sort", "reverse", "__setitem__",
                     "__delitem__", "__iadd__"}


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_profile_script_help_as_a_script():
    done = run([sys.executable, "tools/profile.py", "--help"], REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: profile.py ")
    for command in cli.COMMANDS:
        assert command in done.stdout
    done = run([sys.executable, "tools/profile.py", "bank", "--help"], REPO)
    assert done.returncode == 0 and "--negatives" in done.stdout, done.stderr


def test_a_tools_script_that_imports_cprofile_gets_the_standard_profile(tmp_path):
    """The probe runs as a script from a folder holding everything tools/ holds (links), so its sys.path[0] is
    that folder, as for `python tools/NAME.py`, without writing into the repository."""
    tools = (tmp_path / "tools").resolve()  # sys.path[0] is the script's folder with links resolved
    tools.mkdir()
    for entry in (REPO / "tools").iterdir():
        if entry.name != "__pycache__":
            (tools / entry.name).symlink_to(entry)
    (tools / "probe.py").write_text(PROBE, encoding="utf-8")
    done = run([sys.executable, str(tools / "probe.py")], tmp_path)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["path0"] == str(tools)
    assert seen["found_first"] == str(tools / "profile.py")  # the shadowing this file is about is in place
    assert seen["profile_file"] == str(STANDARD_PROFILE)
    assert seen["has_profile_and_run"]
    assert seen["cprofile_run_doc"] == seen["profile_run_doc"] and seen["profile_run_doc"].startswith("Run statement")


def test_imported_under_the_package_name_it_is_the_command_line():
    assert profile_script.main is cli.main
    assert not hasattr(profile_script, "Profile")


def sys_path_edits(source: str, name: str = "<source>") -> list[str]:
    """`file:line` of every statement that assigns, deletes or mutates sys.path (or calls site.addsitedir)."""
    def is_sys_path(node: ast.AST) -> bool:
        while isinstance(node, ast.Subscript):  # sys.path[0] = ..., del sys.path[0]
            node = node.value
        return (isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name)
                and node.value.id == "sys")

    found = []
    for node in ast.walk(ast.parse(source, name)):
        targets = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        elif isinstance(node, ast.Delete):
            targets = node.targets
        edits = any(is_sys_path(t) for t in targets)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            edits |= node.func.attr in SYS_PATH_MUTATORS and is_sys_path(node.func.value)
            edits |= (node.func.attr == "addsitedir" and isinstance(node.func.value, ast.Name)
                      and node.func.value.id == "site")
        if isinstance(node, ast.ImportFrom) and node.module == "sys":
            edits |= any(alias.name == "path" for alias in node.names)
        if edits:
            found.append(f"{name}:{node.lineno}")
    return found


def test_the_sys_path_check_finds_each_kind_of_edit():
    for source in ("sys.path.insert(0, 'x')", "sys.path.pop(0)", "sys.path[:0] = ['x']", "del sys.path[0]",
                   "sys.path = []", "sys.path += ['x']", "site.addsitedir('x')", "from sys import path"):
        assert sys_path_edits(f"import sys, site\n{source}\n") == ["<source>:2"], source
    assert sys_path_edits("import sys\nfirst = sys.path[0]\nentries = [p for p in sys.path if p]\n") == []


def test_no_project_module_edits_sys_path():
    files = sorted(path for folder in FOLDERS for path in (REPO / folder).rglob("*.py"))
    assert REPO / "tools" / "profile.py" in files and REPO / "tools" / "__init__.py" in files
    found = [edit for path in files
             for edit in sys_path_edits(path.read_text(encoding="utf-8"), str(path.relative_to(REPO)))]
    assert not found, f"sys.path edited at: {', '.join(found)}"


def test_profile_is_the_only_module_name_tools_shadows():
    """Any other file or package of tools/ named like a standard or installed module would shadow it in every
    `python tools/NAME.py` process; tools/profile.py is the one that hands its name over."""
    names = {path.stem for path in (REPO / "tools").glob("*.py") if path.stem != "__init__"}
    names |= {path.parent.name for path in (REPO / "tools").glob("*/__init__.py")}
    assert {"profile", "profiling", "make_shards"} <= names
    taken = set(sys.stdlib_module_names) | set(importlib.metadata.packages_distributions())
    assert names & taken == {"profile"}
