"""Functions the OrderedPool tests run in spawned worker processes (they must be importable by name)."""

import os


def square(x: int) -> int:
    return x * x


def die_on_13(x: int) -> int:
    if x == 13:
        os._exit(7)  # as a segfaulting decoder or the OOM killer would end the worker
    return x * x


def crashed(x: int) -> str:
    return f"crashed on {x}"
