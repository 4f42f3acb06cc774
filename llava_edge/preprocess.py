"""Image loading and CLIP preprocessing in numpy/PIL: the one implementation.

Training, export (parity checks) and the runtime all call :func:`preprocess`.
It reproduces transformers' ``CLIPImageProcessor`` (resize the shortest edge,
bicubic; center crop; rescale; normalize), which a test checks to 1e-6,
``SiglipImageProcessor`` (resize to the tile as it is, no crop: ``squash``), and
LLaVA's ``expand2square`` (pad to a square filled with the image mean) for
checkpoints trained with ``image_aspect_ratio = pad``. It is written here rather
than calling transformers because the runtime must not import torch or
transformers.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import UserError

PAD_MODES = ("pad", "square")  # LLaVA's image_aspect_ratio: pad to square, or CLIP's crop
# Limits checked on the header, before any pixel is decoded. A 196-byte PNG can declare 1 x 60000 pixels,
# which PIL's decompression-bomb guard lets through and LLaVA's pad-to-square would turn into 60000 x 60000
# (10.8 GB of RGB). 100 Mpx is a 12000 x 8000 photo decoded (300 MB of RGB), or a 10000 x 10000 padded square.
MAX_PIXELS = 100_000_000
MAX_ASPECT = 50  # longer side / shorter side: beyond this the picture is a strip the tower sees as a line
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


@dataclass(frozen=True)
class ImageSpec:
    """What the vision tower expects; stored in the bundle manifest."""

    resize: int  # shortest edge after resizing
    crop: int  # square crop size == the tower's image size
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    pad: str = "square"  # one of PAD_MODES
    rescale: float = 1 / 255
    resample: int = 3  # PIL bicubic, as CLIP
    squash: bool = False  # resize to crop x crop, aspect not kept, no crop (SigLIP's processor)

    def to_dict(self) -> dict:
        d = asdict(self)
        if not self.squash:  # absent unless set: a CLIP bundle's manifest is as it always was
            del d["squash"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ImageSpec":
        """From a manifest's ``image`` section, checked: a one-line error for settings no image can go through."""
        try:
            spec = cls(resize=int(d["resize"]), crop=int(d["crop"]), mean=tuple(float(x) for x in d["mean"]),
                       std=tuple(float(x) for x in d["std"]), pad=str(d.get("pad", "square")),
                       rescale=float(d.get("rescale", 1 / 255)), resample=int(d.get("resample", 3)),
                       squash=d.get("squash", False))
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"the bundle's image settings are incomplete or malformed ({type(e).__name__}: {e}): "
                            "export it again") from None
        bad = [name for name, ok in (
            ("resize", 1 <= spec.resize <= 16384), ("crop", 1 <= spec.crop <= 16384),
            ("mean", len(spec.mean) == 3 and all(np.isfinite(spec.mean))),
            ("std", len(spec.std) == 3 and all(np.isfinite(spec.std)) and all(x > 0 for x in spec.std)),
            ("pad", spec.pad in PAD_MODES), ("rescale", np.isfinite(spec.rescale) and spec.rescale > 0),
            ("resample", spec.resample in (0, 1, 2, 3, 4, 5)), ("squash", isinstance(spec.squash, bool))) if not ok]
        if bad:
            raise UserError(f"the bundle's image settings are invalid ({', '.join(f'{k} {getattr(spec, k)!r}' for k in bad)}): "
                            "export it again")
        return spec

    @classmethod
    def from_processor_config(cls, cfg: dict, pad: str = "square") -> "ImageSpec":
        """From a Hugging Face ``preprocessor_config.json`` (CLIPImageProcessor; SiglipImageProcessor, whose
        ``size`` is a height and width the picture is resized to as it is)."""
        size = cfg.get("size", 224)
        squash = isinstance(size, dict) and "shortest_edge" not in size and "height" in size
        if squash and size.get("width", size["height"]) != size["height"]:
            raise UserError(f"the image processor resizes to {size['height']} x {size.get('width')}: a vision tower "
                            "takes square tiles")
        resize = size.get("shortest_edge", size.get("height")) if isinstance(size, dict) else int(size)
        crop = cfg.get("crop_size", resize)
        crop = crop.get("height", crop.get("width")) if isinstance(crop, dict) else int(crop)
        if squash or not cfg.get("do_center_crop", True):
            crop = resize
        if pad not in PAD_MODES:
            raise UserError(f"unknown image pad mode {pad!r}; known: {', '.join(PAD_MODES)}")
        return cls(
            resize=int(resize),
            crop=int(crop),
            mean=tuple(float(x) for x in cfg.get("image_mean", (0.48145466, 0.4578275, 0.40821073))),
            std=tuple(float(x) for x in cfg.get("image_std", (0.26862954, 0.26130258, 0.27577711))),
            pad=pad,
            rescale=float(cfg.get("rescale_factor", 1 / 255)),
            resample=int(cfg.get("resample", 3)),
            squash=squash,
        )


ImageInput = Union[str, Path, Image.Image, np.ndarray, bytes]  # bytes: an encoded file's content


def check_image_size(width: int, height: int, padded: bool, what: str = "image") -> None:
    """The size limits (``MAX_PIXELS``, ``MAX_ASPECT``, and the padded square's pixels when ``padded``)."""
    if width < 1 or height < 1:
        raise UserError(f"{what} has no pixels ({width} x {height})")
    if width * height > MAX_PIXELS:
        raise UserError(f"{what} is {width} x {height} = {width * height / 1e6:.0f} Mpx, over the limit of "
                        f"{MAX_PIXELS / 1e6:.0f} Mpx: downscale it first")
    if max(width, height) > MAX_ASPECT * min(width, height):
        raise UserError(f"{what} is {width} x {height}, an aspect ratio over {MAX_ASPECT}:1: crop or pad it first")
    side = max(width, height)
    if padded and side * side > MAX_PIXELS:
        raise UserError(f"{what} is {width} x {height}: padded to a square (the bundle's pad mode) it would be "
                        f"{side * side / 1e6:.0f} Mpx, over the limit of {MAX_PIXELS / 1e6:.0f} Mpx: downscale it first")


def load_image(image: ImageInput, padded: bool = False, formats: tuple[str, ...] | None = None) -> Image.Image:
    """Any image Pillow reads, as 8-bit RGB, upright (EXIF orientation applied).

    Transparent pixels are composited onto white, as transformers' ``convert_to_rgb``
    does; 16-bit and float images are scaled to 8 bits. The size limits are checked on
    the header before anything is decoded (:func:`check_image_size`; ``padded``: the
    image will be padded to a square). ``formats``: the file formats accepted (Pillow's
    names, e.g. ``("PNG", "JPEG", "WEBP")``; None: any Pillow reads).
    """
    if isinstance(image, np.ndarray):
        if image.ndim >= 2:
            check_image_size(image.shape[1], image.shape[0], padded, "the image array")
        return _array_to_rgb(image)
    if isinstance(image, Image.Image):
        check_image_size(*image.size, padded)
        return _to_rgb(image)
    if isinstance(image, (bytes, bytearray)):
        path, source = "the image data", io.BytesIO(image)
    else:
        if isinstance(image, str) and _URL.match(image):
            raise UserError(f"remote images are not supported, download it first: {image}")
        path = source = Path(image)
        if path.is_dir():
            raise UserError(f"the image is a directory, not a file: {image}")
        if not path.is_file():
            raise UserError(f"image not found: {image}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source, formats=formats) as im:
                check_image_size(*im.size, padded, f"image {path}")
                im = ImageOps.exif_transpose(im)
                im.load()
                return _to_rgb(im)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise UserError(f"image too large (decompression bomb guard): {path}") from None
    except PermissionError:
        raise UserError(f"image not readable (permission denied): {path}") from None
    except UnidentifiedImageError:
        kinds = f" ({', '.join(formats)})" if formats else ""
        raise UserError(f"not a readable image{kinds}: {path}") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as e:
        raise UserError(f"not a readable image: {path} ({type(e).__name__})") from None


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return _array_to_rgb(np.asarray(im))
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def _array_to_rgb(a: np.ndarray) -> Image.Image:
    a = np.asarray(a)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
        raise UserError(f"an image array must be HxW, HxWx1, HxWx3 or HxWx4, not {a.shape}")
    if a.dtype != np.uint8:
        if np.issubdtype(a.dtype, np.floating):
            a = np.clip(a, 0.0, 1.0) * 255.0 + 0.5 if a.max(initial=0) <= 1.0 else np.clip(a, 0, 255)
        elif a.dtype in (np.uint16, np.int32, np.uint32, np.int64) and a.max(initial=0) > 255:
            a = a / 257.0 + 0.5 if a.max(initial=0) <= 65535 else a * (255.0 / a.max())
        a = np.clip(a, 0, 255).astype(np.uint8)
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    if a.shape[2] == 4:
        return _to_rgb(Image.fromarray(a, "RGBA"))
    return Image.fromarray(a, "RGB")


def expand2square(im: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """LLaVA's pad-to-square: the image centred on a square of ``fill``."""
    w, h = im.size
    if w == h:
        return im
    side = max(w, h)
    out = Image.new(im.mode, (side, side), fill)
    out.paste(im, ((side - w) // 2, (side - h) // 2))
    return out


def preprocess(image: ImageInput, spec: ImageSpec, formats: tuple[str, ...] | None = None) -> np.ndarray:
    """One image as the tower's ``pixel_values``: float32, shape (3, crop, crop) (``formats``: see ``load_image``)."""
    im = load_image(image, padded=spec.pad == "pad", formats=formats)
    if spec.pad == "pad":
        im = expand2square(im, tuple(int(x * 255) for x in spec.mean))
    return clip_pixels(im, spec)


def clip_pixels(im: Image.Image, spec: ImageSpec) -> np.ndarray:
    """An RGB picture through CLIP's steps (resize the shortest edge, center crop, rescale, normalize), or
    SigLIP's (``spec.squash``: resize to the tile, rescale, normalize).

    ``spec.pad`` is not looked at: padding, where the checkpoint wants it, happens before. Float32 (3, crop, crop).
    """
    if spec.squash and im.size != (spec.crop, spec.crop):
        im = im.resize((spec.crop, spec.crop), resample=spec.resample)
    w, h = im.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = spec.resize, int(spec.resize * long / short)
    size = (new_short, new_long) if w <= h else (new_long, new_short)
    if size != im.size:
        im = im.resize(size, resample=spec.resample)
    w, h = im.size
    a = np.asarray(im)
    if h < spec.crop or w < spec.crop:  # pad as transformers' center_crop does
        ph, pw = max(h, spec.crop), max(w, spec.crop)
        padded = np.zeros((ph, pw, 3), a.dtype)
        top, left = (ph - h) // 2, (pw - w) // 2
        padded[top : top + h, left : left + w] = a
        a, h, w = padded, ph, pw
    top, left = (h - spec.crop) // 2, (w - spec.crop) // 2
    a = a[top : top + spec.crop, left : left + spec.crop]
    x = (a.astype(np.float64) * spec.rescale).astype(np.float32)
    x = (x - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)

