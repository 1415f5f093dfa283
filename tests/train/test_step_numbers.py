"""Step 1 of the real training loop recomputed from its step-0 state: the logged numbers must be the paper's.

The other run tests compare runs with each other (resumed = uninterrupted, 2 processes = 1), which a wiring
mistake made the same way in both passes: a positive read from another sample's row, the bank updated before the
loss scores it, a shifted class target. Here the trainer runs one step in-process; the test rebuilds the state it
started from (the trainer's construction order after torch.manual_seed(run.seed)), takes the same first batch
through the library's loader, batched stage and network, and writes the rest itself: which rows are the positives
and negatives, the patch orders, Wu et al.'s constant Z and the NCE terms in float64 (or the cross entropy of a
classification baseline). log.jsonl and the step-1 checkpoint must hold those numbers.
"""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from pirl_trainer.common.rng import (PURPOSE_HEADS, PURPOSE_JIGSAW_LABEL, PURPOSE_NEGATIVES, counter_words,
                                        derive_seed)
from tests.train.conftest import tiny_overrides
from pirl_trainer.train import checkpoint, pirl
from pirl_trainer.train.config import PirlConfig, load_config
from pirl_trainer.train.methods import CONTRASTIVE, build_net
from pirl_trainer.train.run_log import read_jsonl

CPU = torch.device("cpu")
ONE_PROCESS = SimpleNamespace(process_index=0, num_processes=1)  # all that build_loader reads of the Accelerator
# Not 0.5: an update with momentum and 1 - momentum swapped would give the same rows.
BANK_MOMENTUM = 0.75
# float32 numbers recomputed in float64 from float32 embeddings: the trainer's rounding, not a wiring slip.
RTOL = 1e-5


def run_one_step(overrides: list[str], out_dir) -> tuple[dict, dict]:
    """The trainer's step-1 record in log.jsonl and its step-1 checkpoint."""
    pirl.main([*overrides, "--run.max_steps=1"])
    (record,) = read_jsonl(out_dir / "log.jsonl")
    assert record["step"] == 1
    return record, checkpoint.load(checkpoint.checkpoint_path(out_dir, 1))


def step_zero(overrides: list[str]):
    """(cfg, loader, net, bank, model batch): the trainer's construction order from its seed (train/pirl.py train():
    seed, loader, batched stage, network, then the bank's random rows from the same global stream), and the first
    batch of epoch 0 through the batched stage."""
    cfg = load_config(PirlConfig, None, overrides)
    torch.manual_seed(cfg.run.seed)
    loader = pirl.build_loader(cfg, ONE_PROCESS)
    augment = pirl.build_augment(cfg)
    net = build_net(cfg, loader.classes if loader.labelled else None).train()  # BatchNorm on batch statistics
    bank = pirl.build_bank(cfg, loader.num_samples, CPU) if cfg.method in CONTRASTIVE else None
    loader.set_epoch(0)
    batch = augment(pirl.to_device(next(iter(loader)), CPU), 0)
    return cfg, loader, net, bank, batch


def counter_negatives(seed: int, step: int, index: torch.Tensor, num: int, num_rows: int) -> torch.Tensor:
    """(B, num) rows uniform over the num_rows - 1 rows other than the sample's own (the paper's D_N): draw k of
    sample i maps the counter word of (seed, step, i, k) to [0, num_rows - 1) by multiply-shift, and values at or
    above the own row move up by one."""
    words = counter_words(derive_seed(PURPOSE_NEGATIVES, seed, step), index, num)
    draw = (words * (num_rows - 1)) >> 32
    return draw + (draw >= index[:, None]).long()


def counter_patch_orders(seed: int, step: int, index: torch.Tensor, num_patches: int) -> torch.Tensor:
    """(B, num_patches) permutations: argsort of the counter uniforms of (seed, step, i, slot)."""
    words = counter_words(derive_seed(PURPOSE_HEADS, seed, step), index, num_patches)
    return words.argsort(dim=1)


def nce_term(pos: torch.Tensor, neg: torch.Tensor, tau: float, log_z: float, num_data: int) -> torch.Tensor:
    """Wu et al.'s binary NCE (paper eq. 3-4) in float64: P(s) = exp(s / tau) / Z, each of the K negatives a
    noise sample of probability 1 / num_data, h(s) = P(s) / (P(s) + K / num_data); the term is the batch mean of
    -log h(positive) - sum_k log(1 - h(negative_k))."""
    pos, neg = pos.double(), neg.double()
    noise = neg.shape[1] / num_data
    p_pos, p_neg = torch.exp(pos / tau - log_z), torch.exp(neg / tau - log_z)
    h_pos, h_neg = p_pos / (p_pos + noise), p_neg / (p_neg + noise)
    return (-torch.log(h_pos) - torch.log(1 - h_neg).sum(dim=1)).mean()


def test_pirl_step_one_logs_the_nce_terms_of_its_own_rows_and_updates_them_after_the_loss(synthetic_shards, tmp_path):
    overrides = [*tiny_overrides(synthetic_shards, tmp_path), f"--loss.bank_momentum={BANK_MOMENTUM}"]
    record, state = run_one_step(overrides, tmp_path)

    cfg, loader, net, bank, batch = step_zero(overrides)
    # Logged step 1 draws with the loop's counter before its increment: step 0.
    seed, step, tau, num_data, num_neg = cfg.run.seed, 0, cfg.loss.tau, loader.num_samples, cfg.loss.num_negatives
    index = batch["index"]
    initial = bank.rows.clone()
    assert index.shape == (8,) and num_data == 30
    # The rebuilt start is the trainer's: the rows step 1 did not visit are still the rebuilt ones, bit for bit.
    untouched = torch.ones(num_data, dtype=torch.bool)
    untouched[index] = False
    assert torch.equal(state["bank"]["rows"][untouched], initial[untouched])

    order = counter_patch_orders(seed, step, index, cfg.data.recipe.view_tiles)
    with torch.no_grad():
        f_img, g_jig = net(batch["image"], batch["patches"], patch_order=order)  # the forward before any update
    negatives = counter_negatives(seed, step, index, num_neg, num_data)
    assert negatives.shape == (8, num_neg) and not (negatives == index[:, None]).any()
    assert 0 <= negatives.min() and negatives.max() < num_data

    positives = initial.double()[index]  # m_I: each sample's own row, as it was before the step
    negative_rows = initial.double()[negatives]  # (B, K, D) m_I'
    sims = {}
    for name, query in (("image", f_img.double()), ("jigsaw", g_jig.double())):
        sims[name] = ((query * positives).sum(dim=1), torch.einsum("bd,bkd->bk", query, negative_rows))
    # Z = num_data * mean exp(s / tau), estimated once on the first step from the image term's similarities.
    pos, neg = sims["image"]
    log_z = math.log(num_data) + math.log(torch.cat([pos, neg.flatten()]).div(tau).exp().mean())
    terms = {name: nce_term(pos, neg, tau, log_z, num_data).item() for name, (pos, neg) in sims.items()}
    loss = cfg.loss.lam * terms["jigsaw"] + (1 - cfg.loss.lam) * terms["image"]  # paper eq. 5

    assert record["loss_image"] == pytest.approx(terms["image"], rel=RTOL)
    assert record["loss_jigsaw"] == pytest.approx(terms["jigsaw"], rel=RTOL)
    assert record["loss"] == pytest.approx(loss, rel=RTOL)
    assert record["pos_image"] == pytest.approx(sims["image"][0].mean().item(), rel=RTOL, abs=1e-6)
    assert record["neg_image"] == pytest.approx(sims["image"][1].mean().item(), rel=RTOL, abs=1e-6)
    assert float(state["log_z"]) == pytest.approx(log_z, rel=RTOL)  # kept for the later steps

    # The update after the step: normalise(m * old + (1 - m) * f(v_I)) on the batch's rows, from the forward above.
    m = cfg.loss.bank_momentum
    expected = F.normalize(m * initial[index] + (1 - m) * f_img, dim=1)
    torch.testing.assert_close(state["bank"]["rows"][index], expected, rtol=RTOL, atol=1e-6)
    # One image pass in train mode moved the BatchNorm running statistics, the patch pass left them alone
    # (PIRLNet.patch_bn_stats): the rebuilt network after the same forward holds the checkpoint's.
    for key, value in net.state_dict().items():
        if "running" in key or "num_batches" in key:
            torch.testing.assert_close(state["model"][key], value, rtol=RTOL, atol=1e-6, msg=key)


def test_jigsaw_step_one_logs_the_cross_entropy_of_its_counter_drawn_permutations(synthetic_shards, tmp_path):
    overrides = [*tiny_overrides(synthetic_shards, tmp_path), "--method=jigsaw", "--model.num_permutations=4"]
    record, state = run_one_step(overrides, tmp_path)

    cfg, _, net, _, batch = step_zero(overrides)
    index, k = batch["index"], cfg.model.num_permutations
    # Permutation id of sample i at step 0: its counter word of (seed, step, i) mapped to [0, K) by multiply-shift.
    words = counter_words(derive_seed(PURPOSE_JIGSAW_LABEL, cfg.run.seed, 0), index, 1)[:, 0]
    target = (words * k) >> 32
    assert 0 <= target.min() and target.max() < k
    with torch.no_grad():
        logits = net(batch["patches"], target).double()  # the classifier shuffles the patches by target's ids
    assert logits.shape == (8, k)
    cross_entropy = (torch.logsumexp(logits, dim=1) - logits.gather(1, target[:, None])[:, 0]).mean().item()
    accuracy = (logits.argmax(dim=1) == target).double().mean().item()

    assert record["loss"] == pytest.approx(cross_entropy, rel=RTOL)
    assert record["accuracy"] == pytest.approx(accuracy, abs=1e-6)
    for key, value in net.state_dict().items():
        if "running" in key or "num_batches" in key:
            torch.testing.assert_close(state["model"][key], value, rtol=RTOL, atol=1e-6, msg=key)
