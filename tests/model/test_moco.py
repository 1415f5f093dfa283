"""MoCo v2's parts (model/moco.py, model/losses.py moco_loss): the queue's order and wrap-around, the key encoder's
EMA and its lack of gradients, the shuffled-BatchNorm groups, the InfoNCE against the queue."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pirl_trainer.model.losses import moco_loss
from pirl_trainer.model.moco import MoCoNet, MomentumKeys, group_bounds, shuffle_order


def momentum_keys(queue_size: int = 10, dim: int = 128, momentum: float = 0.999) -> tuple[MoCoNet, MomentumKeys]:
    query = MoCoNet("resnet18", embed_dim=dim)
    return query, MomentumKeys(MoCoNet("resnet18", embed_dim=dim), query, queue_size, dim, momentum)


def test_the_key_encoder_starts_as_the_query_network_and_never_takes_a_gradient():
    query, keys = momentum_keys()
    for (name, q), (key_name, k) in zip(query.state_dict().items(), keys.encoder.state_dict().items()):
        assert name == key_name and torch.equal(q, k), name
    assert not any(p.requires_grad for p in keys.encoder.parameters())
    images = torch.randn(4, 3, 32, 32)
    with torch.enable_grad():
        k = keys.encode(images)
        q = query(images)
        out = moco_loss(q, k, keys.queue, 0.2)
        out["loss"].backward()
    assert not k.requires_grad
    assert all(p.grad is None for p in keys.encoder.parameters())
    assert all(p.grad is not None for p in query.parameters())  # the query network did learn from it
    torch.testing.assert_close(k.norm(dim=1), torch.ones(4))


def test_the_ema_is_m_times_the_key_plus_1_minus_m_times_the_query_exactly():
    """Dyadic values and m = 0.75: every product and sum is exact in float32, so the update must be bit-exact."""
    query, keys = momentum_keys(momentum=0.75)
    with torch.no_grad():
        for i, (p, k) in enumerate(zip(query.parameters(), keys.encoder.parameters())):
            p.copy_(torch.randint(-64, 64, p.shape).float() / 8)
            k.copy_(torch.randint(-64, 64, k.shape).float() / 8 + i)
    before = {name: t.clone() for name, t in keys.encoder.state_dict().items()}
    keys.momentum_update(query)
    params = dict(query.named_parameters())
    for name, k in keys.encoder.named_parameters():
        assert torch.equal(k, 0.75 * before[name] + 0.25 * params[name].detach()), name
    buffers = dict(keys.encoder.named_buffers())
    for name in buffers:  # BatchNorm's running statistics are not averaged (never read: batch statistics only)
        assert torch.equal(buffers[name], before[name]), name
    renamed = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="do not match"):
        keys.momentum_update(renamed)


def test_keys_go_into_the_queue_in_order_and_wrap_around_a_queue_the_batch_does_not_divide():
    _, keys = momentum_keys(queue_size=10, dim=2)
    initial = keys.queue.clone()
    torch.testing.assert_close(initial.norm(dim=1), torch.ones(10))  # random unit rows, as MoCo's
    batches = [torch.arange(8.0).view(4, 2) + 100 * step for step in range(3)]  # 4 keys a step, K = 10
    keys.enqueue(batches[0])
    assert torch.equal(keys.queue[:4], batches[0]) and torch.equal(keys.queue[4:], initial[4:])
    assert int(keys.pointer) == 4
    keys.enqueue(batches[1])
    assert torch.equal(keys.queue[4:8], batches[1]) and int(keys.pointer) == 8
    keys.enqueue(batches[2])  # rows 8, 9, then 0, 1: over the oldest keys
    assert torch.equal(keys.queue[8:], batches[2][:2]) and torch.equal(keys.queue[:2], batches[2][2:])
    assert torch.equal(keys.queue[2:4], batches[0][2:]) and int(keys.pointer) == 2
    # the state a resumed run restores: the queue and the pointer
    _, other = momentum_keys(queue_size=10, dim=2)
    other.load_state_dict(keys.state_dict())
    assert torch.equal(other.queue, keys.queue) and int(other.pointer) == 2
    with pytest.raises(ValueError, match="at most 10 keys"):
        keys.enqueue(torch.zeros(11, 2))


def test_moco_loss_scores_the_positive_against_the_queue_with_target_0():
    q = F.normalize(torch.randn(5, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    k = F.normalize(torch.randn(5, 8, generator=torch.Generator().manual_seed(1)), dim=1)
    queue = F.normalize(torch.randn(12, 8, generator=torch.Generator().manual_seed(2)), dim=1)
    out = moco_loss(q, k, queue, 0.2)
    expected = sum(-math.log(math.exp(float(q[b] @ k[b]) / 0.2) /
                             (math.exp(float(q[b] @ k[b]) / 0.2) + sum(math.exp(float(q[b] @ queue[j]) / 0.2)
                                                                       for j in range(12))))
                   for b in range(5)) / 5
    assert out["loss"].item() == pytest.approx(expected, rel=1e-5)
    torch.testing.assert_close(out["neg"], q @ queue.T)
    assert torch.equal(out["accuracy"], (out["pos"] > out["neg"].max(dim=1).values).float())
    out = moco_loss(q, q.clone(), -q[:3], 0.2)  # positive at cosine 1, negatives below: ranked first
    assert torch.equal(out["accuracy"], torch.ones(5))


def test_group_bounds_cut_as_evenly_as_numpy_does():
    assert group_bounds(10, 4) == [0, 3, 6, 8, 10]
    assert group_bounds(8, 8) == list(range(9))
    for n, g in ((30, 8), (7, 3), (64, 8)):
        sizes = [len(part) for part in np.array_split(range(n), g)]
        bounds = group_bounds(n, g)
        assert [b - a for a, b in zip(bounds, bounds[1:])] == sizes
    with pytest.raises(ValueError, match="non-empty groups"):
        group_bounds(3, 4)


def test_the_shuffle_is_a_function_of_the_samples_not_of_the_padding_or_the_process_count():
    """One process: samples 0..6. Two processes padded to 4 rows each: samples 0..3, then 4..6 and a padding row.
    The first 7 positions of each order name the same samples in the same order; ties keep the batch's order."""
    samples = torch.arange(7)
    words = torch.tensor([5, 3, 9, 3, 0, 7, 3])  # three tied words
    one = shuffle_order(words, torch.ones(7, dtype=torch.bool))
    assert samples[one].tolist() == [4, 1, 3, 6, 0, 5, 2]
    padded_samples = torch.tensor([0, 1, 2, 3, 4, 5, 6, -1])
    padded_words = torch.tensor([5, 3, 9, 3, 0, 7, 3, 0])  # the padding row's word would sort first
    two = shuffle_order(padded_words, padded_samples >= 0)
    assert padded_samples[two].tolist() == [4, 1, 3, 6, 0, 5, 2, -1]
    padded_samples = torch.tensor([0, 1, 2, -1, 3, 4, 5, 6])  # the padding in the middle (rank 0's batch short)
    two = shuffle_order(torch.tensor([5, 3, 9, 0, 3, 0, 7, 3]), padded_samples >= 0)
    assert padded_samples[two].tolist() == [4, 1, 3, 6, 0, 5, 2, -1]


def test_each_group_of_keys_is_normalised_by_its_own_statistics():
    """encode_groups: a group's keys depend on its own images only (its own BatchNorm statistics), differ from the
    keys of the whole batch at once, and come out in shuffled order; running statistics stay as they were."""
    _, keys = momentum_keys()
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    order = torch.tensor([6, 2, 7, 0, 3, 5, 1, 4])
    bounds = group_bounds(8, 2)
    running = keys.encoder.trunk.bn1.running_mean.clone()
    grouped = keys.encode_groups(images, order, bounds, 0, 2)
    torch.testing.assert_close(grouped[:4], keys.encode(images[order[:4]]), rtol=0, atol=0)
    torch.testing.assert_close(grouped[4:], keys.encode(images[order[4:]]), rtol=0, atol=0)
    # a second process's half (groups 1..1 alone) is the same keys
    torch.testing.assert_close(keys.encode_groups(images, order, bounds, 1, 2), grouped[4:], rtol=0, atol=0)
    other = images.clone()
    other[order[4:]] += 1.0  # change group 1's images only
    assert torch.equal(keys.encode_groups(other, order, bounds, 0, 1), grouped[:4])
    assert not torch.allclose(keys.encode(images[order]), grouped, atol=1e-3)  # one group: other statistics
    assert torch.equal(keys.encoder.trunk.bn1.running_mean, running)
