"""The runtime's numpy/PIL preprocessing equals transformers' CLIPImageProcessor."""

import warnings

import numpy as np
import pytest
from PIL import Image

from llava_edge.errors import UserError
from llava_edge.preprocess import ImageSpec, expand2square, load_image, preprocess


@pytest.fixture(scope="module")
def clip_processor():
    from transformers import CLIPImageProcessor

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})


@pytest.mark.parametrize("w,h", [(336, 336), (640, 480), (200, 900), (50, 40), (337, 1000)])
def test_equals_clip_image_processor(clip_processor, w, h):
    rng = np.random.default_rng(w * h)
    im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    spec = ImageSpec.from_processor_config(clip_processor.to_dict())
    ref = clip_processor(images=im, return_tensors="np")["pixel_values"][0]
    got = preprocess(im, spec)
    assert got.shape == ref.shape == (3, 336, 336)
    assert np.abs(got - ref).max() <= 1e-6


def test_pad_mode_is_llava_expand2square(clip_processor):
    rng = np.random.default_rng(1)
    im = Image.fromarray(rng.integers(0, 256, (300, 500, 3), dtype=np.uint8))
    spec = ImageSpec.from_processor_config(clip_processor.to_dict(), pad="pad")
    fill = tuple(int(x * 255) for x in clip_processor.image_mean)
    squared = expand2square(im, fill)
    assert squared.size == (500, 500)
    assert squared.getpixel((0, 0)) == fill and squared.getpixel((250, 250)) == im.getpixel((250, 150))
    ref = clip_processor(images=squared, return_tensors="np")["pixel_values"][0]
    assert np.abs(preprocess(im, spec) - ref).max() <= 1e-6


def test_exif_orientation_applied(tmp_path):
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    im.paste((0, 0, 255), (0, 0, 20, 20))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    im.save(tmp_path / "r.jpg", exif=exif, quality=100)
    out = load_image(tmp_path / "r.jpg")
    assert out.size == (20, 40)
    r, g, b = out.getpixel((10, 5))
    assert b > 200 and r < 60  # the blue half is now on top


def test_modes_become_rgb(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red -> white
    assert load_image(rgba).getpixel((0, 0)) == (255, 255, 255)
    gray16 = Image.fromarray(np.full((8, 8), 65535, np.uint16))
    gray16.save(tmp_path / "g16.png")
    assert load_image(tmp_path / "g16.png").getpixel((0, 0)) == (255, 255, 255)
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    assert load_image(pal).getpixel((3, 3)) == (10, 200, 30)
    assert load_image(np.zeros((4, 4), np.uint8)).mode == "RGB"
    assert load_image(np.ones((4, 4, 3), np.float32)).getpixel((0, 0)) == (255, 255, 255)


def test_bad_images_name_the_file(tmp_path, monkeypatch):
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(UserError, match="notes.png"):
        load_image(tmp_path / "notes.png")
    with pytest.raises(UserError, match="not found"):
        load_image(tmp_path / "missing.png")
    Image.new("RGB", (64, 64)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(UserError, match="decompression bomb"):
        load_image(tmp_path / "big.png")
