"""Corrupt records inside the data: every backend leaves them out, counts them, and stops past the limit (DALI
only those the structure check catches: an undecodable scan stops its pipeline).

The records are damaged in place (same length), as storage or a copy damages them: the manifest's sizes still
match, so only the sample itself can tell.
"""
import shutil

import numpy as np
import pytest
import simplejpeg
import torch

from pirl_trainer.pipelines import batch as B
from pirl_trainer.pipelines.epoch_loader import CorruptSamples
from pirl_trainer.pipelines.jpeg_check import jpeg_problem
from pirl_trainer.pipelines.shard_index import ShardReader, build_sample_table

from .backend_checks import epoch, make_loader as make
from .conftest import CLASS_SIZES

N = sum(CLASS_SIZES)
BACKENDS = ["reference", "dali", "ffcv"]


def garbage(jpg: bytes) -> bytes:
    """Random bytes of the same length (not starting with a JPEG marker)."""
    noise = np.random.default_rng(len(jpg)).integers(0, 256, len(jpg), dtype=np.uint8).tobytes()
    return b"GARBAGE!" + noise[8:]


def lost_tail(jpg: bytes) -> bytes:
    """The first half of the JPEG, zeros after it: a write or a copy that never finished."""
    half = len(jpg) // 2
    return jpg[:half] + bytes(len(jpg) - half)


def claim_huge_size(jpg: bytes) -> bytes:
    """The same JPEG whose SOF header claims 30,000 x 30,000 pixels (900 M): a decompression bomb."""
    data = bytearray(jpg)
    for marker in (b"\xff\xc0", b"\xff\xc2", b"\xff\xc1"):
        at = data.find(marker)
        if at >= 0:
            data[at + 5:at + 9] = (30000).to_bytes(2, "big") * 2  # height, width after length and precision
            return bytes(data)
    raise AssertionError("no SOF marker")


def undefined_huffman_table(jpg: bytes) -> bytes:
    """The scan header's table selectors changed to Huffman tables the file never defines: every header checks
    out, and the decoder fails as it starts on the entropy-coded data."""
    data = bytearray(jpg)
    sos = data.find(b"\xff\xda")
    for c in range(data[sos + 4]):  # length (2 bytes), component count, then (component id, table selectors)
        data[sos + 6 + 2 * c] = 0x33
    return bytes(data)


# global index -> damage; spread over different shards and batches
DAMAGE = {5: garbage, 12: lost_tail, 20: claim_huge_size}
# Damage the structure check cannot see: the reference's and FFCV's decoders fail, and the sample is skipped the
# same way. DALI's decoder stops its pipeline instead (test_an_undecodable_sample_stops_dali).
UNDECODABLE = {27: undefined_huffman_table}
REASONS = {5: "not a JPEG", 12: "truncated", 20: "30000x30000 = 900,000,000 pixels.*decompression bomb",
           27: "its JPEG could not be decoded"}


def test_the_check_passes_sound_jpegs_and_names_each_damage(small_shards):
    table = build_sample_table(small_shards)
    reader = ShardReader(table)
    jpgs = [bytes(reader.read(i).jpg) for i in range(N)]
    assert all(jpeg_problem(j) is None for j in jpgs)
    for i, damage in DAMAGE.items():
        assert jpeg_problem(damage(jpgs[i])) is not None
    jpg = jpgs[0]
    assert "truncated" in jpeg_problem(jpg[: len(jpg) // 2])  # cut, not zeroed
    assert jpeg_problem(jpg + b"trailing bytes") is None  # data after the end-of-image marker is allowed
    assert "truncated inside its headers" in jpeg_problem(jpg[:40])
    undecodable = undefined_huffman_table(jpgs[27])
    assert jpeg_problem(undecodable) is None and len(undecodable) == len(jpgs[27])
    with pytest.raises(ValueError, match="Huffman table 0x03 was not defined"):
        simplejpeg.decode_jpeg(undecodable)  # the reference's decoder


def damage_shards(src, dst, damages) -> dict[int, str]:
    """A copy of the shard folder with `damages` applied in place; returns index -> its tar's path."""
    shutil.copytree(src, dst)
    table = build_sample_table(dst)
    reader = ShardReader(table)
    where = {}
    for i, damage in damages.items():
        jpg = bytes(reader.read(i).jpg)
        shard = table.tar_paths[int(table.shard[i])]
        with open(shard, "r+b") as f:
            f.seek(int(table.start[i]) + int(table.jpg_at[i]))
            f.write(damage(jpg))
        where[i] = shard
    return where


def damage_beton(small_shards, intact, dst, damages) -> dict[int, str]:
    """A .beton of the intact shards (kept in `intact`), copied to `dst` with `damages` applied to its stored JPEG
    bytes in place."""
    pytest.importorskip("ffcv")
    from pirl_trainer.tools.sharding.beton import build_beton

    build_beton(small_shards, intact, workers=1)
    shutil.copytree(intact, dst)
    beton = dst / "dataset.beton"
    data = bytearray(beton.read_bytes())
    reader = ShardReader(build_sample_table(small_shards))
    for i, damage in damages.items():
        jpg = bytes(reader.read(i).jpg)
        at = data.find(jpg)
        assert at >= 0 and data.find(jpg, at + 1) < 0, "the stored JPEG must be found once"
        data[at:at + len(jpg)] = damage(jpg)
    beton.write_bytes(bytes(data))
    return {i: str(beton) for i in damages}


@pytest.fixture(scope="module", params=BACKENDS)
def damaged(request, small_shards, tmp_path_factory):
    """(backend, damaged data, the same data intact, damaged index -> the file named in messages)."""
    backend = request.param
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    damages = DAMAGE if backend == "dali" else {**DAMAGE, **UNDECODABLE}
    root = tmp_path_factory.mktemp(f"damaged_{backend}")
    if backend == "ffcv":
        where = damage_beton(small_shards, root / "intact", root / "data", damages)
        return backend, root / "data", root / "intact", where
    return backend, root / "data", small_shards, damage_shards(small_shards, root / "data", damages)


def assert_left_out_and_named(loader, batches, intact, where, err) -> None:
    """`batches`, one epoch of `loader` over damaged data, against `intact`, the same epoch of the intact data: the
    same number of steps, every sound sample once, the damaged ones (`where`: index -> file) counted in
    loader.skipped and named in `err`, and every other sample's views unchanged."""
    assert len(batches) == len(loader)  # the same number of steps
    seen = torch.cat([b[B.INDEX] for b in batches]).tolist()
    assert sorted(seen) == sorted(set(range(N)) - set(where))
    assert sorted(loader.skipped) == sorted(where)
    for i in where:
        assert f"skipped {where[i]} sample {i:09d}" in err
    # Every other sample keeps its views: they depend on (seed, epoch, index) alone.
    for got, full in zip(batches, intact, strict=True):
        keep = ~torch.isin(full[B.INDEX], torch.tensor(list(where)))
        assert sorted(got) == sorted(full)
        for key in got:
            assert torch.equal(got[key].cpu(), full[key][keep].cpu()), key


def assert_each_damage_is_named(loader, where) -> None:
    """With no corrupt sample allowed, the step of each damaged sample of `loader` (eval mode: identity order) stops
    with an error naming its file (`where`: index -> file), its index and its damage."""
    for i in where:
        loader.max_skipped_per_epoch = 0
        loader.set_epoch(0, start_step=i // loader.batch_size)
        with pytest.raises(CorruptSamples, match=rf"{where[i]} sample {i:09d}: .*{REASONS[i]}"):
            list(loader)


@pytest.mark.parametrize("mode", ["pretrain", "eval"])
def test_corrupt_samples_are_left_out_and_the_rest_is_unchanged(damaged, small_recipe, mode, capsys):
    backend, data, intact_data, where = damaged
    loader = make(backend, data, small_recipe, mode=mode, with_geometry=mode == "pretrain", num_workers=2)
    batches = epoch(loader, 1)
    intact = epoch(make(backend, intact_data, small_recipe, mode=mode, with_geometry=mode == "pretrain"), 1)
    assert_left_out_and_named(loader, batches, intact, where, capsys.readouterr().err)


def test_two_ranks_keep_equal_steps_and_every_sound_sample_once(damaged, small_recipe):
    backend, data, _, where = damaged
    loaders = [make(backend, data, small_recipe, rank=r, world_size=2, batch_size=3) for r in range(2)]
    epochs = [epoch(loader, 2) for loader in loaders]
    assert len(epochs[0]) == len(epochs[1]) == len(loaders[0])
    seen = torch.cat([b[B.INDEX] for e in epochs for b in e]).tolist()
    assert sorted(seen) == sorted(set(range(N)) - set(where))
    assert sorted(loaders[0].skipped + loaders[1].skipped) == sorted(where)


def test_past_the_limit_the_error_names_the_file_and_the_sample(damaged, small_recipe):
    backend, data, _, where = damaged
    loader = make(backend, data, small_recipe, mode="eval", batch_size=8)  # identity order: 5, 12, then 20
    loader.max_skipped_per_epoch = 2
    loader.set_epoch(0)
    with pytest.raises(CorruptSamples, match=rf"{where[20]} sample 000000020: .*{REASONS[20]}.*corrupt sample 3 of "
                                             r"epoch 0 on rank 0, more than max_skipped_per_epoch = 2"):
        list(loader)
    loader.max_skipped_per_epoch = len(where)
    assert len(epoch(loader)) == len(loader)  # the count starts again with every epoch


def test_each_damage_is_named(damaged, small_recipe):
    backend, data, _, where = damaged
    assert_each_damage_is_named(make(backend, data, small_recipe, mode="eval", batch_size=8), where)


def test_a_batch_of_nothing_but_corrupt_samples_is_an_error(damaged, small_recipe):
    backend, data, _, _ = damaged
    loader = make(backend, data, small_recipe, mode="eval", batch_size=1)
    loader.set_epoch(0, start_step=5)
    # DALI's source cannot hand it an empty batch: the error comes from its worker, through DALI's own.
    error, message = (Exception, "step 5 of epoch 0 on rank 0: every sample is corrupt") if backend == "dali" else (
        CorruptSamples, "every sample of step 5 of epoch 0 on rank 0 is corrupt")
    with pytest.raises(error, match=message):
        next(iter(loader))


@pytest.mark.parametrize("mode, workers", [("eval", 0), ("pretrain", 2)])
def test_an_undecodable_sample_stops_dali_naming_it(small_shards, small_recipe, tmp_path, mode, workers):
    """DALI decodes inside its pipeline, where a sample can no longer be left out: damage the structure check
    cannot see stops the epoch at that sample's step, and the error names its shard and index (DALI itself only
    says which row of its batch failed: the rows before it in the step, less those left out, give the sample)."""
    pytest.importorskip("nvidia.dali")
    from pirl_trainer.pipelines.dali_options import DaliOptions

    # 24 is left out before DALI sees its step (eval: 24-30), so 27 is the batch's row 2, not 3
    where = damage_shards(small_shards, tmp_path / "data", {**DAMAGE, 24: lost_tail, **UNDECODABLE})
    loader = make("dali", tmp_path / "data", small_recipe, mode=mode, batch_size=8, num_workers=workers,
                  options=DaliOptions(decode_device="cpu"))
    loader.set_epoch(0)
    (step,) = [s for s, batch in enumerate(loader.batches()) if 27 in batch]
    read = []
    with pytest.raises(CorruptSamples, match=rf"^{where[27]} sample 000000027: its JPEG could not be decoded "
                                             r"\(DALI: Failed to decode sample #\d+ of the batch"):
        for batch in loader:
            read.append(batch)
    assert len(read) == step  # every step before the damaged one was trained on


def test_training_goes_on_past_corrupt_samples_and_reports_them(damaged, tmp_path, capsys, monkeypatch):
    import json

    from tests.train.conftest import tiny_overrides
    from pirl_trainer.train import pirl

    backend, data, _, where = damaged
    steps = []  # (rows, loss) of each step's batch, as the loss saw it
    real_losses = pirl.contrastive_losses

    def losses_seen(cfg, net, bank, image, patches, index, *rest):
        losses, log_z = real_losses(cfg, net, bank, image, patches, index, *rest)
        steps.append((len(index), losses["loss"].item()))
        return losses, log_z

    monkeypatch.setattr(pirl, "contrastive_losses", losses_seen)
    run = tmp_path / "run"
    args = [*tiny_overrides(data, run), f"--data.backend={backend}", "--optim.epochs=1"]
    record = pirl.main(args)
    assert record["skipped"] == len(where) and record["step"] == 4  # 31 samples, 8 a batch: the same 4 steps
    logged = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in logged][-1] == len(where)
    # Every sound sample trained once, in batches one row shorter per corrupt sample; each step's logged loss is
    # the loss of the rows that remained (the mean over them), not scaled as if the corrupt rows had counted.
    assert sum(rows for rows, _ in steps) == N - len(where) and min(rows for rows, _ in steps) < 8
    assert [r["loss"] for r in logged if "loss" in r] == pytest.approx([loss for _, loss in steps], rel=1e-6)
    err = capsys.readouterr().err
    assert f"skipped={len(where)}" in err  # the progress line
    assert f"skipped {where[20]} sample 000000020" in err
    with pytest.raises(CorruptSamples, match=rf"{data}.* sample 0000000\d\d: .*max_skipped_per_epoch = 1"):
        pirl.main([*args, f"--run.out_dir={tmp_path / 'strict'}", "--data.max_skipped_per_epoch=1"])


def test_every_real_photo_passes_the_check(real_data):
    photos = [p for p in real_data.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg")]
    assert len(photos) > 100
    problems = {str(p): jpeg_problem(p.read_bytes()) for p in photos}
    assert {p: why for p, why in problems.items() if why} == {}
