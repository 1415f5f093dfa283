"""The batched augmentation stage: a loader batch (uint8 geometry) -> a model batch (float, painted, normalised).

Loaders cut, this stage paints (DESIGN.md, "Two contracts, one split"). It runs on the device the batch is
trained on (CUDA on a cluster, the CPU here), after the host->device copy, on whole batches:
- geometry that needs no resampling: per-patch flips, the rotation of It by a multiple of 90 degrees
  (`rotation`, `rotation_jigsaw`: rotating a square crop and then tiling it equals moving each tile to its
  rotated grid cell and rotating the tile), per-patch rotations (`patch_rotation`);
- photometric: brightness, contrast, saturation and hue in a random order (torchvision's ColorJitter
  semantics), random grayscale, with an independent draw for the image view and for each tile of It;
- float conversion and normalisation;
- Gaussian blur (recipe.blur_p > 0, SimCLR / MoCo v2) of the image view and of a second image view's tile
  (pipelines/blur.py): one pass over the normalised output, whichever kernels painted it.
`eval()` is the evaluation form: float conversion and normalisation only (bank initialisation, the probe).

Randomness: every parameter of sample i in epoch e is a counter-based hash of (seed, e, i, slot)
(common.rng.counter_uniform), drawn on the host from the batch's `index` for the whole batch in a few
tensor ops: independent of batch composition, rank, worker count and device. The blur has its own stream
(rng.PURPOSE_BLUR), so every other draw is the same whatever the blur's settings.

Who paints: on the CPU a fused numba kernel (pipelines/paint_cpu.py), one pass per view; elsewhere the
whole-tensor kernels below (eager or torch.compile'd). Those group the views: views that apply the same ops
in the same order run as one set of ops (group_by="order": at most 24 groups, no wasted arithmetic); on CUDA,
where each launch costs more than the arithmetic, views are grouped by the position of the hue op only
(group_by="hue": at most 5 groups) and the other steps blend each view with its own op's reference image in
one masked pass. All are exact against torchvision, and all are tested on the CPU.
"""

import warnings
from dataclasses import dataclass

import torch

from pirl_trainer.pipelines import batch as B
from pirl_trainer.pipelines import paint_cpu
from pirl_trainer.pipelines.blur import Blur, blur_in_place, draw_blur, kernel_size
from pirl_trainer.pipelines.photometric import (
    BRIGHTNESS, CONTRAST, HUE, JITTER_DRAWS, LUMA, NONE, SATURATION, Jitter, draw_jitter,
)
from pirl_trainer.pipelines.recipe import PirlRecipe
from pirl_trainer.common.rng import PURPOSE_AUGMENT, counter_uniform, derive_seed

# Per view slot: the jitter's uniforms, then a flip coin and a rotation draw.
_FLIP, _ROTATION = JITTER_DRAWS, JITTER_DRAWS + 1
VIEW_DRAWS = JITTER_DRAWS + 2
GROUP_BY = ("order", "hue")
# The views of It rotated as a whole by a random multiple of 90 degrees (the "image" view never is).
ROTATED_VIEWS = ("rotation", "rotation_jigsaw")
KERNEL_CHOICES = ("auto", "numba", "tensor", "compiled")


@dataclass
class AugmentParams:
    """What the stage draws for a batch of B samples whose It has K tiles (CPU tensors)."""

    image: Jitter  # B views: the image view I
    tiles: Jitter  # B*K views: the tiles of It, sample-major
    tile_flip: torch.Tensor  # (B*K,) bool: horizontal flip of a patch (recipe.patch_flip_p; jigsaw views)
    tile_rotation: torch.Tensor  # (B*K,) int64 quarter turns of each patch (recipe.patch_rotation)
    view_rotation: torch.Tensor  # (B,) int64 quarter turns of It as a whole (ROTATED_VIEWS; else 0)
    image_blur: Blur  # B views: the image view's Gaussian blur
    tile_blur: Blur  # B*K views: a second image view's blur (never applied to jigsaw patches)


def draw_params(recipe: PirlRecipe, seed: int, epoch: int, index: torch.Tensor) -> AugmentParams:
    """The parameters of the samples `index` (B,) in `epoch`: a pure function of (recipe, seed, epoch, index).

    Slot 0 of a sample is its image view (and the rotation of It), slots 1..K its tiles; the blur comes from
    its own stream (pipelines/blur.py draw_blur).
    """
    r = recipe
    index = index.detach().to("cpu", torch.int64)
    b, k = index.shape[0], r.view_tiles
    u = counter_uniform(derive_seed(PURPOSE_AUGMENT, seed, epoch), index, (1 + k) * VIEW_DRAWS)
    u = u.view(b, 1 + k, VIEW_DRAWS)
    image_strengths = dict(brightness=r.brightness, contrast=r.contrast, saturation=r.saturation, hue=r.hue,
                           jitter_p=r.jitter_p, grayscale_p=r.grayscale_p)
    if r.second_image_view:
        # It is a second image view with "the standard data augmentation" (paper A.2): the image's strengths.
        tile_strengths = image_strengths
    else:
        tile_strengths = dict(brightness=r.patch_brightness, contrast=r.patch_contrast,
                              saturation=r.patch_saturation, hue=r.patch_hue, jitter_p=r.patch_jitter_p,
                              grayscale_p=r.patch_grayscale_p)
    tile_u = u[:, 1:].reshape(b * k, VIEW_DRAWS)
    jigsaw = not r.second_image_view
    image_blur, second_blur = draw_blur(r, seed, epoch, index)
    quarter_turns = (tile_u[:, _ROTATION] * 4).to(torch.int64)
    return AugmentParams(
        image=draw_jitter(u[:, 0, :JITTER_DRAWS], **image_strengths),
        tiles=draw_jitter(tile_u[:, :JITTER_DRAWS], **tile_strengths),
        tile_flip=(tile_u[:, _FLIP] < r.patch_flip_p) if jigsaw else torch.zeros(b * k, dtype=torch.bool),
        tile_rotation=quarter_turns if (jigsaw and r.patch_rotation) else torch.zeros_like(quarter_turns),
        view_rotation=((u[:, 0, _ROTATION] * 4).to(torch.int64) if r.jigsaw_view in ROTATED_VIEWS
                       else torch.zeros(b, dtype=torch.int64)),
        image_blur=image_blur,
        tile_blur=Blur.none(b * k) if jigsaw else second_blur,
    )


def rotated_cells(grid: int, quarter_turns: int) -> torch.Tensor:
    """(grid*grid,) int64: after rotating a square crop by `quarter_turns` x 90 degrees (torch.rot90's sense),
    grid cell j holds what was cell rotated_cells(...)[j]. Rotating the grid of cell ids moves them as pixels."""
    ids = torch.arange(grid * grid).view(grid, grid)
    return torch.rot90(ids, quarter_turns, dims=(0, 1)).reshape(-1)


class BatchAugment:
    """Loader batch -> model batch, on the batch's device. `stage(batch, epoch)` for pretraining,
    `stage.eval(batch)` for evaluation.

    kernels: which implementation paints (all exact against torchvision, all tested on the CPU):
    - "numba": pipelines/paint_cpu.py, one fused pass per view (CPU tensors only; needs numba);
    - "tensor": the whole-tensor kernels below, on any device (CUDA's path);
    - "compiled": the same through torch.compile (inductor: C++ on the CPU, triton on CUDA), one fused loop per
      kernel; the first batch pays a one-off compilation, and a failure to compile falls back to "tensor";
    - "auto": "numba" for CPU batches where numba imports, else "tensor".
    group_by=None picks the faster grouping of views for the tensor kernels and device (see _group_by).
    """

    def __init__(self, recipe: PirlRecipe, seed: int = 0, kernels: str = "auto", group_by: str | None = None):
        if group_by is not None and group_by not in GROUP_BY:
            raise ValueError(f"group_by must be one of {GROUP_BY} or None, got {group_by!r}")
        if kernels not in KERNEL_CHOICES:
            raise ValueError(f"kernels must be one of {KERNEL_CHOICES}, got {kernels!r}")
        if kernels == "numba" and not paint_cpu.available():
            raise ImportError("kernels='numba' needs numba (pip install numba); or use kernels='tensor'")
        self.recipe = recipe.validate()
        self.seed = seed
        self.kernels = kernels
        self.group_by = group_by
        self.compile = kernels == "compiled"

    def __call__(self, batch: dict, epoch: int) -> dict:
        r = self.recipe
        image, tiles, index = batch[B.IMAGE], batch[B.PATCHES], batch[B.INDEX]
        b, k = tiles.shape[:2]
        if k != r.view_tiles or tiles.shape[-1] != r.view_tile_size:
            raise ValueError(f"patches of shape {tuple(tiles.shape)} do not match the recipe's It "
                             f"({r.view_tiles} tiles of {r.view_tile_size} px, jigsaw_view={r.jigsaw_view!r})")
        params = draw_params(r, self.seed, epoch, index)
        out = dict(batch)
        out[B.IMAGE] = self.paint(image, params.image)
        tiles = self._move_tiles(tiles, params)
        out[B.PATCHES] = self.paint(tiles.reshape(b * k, *tiles.shape[2:]), params.tiles).view(tiles.shape)
        if r.blur_p > 0:  # blur_p = 0 (PIRL's recipe): no pass at all
            size = kernel_size(r.image_size, r.blur_kernel_fraction)
            blur_in_place(out[B.IMAGE], params.image_blur, size)
            if r.second_image_view:
                blur_in_place(out[B.PATCHES].view(b * k, *tiles.shape[2:]), params.tile_blur, size)
        return out

    def eval(self, batch: dict) -> dict:
        """The evaluation form: the image converted and normalised, nothing random."""
        out = dict(batch)
        image = batch[B.IMAGE]
        if image.dtype != torch.uint8:
            raise TypeError(f"the loader batch holds uint8 pixels (pipelines/batch.py), got {image.dtype}")
        mean = torch.tensor(self.recipe.mean, dtype=torch.float32, device=image.device)
        std = torch.tensor(self.recipe.std, dtype=torch.float32, device=image.device)
        out[B.IMAGE] = self._kernel("normalise", self._kernel("to_float", image), mean, std)
        return out

    # --- geometry: permutations of uint8 pixels, exact ---

    def _move_tiles(self, tiles: torch.Tensor, p: AugmentParams) -> torch.Tensor:
        """(B, K, 3, P, P) uint8 -> the same after It's rotation, per-patch flips and per-patch rotations."""
        b, k = tiles.shape[:2]
        if not (p.view_rotation.any() or p.tile_flip.any() or p.tile_rotation.any()):
            return tiles
        tiles = tiles.clone()
        grid = self.recipe.grid
        for turns in (1, 2, 3):
            rows = _rows(p.view_rotation == turns, tiles.device)
            if rows is not None:
                moved = tiles[rows]
                if k > 1:  # rotation_jigsaw: each tile goes to its rotated cell
                    moved = moved[:, rotated_cells(grid, turns).to(tiles.device)]
                tiles[rows] = torch.rot90(moved, turns, dims=(-2, -1))
        flat = tiles.view(b * k, *tiles.shape[2:])
        rows = _rows(p.tile_flip, flat.device)
        if rows is not None:
            flat[rows] = flat[rows].flip(-1)
        for turns in (1, 2, 3):
            rows = _rows(p.tile_rotation == turns, flat.device)
            if rows is not None:
                flat[rows] = torch.rot90(flat[rows], turns, dims=(-2, -1))
        return tiles

    # --- photometric ---

    def paint(self, views: torch.Tensor, jitter: Jitter) -> torch.Tensor:
        """(N, 3, H, W) uint8 (any strides) -> (N, 3, H, W) float32 jittered, grayscaled and normalised.

        Views are painted group by group (see the module docstring): each group is gathered, converted, painted
        and normalised while it sits in the cache, and written once into the output.
        """
        if views.dtype != torch.uint8:
            raise TypeError(f"the loader batch holds uint8 pixels (pipelines/batch.py), got {views.dtype}")
        cpu = views.device.type == "cpu"
        if self.kernels == "numba" and not cpu:
            raise ValueError(f"kernels='numba' paints CPU tensors only, got a batch on {views.device}")
        if self.kernels == "numba" or (self.kernels == "auto" and cpu and paint_cpu.available()):
            return paint_cpu.paint(views, jitter, self.recipe.mean, self.recipe.std)
        k = self._kernel
        out = torch.empty(views.shape, dtype=torch.float32, device=views.device)
        mean = torch.tensor(self.recipe.mean, dtype=torch.float32, device=views.device)
        std = torch.tensor(self.recipe.std, dtype=torch.float32, device=views.device)
        for rows, steps in _groups(jitter, self._group_by(views.device)):
            rows_dev = rows.to(views.device, non_blocking=True)
            sub = k("to_float", views.index_select(0, rows_dev))
            for kernel, args in steps:
                sub = k(kernel, sub, *(a.to(views.device, non_blocking=True) for a in args))
            gray = jitter.gray[rows]
            if gray.all():
                sub = k("grayscale", sub)
            elif gray.any():
                at = gray.nonzero().squeeze(1).to(views.device, non_blocking=True)
                sub = sub.index_copy(0, at, k("grayscale", sub.index_select(0, at)))
            out.index_copy_(0, rows_dev, k("normalise", sub, mean, std))
        return out

    def _group_by(self, device: torch.device) -> str:
        # Measured on a 2-core CPU (docs/results.md): eager kernels are fastest on exact-order groups (uniform
        # steps, fewest passes); compiled ones on hue groups (fewer, larger calls, the blends fused). On CUDA
        # the launch count decides, so hue groups there too.
        if self.group_by is not None:
            return self.group_by
        return "hue" if (self.compile or device.type == "cuda") else "order"

    def _kernel(self, name: str, *args: torch.Tensor) -> torch.Tensor:
        """Run one pixel kernel; if the compiled one cannot be built here (no C++ compiler or triton),
        warn once and continue in eager mode."""
        if self.compile:
            try:
                return compiled_kernels()[name](*args)
            except Exception as err:  # inductor raises many types (BackendCompilerFailed, CalledProcessError, ...)
                warnings.warn(f"pipelines.augment: torch.compile failed ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''}); using eager kernels",
                              RuntimeWarning, stacklevel=2)
                self.compile = False
        return KERNELS[name](*args)


def _rows(mask: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """Row ids where a host-side mask is set, on `device`; None when there are none (nothing to launch)."""
    rows = mask.nonzero().squeeze(1)
    return rows.to(device, non_blocking=True) if len(rows) else None


# --- the pixel kernels: pure functions of (views, per-view factors), torchvision's arithmetic. Written without
# boolean masks, torch.where or remainder (each several times slower than arithmetic on the CPU), so that eager
# mode stays reasonable and torch.compile can fuse each into one vectorised loop. ---


def _gray(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> (N, 1, H, W) luma, torchvision's rgb_to_grayscale arithmetic."""
    return x[:, 0:1] * LUMA[0] + x[:, 1:2] * LUMA[1] + x[:, 2:3] * LUMA[2]


def _column(f: torch.Tensor) -> torch.Tensor:
    return f.view(-1, 1, 1, 1)


def brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (x * _column(f)).clamp(0.0, 1.0)


def contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    f = _column(f)
    mean = _gray(x).mean(dim=(-3, -2, -1), keepdim=True)
    return (x * f + mean * (1.0 - f)).clamp(0.0, 1.0)


def saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    f = _column(f)
    return (x * f + _gray(x) * (1.0 - f)).clamp(0.0, 1.0)


def _is_zero(t: torch.Tensor) -> torch.Tensor:
    """1.0 where t == 0, else 0.0, for t >= 0."""
    return 1.0 - torch.sign(t)


def hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """torchvision's adjust_hue (an HSV round trip with h += shift mod 1), per view shift in [-0.5, 0.5].

    A hue shift keeps each pixel's max and min; channel c becomes min + (max - min) * T(h6 - 2c), with h6 the
    shifted hue in sixths of a turn wrapped into [0, 6) and T(y) = clamp(||y| - 3| - 1, 0, 1) the HSV channel
    ramp (valid for |y| <= 6). Equal to torchvision's formula up to float rounding (tested to 1e-5).
    """
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    hi = torch.maximum(torch.maximum(r, g), b)
    lo = torch.minimum(torch.minimum(r, g), b)
    span = hi - lo
    # Which channel holds the max, ties to r then g (torchvision's _rgb_to_hsv), as 0/1 floats.
    is_r = _is_zero(hi - r)
    is_g = _is_zero(hi - g) * (1.0 - is_r)
    is_b = 1.0 - is_r - is_g
    num = is_r * (g - b) + is_g * (b - r + 2.0 * span) + is_b * (r - g + 4.0 * span)
    h6 = num / (span + _is_zero(span)) + _column(shift) * 6.0  # in [-4, 8]; a grey pixel ends at min + 0
    h6 = h6 - 6.0 * torch.floor(h6 / 6.0)
    offsets = torch.tensor([0.0, 2.0, 4.0], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    ramp = (((h6 - offsets).abs() - 3.0).abs() - 1.0).clamp(0.0, 1.0)
    return lo + span * ramp


def blend_mixed(x: torch.Tensor, f: torch.Tensor, is_contrast: torch.Tensor, is_saturation: torch.Tensor):
    """One step where views apply different blend ops: x = clamp(f x + (1 - f) ref), ref = 0 (brightness),
    the mean grey (contrast) or the grey image (saturation); f = 1 for a view with no op at this step."""
    f, is_contrast, is_saturation = _column(f), _column(is_contrast), _column(is_saturation)
    gray = _gray(x)
    ref = gray * is_saturation + gray.mean(dim=(-3, -2, -1), keepdim=True) * is_contrast
    return (x * f + ref * (1.0 - f)).clamp(0.0, 1.0)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    return _gray(x).expand(-1, 3, -1, -1)


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 in [0, 1], contiguous, as torchvision's to_dtype(scale=True)."""
    return x.to(torch.float32, memory_format=torch.contiguous_format) * (1.0 / 255)


def normalise(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std per channel, as torchvision's normalize."""
    return (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


KERNELS = {"brightness": brightness, "contrast": contrast, "saturation": saturation, "hue": hue,
            "blend_mixed": blend_mixed, "grayscale": grayscale, "to_float": to_float, "normalise": normalise}
_UNIFORM = {BRIGHTNESS: "brightness", CONTRAST: "contrast", SATURATION: "saturation", HUE: "hue"}
_COMPILED: dict = {}


def compiled_kernels() -> dict:
    """KERNELS through torch.compile (dynamic shapes: one compilation serves every group and view size, plus
    one for groups of a single view), built on first use and shared by every BatchAugment of the process."""
    if not _COMPILED:
        _COMPILED.update({name: torch.compile(fn, dynamic=True) for name, fn in KERNELS.items()})
    return _COMPILED


def _groups(jitter: Jitter, group_by: str):
    """[(rows, steps)]: the views (host int64 ids) that share a plan, and that plan as [(kernel, args)].

    group_by="order": views with the same ops in the same order; every step is one uniform kernel.
    group_by="hue": views with hue at the same position; the other steps are masked blends.
    Views without jitter form a group with no steps (they are only converted, maybe grayed, normalised).
    """
    order = jitter.order
    if group_by == "order":
        keys = (order * torch.tensor([125, 25, 5, 1])).sum(1)  # the order as a base-5 number
    else:
        keys = torch.where(order == HUE, torch.arange(4), 4).amin(1)  # position of hue, 4 if none
        keys = torch.where(order[:, 0] == NONE, 5, keys)
    step_factor = jitter.step_factors()
    groups = []
    for key in keys.unique().tolist():
        rows = (keys == key).nonzero().squeeze(1)
        ops, factors = order[rows], step_factor[rows]
        steps = []
        for step in range(4):
            op = ops[:, step]
            if (op == NONE).all():
                continue
            if (op == op[0]).all():
                steps.append((_UNIFORM[int(op[0])], (factors[:, step].clone(),)))
            elif (op == HUE).any():
                raise ValueError("hue cannot be blended: group views by the position of their hue op")
            else:
                masks = torch.stack([op == CONTRAST, op == SATURATION]).to(torch.float32)
                steps.append(("blend_mixed", (factors[:, step].clone(), masks[0].clone(), masks[1].clone())))
        groups.append((rows, steps))
    return groups
