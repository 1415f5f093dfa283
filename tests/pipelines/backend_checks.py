"""What the backend tests share: a loader on the test data with the tests' small defaults, one epoch read whole, and
the check that a backend gives the reference's samples and crops with pixels within a bound."""
import torch

from pirl_trainer import pipelines
from pirl_trainer.pipelines import batch as B
from pirl_trainer.pipelines.batch import check_loader_batch


def make_loader(backend: str, data, recipe, **kw):
    """pipelines.make_loader on `data` with batches of 4 read in this process (num_workers=0), unless `kw` says
    otherwise."""
    return pipelines.make_loader(backend, str(data), recipe, **{"batch_size": 4, "num_workers": 0, **kw})


def epoch(loader, e: int = 0, start_step: int = 0) -> list[dict[str, torch.Tensor]]:
    """Every batch of epoch `e` from `start_step` on."""
    loader.set_epoch(e, start_step)
    return list(loader)


def mad_per_view(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(..., 3): mean absolute difference of each view (image or tile), per channel."""
    return (a.float() - b.float()).abs().mean(dim=(-2, -1))


def assert_same_crops_close_pixels(ours: list, ref: list, recipe, bound: float) -> dict[str, torch.Tensor]:
    """Two epochs of labelled pretraining batches read with geometry: the same batches, keys, samples, labels and
    drawn geometry exactly, and every view's per-channel difference within `bound`; returns those differences,
    (views, 3) for the image and for the patches."""
    assert len(ours) == len(ref)
    diffs = {B.IMAGE: [], B.PATCHES: []}
    for a, b in zip(ours, ref):
        check_loader_batch(a, recipe, labelled=True)
        assert set(a) == set(b)
        for key in (B.INDEX, B.LABEL, *B.GEOMETRY_KEYS):  # same samples, same drawn geometry
            assert torch.equal(a[key], b[key]), key
        for key, views in diffs.items():
            mad = mad_per_view(a[key], b[key])
            assert (mad <= bound).all(), (key, mad.max())
            views.append(mad.reshape(-1, 3))
    return {key: torch.cat(views) for key, views in diffs.items()}
