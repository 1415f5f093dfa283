"""The loader front (pipelines/loader_front.py): every backend binds and checks its arguments the same way, in the
same order, before any file is read."""
import importlib.util
import inspect

import pytest

from pirl_trainer import pipelines
from pirl_trainer.pipelines.epoch_loader import EpochLoader
from pirl_trainer.pipelines.errors import BackendUnavailable
from pirl_trainer.pipelines.loader_front import LoaderArgs

OWN_OPTIONS = {"reference": ["pin_memory", "decode_device"], "dali": ["options", "pin_memory"],
               "ffcv": ["pin_memory", "os_cache"]}


def test_every_backend_refuses_a_bad_common_argument_with_the_same_message_before_reading(small_recipe, tmp_path):
    missing = str(tmp_path / "no-such-shards")  # read before the checks, this would be a file error instead
    for kwargs, error, message in [
        (dict(mode="train"), ValueError, "mode must be one of ('pretrain', 'eval'), got 'train'"),
        (dict(mode="eval", with_geometry=True), ValueError,
         "with_geometry=True only applies to mode='pretrain' (eval draws no geometry)"),
        (dict(num_workers=-1), ValueError, "num_workers must be >= 0, got -1"),
        (dict(seed=-2), ValueError, "seed must be >= 0, got -2"),
    ]:
        for backend in pipelines.BACKENDS:
            if backend == "ffcv" and importlib.util.find_spec("ffcv") is None:
                continue  # a missing FFCV is said first (test_ffcv_loader.py)
            with pytest.raises(error) as got:
                pipelines.make_loader(backend, missing, small_recipe, **({"batch_size": 2, "num_workers": 0} | kwargs))
            assert str(got.value) == message, (backend, kwargs)


def test_the_backends_own_options_are_checked_before_reading(small_recipe, tmp_path):
    missing = str(tmp_path / "no-such-shards")
    with pytest.raises(ValueError, match=r"decode_device \(data.decode_device\) must be one of .* got 'gpu'"):
        pipelines.make_loader("reference", missing, small_recipe, batch_size=2, num_workers=0, decode_device="gpu")
    with pytest.raises(ValueError, match="dali.decode_device must be one of .* got 'gpu'"):
        pipelines.make_loader("dali", missing, small_recipe, batch_size=2, num_workers=0,
                              options={"decode_device": "gpu"})


@pytest.mark.parametrize("backend", sorted(OWN_OPTIONS))
def test_an_unknown_or_missing_argument_names_the_backend_and_what_it_takes(small_recipe, tmp_path, backend):
    foreign = {"reference": "os_cache", "dali": "decode_device", "ffcv": "options"}[backend]  # another backend's
    with pytest.raises(TypeError) as got:
        pipelines.make_loader(backend, str(tmp_path), small_recipe, batch_size=2, num_workers=0, **{foreign: 1})
    assert str(got.value) == (f"make_loader() of the {backend} backend got an unexpected keyword argument "
                              f"{foreign!r}; it takes ['batch_size', 'num_workers', 'rank', 'world_size', 'seed', "
                              f"'mode', 'with_geometry'] (every backend) and {OWN_OPTIONS[backend]} (its own)")
    with pytest.raises(TypeError, match=rf"{backend} backend is missing required keyword arguments \['batch_size'\]"):
        pipelines.make_loader(backend, str(tmp_path), small_recipe, num_workers=0)


def test_the_front_hands_epoch_loader_exactly_its_arguments():
    taken = [p.name for p in inspect.signature(EpochLoader.__init__).parameters.values()
             if p.kind is inspect.Parameter.KEYWORD_ONLY]
    assert sorted(taken) == sorted(f.name for f in LoaderArgs.__dataclass_fields__.values())


def test_backend_unavailable_is_one_class_reexported_by_the_package():
    assert pipelines.BackendUnavailable is BackendUnavailable
