import math

import pytest
import torch
import torch.nn.functional as F

from pirl_trainer.model.covariant import (CovariantNet, JigsawClassifier, RotationClassifier, classification_loss,
                            draw_permutation_ids)

B, N, D = 8, 9, 12


def _small_jigsaw(k: int = 20) -> JigsawClassifier:
    return JigsawClassifier(D, num_permutations=k, hidden=24, patch_dim=6)


def test_jigsaw_matches_an_explicit_per_sample_shuffle():
    clf = _small_jigsaw()
    x = torch.randn(B, N, D)
    ids = torch.randint(0, 20, (B,))
    out = clf(x, ids)
    assert out.shape == (B, 20)
    table = clf.permutations
    for b in range(B):
        # The puzzle the classifier must see: slot j holds grid patch table[id, j].
        shuffled = torch.stack([x[b, table[ids[b], j]] for j in range(N)])  # (9, D)
        ref = clf.classifier(F.relu(clf.patch_proj(shuffled)).reshape(-1))
        torch.testing.assert_close(out[b], ref)


def test_shuffling_the_input_equals_asking_for_that_permutation():
    clf = _small_jigsaw()
    clf.permutations[0] = torch.arange(N)  # make id 0 the identity, which the greedy table need not contain
    x = torch.randn(B, N, D)
    i = 7
    p = clf.permutations[i]
    torch.testing.assert_close(clf(x[:, p], torch.zeros(B, dtype=torch.int64)),
                               clf(x, torch.full((B,), i)))


def test_default_sizes():
    clf = JigsawClassifier(2048)
    assert clf.permutations.shape == (1000, 9)
    assert clf.classifier[0].in_features == 9 * 128
    assert clf(torch.randn(2, 9, 2048), torch.tensor([0, 999])).shape == (2, 1000)
    assert sum(p.numel() for p in clf.parameters()) == 1_365_608  # the docstring's 1.37M
    single = JigsawClassifier(16, num_permutations=10, hidden=None, patch_dim=4)
    assert isinstance(single.classifier[0], torch.nn.Linear) and len(single.classifier) == 1


def test_gradient_reaches_every_parameter():
    clf = _small_jigsaw()
    out = clf(torch.randn(B, N, D), torch.randint(0, 20, (B,)))
    classification_loss(out, torch.randint(0, 20, (B,)))["loss"].backward()
    for name, p in clf.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_table_travels_with_the_state_dict():
    src = _small_jigsaw()
    assert "permutations" in src.state_dict()
    other_seed = JigsawClassifier(D, num_permutations=20, hidden=24, patch_dim=6, permutation_seed=5)
    assert not torch.equal(other_seed.permutations, src.permutations)
    other_seed.load_state_dict(src.state_dict())
    assert torch.equal(other_seed.permutations, src.permutations)
    with pytest.raises(RuntimeError, match="permutations"):
        _small_jigsaw(k=30).load_state_dict(src.state_dict())


def test_jigsaw_rejects_wrong_shapes():
    clf = _small_jigsaw()
    with pytest.raises(ValueError, match="grid order"):
        clf(torch.randn(B, 4, D), torch.zeros(B, dtype=torch.int64))
    with pytest.raises(ValueError, match="perm_ids"):
        clf(torch.randn(B, N, D), torch.zeros(B + 1, dtype=torch.int64))


def _train(model, make_batch, steps: int = 200) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        inputs, target = make_batch()
        loss = classification_loss(model(*inputs), target)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()


def _jigsaw_toy(position_signal: float):
    """Patch features = a fixed vector per grid cell (what a trunk must learn to see) + fresh noise."""
    k = 10
    cells = torch.randn(N, D)
    clf = JigsawClassifier(D, num_permutations=k, hidden=64, patch_dim=32)

    def batch(size: int = 128):
        x = position_signal * cells + torch.randn(size, N, D)
        ids = torch.randint(0, k, (size,))
        return (x, ids), ids

    _train(clf, batch)
    (x, ids), target = batch(2000)
    with torch.no_grad():
        return classification_loss(clf(x, ids), target)["accuracy"].item()


def test_jigsaw_task_is_learnable_when_patches_reveal_their_cell():
    assert _jigsaw_toy(position_signal=1.0) > 0.9


def test_the_id_does_not_leak_into_the_logits():
    # Features with no position signal: the shuffled puzzle looks the same whatever the id, so a head that
    # could read the id through its gather would show here. Chance is 0.1 (2000 samples: sd 0.007).
    assert _jigsaw_toy(position_signal=0.0) < 0.15


def test_rotation_shapes_and_errors():
    clf = RotationClassifier(D)
    assert clf(torch.randn(B, 1, D)).shape == (B, 4)
    assert clf(torch.randn(B, D)).shape == (B, 4)
    assert RotationClassifier(D, hidden=16)(torch.randn(B, D)).shape == (B, 4)
    with pytest.raises(ValueError, match="RotationClassifier expects"):
        clf(torch.randn(B, 2, D))


def test_rotation_toy_is_learnable():
    turns = torch.randn(4, D)  # a feature direction per quarter turn, plus noise
    clf = RotationClassifier(D)

    def batch(size: int = 128):
        y = torch.randint(0, 4, (size,))
        return (turns[y].unsqueeze(1) + torch.randn(size, 1, D),), y

    _train(clf, batch)
    (x,), y = batch(2000)
    with torch.no_grad():
        assert classification_loss(clf(x), y)["accuracy"].item() > 0.9


def test_ids_do_not_depend_on_how_samples_are_batched():
    index = torch.randperm(5000)[:300]
    whole = draw_permutation_ids(7, 11, index, 1000)
    split = torch.cat([draw_permutation_ids(7, 11, part, 1000) for part in index.split([1, 120, 179])])
    assert torch.equal(whole, split)
    order = torch.randperm(300)
    assert torch.equal(draw_permutation_ids(7, 11, index[order], 1000), whole[order])
    assert whole.dtype == torch.int64 and whole.shape == (300,)
    # (seed, step) matter.
    assert not torch.equal(draw_permutation_ids(7, 12, index, 1000), whole)
    assert not torch.equal(draw_permutation_ids(8, 11, index, 1000), whole)


def _chi2_critical(df: int, z: float = 3.0902) -> float:
    """Upper 0.1% point of chi-square (z = the normal's 0.999 quantile), Wilson-Hilferty: within 1% for df >= 9."""
    c = 2.0 / (9 * df)
    return df * (1 - c + z * math.sqrt(c)) ** 3


@pytest.mark.parametrize("k, draws", [(10, 20_000), (1000, 200_000)])
def test_ids_are_uniform(k, draws):
    ids = draw_permutation_ids(0, 3, torch.arange(draws), k)
    assert ids.min() >= 0 and ids.max() < k
    counts = torch.bincount(ids, minlength=k).double()
    expected = draws / k
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < _chi2_critical(k - 1), chi2


def test_ids_reject_bad_arguments():
    with pytest.raises(ValueError, match="k must be"):
        draw_permutation_ids(0, 0, torch.arange(4), 0)
    with pytest.raises(ValueError, match="index must be"):
        draw_permutation_ids(0, 0, torch.arange(4).view(2, 2), 10)


def test_classification_loss_known_values():
    out = classification_loss(torch.zeros(5, 4, requires_grad=True), torch.tensor([0, 1, 2, 3, 0]))
    torch.testing.assert_close(out["loss"], torch.tensor(math.log(4)))
    assert out["loss"].requires_grad and not out["accuracy"].requires_grad
    logits = 5.0 * F.one_hot(torch.tensor([0, 1, 2, 3, 3]), 4).float()
    acc = classification_loss(logits.bfloat16(), torch.tensor([0, 1, 2, 3, 0]))["accuracy"]
    assert acc.item() == pytest.approx(0.8)


def test_supervised_net_fits_a_batch_of_labelled_images():
    """The image view as one "patch" through the trunk and a linear layer: it can memorise 6 images' labels."""
    torch.manual_seed(0)
    net = CovariantNet("supervised", "resnet18", num_classes=3)
    image, label = torch.randn(6, 1, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2])
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(15):
        out = classification_loss(net(image), label)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert torch.equal(net(image).argmax(1), label)  # batch statistics, as in training
    with pytest.raises(ValueError, match="needs num_classes >= 2"):
        CovariantNet("supervised", "resnet18")
