"""What the tools tests share: one intra-op thread, the mixed image tree of the make_shards tests and its shards,
tools/profile.py's help."""
from pathlib import Path

import pytest
import torch

from pirl_trainer.tools.make_shards import build_shards
from tests.tools import image_factory as make

SHARD_SIZE = 20_000  # a few generated samples per shard, so that shard boundaries are exercised


@pytest.fixture
def one_thread():
    """Measured on the shared 2-core machine: while another process holds a core, 2 intra-op threads run the
    profilers' tiny models ~7x slower than 1. One thread keeps the tests' time steady; the numbers are not compared."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture
def profile_help(capsys):
    """profile_help(command): tools/profile.py COMMAND --help, which must exit 0; returns what it printed."""
    from pirl_trainer.tools.profile import main

    def help_of(command: str) -> str:
        with pytest.raises(SystemExit) as done:
            main([command, "--help"])
        assert done.value.code == 0
        return capsys.readouterr().out

    return help_of


def build_tree(root: Path) -> dict:
    """A folder tree with every kind of bad input next to good and convertible images.
    Returns the expected kept files in input order (path, label, original bytes or None when re-encoded)."""
    files = {
        "README.txt": make.TEXT,  # stray file outside any class folder
        "a_good/1.jpg": make.rgb_jpeg(seed=1),
        "a_good/2.jpg": make.grey_jpeg(),
        "a_good/3.jpg": make.rgb_jpeg(48, 32, seed=3, orientation=6),
        "a_good/.DS_Store": make.DS_STORE,
        "a_good/notes.txt": make.TEXT,
        "a_good/zero.jpg": b"",
        "a_good/trunc.jpg": make.truncated(make.rgb_jpeg(200, 150)),
        "a_good/header.jpg": make.header_only(make.rgb_jpeg()),
        "a_good/html.jpg": make.HTML_PAGE,
        "a_good/bomb.png": make.png_bomb(100_000, 100_000),
        "a_good/bomb2.jpg": make.jpeg_bomb(),
        "c_convert/alpha.png": make.rgba_png(),
        "c_convert/big.jpg": make.rgb_jpeg(130, 70, seed=4),
        "c_convert/cmyk.jpg": make.cmyk_jpeg(),
        "c_convert/pal.gif": make.palette_gif(),
    }
    files.update({f"d_more/{i:02d}.jpg": make.rgb_jpeg(seed=10 + i) for i in range(6)})
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    (root / "b_empty").mkdir()
    (root / "a_good" / "link.jpg").symlink_to(root / "nowhere.jpg")  # unreadable path
    kept = [("a_good/1.jpg", 0, True), ("a_good/2.jpg", 0, True), ("a_good/3.jpg", 0, False)]
    kept += [(f"c_convert/{n}", 2, n == "big.jpg") for n in ["alpha.png", "big.jpg", "cmyk.jpg", "pal.gif"]]
    kept += [(f"d_more/{i:02d}.jpg", 3, True) for i in range(6)]
    return {"kept": [(root / p, label, files[p] if same else None) for p, label, same in kept]}


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """(root, build_tree(root)): the mixed folder tree, once per test module."""
    root = tmp_path_factory.mktemp("tree")
    return root, build_tree(root)


@pytest.fixture(scope="module")
def tree_shards(tree, tmp_path_factory):
    """(shard folder, manifest): the tree made into WebDataset shards of SHARD_SIZE bytes, in this process."""
    out = tmp_path_factory.mktemp("tree_shards") / "shards"
    return out, build_shards(tree[0], out, workers=0, shard_size=SHARD_SIZE)
