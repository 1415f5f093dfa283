"""Top-1 and top-5 of method=supervised's classifier on labelled test shards (eval.*), the semi-supervised table's
numbers (paper Table 3: single-crop top-5 on ImageNet's validation set).

    evaluator = ClassifierEval(cfg, accelerator, train_loader)   # every rank; refuses other classes up front
    evaluator.evaluate(accelerator.unwrap_model(net), step, epoch)   # every rank, together

Single crop: the eval view (shorter side to image_size x eval_resize_ratio, centre crop; the batched stage's eval
form normalises it), BatchNorm in eval mode (running statistics), every module's train/eval flag restored after.
Every rank scores its share of the test set, the sampler's unshuffled split (pipelines/sampler.py: each sample
exactly once over all ranks), and the counts are summed with one all-reduce, so the result is that of one pass
over the whole set whatever the process count. Before it, rank 0's BatchNorm buffers go to every rank (DDP
broadcasts them at the next forward anyway): one classifier is scored, not one per rank.

Top-k: a sample counts when its label is among the k largest logits. With fewer than k classes every sample
counts (k is capped at the class count, as torchvision's reference scripts do): "top5" is then top-C, 100 %.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from pirl_trainer import pipelines
from pirl_trainer.pipelines.augment import BatchAugment
from pirl_trainer.pipelines.class_index import check_same_classes
from pirl_trainer.train.config import ConfigError, PirlConfig

TOP_K = (1, 5)  # the paper's Table 3 reports top-5; top-1 beside it, as VISSL's semi-supervised benchmark does
RESULT_NAME = "eval.json"  # in run.out_dir: the latest evaluation


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks=TOP_K) -> torch.Tensor:
    """(len(ks),) int64: how many rows of logits (B, C) have their label among their k largest, for each k
    (k capped at C). Ties: torch.topk's order."""
    k_max = min(max(ks), logits.shape[1])
    top = logits.topk(k_max, dim=1).indices  # (B, k_max), largest first
    hit = top == labels.view(-1, 1)  # (B, k_max): at most one True per row
    return torch.stack([hit[:, :min(k, k_max)].any(dim=1).sum() for k in ks])


def due(step: int, steps_per_epoch: int, every_epochs: int, last_step: int) -> bool:
    """Whether an evaluation follows this global step: the last one, and every `every_epochs`-th epoch's end."""
    return step == last_step or (every_epochs > 0 and step % (every_epochs * steps_per_epoch) == 0)


class ClassifierEval:
    """This rank's eval loader over eval.test_shards and the run's facts the result records."""

    def __init__(self, cfg: PirlConfig, accelerator, train_loader, backend_options: dict | None = None):
        e = cfg.eval
        if e.every_epochs < 0 or e.batch_size < 1:
            raise ConfigError(f"eval.every_epochs must be >= 0 and eval.batch_size >= 1, got {e.every_epochs} and "
                              f"{e.batch_size}")
        self.accelerator = accelerator
        self.loader = pipelines.make_loader(
            cfg.data.backend, e.test_shards, cfg.data.recipe, batch_size=e.batch_size,
            num_workers=cfg.data.num_workers, rank=accelerator.process_index, world_size=accelerator.num_processes,
            seed=cfg.run.seed, mode="eval", **(backend_options or {}))
        if not self.loader.labelled:
            raise ValueError(f"eval.test_shards={e.test_shards} has no labels: top-1 / top-5 need labelled shards")
        # before any step: a test label must name the class the classifier learns under that number
        check_same_classes("method=supervised (data.shards against eval.test_shards)", cfg.data.shards,
                           train_loader.classes, e.test_shards, self.loader.classes)
        self.stage = BatchAugment(cfg.data.recipe, kernels=cfg.data.augment_kernels)
        self.autocast = torch.autocast(accelerator.device.type, dtype=torch.bfloat16, enabled=cfg.run.bf16)
        self.channels_last = cfg.run.channels_last
        self.result_path = Path(cfg.run.out_dir) / RESULT_NAME
        self.about = {  # what the numbers are of, written beside them
            "test_shards": e.test_shards, "train_shards": cfg.data.shards, "num_train": train_loader.epoch_samples,
            "subset": cfg.data.subset or None,
            "subset_fraction": cfg.data.subset_fraction or None,
            "subset_seed": cfg.data.subset_seed if cfg.data.subset_fraction else None,
            "init_checkpoint": cfg.model.init_checkpoint or None, "arch": cfg.model.arch,
            "num_classes": len(train_loader.classes),
        }

    @torch.no_grad()
    def counts(self, model: torch.nn.Module) -> torch.Tensor:
        """(3,) int64 on this rank: top-1 hits, top-5 hits, samples scored (before the all-reduce)."""
        device = self.accelerator.device
        totals = torch.zeros(len(TOP_K) + 1, dtype=torch.int64, device=device)
        self.loader.set_epoch(0)
        for batch in self.loader:
            image = self.stage.eval({"image": batch["image"].to(device, non_blocking=True)})["image"]
            if self.channels_last:
                image = image.contiguous(memory_format=torch.channels_last)
            with self.autocast:
                logits = model(image[:, None])  # (B, C): the image view as a one-view batch, as in training
            labels = batch["label"].to(device, non_blocking=True)
            totals[:-1] += topk_correct(logits.float(), labels)
            totals[-1] += len(labels)
        return totals

    def evaluate(self, model: torch.nn.Module, step: int, epoch: int) -> dict:
        """{"eval_top1", "eval_top5" (percent), "eval_num_test"} over the whole test set; every rank calls it with
        the unwrapped model. The main process also writes them, with the run's facts, to run.out_dir/eval.json."""
        accelerator = self.accelerator
        if accelerator.num_processes > 1:
            for buffer in model.buffers():
                torch.distributed.broadcast(buffer.data, src=0)
        modes = {m: m.training for m in model.modules()}
        model.eval()
        try:
            totals = self.counts(model)
        finally:
            for module, training in modes.items():
                module.training = training
        hits = accelerator.reduce(totals, "sum").tolist()
        num_test = hits.pop()
        result = {f"eval_top{k}": 100.0 * h / max(1, num_test) for k, h in zip(TOP_K, hits)}
        result["eval_num_test"] = num_test
        if accelerator.is_main_process:
            record = {"top1": result["eval_top1"], "top5": result["eval_top5"], "num_test": num_test,
                      "step": step, "epoch": epoch, **self.about}
            self.result_path.parent.mkdir(parents=True, exist_ok=True)
            self.result_path.write_text(json.dumps(record, indent=2) + "\n")
        return result

