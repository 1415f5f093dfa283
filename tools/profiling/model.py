"""Training-step throughput of the model alone (no data loading), several settings side by side in one run.

A setting is BATCH:IMAGE_SIZE:PATCH_SIZE. Each runs forward (image + the B*9 patches as one batch), a stand-in
loss, backward and an SGD step on random CPU inputs; the first step is a warm-up and is not timed. Ratios
between settings are what to compare: the machine may be shared.
"""

import time

import torch

from pirl_trainer.model.pirl import PIRLNet
from pirl_trainer.tools.profiling import UsageError, machine
from pirl_trainer.tools.profiling.report import table


def parse_setting(text: str) -> tuple[int, int, int]:
    try:
        batch, image_size, patch_size = (int(v) for v in text.split(":"))
    except ValueError:
        raise UsageError(f"--setting {text!r}: expected BATCH:IMAGE_SIZE:PATCH_SIZE, e.g. 32:64:24") from None
    if min(batch, image_size, patch_size) < 1:
        raise UsageError(f"--setting {text!r}: every number must be >= 1")
    return batch, image_size, patch_size


def step_rate(arch: str, batch: int, image_size: int, patch_size: int, steps: int) -> float:
    torch.manual_seed(0)
    net = PIRLNet(arch)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    image = torch.randn(batch, 3, image_size, image_size)
    patches = torch.randn(batch, 9, 3, patch_size, patch_size)
    for i in range(steps + 1):
        if i == 1:
            start = time.perf_counter()
        f_img, g_jig = net(image, patches)
        loss = -(f_img * g_jig).sum()  # stands in for the contrastive loss: same graph through both heads
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps * batch / (time.perf_counter() - start)


def profile_model(arch: str, settings: list[str], steps: int) -> dict:
    parsed = [parse_setting(text) for text in settings]  # every typo reported before the first run
    results = []
    for text, setting in zip(settings, parsed):
        rate = step_rate(arch, *setting, steps)
        results.append({"setting": text, "img_per_s": rate, "ratio_to_first": rate / results[0]["img_per_s"]
                        if results else 1.0})
    return {"arch": arch, "steps": steps, "results": results, "device": machine.cpu_description()}


def report(result: dict) -> str:
    rows = [[r["setting"], r["img_per_s"], r["ratio_to_first"]] for r in result["results"]]
    return "\n".join([
        f"{result['arch']}, {result['steps']} timed steps per setting, {result['device']}",
        table(["batch:image:patch", "img/s", "ratio_to_first"], rows),
    ])
