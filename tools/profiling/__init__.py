"""The measurements behind tools/profile.py, one kind per module.

decode: the decode limit (JPEGs one core fully decodes per second); loaders: loader-only throughput and the
batched stage's time per batch; step: a profiled training run split into phases; model: the model's step
alone on random inputs; augment: the batched stage against the per-view loop it replaced. machine, report and
plots are shared: which device, the text and JSON output, the PNG charts; cli is the command line.
"""


class UsageError(ValueError):
    """A bad command-line value: tools/profile.py prints the message as one line and exits with status 2."""
