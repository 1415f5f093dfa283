"""Training-step throughput of the model alone (no data loading), several settings side by side in one run.

    python tools/bench_step.py --arch resnet18 --setting 32:64:32 --setting 64:64:24 --steps 4

A setting is BATCH:IMAGE_SIZE:PATCH_SIZE. Each runs forward (image + the B*9 patches as one batch), a
stand-in loss, backward and an SGD step on random inputs; the first step is a warm-up and is not timed.
Ratios between settings are what to compare: the machine may be shared.
"""
from __future__ import annotations

import argparse
import time

import torch

from model.pirl import PIRLNet


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--setting", action="append", required=True, help="BATCH:IMAGE_SIZE:PATCH_SIZE")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per setting")
    args = parser.parse_args()
    rates = []
    for setting in args.setting:
        batch, image_size, patch_size = (int(v) for v in setting.split(":"))
        rates.append(step_rate(args.arch, batch, image_size, patch_size, args.steps))
        print(f"{args.arch} batch {batch}, image {image_size}px, patches 9x{patch_size}px: "
              f"{rates[-1]:.1f} img/s ({rates[-1] / rates[0]:.2f}x the first)", flush=True)


if __name__ == "__main__":
    main()
