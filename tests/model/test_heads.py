import pytest
import torch

from pirl_trainer.model.heads import ImageHead, JigsawHead

B, N, D, OUT = 16, 9, 12, 5


def test_image_head_shape():
    assert ImageHead(D, OUT)(torch.randn(B, D)).shape == (B, OUT)


def test_jigsaw_head_shape_and_default_sizes():
    head = JigsawHead(D)
    assert head.mix.in_features == 9 * 128  # the paper's 1152-d concatenation
    assert head(torch.randn(B, N, D)).shape == (B, 128)


def test_jigsaw_head_rejects_wrong_patch_count():
    with pytest.raises(ValueError, match="JigsawHead expects"):
        JigsawHead(D, OUT)(torch.randn(B, 8, D))


def test_orders_are_per_sample_permutations():
    head = JigsawHead(D, OUT)
    orders = head.sample_orders(64, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert orders.shape == (64, N)
    assert torch.equal(orders.sort(dim=1).values, torch.arange(N).expand(64, N))
    # Different samples get different orders (64 draws from 9! = 362,880 permutations).
    assert len({tuple(o.tolist()) for o in orders}) > 60


def test_fixed_generator_is_reproducible_and_seed_matters():
    head = JigsawHead(D, OUT)
    x = torch.randn(B, N, D)
    a = head(x, torch.Generator().manual_seed(3))
    b = head(x, torch.Generator().manual_seed(3))
    c = head(x, torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_batched_head_equals_per_sample_loop():
    head = JigsawHead(D, OUT)
    x = torch.randn(B, N, D)
    fast = head(x, torch.Generator().manual_seed(7))

    orders = torch.argsort(torch.rand(B, N, generator=torch.Generator().manual_seed(7)), dim=1)
    slow = []
    for b in range(B):
        patch_vecs = [head.patch_proj(x[b, i]) for i in orders[b].tolist()]
        slow.append(head.mix(torch.cat(patch_vecs)))
    torch.testing.assert_close(fast, torch.stack(slow))


def test_output_depends_on_order():
    # A different order of the same patches gives a different g: the shuffle is not a no-op.
    head = JigsawHead(D, OUT)
    x = torch.randn(1, N, D).expand(32, N, D)
    out = head(x, torch.Generator().manual_seed(0))
    assert (out - out[0]).abs().amax() > 1e-4
