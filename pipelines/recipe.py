"""The PIRL augmentation recipe: every number of the two views, read by every backend.

Sources: "paper" = Misra & van der Maaten, CVPR 2020 (arXiv 1912.01991), supplement A / A.1;
"(ref)" = the public reference implementation, VISSL's `pirl_jigsaw_4node_resnet50.yaml` with its
`ImgPilToPatchesAndImage` / `ImgPatchesFromTensor` transforms, where the paper gives no number.
The Gaussian blur is not PIRL's: "SimCLR" = Chen et al., ICML 2020 (arXiv 2002.05709), appendix A;
"MoCo v2" = Chen et al., arXiv 2003.04297, with its public code's `GaussianBlur([.1, 2.])`.

How to scale down for CPU runs: the resolution fields are plain config. Keep `jigsaw_size` divisible by
`grid` and `patch_size <= jigsaw_size // grid`, e.g. `image_size=112, jigsaw_size=120, patch_size=32`
(cells of 40 px, offsets 0-8 px), as `--data.recipe.image_size=112` etc. The ResNet trunk has stride 32:
a patch of 32 px or less leaves a 1x1 res5 map (smaller patches still run, on padding; the Imagenette CPU
config uses 24 px patches in 32 px cells, the paper's 64/85 ratio). Crop scales, ratios and
jitter strengths are resolution-free and stay as they are.
"""

from dataclasses import dataclass

# What the transformed view It is (paper section 4.3, supplement A.2):
# - "jigsaw": 9 patches of a 255 crop (section 2.3, the default);
# - "rotation": a second, independently augmented image view rotated by a random multiple of 90 degrees;
# - "rotation_jigsaw": the 255 crop rotated by a random multiple of 90 degrees, then tiled;
# - "image": a second, independently augmented image view, never rotated (SimCLR's and MoCo v2's two views).
JIGSAW_VIEWS = ("jigsaw", "rotation", "rotation_jigsaw", "image")

# The views of It that are a second full image view (one tile of image_size, cut like the image view I).
SECOND_IMAGE_VIEWS = ("rotation", "image")


@dataclass
class PirlRecipe:
    # --- image view I (paper supplement A.1: "standard data augmentation") ---
    image_size: int = 224  # paper A.1: "The image I is a 224x224 image"
    image_scale_min: float = 0.08  # (ref) crop_scale_image [0.08, 1.0], torchvision's RandomResizedCrop default
    image_scale_max: float = 1.0  # (ref) as above
    ratio_min: float = 3 / 4  # (ref) torchvision RandomResizedCrop default aspect range, not overridden by VISSL
    ratio_max: float = 4 / 3  # (ref) as above
    flip_p: float = 0.5  # paper A: "horizontally flipping"; p from (ref) RandomHorizontalFlip default
    brightness: float = 0.4  # (ref) ColorJitter brightness 0.4
    contrast: float = 0.4  # (ref) ColorJitter contrast 0.4
    saturation: float = 0.4  # (ref) ColorJitter saturation 0.4
    hue: float = 0.2  # (ref) ColorJitter hue 0.2 (pirl_jigsaw_4node_resnet50.yaml)
    jitter_p: float = 1.0  # (ref) ColorJitter is applied to every sample (no RandomApply around it)
    grayscale_p: float = 0.2  # (ref) RandomGrayscale p=0.2

    # --- Gaussian blur of the image view and of a second image view, after the colour (SimCLR, MoCo v2) ---
    blur_p: float = 0.0  # PIRL's recipe has no blur; SimCLR and MoCo v2 blur with p=0.5
    blur_sigma_min: float = 0.1  # SimCLR appendix A: sigma ~ U[0.1, 2.0]; MoCo v2's GaussianBlur([.1, 2.])
    blur_sigma_max: float = 2.0  # as above
    blur_kernel_fraction: float = 0.1  # SimCLR appendix A: kernel size 10% of the image side (made odd)

    # --- jigsaw view It (paper supplement A.1) ---
    jigsaw_view: str = "jigsaw"  # what It is: one of JIGSAW_VIEWS above; paper 2.3 (jigsaw) and 4.3 (rotation)
    jigsaw_size: int = 255  # paper A.1: crop "resized to 255x255"
    jigsaw_scale_min: float = 0.6  # paper A.1: a crop "that occupies at least 60% of the image"
    jigsaw_scale_max: float = 1.0  # (ref) crop_scale_patches [0.6, 1.0]
    jigsaw_ratio_min: float = 3 / 4  # (ref) torchvision RandomResizedCrop default aspect range
    jigsaw_ratio_max: float = 4 / 3  # (ref) as above
    grid: int = 3  # paper A.1: "divide into a 3x3 grid"
    patch_size: int = 64  # paper A.1: "a patch of 64x64 from each of these grids"
    patch_flip_p: float = 0.0  # paper: patches get photometric augmentation only; (ref) flips each patch, p=0.5
    patch_rotation: bool = False  # rotate each patch by its own random multiple of 90 deg; the paper's jigsaw has none
    patch_brightness: float = 0.4  # paper A.1: jitter "to each patch independently"; strength from (ref)
    patch_contrast: float = 0.4  # (ref) same ColorJitter as the image view, drawn per patch
    patch_saturation: float = 0.4  # (ref) as above
    patch_hue: float = 0.2  # (ref) as above
    patch_jitter_p: float = 1.0  # (ref) applied to every patch
    patch_grayscale_p: float = 0.2  # (ref) RandomGrayscale p=0.2, drawn per patch

    # --- both views: normalisation by ImageNet channel statistics, (ref) Normalize; one field per channel
    # because the training config (an OmegaConf structured config) takes plain scalar fields only ---
    mean_r: float = 0.485  # (ref) Normalize mean, torchvision's ImageNet statistics
    mean_g: float = 0.456
    mean_b: float = 0.406
    std_r: float = 0.229  # (ref) Normalize std
    std_g: float = 0.224
    std_b: float = 0.225

    # --- decoding (docs/pipelines.md, "The reference backend": pixels against a full-resolution decode) ---
    reduced_decoding: bool = True  # decode at 1/2..1/8 scale (in libjpeg's IDCT) where every crop shrinks >= 2x

    # --- eval view (linear probe) ---
    eval_resize_ratio: float = 256 / 224  # standard ImageNet eval: shorter side 256, centre crop 224

    @property
    def mean(self) -> list[float]:
        return [self.mean_r, self.mean_g, self.mean_b]

    @property
    def std(self) -> list[float]:
        return [self.std_r, self.std_g, self.std_b]

    @property
    def cell_size(self) -> int:
        return self.jigsaw_size // self.grid

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def second_image_view(self) -> bool:
        """Whether It is a second image view ("rotation", "image"): its own crop of the image view's scale and
        ratio, its own flip, resized to image_size, one tile, painted with the image view's strengths."""
        return self.jigsaw_view in SECOND_IMAGE_VIEWS

    @property
    def view_tiles(self) -> int:
        """How many tiles the transformed view It has: 9 for the jigsaw views, 1 for a second image view."""
        return 1 if self.second_image_view else self.num_patches

    @property
    def view_tile_size(self) -> int:
        """Side of each tile of It: patch_size for the jigsaw views, image_size for a second image view."""
        return self.image_size if self.second_image_view else self.patch_size

    @property
    def max_patch_offset(self) -> int:
        """Largest top-left offset of a patch inside its cell, inclusive: 21 px at 255/3/64 (cell 85 - patch 64,
        every position of the patch in its cell; the (ref) ImgPatchesFromTensor draws only 0-20)."""
        return self.cell_size - self.patch_size

    @property
    def eval_resize_size(self) -> int:
        return round(self.image_size * self.eval_resize_ratio)

    def validate(self) -> "PirlRecipe":
        """Raise ValueError naming the first bad field; returns self so it can be chained."""
        for name in ("image_size", "jigsaw_size", "grid", "patch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"PirlRecipe.{name} must be a positive int, got {value!r}")
        if self.jigsaw_size % self.grid:
            raise ValueError(
                f"PirlRecipe.jigsaw_size={self.jigsaw_size} must be divisible by grid={self.grid}"
            )
        if self.patch_size > self.cell_size:
            raise ValueError(
                f"PirlRecipe.patch_size={self.patch_size} exceeds the grid cell "
                f"({self.jigsaw_size} // {self.grid} = {self.cell_size})"
            )
        for name in ("flip_p", "jitter_p", "grayscale_p", "patch_flip_p", "patch_jitter_p",
                     "patch_grayscale_p", "blur_p"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"PirlRecipe.{name}={value} is a probability: must be in [0, 1]")
        for name in ("brightness", "contrast", "saturation", "patch_brightness", "patch_contrast",
                     "patch_saturation"):
            if getattr(self, name) < 0:
                raise ValueError(f"PirlRecipe.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("hue", "patch_hue"):
            # torchvision's adjust_hue accepts shifts in [-0.5, 0.5]
            if not 0.0 <= getattr(self, name) <= 0.5:
                raise ValueError(f"PirlRecipe.{name} must be in [0, 0.5], got {getattr(self, name)}")
        for lo, hi in (("image_scale_min", "image_scale_max"), ("jigsaw_scale_min", "jigsaw_scale_max")):
            if not 0.0 < getattr(self, lo) <= getattr(self, hi) <= 1.0:
                raise ValueError(
                    f"PirlRecipe.{lo}/{hi} must satisfy 0 < {lo} <= {hi} <= 1, "
                    f"got {getattr(self, lo)}, {getattr(self, hi)}"
                )
        for lo, hi in (("ratio_min", "ratio_max"), ("jigsaw_ratio_min", "jigsaw_ratio_max")):
            if not 0.0 < getattr(self, lo) <= getattr(self, hi):
                raise ValueError(
                    f"PirlRecipe.{lo}/{hi} must satisfy 0 < {lo} <= {hi}, "
                    f"got {getattr(self, lo)}, {getattr(self, hi)}"
                )
        if not 0.0 < self.blur_sigma_min <= self.blur_sigma_max:
            raise ValueError(f"PirlRecipe.blur_sigma_min/blur_sigma_max must satisfy 0 < blur_sigma_min <= "
                             f"blur_sigma_max, got {self.blur_sigma_min}, {self.blur_sigma_max}")
        if not 0.0 < self.blur_kernel_fraction <= 1.0:
            raise ValueError(f"PirlRecipe.blur_kernel_fraction must be in (0, 1], got {self.blur_kernel_fraction}")
        for name in ("std_r", "std_g", "std_b"):
            if getattr(self, name) <= 0:
                raise ValueError(f"PirlRecipe.{name} must be positive, got {getattr(self, name)}")
        if self.eval_resize_ratio < 1.0:
            raise ValueError(f"PirlRecipe.eval_resize_ratio must be >= 1, got {self.eval_resize_ratio}")
        if self.jigsaw_view not in JIGSAW_VIEWS:
            raise ValueError(
                f"PirlRecipe.jigsaw_view={self.jigsaw_view!r} is not supported; valid: {list(JIGSAW_VIEWS)}"
            )
        return self
