import io

import numpy as np
import pytest
from PIL import Image, ImageFile

from tests.tools import image_factory as make
from pirl_trainer.tools.sharding import image_check
from pirl_trainer.tools.sharding.image_check import (
    COLOUR_MODE,
    DEFAULT_MAX_PIXELS,
    EXIF_ORIENTATION,
    MAX_SIDE,
    NOT_JPEG,
    CheckOptions,
    check_bytes,
    check_file,
)

OPTIONS = CheckOptions()


def decoded(jpeg: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(jpeg))
    assert img.format == "JPEG"
    img.load()
    return img


def category(reason: str) -> str:
    return reason.split(":", 1)[0]


@pytest.mark.parametrize(
    "data, expected",
    [
        (b"", "empty file"),
        (make.truncated(make.rgb_jpeg(200, 150)), "truncated"),
        (make.header_only(make.rgb_jpeg()), "truncated"),
        (make.rgb_jpeg()[:-2], "truncated"),  # only the end-of-image marker missing
        (make.TEXT, "not an image"),
        (make.HTML_PAGE, "not an image"),
        (make.DS_STORE, "not an image"),
        (make.png_bomb(100_000, 100_000), "decompression bomb"),  # Pillow's own check, at open
        (make.png_bomb(12_000, 10_000), "decompression bomb"),  # ours: between Pillow's warning and error
        (make.jpeg_bomb(), "decompression bomb"),
    ],
    ids=["empty", "truncated", "header-only", "no-eoi", "text", "html", "ds-store", "png-bomb-10G",
         "png-bomb-120M", "jpeg-bomb"],  # fmt: skip
)
def test_bad_input_is_skipped_with_its_reason(data, expected):
    result = check_bytes(data, OPTIONS)
    assert result.data is None
    assert category(result.skip_reason) == expected, result.skip_reason


def test_html_reason_says_html():
    assert "HTML" in check_bytes(make.HTML_PAGE, OPTIONS).skip_reason


def test_pixel_cap_is_checked_on_the_header_before_decoding():
    result = check_bytes(make.rgb_jpeg(64, 64), CheckOptions(max_pixels=64 * 64 - 1))
    assert result.data is None
    assert "64x64 = 4096 pixels > max_pixels 4095" in result.skip_reason
    assert check_bytes(make.rgb_jpeg(64, 64), CheckOptions(max_pixels=64 * 64)).data is not None


def test_pillow_globals_are_restored():
    before = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    check_bytes(make.rgb_jpeg(), CheckOptions(max_pixels=10))
    assert (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES) == before
    assert DEFAULT_MAX_PIXELS == 89_478_485


def test_truncation_is_caught_even_if_someone_enabled_load_truncated_images(monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    assert category(check_bytes(make.truncated(make.rgb_jpeg(200, 150)), OPTIONS).skip_reason) == "truncated"


@pytest.mark.parametrize(
    "data", [make.rgb_jpeg(), make.grey_jpeg(), make.rgb_jpeg(orientation=1)], ids=["rgb", "grey", "orientation-1"]
)
def test_valid_rgb_and_greyscale_jpegs_keep_their_bytes(data):
    result = check_bytes(data, OPTIONS)
    assert result.data == data
    assert result.reencoded == ()
    assert result.source_bytes == len(data)


def test_invalid_orientation_value_keeps_the_bytes():
    data = make.rgb_jpeg(orientation=0)  # as ImageNet's n03337140_file.JPEG
    assert check_bytes(data, OPTIONS).data == data


def test_cmyk_jpeg_becomes_rgb():
    result = check_bytes(make.cmyk_jpeg(), OPTIONS)
    img = decoded(result.data)
    assert (img.mode, img.size, result.reencoded) == ("RGB", (40, 30), (COLOUR_MODE,))


def test_alpha_is_composited_onto_white():
    result = check_bytes(make.rgba_png(), OPTIONS)
    assert result.reencoded == (NOT_JPEG,)
    rgb = np.asarray(decoded(result.data), dtype=int)  # (30, 40, 3)
    assert rgb.shape == (30, 40, 3)
    assert np.abs(rgb[:, :15] - [255, 255, 255]).max() < 8  # transparent half: white
    assert np.abs(rgb[:, 25:] - [255, 0, 0]).max() < 8  # opaque half: red


def test_palette_gif_becomes_rgb_jpeg():
    result = check_bytes(make.palette_gif(), OPTIONS)
    img = decoded(result.data)
    assert (img.mode, img.size, result.reencoded) == ("RGB", (40, 30), (NOT_JPEG,))
    expected = make.pixels(40, 30).astype(int)
    assert np.abs(np.asarray(img, dtype=int) - expected).mean() < 12  # palette + JPEG error only


def test_sixteen_bit_png_is_scaled_not_clipped():
    rgb = np.asarray(decoded(check_bytes(make.sixteen_bit_png(value=32768), OPTIONS).data), dtype=int)
    assert np.abs(rgb - 127).max() <= 2  # 32768 / 257 = 127.5; Pillow's own convert would clip to 255


def test_exif_rotated_jpeg_is_stored_upright_without_orientation():
    # orientation 6: the stored 48x32 pixels are shown rotated 90 degrees clockwise, i.e. 32 wide, 48 high
    rotated = make.rgb_jpeg(48, 32, orientation=6)
    result = check_bytes(rotated, OPTIONS)
    img = decoded(result.data)
    assert result.reencoded == (EXIF_ORIENTATION,)
    assert img.size == (32, 48)
    assert img.getexif().get(0x0112) is None
    upright = np.rot90(make.pixels(48, 32), k=-1)  # (48, 32, 3): what a viewer shows
    assert np.abs(np.asarray(img, dtype=int) - upright).mean() < 4


def test_reencoded_images_with_orientation_are_made_upright_too():
    exif = Image.Exif()
    exif[0x0112] = 8  # rotate 90 counter-clockwise to view
    png = make.encode(Image.fromarray(make.pixels(48, 32)), "PNG", exif=exif.tobytes())
    assert decoded(check_bytes(png, OPTIONS).data).size == (32, 48)


def test_max_side_reencodes_only_larger_images():
    options = CheckOptions(max_side=64)
    small = make.rgb_jpeg(64, 40)
    assert check_bytes(small, options).data == small
    large = check_bytes(make.rgb_jpeg(130, 70), options)
    assert large.reencoded == (MAX_SIDE,)
    assert decoded(large.data).size == (64, 34)  # FFCV: int(70 * 64 / 130) = 34
    grey = check_bytes(make.grey_jpeg(100, 20), options)
    assert decoded(grey.data).mode == "RGB"


def test_unreadable_paths(tmp_path):
    missing = check_file(str(tmp_path / "missing.jpg"), OPTIONS)
    assert missing.skip_reason.startswith("unreadable: FileNotFoundError")
    folder = check_file(str(tmp_path), OPTIONS)
    assert folder.skip_reason.startswith("unreadable: IsADirectoryError")


def test_unreadable_file(tmp_path, monkeypatch):
    # The fault is injected: file modes stop no one running as root (as CI and containers do).
    path = tmp_path / "locked.jpg"
    path.write_bytes(make.rgb_jpeg())
    real_open = open

    def locked_open(file, *args, **kwargs):
        if str(file) == str(path):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(image_check, "open", locked_open, raising=False)
    assert check_file(str(path), OPTIONS).skip_reason == "unreadable: PermissionError: Permission denied"
    assert check_file(str(tmp_path / "missing.jpg"), OPTIONS).skip_reason.startswith("unreadable: FileNotFound")
