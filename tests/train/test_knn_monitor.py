import math

import pytest
import torch
import torch.nn.functional as F

from pirl_trainer import pipelines
from pirl_trainer.model.trunk import build_trunk
from pirl_trainer.pipelines.augment import BatchAugment
from pirl_trainer.pipelines.recipe import PirlRecipe
from pirl_trainer.train import knn_monitor


def unit(*angles_deg):
    """Unit 2-d rows at the given angles: cosines are cos(angle differences), easy to check by hand."""
    a = torch.tensor(angles_deg, dtype=torch.float64) * math.pi / 180
    return torch.stack([a.cos(), a.sin()], 1)


def test_separable_clusters_give_100_percent():
    gen = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(5, 64, generator=gen), dim=1)
    labels = torch.arange(5).repeat_interleave(8)  # 8 points per class
    points = F.normalize(centres[labels] + 0.05 * torch.randn(40, 64, generator=gen), dim=1)
    train, test = points[::2], points[1::2]
    assert knn_monitor.knn_top1(train, labels[::2], test, labels[1::2], k=3, temperature=0.07) == 100.0


def test_hand_computed_votes_weight_close_neighbours_over_the_majority():
    # Class 0 at 0/10/20 degrees, class 1 at 55/90/120; the query at 40 degrees has as its 3 nearest neighbours
    # 55 (class 1, cos 15 deg), 20 and 10 (class 0, cos 20 and cos 30 deg).
    train, labels = unit(0, 10, 20, 55, 90, 120), torch.tensor([0, 0, 0, 1, 1, 1])
    query = unit(40)
    cos = lambda deg: math.cos(math.radians(deg))  # noqa: E731
    for t in (0.07, 1.0):
        votes = knn_monitor.knn_votes(train, labels, query, num_classes=2, k=3, temperature=t)
        expected = [math.exp(cos(20) / t) + math.exp(cos(30) / t), math.exp(cos(15) / t)]
        torch.testing.assert_close(votes, torch.tensor([expected], dtype=torch.float64))
    # At T = 0.07 the single closest neighbour outweighs two farther ones; at T = 1 the majority wins.
    assert knn_monitor.knn_votes(train, labels, query, 2, 3, 0.07).argmax().item() == 1
    assert knn_monitor.knn_votes(train, labels, query, 2, 3, 1.0).argmax().item() == 0


def test_chunked_votes_equal_one_block_and_k_is_capped_at_the_train_size():
    gen = torch.Generator().manual_seed(1)
    train = F.normalize(torch.randn(23, 8, generator=gen), dim=1)
    test = F.normalize(torch.randn(11, 8, generator=gen), dim=1)
    labels = torch.randint(0, 4, (23,), generator=gen)
    whole = knn_monitor.knn_votes(train, labels, test, 4, k=5, temperature=0.1)
    torch.testing.assert_close(knn_monitor.knn_votes(train, labels, test, 4, k=5, temperature=0.1, chunk=4), whole)
    all_votes = knn_monitor.knn_votes(train, labels, test, 4, k=100, temperature=0.1)  # k > N: every train row
    torch.testing.assert_close(all_votes.sum(1), ((test @ train.T) / 0.1).exp().sum(1))


def test_subsample_indexes_are_spread_evenly():
    assert knn_monitor.subsample_indexes(30, 10).tolist() == list(range(0, 30, 3))
    assert knn_monitor.subsample_indexes(30, None) is None and knn_monitor.subsample_indexes(30, 30) is None
    assert len(set(knn_monitor.subsample_indexes(1000, 999).tolist())) == 999


@torch.no_grad()
def brute_force_features(trunk, shards, recipe, cap=None):
    """L2-normalised trunk outputs and labels of the centre-cropped eval view, sample by sample in index order;
    `cap` keeps floor(i * N / cap) for i < cap, as the monitor's subset."""
    loader = pipelines.make_loader("reference", str(shards), recipe, batch_size=16, num_workers=0, mode="eval")
    loader.set_epoch(0)
    stage, feats, labels, index = BatchAugment(recipe), [], [], []
    for batch in loader:
        feats.append(F.normalize(trunk(stage.eval(batch)["image"]).float(), dim=1))
        labels.append(batch["label"])
        index.append(batch["index"])
    feats, labels, index = torch.cat(feats), torch.cat(labels), torch.cat(index)
    n = len(index)
    wanted = sorted({i * n // cap for i in range(cap)}) if cap and cap < n else list(range(n))
    rows = [index.tolist().index(i) for i in wanted]
    return feats[rows], labels[rows]


def brute_force_knn_top1(trunk, train_shards, test_shards, recipe, k, temperature, max_train=None, max_test=None):
    """NPID's weighted vote written out: every test row sorts all train rows by cosine, its k first vote
    exp(cos / T) for their class; top-1 in percent."""
    was_training = trunk.training
    trunk.eval()
    train, y_train = brute_force_features(trunk, train_shards, recipe, max_train)
    test, y_test = brute_force_features(trunk, test_shards, recipe, max_test)
    trunk.train(was_training)
    correct = 0
    for row, label in zip(test, y_test.tolist()):
        sims = train @ row
        votes: dict[int, float] = {}
        for j in sims.argsort(descending=True)[:k].tolist():
            votes[int(y_train[j])] = votes.get(int(y_train[j]), 0.0) + math.exp(float(sims[j]) / temperature)
        correct += max(votes, key=votes.get) == label
    return 100.0 * correct / len(y_test)


@pytest.fixture
def monitor(synthetic_shards):
    return knn_monitor.KnnMonitor(str(synthetic_shards), str(synthetic_shards), PirlRecipe(), image_size=32,
                                  batch_size=8, num_workers=0, max_train=20)


def test_evaluate_on_shards_with_a_resnet18_trunk_equals_a_brute_force_vote(monitor, synthetic_shards):
    torch.manual_seed(0)
    trunk, _ = build_trunk("resnet18")
    result = monitor.evaluate(trunk, "cpu")
    expected = brute_force_knn_top1(trunk, synthetic_shards, synthetic_shards, monitor.recipe, 20,
                                    0.07, max_train=20)
    assert result["knn_top1"] == pytest.approx(expected, abs=1e-4)  # float32 percent
    assert result == {**result, "knn_k": 20, "knn_num_train": 20, "knn_num_test": 30}
    monitor.k = 5  # fewer voters than training images: the vote is no longer every train row's
    expected = brute_force_knn_top1(trunk, synthetic_shards, synthetic_shards, monitor.recipe, 5,
                                    0.07, max_train=20)
    assert monitor.evaluate(trunk, "cpu")["knn_top1"] == pytest.approx(expected, abs=1e-4)  # float32 percent
    assert monitor.recipe.image_size == 32 and PirlRecipe().image_size == 224


def test_the_reference_loader_reads_only_the_subset(monitor):
    monitor.train_loader.set_epoch(0)
    read = [i for batch in monitor.train_loader for i in batch["index"].tolist()]
    assert read == knn_monitor.subsample_indexes(30, 20).tolist()


def test_evaluate_runs_in_eval_mode_without_grad_and_restores_every_flag(monitor):
    trunk, _ = build_trunk("resnet18")
    trunk.train()
    trunk.layer1.eval()  # a frozen part: must stay in eval mode after evaluate, not follow the parent
    seen = []
    trunk.register_forward_hook(lambda m, i, o: seen.append((m.training, torch.is_grad_enabled())))
    before = {name: m.training for name, m in trunk.named_modules()}
    running_mean = trunk.bn1.running_mean.clone()
    monitor.evaluate(trunk, "cpu")
    assert seen and all(mode == (False, False) for mode in seen)
    assert {name: m.training for name, m in trunk.named_modules()} == before
    torch.testing.assert_close(trunk.bn1.running_mean, running_mean)  # eval mode: BatchNorm statistics untouched
    monitor.evaluate(trunk.eval(), "cpu")
    assert not any(m.training for m in trunk.modules())


def test_evaluate_accepts_a_feature_function_and_small_k(synthetic_shards):
    monitor = knn_monitor.KnnMonitor(str(synthetic_shards), str(synthetic_shards), PirlRecipe(image_size=32),
                                     batch_size=8, num_workers=0, k=1, max_test=10)
    # The test set is the train set: each test image's nearest neighbour is itself.
    result = monitor.evaluate(lambda image: image.flatten(1), "cpu")
    assert result["knn_top1"] == 100.0 and result["knn_num_test"] == 10 and result["knn_k"] == 1


def test_unlabelled_shards_fail_at_construction(unlabelled_shards):
    with pytest.raises(ValueError, match="no labels"):
        knn_monitor.KnnMonitor(str(unlabelled_shards), str(unlabelled_shards), PirlRecipe(), num_workers=0)


def relabelled_copy(shards, dest, classes):
    """A copy of a shard folder whose manifest names other classes (same samples, same labels)."""
    import json
    import shutil

    shutil.copytree(shards, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest["classes"] = classes
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return dest


# tools/synthetic_data.py's class folders, sorted as make_shards sorts them
SYNTHETIC_CLASSES = ["bar", "circle", "crescent", "cross", "frame", "ring", "square", "star", "triangle",
                     "triangle_outline"]


def test_class_difference_names_the_first_position_or_the_counts():
    from pirl_trainer.pipelines.class_index import class_difference

    a = ["n01440764", "n01443537", "n01484850"]
    assert class_difference(a, list(a)) is None
    assert class_difference(a, ["n01440764", "n01484850", "n01491361"]) == (
        "class 1 is 'n01443537' in the training shards and 'n01484850' in the test shards (3 and 3 classes)")
    assert class_difference(a, a[:2]) == "the training shards have 3 classes, the test shards 2 (the first 2 agree)"
    assert class_difference(a[:1], ["x", *a]).startswith("class 0 is 'n01440764' in the training shards and 'x'")


def test_shards_with_other_classes_are_refused_at_construction(synthetic_shards, tmp_path):
    from pirl_trainer.pipelines.class_index import ClassIndexMismatch, check_same_classes

    assert pipelines.make_loader("reference", str(synthetic_shards), PirlRecipe(), batch_size=8, num_workers=0,
                                 mode="eval").classes == SYNTHETIC_CLASSES
    renamed = relabelled_copy(synthetic_shards, tmp_path / "renamed",
                              [*SYNTHETIC_CLASSES[:3], "plus", *SYNTHETIC_CLASSES[4:]])
    with pytest.raises(ClassIndexMismatch) as refused:
        knn_monitor.KnnMonitor(str(synthetic_shards), str(renamed), PirlRecipe(), num_workers=0)
    assert str(refused.value).startswith(
        f"kNN monitor: training shards {synthetic_shards} and test shards {renamed} have different class indexes: "
        "class 3 is 'cross' in the training shards and 'plus' in the test shards (10 and 10 classes).")
    longer = relabelled_copy(synthetic_shards, tmp_path / "longer", [*SYNTHETIC_CLASSES, "extra"])
    with pytest.raises(ClassIndexMismatch, match=r"the training shards have 10 classes, the test shards 11 \(the "
                                                 r"first 10 agree\)"):
        knn_monitor.KnnMonitor(str(synthetic_shards), str(longer), PirlRecipe(), num_workers=0)
    check_same_classes("kNN monitor", "a", SYNTHETIC_CLASSES, "b", None)  # unlabelled: each user's own refusal
