"""JPEG bytes -> the uint8 loader views of one sample (reference backend): decode once, cut both views.

Pretraining (paper supplement A.1), from one decoded image and the geometry of pipelines/geometry.py:
- image view I: random resized crop -> image_size, horizontal flip;
- It, jigsaw views: its own random resized crop (scale >= jigsaw_scale_min) -> jigsaw_size, one patch_size
  patch per grid cell at a random offset, in grid order; "rotation" and "image" views: a second image view.
Colour, rotations and normalisation happen later, on whole batches (pipelines/augment.py).

Speed (docs/pipelines.md, "The reference backend"): simplejpeg (libjpeg-turbo) reads the header, the geometry is drawn
from the full-resolution size, and where every crop of the sample is downscaled by 2x or more the JPEG is
decoded at 1/2, 1/4 or 1/8 scale inside the inverse DCT. Crops are views of the decoded HWC array and are
resized with torch's antialiased bilinear uint8 kernel, which is fastest on that (channels-last) layout and
gives torchvision's pixels. Views come out channels-last (HWC storage, CHW shape); the batched stage reads
any layout.
"""

import numpy as np
import simplejpeg
import torch
import torch.nn.functional as NF
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as F

from pirl_trainer.pipelines import batch as B
from pirl_trainer.pipelines.geometry import SampleGeometry, cut_patches, dct_reduction, draw_sample_geometry
from pirl_trainer.pipelines.limits import too_many_pixels
from pirl_trainer.pipelines.recipe import PirlRecipe


# JPEG colour spaces simplejpeg converts to RGB correctly. It also "decodes" CMYK and YCCK without an error,
# but not as torchvision and Pillow do (Adobe's inverted CMYK): those go through torchvision.
_SIMPLEJPEG_COLORSPACES = ("YCbCr", "Gray", "RGB")


def check_pixels(height: int, width: int) -> None:
    """ValueError for an image whose header claims more than MAX_DECODE_PIXELS (checked before decoding)."""
    bomb = too_many_pixels(height, width)
    if bomb is not None:
        raise ValueError(bomb)


def jpeg_header(jpg) -> tuple[int, int, str]:
    """(height, width, colour space) from the JPEG header, without decoding pixels; ValueError past the
    decompression-bomb limit (check_pixels)."""
    height, width, colorspace, _ = simplejpeg.decode_jpeg_header(jpg)
    check_pixels(height, width)
    return height, width, colorspace


def decode(jpg, reduction: int = 1) -> torch.Tensor:
    """JPEG bytes -> (3, H', W') uint8 RGB, a channels-last view of the decoded HWC array.

    reduction r in (1, 2, 4, 8) decodes at 1/r scale inside the IDCT (H' = ceil(H / r)). Greyscale JPEGs come
    out as 3 channels. CMYK and YCCK JPEGs (tools/make_shards.py re-encodes those; other writers may not) go
    through torchvision at full scale.
    """
    return _decode(jpg, jpeg_header(jpg), reduction)[0]


def _decode(jpg, header: tuple[int, int, str], reduction: int) -> tuple[torch.Tensor, int]:
    """decode() for a header already read; also returns the reduction applied (1 where torchvision decoded)."""
    height, width, colorspace = header
    if colorspace not in _SIMPLEJPEG_COLORSPACES:
        return decode_jpeg(torch.frombuffer(bytearray(jpg), dtype=torch.uint8), mode=ImageReadMode.RGB), 1
    if reduction == 1:
        hwc = simplejpeg.decode_jpeg(jpg, colorspace="RGB")
    else:
        hwc = simplejpeg.decode_jpeg(jpg, colorspace="RGB", min_height=-(-height // reduction),
                                     min_width=-(-width // reduction))
    if hwc.ndim == 2:
        hwc = hwc[:, :, None].repeat(3, axis=2)
    return torch.from_numpy(np.ascontiguousarray(hwc)).permute(2, 0, 1), reduction


def _resized_crop(image: torch.Tensor, box: tuple[int, int, int, int], scale: int, side: int | tuple[int, int]):
    """Crop `box` (full-resolution coordinates) of an image decoded at 1/scale, antialiased resize to side
    (an int for a square, or (height, width)).

    At full scale: torch's uint8 kernel (torchvision's pixels). At a reduced scale the box has fractional
    coordinates; rounding them would shift the view by up to half a decoded pixel, so Pillow's resize, which
    takes a fractional box with the same antialiased bilinear filter, does those.
    """
    top, left, h, w = box
    out_h, out_w = (side, side) if isinstance(side, int) else side
    if scale == 1:
        # torchvision's resized_crop calls this kernel; calling it directly saves ~0.1 ms of dispatch a sample.
        crop = image[:, top:top + h, left:left + w].unsqueeze(0)
        return NF.interpolate(crop, size=(out_h, out_w), mode="bilinear", antialias=True, align_corners=False)[0]
    pil = Image.fromarray(image.permute(1, 2, 0).numpy())
    out = pil.resize((out_w, out_h), Image.Resampling.BILINEAR,
                     box=(left / scale, top / scale, (left + w) / scale, (top + h) / scale))
    return torch.from_numpy(np.asarray(out).copy()).permute(2, 0, 1)


def pretrain_views(jpg, recipe: PirlRecipe, generator: torch.Generator) -> dict:
    """JPEG bytes -> uint8 image (3, S, S), patches (K, 3, P, P) (It's tiles) and the drawn geometry.

    The geometry depends on the generator and the header's size only, never on the decoder or the decoding
    scale (recipe.reduced_decoding=False decodes at full resolution, e.g. to measure what reducing changes).
    """
    r = recipe
    header = jpeg_header(jpg)
    height, width, _ = header
    geo: SampleGeometry = draw_sample_geometry(height, width, r, generator)
    image, scale = _decode(jpg, header, dct_reduction(height, width, geo.crops(r)) if r.reduced_decoding else 1)
    view = _resized_crop(image, geo.image_box, scale, r.image_size)
    if geo.image_flipped:
        view = view.flip(-1)
    if r.second_image_view:
        tiles = _resized_crop(image, geo.jigsaw_box, scale, r.image_size)
        tiles = (tiles.flip(-1) if geo.jigsaw_flipped else tiles).unsqueeze(0)
    else:
        crop = _resized_crop(image, geo.jigsaw_box, scale, r.jigsaw_size)
        tiles = cut_patches(crop, geo.patch_origins, r.patch_size)
    return {
        B.IMAGE: view,
        B.PATCHES: tiles,
        B.PATCH_ORIGIN: geo.patch_origins,
        B.JIGSAW_BOX: torch.tensor(geo.jigsaw_box, dtype=torch.int64),
        B.IMAGE_BOX: torch.tensor(geo.image_box, dtype=torch.int64),
        B.IMAGE_FLIPPED: torch.tensor(geo.image_flipped),
        B.JIGSAW_FLIPPED: torch.tensor(geo.jigsaw_flipped),
    }


def eval_size(height: int, width: int, recipe: PirlRecipe) -> tuple[int, int]:
    """The size torchvision's resize([eval_resize_size]) gives: shorter side to eval_resize_size."""
    size = recipe.eval_resize_size
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def eval_view(jpg, recipe: PirlRecipe) -> torch.Tensor:
    """JPEG bytes -> (3, S, S) uint8: shorter side to eval_resize_size, centre crop (standard evaluation)."""
    header = jpeg_header(jpg)
    height, width, _ = header
    target = eval_size(height, width, recipe)
    whole = (0, 0, height, width)
    reduction = dct_reduction(height, width, [(whole, min(target))]) if recipe.reduced_decoding else 1
    image, scale = _decode(jpg, header, reduction)
    view = _resized_crop(image, whole, scale, target)
    return F.center_crop(view, [recipe.image_size, recipe.image_size])
