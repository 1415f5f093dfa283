"""Semi-supervised fine-tuning: a pretrained trunk (model.init_checkpoint), a labelled subset (data.subset*),
top-1 / top-5 on test shards (eval.*), the step schedule, through train/pirl.py's one loop."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from PIL import Image

from pirl_trainer.pipelines import batch as B
from pirl_trainer.pipelines.class_index import ClassIndexMismatch
from pirl_trainer.pipelines.shard_index import build_sample_table, read_labels
from pirl_trainer.pipelines.subset import SubsetError, class_fraction, subset_from_file
from pirl_trainer.tools.make_shards import build_shards
from pirl_trainer.train import checkpoint, pirl
from pirl_trainer.train.classifier_eval import ClassifierEval, due, topk_correct
from pirl_trainer.train.config import ConfigError, PirlConfig, load_config
from pirl_trainer.train.methods import build_net, init_trunk
from pirl_trainer.train.schedule import step_lr_factor
from tests.train.conftest import tiny_overrides
from tests.train.test_knn_monitor import SYNTHETIC_CLASSES, relabelled_copy

SUPERVISED = "train/configs/methods/supervised.yaml"
PER_CLASS = 3  # conftest.synthetic_shards: 10 classes x 3 samples, written class by class


def config(shards, out_dir, *extra, method_file=SUPERVISED):
    return load_config(PirlConfig, method_file, [*tiny_overrides(shards, out_dir), *extra])


def fake_accelerator(rank=0, world_size=1):
    """What build_loader and ClassifierEval.counts read of an Accelerator, for a rank of a world in-process."""
    return SimpleNamespace(process_index=rank, num_processes=world_size, device=torch.device("cpu"),
                           print=lambda *a, **k: None)


def rank_loaders(cfg, world_size=2):
    return [pirl.build_loader(cfg, fake_accelerator(rank, world_size)) for rank in range(world_size)]


def read_epoch(loader, epoch, start_step=0):
    loader.set_epoch(epoch, start_step)
    return list(loader)


@pytest.fixture(scope="module")
def pretrained(synthetic_shards, tmp_path_factory):
    """A PIRL checkpoint of one step (trunk + heads + bank): what fine-tuning starts from."""
    out = tmp_path_factory.mktemp("pretrained")
    pirl.main(["--config", "train/configs/methods/pirl.yaml", *tiny_overrides(synthetic_shards, out),
               "--run.max_steps=1"])
    return checkpoint.latest_checkpoint(out)


@pytest.fixture(scope="module")
def imagenet_named(tmp_path_factory):
    """Shards of 2 classes x 3 images named as ImageNet's (n01440764/n01440764_<k>.JPEG): unique file names."""
    root = tmp_path_factory.mktemp("named")
    rng = np.random.default_rng(0)
    for wnid in ("n01440764", "n01443537"):
        (root / "train" / wnid).mkdir(parents=True)
        for k in (10026, 10027, 10029):
            pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "train" / wnid / f"{wnid}_{k}.JPEG", quality=90)
    build_shards(root / "train", root / "shards", workers=0)
    return root / "shards"


# --- model.init_checkpoint ---

def test_init_checkpoint_loads_the_trunk_exactly_and_leaves_the_classifier_fresh(synthetic_shards, tmp_path,
                                                                                  pretrained):
    cfg = config(synthetic_shards, tmp_path)
    torch.manual_seed(0)
    fresh = build_net(cfg, SYNTHETIC_CLASSES)
    torch.manual_seed(0)
    net = build_net(cfg, SYNTHETIC_CLASSES)
    init_trunk(net, pretrained, "resnet18")
    saved = checkpoint.load(pretrained)["model"]
    trunk = net.trunk.state_dict()
    assert trunk.keys() == {k[len("trunk."):] for k in saved if k.startswith("trunk.")}
    for key, value in trunk.items():
        assert torch.equal(value, saved[f"trunk.{key}"]), key
    assert not torch.equal(trunk["conv1.weight"], fresh.trunk.state_dict()["conv1.weight"])  # it did change
    for key, value in net.classifier.state_dict().items():  # the classifier is the fresh one, bit for bit
        assert torch.equal(value, fresh.classifier.state_dict()[key]), key


def test_init_checkpoint_errors_name_the_file_and_the_problem(synthetic_shards, tmp_path, pretrained):
    net = build_net(config(synthetic_shards, tmp_path), SYNTHETIC_CLASSES)
    with pytest.raises(FileNotFoundError, match=r"model.init_checkpoint: .*nowhere.pt: no such checkpoint file"):
        init_trunk(net, tmp_path / "nowhere.pt", "resnet18")
    headless = tmp_path / "heads.pt"
    torch.save({"model": {"classifier.classifier.weight": torch.zeros(10, 512)}}, headless)
    with pytest.raises(ValueError, match=rf"{headless} holds no trunk weights"):
        init_trunk(net, headless, "resnet18")
    wide = build_net(config(synthetic_shards, tmp_path, "--model.arch=resnet50"), SYNTHETIC_CLASSES)
    with pytest.raises(ValueError, match=rf"{pretrained} holds a resnet18 trunk, this run's model.arch is "
                                         "resnet50: set --model.arch=resnet18"):
        init_trunk(wide, pretrained, "resnet50")
    anonymous = tmp_path / "no_config.pt"  # no config to name its arch: the shapes tell
    torch.save({"model": checkpoint.load(pretrained)["model"]}, anonymous)
    with pytest.raises(ValueError, match=rf"{anonymous}'s trunk does not fit model.arch=resnet50"):
        init_trunk(wide, anonymous, "resnet50")


# --- data.subset, data.subset_fraction ---

def test_subset_file_of_indexes_is_what_every_epoch_reads_once_over_two_ranks(synthetic_shards, tmp_path):
    wanted = [0, 2, 3, 7, 11, 12, 17, 20, 23, 28, 29]
    subset = tmp_path / "subset.txt"
    subset.write_text("".join(f"{i}\n" for i in reversed(wanted)) + "\n")  # any order; blank lines ignored
    cfg = config(synthetic_shards, tmp_path, f"--data.subset={subset}", "--data.batch_size=2")
    loaders = rank_loaders(cfg)
    assert len(loaders[0]) == len(loaders[1]) == 3  # steps from the subset's 11 samples, not the shards' 30
    assert loaders[0].num_samples == 30 and loaders[0].epoch_samples == 11  # global indexes stay global
    labels = read_labels(build_sample_table(synthetic_shards), np.arange(30))
    orders = []
    for epoch in (0, 1):
        seen = []
        for loader in loaders:
            for batch in read_epoch(loader, epoch):
                seen += batch[B.INDEX].tolist()
                assert batch[B.LABEL].tolist() == labels[batch[B.INDEX].numpy()].tolist()  # its own label
        assert sorted(seen) == wanted  # every subset sample exactly once per epoch over the ranks
        orders.append(seen)
    assert orders[0] != orders[1]  # shuffled per epoch


def test_resume_from_a_mid_epoch_step_gives_the_same_batches(synthetic_shards, tmp_path):
    cfg = config(synthetic_shards, tmp_path, "--data.subset_fraction=0.4", "--data.batch_size=2")
    loader = pirl.build_loader(cfg, fake_accelerator())
    assert loader.epoch_samples == 10 and len(loader) == 5  # round(0.4 x 3) = 1 a class, 2 a batch
    full = read_epoch(loader, 3)
    resumed = read_epoch(loader, 3, start_step=2)
    assert len(resumed) == 3
    for a, b in zip(resumed, full[2:], strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key  # the same samples and the same crops
    assert set(torch.cat([b[B.INDEX] for b in full]).tolist()) == set(loader.subset.tolist())


def test_subset_file_of_image_names_as_imagenets_subset_files_name_them(imagenet_named, tmp_path):
    names = (imagenet_named / "sample_names.txt").read_text().splitlines()
    assert names[4] == "n01443537/n01443537_10027.JPEG"  # what make_shards wrote: sample i's relative path
    subset = tmp_path / "1percent.txt"
    subset.write_text("n01443537_10027.JPEG\nn01440764/n01440764_10026.JPEG\n")  # a file name, or with its folder
    assert subset_from_file(subset, imagenet_named, 6).tolist() == [0, 4]
    cfg = config(imagenet_named, tmp_path, f"--data.subset={subset}")
    loader = pirl.build_loader(cfg, fake_accelerator())
    assert sorted(torch.cat([b[B.INDEX] for b in read_epoch(loader, 0)]).tolist()) == [0, 4]


def test_names_missing_repeated_or_shared_are_errors_naming_them(imagenet_named, synthetic_shards, tmp_path):
    subset = tmp_path / "subset.txt"
    subset.write_text("n01440764_10026.JPEG\nn09999999_1.JPEG\nn01443537_4.JPEG\n")
    with pytest.raises(SubsetError, match=r"2 of its 3 names are not in .*'n09999999_1.JPEG', 'n01443537_4.JPEG'"):
        subset_from_file(subset, imagenet_named, 6)
    subset.write_text("n01440764_10026.JPEG\nn01440764_10027.JPEG\nn01440764/n01440764_10026.JPEG\n")
    with pytest.raises(SubsetError, match=r"subset.txt:3 .* names sample 0 again \(first on line 1"):
        subset_from_file(subset, imagenet_named, 6)
    subset.write_text("3\n31\n")
    with pytest.raises(SubsetError, match=r"subset.txt:2 \('31'\): sample index outside the shards' 0..29"):
        subset_from_file(subset, synthetic_shards, 30)
    subset.write_text("star/00001.jpg\n00002.jpg\n")  # every synthetic class has a 00002.jpg
    with pytest.raises(SubsetError, match=r"subset.txt:2 \('00002.jpg'\) names several samples \(bar/00002.jpg, "
                                          r"circle/00002.jpg"):
        subset_from_file(subset, synthetic_shards, 30)


def test_shards_without_sample_names_still_train_and_refuse_a_subset_by_names(synthetic_shards, tmp_path):
    import shutil

    old = tmp_path / "old"  # shards as make_shards wrote them before sample_names.txt
    shutil.copytree(synthetic_shards, old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["sample_names"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    (old / "sample_names.txt").unlink()
    subset = tmp_path / "subset.txt"
    subset.write_text("star/00001.jpg\n")
    with pytest.raises(ConfigError, match=r"lists no sample names .*remake the shards, or give the subset as sample "
                                          "indexes"):
        pirl.build_loader(config(old, tmp_path, f"--data.subset={subset}"), fake_accelerator())
    subset.write_text("5\n6\n")
    loader = pirl.build_loader(config(old, tmp_path, f"--data.subset={subset}"), fake_accelerator())
    assert loader.subset.tolist() == [5, 6]


def test_fraction_takes_that_share_of_every_class_deterministically_for_a_seed():
    sizes = [1, 2, 7, 10, 13, 40]  # uneven classes, one of a single sample
    labels = np.repeat(np.arange(len(sizes)), sizes)[np.random.default_rng(0).permutation(sum(sizes))]
    subset = class_fraction(labels, 0.1, seed=3)
    counts = np.bincount(labels[subset], minlength=len(sizes))
    assert counts.tolist() == [1, 1, 1, 1, 1, 4]  # round(0.1 n), at least one
    assert class_fraction(labels, 0.25, seed=3).size == sum(max(1, int(np.floor(0.25 * n + 0.5))) for n in sizes)
    assert np.array_equal(class_fraction(labels, 0.1, seed=3), subset)  # the same seed, the same subset
    others = [class_fraction(labels, 0.1, seed=s) for s in range(4, 8)]
    assert any(not np.array_equal(o, subset) for o in others)  # another seed, another draw
    assert set(subset) <= set(class_fraction(labels, 0.5, seed=3))  # nested: a smaller fraction inside a larger
    assert np.array_equal(class_fraction(labels, 1.0, seed=3), np.arange(len(labels)))
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(SubsetError, match="must be in \\(0, 1\\]"):
            class_fraction(labels, bad, seed=0)


def test_fraction_subset_of_the_loader_and_its_per_class_summary(synthetic_shards, tmp_path, capsys):
    cfg = config(synthetic_shards, tmp_path, "--data.subset_fraction=0.5", "--data.subset_seed=4")
    printed = []
    loader = pirl.build_loader(cfg, SimpleNamespace(process_index=0, num_processes=1, print=printed.append))
    labels = read_labels(build_sample_table(synthetic_shards), np.arange(30))
    assert np.array_equal(loader.subset, class_fraction(labels, 0.5, seed=4))
    assert np.bincount(labels[loader.subset]).tolist() == [2] * 10
    assert printed == ["training subset: 20 of 30 samples, 2-2 per class (min-max over 10 classes)"]
    other = pirl.build_loader(config(synthetic_shards, tmp_path, "--data.subset_fraction=0.5"), fake_accelerator())
    assert not np.array_equal(other.subset, loader.subset)


def test_subset_settings_that_cannot_apply_are_config_errors(synthetic_shards, unlabelled_shards, tmp_path):
    subset = tmp_path / "subset.txt"
    subset.write_text("1\n")
    both = config(synthetic_shards, tmp_path, f"--data.subset={subset}", "--data.subset_fraction=0.1")
    with pytest.raises(ConfigError, match="both set: choose one"):
        pirl.build_loader(both, fake_accelerator())
    dali = config(synthetic_shards, tmp_path, f"--data.subset={subset}", "--data.backend=dali")
    with pytest.raises(ConfigError, match="DaliLoader plans its epochs itself and cannot read a subset: use the "
                                          "reference or the ffcv backend"):
        pirl.build_loader(dali, fake_accelerator())
    unlabelled = config(unlabelled_shards, tmp_path, "--data.subset_fraction=0.5", method_file=None)
    with pytest.raises(ConfigError, match="drawn class by class, and .* is unlabelled"):
        pirl.build_loader(unlabelled, fake_accelerator())
    with pytest.raises(ConfigError, match="method=pirl's memory bank needs every sample"):
        pirl.main([*tiny_overrides(synthetic_shards, tmp_path), "--data.subset_fraction=0.5"])


@pytest.mark.slow  # converting to a .beton and FFCV's first epoch: ~20 s
def test_ffcv_backend_reads_the_subset_once_over_two_ranks_and_resumes(synthetic_shards, tmp_path):
    pytest.importorskip("ffcv")
    from pirl_trainer.tools.sharding.beton import build_beton

    build_beton(synthetic_shards, tmp_path / "beton", workers=1)
    subset = tmp_path / "subset.txt"
    subset.write_text("1\n4\n9\n14\n20\n22\n27\n")
    cfg = config(tmp_path / "beton", tmp_path, "--data.backend=ffcv", f"--data.subset={subset}",
                 "--data.batch_size=2")
    loaders = rank_loaders(cfg)
    seen = [i for loader in loaders for b in read_epoch(loader, 1) for i in b[B.INDEX].tolist()]
    assert sorted(seen) == [1, 4, 9, 14, 20, 22, 27] and len(loaders[0]) == len(loaders[1]) == 2
    full, resumed = read_epoch(loaders[0], 2), read_epoch(loaders[0], 2, start_step=1)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(resumed, full[1:], strict=True) for k in a)
    names = tmp_path / "names.txt"  # the shards' sample names came along into the .beton folder
    names.write_text("star/00001.jpg\nbar/00000.jpg\n")
    fraction = config(tmp_path / "beton", tmp_path, "--data.backend=ffcv", "--data.subset_fraction=0.4")
    labels = read_labels(build_sample_table(synthetic_shards), np.arange(30))
    assert np.array_equal(pirl.build_loader(fraction, fake_accelerator()).subset, class_fraction(labels, 0.4, 0))
    by_name = config(tmp_path / "beton", tmp_path, "--data.backend=ffcv", f"--data.subset={names}")
    assert pirl.build_loader(by_name, fake_accelerator()).subset.tolist() == [0, 22]


# --- top-1 / top-5 ---

def test_topk_counts_known_values_and_fewer_classes_than_k():
    logits = torch.tensor([[9.0, 8, 7, 6, 5, 4, 3],    # label 0: ranked 1st
                           [1.0, 2, 3, 4, 5, 6, 7],    # label 4: ranked 3rd
                           [0.0, 1, 2, 3, 4, 5, 6],    # label 2: ranked 5th
                           [6.0, 5, 4, 3, 2, 1, 0]])   # label 6: ranked 7th
    labels = torch.tensor([0, 4, 2, 6])
    assert topk_correct(logits, labels).tolist() == [1, 3]
    assert topk_correct(logits, labels, ks=(1, 2, 3, 7)).tolist() == [1, 1, 2, 4]
    three = torch.tensor([[0.0, 1, 2], [2.0, 1, 0], [1.0, 2, 0]])
    assert topk_correct(three, torch.tensor([0, 0, 2])).tolist() == [1, 3]  # top-5 of 3 classes: every sample


class FixedScores(torch.nn.Module):
    """Scores class c as C - c whatever the image (class 0 first), behind a BatchNorm that eval mode must freeze."""

    def __init__(self, num_classes):
        super().__init__()
        self.norm = torch.nn.BatchNorm2d(3)
        self.register_buffer("scores", torch.arange(num_classes, 0, -1, dtype=torch.float32))

    def forward(self, views):  # (B, 1, 3, S, S), as method=supervised hands its image view over
        return self.norm(views[:, 0]).mean(dim=(1, 2, 3))[:, None] * 0 + self.scores


def test_evaluation_counts_each_test_sample_once_over_ranks_with_bn_frozen(synthetic_shards, tmp_path):
    cfg = config(synthetic_shards, tmp_path, f"--eval.test_shards={synthetic_shards}", "--eval.batch_size=4")
    train = pirl.build_loader(cfg, fake_accelerator())
    model = FixedScores(10).train()
    per_rank = [ClassifierEval(cfg, fake_accelerator(r, 2), train).counts(model) for r in range(2)]
    # class 0 predicted for all: top-1 = the 3 samples of class 0, top-5 = the 15 of classes 0-4, of 30
    assert (per_rank[0] + per_rank[1]).tolist() == [3, 15, 30]
    assert per_rank[0][2] == per_rank[1][2] == 15
    accelerator = Accelerator(cpu=True)
    before = model.norm.running_mean.clone()  # counts() above ran it in train mode: the statistics moved
    assert not torch.equal(before, torch.zeros(3))
    result = ClassifierEval(cfg, accelerator, train).evaluate(model, step=7, epoch=2)
    assert result == {"eval_top1": 10.0, "eval_top5": 50.0, "eval_num_test": 30}
    assert model.training and model.norm.training  # every flag restored
    assert torch.equal(model.norm.running_mean, before)  # evaluate() ran BatchNorm in eval mode: no update
    written = json.loads((tmp_path / "eval.json").read_text())
    assert (written["top1"], written["top5"], written["num_test"], written["step"], written["num_train"]) == \
        (10.0, 50.0, 30, 7, 30)


def test_test_shards_of_another_class_index_are_refused_before_training(synthetic_shards, tmp_path):
    test = relabelled_copy(synthetic_shards, tmp_path / "test", SYNTHETIC_CLASSES[::-1])
    with pytest.raises(ClassIndexMismatch, match=(
            rf"method=supervised \(data.shards against eval.test_shards\): training shards {synthetic_shards} and "
            f"test shards {test} have different class indexes: class 0 is 'bar'")):
        pirl.main(["--config", SUPERVISED, *tiny_overrides(synthetic_shards, tmp_path / "run"),
                   f"--eval.test_shards={test}"])
    assert not list(tmp_path.glob("run/checkpoints/*.pt"))
    with pytest.raises(ConfigError, match="eval.test_shards scores method=supervised's classifier"):
        pirl.main([*tiny_overrides(synthetic_shards, tmp_path / "run"), f"--eval.test_shards={test}"])


def test_evaluations_are_due_at_every_nth_epoch_end_and_at_the_last_step():
    assert [s for s in range(1, 13) if due(s, 3, 2, 11)] == [6, 11, 12]
    assert [s for s in range(1, 13) if due(s, 3, 0, 12)] == [12]


def test_step_schedule_drops_tenfold_at_each_step_after_the_warm_up():
    factors = [step_lr_factor(s, 2, [4, 7]) for s in range(9)]
    assert factors == pytest.approx([0.5, 1, 1, 1, 0.1, 0.1, 0.1, 0.01, 0.01])


# --- end to end ---

def test_fine_tuning_run_from_a_pretrained_trunk_on_a_fraction_writes_top1_top5(synthetic_shards, pretrained,
                                                                                 tmp_path, capsys):
    out = tmp_path / "finetune"
    args = ["--config", SUPERVISED, *tiny_overrides(synthetic_shards, out), f"--model.init_checkpoint={pretrained}",
            "--data.subset_fraction=0.5", f"--eval.test_shards={synthetic_shards}", "--eval.every_epochs=1",
            "--optim.lr_steps=[1]", "--optim.nesterov=true", "--optim.weight_decay=0"]
    pirl.main(args)  # 20 samples in batches of 8: 3 steps an epoch, 2 epochs
    err = capsys.readouterr()
    assert f"trunk initialised from {pretrained}" in err.out + err.err
    assert "training subset: 20 of 30 samples, 2-2 per class" in err.out + err.err
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval_top1" in r]
    assert [(r["step"], r["epoch"], r["eval_num_test"]) for r in evals] == [(3, 0, 30), (6, 1, 30)]
    lrs = [r["lr"] for r in records if "lr" in r]  # the rate of the next step: 10x lower from epoch 1's first
    assert lrs[:2] == pytest.approx([lrs[0]] * 2) and lrs[2:] == pytest.approx([lrs[0] / 10] * 4)
    result = json.loads((out / "eval.json").read_text())
    assert (result["top1"], result["top5"]) == (evals[-1]["eval_top1"], evals[-1]["eval_top5"])
    assert (result["num_test"], result["num_train"], result["subset_fraction"], result["init_checkpoint"]) == \
        (30, 20, 0.5, str(pretrained))
    state = checkpoint.load(checkpoint.latest_checkpoint(out))
    assert (state["step"], state["num_samples"], state["epoch_samples"]) == (6, 30, 20)
    assert [result["top1"], result["top5"]] == pytest.approx(scored_by_hand(state, synthetic_shards, tmp_path))
    with pytest.raises(ValueError, match="trained on epochs of 20 samples, this run's data.subset / "
                                         "data.subset_fraction give 30"):
        pirl.main([*args[:-7], "--resume"])


def scored_by_hand(state, shards, tmp_path) -> list[float]:
    """[top-1, top-5] of a checkpoint's classifier on every centre-cropped image of the shards, in one batch."""
    from pirl_trainer import pipelines
    from pirl_trainer.pipelines.augment import BatchAugment

    cfg = config(shards, tmp_path)
    net = build_net(cfg, SYNTHETIC_CLASSES)
    net.load_state_dict(state["model"])
    net.eval()
    test = pipelines.make_loader("reference", str(shards), cfg.data.recipe, batch_size=30, num_workers=0, mode="eval")
    test.set_epoch(0)
    batch = next(iter(test))
    with torch.no_grad():
        logits = net(BatchAugment(cfg.data.recipe).eval(batch)["image"][:, None])
    rank = (logits > logits.gather(1, batch[B.LABEL][:, None])).sum(1)  # classes scored above the label
    return [100 * (rank < k).float().mean().item() for k in (1, 5)]


@pytest.mark.slow  # two processes under accelerate launch: ~30 s
def test_two_processes_score_every_test_image_once_with_rank_0s_classifier(synthetic_shards, pretrained, tmp_path):
    from tests.train.test_two_processes import launch_two

    out = tmp_path / "two"
    launch_two(["--config", SUPERVISED, *tiny_overrides(synthetic_shards, out), f"--model.init_checkpoint={pretrained}",
                "--data.subset_fraction=0.5", f"--eval.test_shards={synthetic_shards}", "--data.batch_size=4",
                "--run.max_steps=3"], port=29541)
    result = json.loads((out / "eval.json").read_text())
    assert (result["num_test"], result["num_train"], result["step"]) == (30, 20, 3)  # each image once over 2 ranks
    state = checkpoint.load(checkpoint.latest_checkpoint(out))  # rank 0's model, whose buffers both ranks scored with
    assert [result["top1"], result["top5"]] == pytest.approx(scored_by_hand(state, synthetic_shards, tmp_path))


def test_finetune_config_is_the_protocols_schedule(tmp_path):
    cfg = load_config(PirlConfig, "train/configs/finetune.yaml", ["--data.shards=/s"])
    assert cfg.method == "supervised" and cfg.model.arch == "resnet50"
    o = cfg.optim  # VISSL's PIRL semi-supervised benchmark (the yaml's comments)
    assert (o.epochs, o.lr, o.reference_batch, list(o.lr_steps)) == (70, 0.01, 256, [30])
    assert (o.momentum, o.nesterov, o.weight_decay, o.warmup_epochs, cfg.data.batch_size) == (0.9, True, 0.0, 0, 32)
    assert (cfg.data.recipe.jitter_p, cfg.data.recipe.grayscale_p) == (0.0, 0.0)
