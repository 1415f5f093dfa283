import dataclasses

import pytest
from omegaconf import OmegaConf

from pirl_trainer.pipelines.recipe import PirlRecipe


def test_defaults_are_the_papers_geometry():
    r = PirlRecipe().validate()
    assert (r.image_size, r.jigsaw_size, r.grid, r.patch_size) == (224, 255, 3, 64)
    assert (r.cell_size, r.num_patches, r.max_patch_offset) == (85, 9, 21)
    assert (r.jigsaw_scale_min, r.image_scale_min) == (0.6, 0.08)
    assert r.eval_resize_size == 256


def test_cpu_scale_down_example_from_the_docstring_is_valid():
    r = PirlRecipe(image_size=112, jigsaw_size=120, patch_size=32).validate()
    assert (r.cell_size, r.max_patch_offset) == (40, 8)
    assert r.eval_resize_size == 128


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"jigsaw_size": 256}, "jigsaw_size"),
        ({"patch_size": 86}, "patch_size"),
        ({"grayscale_p": 1.5}, "grayscale_p"),
        ({"patch_jitter_p": -0.1}, "patch_jitter_p"),
        ({"hue": 0.6}, "hue"),
        ({"patch_contrast": -1.0}, "patch_contrast"),
        ({"jigsaw_scale_min": 0.0}, "jigsaw_scale_min"),
        ({"image_scale_min": 0.9, "image_scale_max": 0.5}, "image_scale_min"),
        ({"ratio_min": 2.0}, "ratio_min"),
        ({"std_g": 0.0}, "std_g"),
        ({"image_size": 0}, "image_size"),
        ({"eval_resize_ratio": 0.5}, "eval_resize_ratio"),
        ({"jigsaw_view": "rotate"}, "jigsaw_view"),
        ({"blur_p": 1.5}, "blur_p"),
        ({"blur_p": -0.5}, "blur_p"),
        ({"blur_sigma_min": 0.0}, "blur_sigma_min"),
        ({"blur_sigma_min": 2.5, "blur_sigma_max": 2.0}, "blur_sigma_min"),
        ({"blur_kernel_fraction": 0.0}, "blur_kernel_fraction"),
        ({"blur_kernel_fraction": 1.5}, "blur_kernel_fraction"),
    ],
)
def test_validate_names_the_bad_field(change, field):
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(PirlRecipe(), **change).validate()


def test_is_an_omegaconf_structured_config():
    cfg = OmegaConf.structured(PirlRecipe)
    cfg.merge_with(OmegaConf.from_dotlist(["image_size=112", "hue=0.1"]))
    recipe = OmegaConf.to_object(cfg)
    assert isinstance(recipe, PirlRecipe)
    assert recipe.image_size == 112 and recipe.hue == 0.1 and recipe.mean == [0.485, 0.456, 0.406]
    with pytest.raises(Exception, match="patch_sise"):
        cfg.merge_with(OmegaConf.from_dotlist(["patch_sise=32"]))



def test_every_field_is_a_plain_scalar():
    # The training config embeds the recipe as an OmegaConf structured config: no tuples or lists.
    for f in dataclasses.fields(PirlRecipe):
        assert f.type in (int, float, bool, str), f.name
