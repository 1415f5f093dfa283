"""Functions the OrderedPool tests run in spawned worker processes (they must be importable by name)."""

import os
import time


def square(x: int) -> int:
    return x * x


def die_on_13(x: int) -> int:
    if x == 13:
        os._exit(7)  # as a segfaulting decoder or the OOM killer would end the worker
    return x * x


def crashed(x: int) -> str:
    return f"crashed on {x}"


def hang_on_13(x: int) -> int:
    if x == 13:
        time.sleep(3600)  # as a decoder stuck on a pathological file would
    return x * x
