"""LLaVA-NeXT's "anyres" input in numpy/PIL: the picture as tiles, and the tiles' features packed for the LM.

It reproduces two references, each exactly (tests/test_anyres.py checks pixels, grids, counts and packed
features against both):

* transformers (``LlavaNextImageProcessor``, ``LlavaNextProcessor``'s token count and
  ``LlavaNextModel.pack_image_features``): ``AnyresSpec(orientation="hw", rounding="hf")``;
* LLaVA's own code (``llava/mm_utils.py`` ``process_anyres_image`` and the ``spatial_unpad`` branch of
  ``llava/model/llava_arch.py``): ``AnyresSpec(orientation="wh", rounding="llava")``.

Both pick the pinpoint (a canvas of whole tiles) that keeps most of the picture's pixels and wastes least,
resize the picture into it (aspect kept, centred on black), cut it into tiles, and put a base tile (the whole
picture squashed to one tile) first. The packing lays the tiles' patch features out as one grid, crops the
black bands off ("unpad") and ends every row with the model's ``image_newline``. They differ in two ways:

* orientation: transformers reads each pinpoint as (height, width), LLaVA as (width, height). With a list
  closed under transposition (LLaVA-1.6's five) this only matters on ties, which the first pinpoint wins: a
  square picture, or one whose sides both fit in one tile. At 336 px tiles a 300 x 200 picture gets one row
  of two tiles from transformers (1464 positions) and two rows of one tile from LLaVA (976 positions).
* rounding in unpad: transformers takes ``int(round(x, 7))`` of the scaled side, LLaVA ``int(x)``, so a
  side that is a whole number of patches only up to float error (e.g. 23.999999999999996) loses a row
  or column of patches in LLaVA's packing.

An optional cap, ``AnyresSpec.max_grid`` (the N of LLaVA-OneVision's ``vision_aspect_ratio: anyres_max_N``),
bounds a picture's positions: when the unpadded grid holds more than about N tiles' worth of patches
(``sqrt(h * w / (N * side**2)) > 1.1``) it is resized bilinearly, as torch's ``F.interpolate`` does, to
``(int(h // ratio), int(w // ratio))`` before the newlines are added (transformers'
``LlavaOnevisionModel.pack_image_features`` and ``LlavaOnevisionProcessor``'s count; tests/test_anyres_max.py).

A second, run-time cap, ``AnyresSpec.max_positions`` (``--image-tokens K``), bounds the positions themselves:
when a picture's packing would take more than K, every part of it is scaled by one factor, as if each tile
had a ``t x t`` patch grid instead of ``side x side``: the base tile is resized to ``t x t`` and the
(unpadded, capped) grid to ``(h * t // side, w * t // side)`` (at least 1 x 1), both bilinearly as above,
with the largest ``t`` whose count fits. Scaling base and grid alike keeps the ratio of detail to overview
the model was trained with; at ``t = side / 2`` the bilinear resize averages 2 x 2 patches.

:func:`num_positions` and :func:`pack` share :func:`_layout` (through :func:`_packed_layout`), so the count
the prompt is built with is the length of what the model receives.
"""

from __future__ import annotations

import ast
import math
import re
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from PIL import Image

from .errors import UserError
from .preprocess import ImageSpec, clip_pixels

ORIENTATIONS = ("hw", "wh")  # how a pinpoint pair reads: (height, width) as transformers, (width, height) as LLaVA
ROUNDINGS = ("hf", "llava")  # unpad's rounding: int(round(x, 7)) as transformers, int(x) as LLaVA
ORIGINS = {"hf": ("hw", "hf"), "llava": ("wh", "llava")}  # config flavour -> (orientation, rounding)
# transformers' LlavaNextConfig default, used when a Hugging Face config.json leaves the list out, as transformers does
HF_DEFAULT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
ONEVISION_DEFAULT_ASPECT = "anyres_max_9"  # LlavaOnevisionConfig's default vision_aspect_ratio


def check_pinpoints(pinpoints, tile: int) -> tuple[tuple[int, int], ...]:
    """``image_grid_pinpoints`` as a tuple of integer pairs, each side a positive multiple of ``tile``; else a UserError."""
    if isinstance(pinpoints, (str, bytes)) or not hasattr(pinpoints, "__iter__"):
        raise UserError(f"image_grid_pinpoints must be a list of [a, b] pairs, not {pinpoints!r}")
    pairs = list(pinpoints)
    if not pairs:
        raise UserError("image_grid_pinpoints is empty: a LLaVA-NeXT checkpoint lists at least one resolution")
    out = []
    for p in pairs:
        if isinstance(p, (str, bytes)) or not hasattr(p, "__len__") or len(p) != 2:
            raise UserError(f"image_grid_pinpoints: {p!r} is not a pair of sides")
        if not all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in p):
            raise UserError(f"image_grid_pinpoints: {list(p)!r} has a side that is not an integer")
        if min(p) <= 0:
            raise UserError(f"image_grid_pinpoints: {list(p)!r} has a side that is not positive")
        if p[0] % tile or p[1] % tile:
            raise UserError(f"image_grid_pinpoints: {list(p)!r} is not a multiple of the {tile} px tile")
        out.append((int(p[0]), int(p[1])))
    return tuple(out)


@dataclass(frozen=True)
class AnyresSpec:
    """How a checkpoint tiles pictures and packs the tiles' features (checked on construction)."""

    tile: int  # the vision tower's image size: each tile is tile x tile pixels
    patch: int  # the tower's patch size: a tile gives (tile // patch)^2 features
    pinpoints: tuple[tuple[int, int], ...]  # image_grid_pinpoints as the checkpoint's config lists them
    orientation: str  # one of ORIENTATIONS
    rounding: str  # one of ROUNDINGS
    max_tiles: int | None = None  # refuse a picture whose grid needs more tiles (the base tile not counted)
    max_grid: int | None = None  # anyres_max_N's N: shrink the unpadded grid to about N tiles' patches; None: never
    max_positions: int | None = None  # --image-tokens K: scale base tile and grid until a picture takes <= K

    def __post_init__(self):
        for name in ("tile", "patch"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0:
                raise UserError(f"anyres {name} must be a positive integer, not {v!r}")
        # a tile need not be a whole number of patches: the tower's stride-`patch` convolution drops the remainder
        # (SigLIP at 384 px with 14 px patches, LLaVA-OneVision's tower, gives 27 x 27), which is how
        # transformers counts too (image_size // patch_size)
        if self.patch > self.tile:
            raise UserError(f"anyres patch {self.patch} px is larger than the {self.tile} px tile")
        if self.orientation not in ORIENTATIONS:
            raise UserError(f"anyres orientation {self.orientation!r} is not one of {', '.join(ORIENTATIONS)}")
        if self.rounding not in ROUNDINGS:
            raise UserError(f"anyres rounding {self.rounding!r} is not one of {', '.join(ROUNDINGS)}")
        m = self.max_tiles
        if m is not None and (not isinstance(m, (int, np.integer)) or isinstance(m, bool) or m < 1):
            raise UserError(f"--max-tiles must be a positive integer, not {m!r}")
        g = self.max_grid
        if g is not None and (not isinstance(g, (int, np.integer)) or isinstance(g, bool) or g < 1):
            raise UserError(f"anyres max_grid (the N of anyres_max_N) must be a whole number >= 1, not {g!r}")
        k = self.max_positions
        if k is not None and (not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1):
            raise UserError(f"--image-tokens must be a whole number of at least 1, not {k!r}")
        object.__setattr__(self, "pinpoints", check_pinpoints(self.pinpoints, self.tile))

    @property
    def side(self) -> int:
        """Patches per tile side."""
        return self.tile // self.patch

    def to_dict(self) -> dict:
        d = {"tile": self.tile, "patch": self.patch, "pinpoints": [list(p) for p in self.pinpoints],
             "orientation": self.orientation, "rounding": self.rounding, "max_tiles": self.max_tiles}
        if self.max_grid is not None:  # absent when uncapped, so an uncapped bundle's manifest is as it always was
            d["max_grid"] = int(self.max_grid)
        if self.max_positions is not None:
            d["max_positions"] = int(self.max_positions)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "AnyresSpec":
        """From :meth:`to_dict`'s form (a manifest's section); a one-line UserError for anything missing or invalid."""
        if not isinstance(d, dict):
            raise UserError(f"the anyres settings must be a mapping, not {type(d).__name__}")
        missing = [k for k in ("tile", "patch", "pinpoints", "orientation", "rounding") if k not in d]
        if missing:
            raise UserError(f"the anyres settings lack {', '.join(missing)}: export the bundle again")
        return cls(tile=d["tile"], patch=d["patch"], pinpoints=d["pinpoints"], orientation=d["orientation"],
                   rounding=d["rounding"], max_tiles=d.get("max_tiles"), max_grid=d.get("max_grid"),
                   max_positions=d.get("max_positions"))

    @classmethod
    def from_config(cls, config: dict, origin: str, tower: dict | None = None,
                    max_tiles: int | None = None, max_grid: int | None = None) -> "AnyresSpec":
        """From a checkpoint's ``config.json`` (a dict).

        ``origin="hf"``: a transformers ``LlavaNextConfig`` or ``LlavaOnevisionConfig``; the tile and patch come
        from its ``vision_config`` (or from ``tower``), the pinpoints from ``image_grid_pinpoints`` (transformers'
        default list when absent). The cap is ``max_grid`` (``anyres_max_N``'s N: the family that has one passes
        it; transformers' LLaVA-NeXT model reads no such setting).
        ``origin="llava"``: an original LLaVA-1.6 config (``image_aspect_ratio: anyres``,
        ``mm_patch_merge_type: spatial_unpad``), which names its tower only by ``mm_vision_tower``: ``tower``
        is then required, the tower's own ``config.json`` (``image_size``, ``patch_size``).
        """
        if origin not in ORIGINS:
            raise UserError(f"unknown config origin {origin!r}; known: {', '.join(ORIGINS)}")
        orientation, rounding = ORIGINS[origin]
        if origin == "hf":
            tower = tower if tower is not None else config.get("vision_config")
            pinpoints = config.get("image_grid_pinpoints", HF_DEFAULT_PINPOINTS)
        else:
            aspect, merge = config.get("image_aspect_ratio"), config.get("mm_patch_merge_type", "flat")
            if aspect != "anyres" or merge != "spatial_unpad":
                raise UserError(f"the LLaVA config says image_aspect_ratio {aspect!r} and mm_patch_merge_type "
                                f"{merge!r}: not a LLaVA-NeXT (anyres, spatial_unpad) checkpoint")
            if tower is None:
                raise UserError(f"the LLaVA config names its vision tower ({config.get('mm_vision_tower')!r}) "
                                "but not its size: pass the tower's config.json as tower")
            pinpoints = config.get("image_grid_pinpoints")
            if isinstance(pinpoints, str):  # LLaVA accepts the list written as a string (ast.literal_eval)
                try:
                    pinpoints = ast.literal_eval(pinpoints)
                except (ValueError, SyntaxError):
                    raise UserError(f"image_grid_pinpoints {pinpoints!r} is not a list of pairs") from None
            if pinpoints is None:
                raise UserError("the LLaVA config has no image_grid_pinpoints")
        if not isinstance(tower, dict) or "image_size" not in tower or "patch_size" not in tower:
            raise UserError("the vision tower's config gives no image_size and patch_size")
        return cls(tile=tower["image_size"], patch=tower["patch_size"], pinpoints=pinpoints,
                   orientation=orientation, rounding=rounding, max_tiles=max_tiles, max_grid=max_grid)


def parse_vision_aspect_ratio(value) -> int:
    """N from ``"anyres_max_N"``, the only form transformers' OneVision model reads; a UserError otherwise."""
    m = re.fullmatch(r"anyres_max_(\d+)", value) if isinstance(value, str) else None
    if not m or int(m.group(1)) < 1:
        raise UserError(f"vision_aspect_ratio {value!r} is not anyres_max_N with a whole number N >= 1")
    return int(m.group(1))


def _check_size(width: int, height: int) -> None:
    if width < 1 or height < 1:
        raise UserError(f"the picture has no pixels ({width} x {height})")


def best_resolution(width: int, height: int, spec: AnyresSpec) -> tuple[int, int]:
    """(width, height) of the pinpoint the picture is fitted into: most picture pixels kept, then least canvas
    wasted, the first listed on a tie (both references' ``select_best_resolution``, same float steps)."""
    _check_size(width, height)
    best, best_kept, best_waste = None, 0, math.inf
    for a, b in spec.pinpoints:
        w, h = (b, a) if spec.orientation == "hw" else (a, b)
        scale = min(w / width, h / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        waste = w * h - kept
        if kept > best_kept or (kept == best_kept and waste < best_waste):
            best, best_kept, best_waste = (w, h), kept, waste
    return best


def grid(width: int, height: int, spec: AnyresSpec) -> tuple[int, int]:
    """(rows, cols) of tiles; a UserError when that is over ``spec.max_tiles``."""
    w, h = best_resolution(width, height, spec)
    rows, cols = h // spec.tile, w // spec.tile
    if spec.max_tiles is not None and rows * cols > spec.max_tiles:
        raise UserError(f"a {width} x {height} picture needs {rows * cols} tiles ({rows} x {cols}) besides the base "
                        f"one, over the limit of {spec.max_tiles}: raise it with --max-tiles or downscale the picture")
    return rows, cols


class Layout(NamedTuple):
    """Where a picture's positions come from (see :func:`_layout`)."""

    rows: int  # the tile grid, besides the base tile
    cols: int
    top: int  # the window of the grid's patches that unpad keeps: rows top..top+h, columns left..left+w
    left: int
    h: int
    w: int
    out_h: int  # the size that window is resized to ((h, w) when nothing caps it)
    out_w: int
    base: int  # the side of the base tile's patch grid as packed (``spec.side`` unless max_positions scales it)

    @property
    def positions(self) -> int:
        return self.base * self.base + self.out_h * (self.out_w + 1)  # base, then each row and its image_newline


def _layout(width: int, height: int, spec: AnyresSpec) -> Layout:
    """The tile grid; the window of its patch grid that unpad keeps, as both references' ``unpad_image`` slices
    it; the size that window is resized to under ``spec.max_grid``; and then under ``spec.max_positions``."""
    rows, cols = grid(width, height, spec)
    cur_h, cur_w = rows * spec.side, cols * spec.side
    fit = (lambda x: int(round(x, 7))) if spec.rounding == "hf" else int
    top = left = 0
    if width / height > cur_w / cur_h:  # wider than the grid: black bands above and below
        top = (cur_h - fit(height * (cur_w / width))) // 2
    else:
        left = (cur_w - fit(width * (cur_h / height))) // 2
    h, w = cur_h - 2 * top, cur_w - 2 * left
    out_h, out_w = h, w
    if spec.max_grid is not None:
        # transformers' expressions, float for float: int // float floors the same way in Python and in torch's
        # pack_image_features, and the processor counts with the same lines
        ratio = math.sqrt(h * w / (spec.max_grid * spec.side**2))
        if ratio > 1.1:
            out_h, out_w = int(h // ratio), int(w // ratio)
    return Layout(rows, cols, top, left, h, w, out_h, out_w, spec.side)


def _packed_layout(width: int, height: int, spec: AnyresSpec) -> Layout:
    """:func:`_layout` for counting and packing: a UserError where the cap leaves no rows or no columns, then
    scaled under ``spec.max_positions`` (the module docstring)."""
    layout = _layout(width, height, spec)
    h, w, out_h, out_w = layout.h, layout.w, layout.out_h, layout.out_w
    if (out_h, out_w) != (h, w) and min(out_h, out_w) < 1:  # torch's interpolate refuses it: transformers' model
        raise UserError(f"a {width} x {height} picture's {h} x {w} patch grid shrinks to {out_h} x {out_w} "
                        f"under anyres_max_{spec.max_grid}: too thin a strip for this checkpoint; crop it")
    k = spec.max_positions
    if k is None or layout.positions <= k:
        return layout
    for t in range(spec.side - 1, 0, -1):  # positions only grow with t: the first that fits is the largest
        scaled = layout._replace(out_h=max(1, out_h * t // spec.side), out_w=max(1, out_w * t // spec.side), base=t)
        if scaled.positions <= k:
            return scaled
    raise UserError(f"--image-tokens {k} is too few for a {width} x {height} picture: scaled down to one patch a "
                    f"tile it still takes {scaled.positions} positions")


def unpadded_size(width: int, height: int, spec: AnyresSpec) -> tuple[int, int]:
    """(h, w) in patches of the tile grid's features once the black bands are cropped off (before any cap)."""
    layout = _layout(width, height, spec)
    return layout.h, layout.w


def packed_grid_size(width: int, height: int, spec: AnyresSpec) -> tuple[int, int]:
    """(h, w) of the grid that is packed, a newline after each of its h rows: :func:`unpadded_size`, resized
    under ``spec.max_grid`` and ``spec.max_positions``."""
    layout = _packed_layout(width, height, spec)
    return layout.out_h, layout.out_w


def base_side(width: int, height: int, spec: AnyresSpec) -> int:
    """The side of the base tile's patch grid as packed: ``spec.side`` unless ``spec.max_positions`` scales it."""
    return _packed_layout(width, height, spec).base


def num_positions(width: int, height: int, spec: AnyresSpec) -> int:
    """How many LM positions the picture takes (what the prompt's image placeholder expands to)."""
    return _packed_layout(width, height, spec).positions


def _linear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For each of ``n_out`` output indices: the two input indices and their float32 weights, as torch's CPU
    ``upsample_bilinear2d`` computes them for ``align_corners=False`` and no ``scale_factor``."""
    # the scale comes from the sizes, in float32 (area_pixel_compute_scale -> compute_scales_value)
    scale = np.float32(n_in) / np.float32(n_out)
    # area_pixel_compute_source_index: scale * (i + 0.5) - 0.5. The product of a float32 scale and i + 0.5 is
    # exact in float64, so this rounds once to float32, as a fused multiply-add does (the pinned torch's CPU build
    # agrees with this more often than with two roundings); either way an ulp of the index moves the output by
    # less than float32 rounding, as the interpolation is continuous across whole indices
    src = (np.float64(scale) * (np.arange(n_out) + 0.5) - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0))  # negative source indices clamp to 0 (linear modes only)
    # guard_index_and_lambda: the lower index, at most the last one; the weight of the next, within [0, 1]
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    lam1 = np.clip(src - i0.astype(np.float32), np.float32(0), np.float32(1))
    i1 = np.where(i0 < n_in - 1, i0 + 1, i0)  # the last input index pairs with itself
    return i0, i1, np.float32(1) - lam1, lam1


def resize_bilinear(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """A (h, w, C) float32 feature map resized to (height, width, C) as
    ``F.interpolate(t[None].permute(0, 3, 1, 2), (height, width), mode="bilinear", align_corners=False)``
    (antialias off) does, to float32 rounding.

    Written by hand because the runtime has no torch (numpy and PIL only); PIL's bilinear filter is a different
    kernel (it widens when downscaling), so only torch's own index and weight formulas give its answer.
    """
    if x.ndim != 3 or x.dtype != np.float32:
        raise ValueError(f"resize_bilinear takes a (h, w, C) float32 map, not {x.dtype} {x.shape}")
    if min(x.shape[:2]) < 1 or height < 1 or width < 1:
        raise ValueError(f"resize_bilinear: sizes must be positive ({x.shape[:2]} -> {(height, width)})")
    r0, r1, a0, a1 = _linear_taps(x.shape[0], height)
    c0, c1, b0, b1 = _linear_taps(x.shape[1], width)
    # along the width within each input row, then between the two rows, the nesting of torch's generic CPU
    # kernel; its channels-last kernel (small outputs) sums the four weighted corners instead, and the compiler
    # fuses multiply-adds in both, so the two agree with this to float32 rounding rather than bit for bit
    across = b0[None, :, None] * x[:, c0] + b1[None, :, None] * x[:, c1]
    return a0[:, None, None] * across[r0] + a1[:, None, None] * across[r1]


def tiles(image: Image.Image, spec: AnyresSpec, image_spec: ImageSpec) -> np.ndarray:
    """The picture as the vision tower's input: float32 (1 + rows*cols, 3, tile, tile), the base tile first,
    then the grid's tiles row by row, each through the checkpoint's CLIP steps (``image_spec``).

    Resizes use ``image_spec.resample``, as transformers does; LLaVA's own code uses PIL's default (bicubic)
    there, which is what CLIP's processor says too.
    """
    if image_spec.crop != spec.tile:
        raise UserError(f"the image settings crop {image_spec.crop} px, not the {spec.tile} px anyres tile")
    im = image if image.mode == "RGB" else image.convert("RGB")
    width, height = im.size
    canvas_w, canvas_h = best_resolution(width, height, spec)
    rows, cols = grid(width, height, spec)
    # fit inside the canvas, aspect kept: the tighter side fills it, the other rounds up (both references)
    if canvas_w / width < canvas_h / height:
        new_w, new_h = canvas_w, min(math.ceil(height * (canvas_w / width)), canvas_h)
    else:
        new_w, new_h = min(math.ceil(width * (canvas_h / height)), canvas_w), canvas_h
    canvas = Image.new("RGB", (canvas_w, canvas_h), (0, 0, 0))
    canvas.paste(im.resize((new_w, new_h), resample=image_spec.resample),
                 ((canvas_w - new_w) // 2, (canvas_h - new_h) // 2))
    t, base = spec.tile, image_spec.resize  # the base tile: squashed to resize x resize, then CLIP's crop
    parts = [im.resize((base, base), resample=image_spec.resample)]
    parts += [canvas.crop((c * t, r * t, (c + 1) * t, (r + 1) * t)) for r in range(rows) for c in range(cols)]
    return np.stack([clip_pixels(p, image_spec) for p in parts])


def pack(features: np.ndarray, width: int, height: int, spec: AnyresSpec, newline: np.ndarray) -> np.ndarray:
    """The tiles' projected features (1 + rows*cols, side*side, H), base tile first, as the LM's image
    positions: (num_positions, H), the base tile's patches (resized under ``spec.max_positions``), then the
    unpadded grid (resized under ``spec.max_grid`` and ``spec.max_positions``, in float32) row by row, each row
    followed by ``newline`` (H,)."""
    lay = _packed_layout(width, height, spec)
    rows, cols, s = lay.rows, lay.cols, spec.side
    if features.ndim != 3 or features.shape[:2] != (1 + rows * cols, s * s):
        raise ValueError(f"features for a {width} x {height} picture must be (1 + {rows}*{cols}, {s * s}, H), "
                         f"not {features.shape}")
    dim = features.shape[2]
    if newline.shape != (dim,):
        raise ValueError(f"image_newline must be ({dim},), not {newline.shape}")
    g = features[1:].reshape(rows, cols, s, s, dim).transpose(0, 2, 1, 3, 4).reshape(rows * s, cols * s, dim)
    g = g[lay.top : lay.top + lay.h, lay.left : lay.left + lay.w]
    if (lay.out_h, lay.out_w) != (lay.h, lay.w):
        g = resize_bilinear(np.ascontiguousarray(g, dtype=np.float32), lay.out_h, lay.out_w).astype(features.dtype)
    base = features[0]
    if lay.base != s:
        base = resize_bilinear(base.reshape(s, s, dim).astype(np.float32), lay.base, lay.base)
        base = base.reshape(lay.base * lay.base, dim).astype(features.dtype)
    ends = np.broadcast_to(newline.astype(features.dtype), (lay.out_h, 1, dim))
    out = np.concatenate([base, np.concatenate([g, ends], axis=1).reshape(lay.out_h * (lay.out_w + 1), dim)])
    assert len(out) == lay.positions
    return out
