"""LLaVA-NeXT (LLaVA-1.6): a picture as a grid of tiles plus the whole picture squashed into one, unpadded.

The picture goes through the vision graph as ``1 + rows x cols`` tiles (one batch). The
base tile's patch tokens come first; the grid's tokens are stitched into one feature
map, the rows and columns that only cover the black padding are cut off (unpad), and an
``image_newline`` vector ends every row. How many positions that makes depends on the
picture's size, and it is counted by the code that packs (:mod:`llava_edge.anyres`).

Checkpoints of two origins differ in two places (see :mod:`llava_edge.anyres`): llava-hf
ones are read as transformers reads them, converted original LLaVA-1.6 ones as LLaVA's
own code does; the bundle records which.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np

from .. import anyres
from ..errors import UserError
from ..preprocess import ImageSpec, clip_pixels, load_image, preprocess
from ..templates import CHAT_TEMPLATE
from ..weights import stored_tensors
from .base import Family, ImagePath, PreparedImage, pixels_key

if TYPE_CHECKING:
    from ..checkpoint import Checkpoint

NEWLINE = "image_newline"


class AnyresTiles(ImagePath):
    def __init__(self, spec: ImageSpec, grid, tokens: int, newline: np.ndarray, several: bool = False,
                 video: bool = False):
        side = grid.tile // grid.patch
        if tokens != side * side:
            raise UserError(f"the bundle's vision graph gives {tokens} tokens per tile, not the {side}x{side} patch "
                            "grid its anyres packing needs: export it again")
        if newline.ndim != 1:
            raise UserError("the bundle's image_newline is not a vector: export it again")
        self.spec, self.grid, self.tokens_per_tile, self.newline = spec, grid, tokens, newline.astype(np.float32)
        self.several, self.video = several, video

    def prepare(self, image, formats=None, alone: bool = True) -> PreparedImage:
        if not alone and self.several:
            # one of several pictures (LLaVA-OneVision): padded to a square with the mean colour, one tile, its
            # patches and one newline, as transformers' OneVision processor and model take each of them
            im = load_image(image, padded=True, formats=formats)
            pixels = preprocess(im, dataclasses.replace(self.spec, pad="pad"))[None]
            return PreparedImage(pixels_key(pixels, "one of several"), pixels, self.several_positions, im.size)
        im = load_image(image, formats=formats)
        w, h = im.size
        rows, cols = anyres.grid(w, h, self.grid)  # refuses what --max-tiles does not allow, before any resize
        pixels = anyres.tiles(im, self.grid, self.spec)
        positions = anyres.num_positions(w, h, self.grid)
        # a cap packs the same pixels into other positions: its cells are not the uncapped picture's
        layout = (w, h) if self.grid.max_positions is None else ((w, h), ("max_positions", self.grid.max_positions))
        return PreparedImage(pixels_key(pixels, *layout), pixels, positions, (w, h), (rows, cols))

    @property
    def several_positions(self) -> int:
        """One tile's patches and a newline."""
        return self.grid.side ** 2 + 1

    @property
    def frame_side(self) -> int:
        """A video frame's patch grid side once pooled: halved, rounded up (get_video_features' ``apply_pooling``)."""
        return -(-self.grid.side // 2)

    def video_positions(self, frames: int) -> int:
        """A video's positions: each frame's pooled grid, then one newline."""
        return frames * self.frame_side ** 2 + 1

    def prepare_video(self, frames: list, name: str = "video") -> PreparedImage:
        if not self.video:
            return super().prepare_video(frames, name)
        # each frame resized to the tile as it is, through the tower's normalization (the video processor's steps)
        pixels = np.stack([clip_pixels(f if f.mode == "RGB" else f.convert("RGB"), self.spec) for f in frames])
        return PreparedImage(pixels_key(pixels, "video"), pixels, self.video_positions(len(frames)),
                             frames[0].size, video=True)

    def pack(self, features: np.ndarray, prepared: PreparedImage) -> np.ndarray:
        self.check_features(features, prepared)
        if prepared.video:
            # LlavaOnevisionModel.get_video_features: every frame's patch grid halved bilinearly (ceil), the frames
            # one after another, one newline after the last
            s, p, dim = self.grid.side, self.frame_side, features.shape[2]
            grids = [anyres.resize_bilinear(np.ascontiguousarray(f.reshape(s, s, dim), np.float32), p, p)
                     for f in features]
            rows = np.concatenate([g.reshape(p * p, dim) for g in grids]).astype(features.dtype)
            return np.concatenate([rows, self.newline[None].astype(features.dtype)])
        if prepared.grid is None:  # one of several pictures: its tile, then one newline
            return np.concatenate([features[0], self.newline[None].astype(features.dtype)])
        w, h = prepared.size
        return anyres.pack(features, w, h, self.grid, self.newline)

    def describe(self, prepared: PreparedImage) -> str:
        if prepared.video:
            p = self.frame_side
            return (f"a video: {prepared.tiles} frames, each one {self.grid.tile} px tile pooled to {p}x{p}, and a "
                    f"newline = {prepared.positions} positions")
        if prepared.grid is None:
            return (f"one of several pictures: padded to a square, one {self.grid.tile} px tile and a newline = "
                    f"{prepared.positions} positions")
        w, h = prepared.size
        rows, cols = prepared.grid or (0, 0)
        uh, uw = anyres.packed_grid_size(w, h, self.grid)
        side, base = self.grid.side, anyres.base_side(w, h, self.grid)
        scaled = ""
        if base != side:
            uncapped = anyres.num_positions(w, h, dataclasses.replace(self.grid, max_positions=None))
            scaled = (f" (every tile's {side}x{side} patches scaled to {base}x{base} under --image-tokens "
                      f"{self.grid.max_positions}; {uncapped} uncapped)")
        return (f"{w}x{h} px -> {rows}x{cols} tiles of {self.grid.tile} px + the whole picture in one: "
                f"{base * base} base positions + {uh}x{uw} unpadded grid with a newline per row = "
                f"{prepared.positions} positions{scaled}")


class LlavaNext(Family):
    name = "llava-next"
    title = "LLaVA-NeXT"
    model_type = "llava_next"
    tiled = True
    caps_positions = True
    hf_class_name = "LlavaNextForConditionalGeneration"
    hf_config_class_name = "LlavaNextConfig"
    hf_processor_class_name = "LlavaNextProcessor"
    no_mmproj = None  # written with pinpoints and image_newline; llama.cpp approximates it (docs/MMPROJ.md)
    supported = ("LlavaNextForConditionalGeneration (model_type 'llava_next') with a llama or mistral language "
                 "model")

    def check(self, config: dict, path) -> None:
        super().check(config, path)
        if not config.get("image_grid_pinpoints"):
            raise UserError(f"{path}/config.json has no image_grid_pinpoints (a LLaVA-NeXT checkpoint needs them)")

    def anyres_spec(self, ckpt: Checkpoint, max_tiles: int | None = None):
        """The tiles' sizes and pinpoints from the llava-hf config; the orientation and rounding of the code the
        weights were trained with, which the recipe names (``anyres_origin: llava`` for a converted original
        LLaVA-1.6, whose config lists the pinpoints as LLaVA does; transformers' when it says nothing)."""
        origin = ckpt.recipe.get("anyres_origin", "hf")
        if origin not in anyres.ORIGINS:
            raise UserError(f"{ckpt.path}/llava_edge.json names an unknown anyres_origin {origin!r} "
                            f"(known: {', '.join(anyres.ORIGINS)})")
        spec = anyres.AnyresSpec.from_config(ckpt.config, "hf", max_tiles=max_tiles)
        orientation, rounding = anyres.ORIGINS[origin]
        return dataclasses.replace(spec, orientation=orientation, rounding=rounding)

    def image_section(self, ckpt: Checkpoint, max_tiles: int | None = None) -> dict:
        return {**super().image_section(ckpt, max_tiles), "anyres": self.anyres_spec(ckpt, max_tiles).to_dict()}

    def most_tiles(self, image: dict) -> int:
        g = self._grid(image)
        most = max((a // g.tile) * (b // g.tile) for a, b in g.pinpoints)
        return 1 + (most if g.max_tiles is None else min(most, g.max_tiles))

    def side_arrays(self, ckpt: Checkpoint) -> dict[str, np.ndarray]:
        for f in ckpt.weight_files():
            for key, st in stored_tensors(f, check=False).items():
                if key.split(".")[-1] == NEWLINE:
                    return {NEWLINE: st.float32().copy()}
        raise UserError(f"{ckpt.path} has no {NEWLINE} tensor (a LLaVA-NeXT checkpoint needs one)")

    def default_conv_mode(self, ckpt: Checkpoint) -> str:
        """The mode LLaVA-NeXT's checkpoints were trained with, by their language model: Mistral-7B-Instruct
        ``mistral_instruct``, Nous-Hermes-2-Yi-34B (ChatML) ``chatml_direct``, Vicuna ``vicuna_v1``; a checkpoint
        with a language model LLaVA-NeXT did not ship is prompted with its own chat template when it has one."""
        tmt = ckpt.text_config.get("model_type", "llama")
        template = ckpt.chat_template() or ""
        if tmt == "mistral":
            return "mistral_instruct"
        if "<|im_start|>" in template:
            return "chatml_direct"
        if tmt == "llama":
            return "vicuna_v1"
        return CHAT_TEMPLATE if template else "vicuna_v1"

    def max_positions(self, image: dict, tokens_per_tile: int, cap: int | None = None) -> int:
        """An upper bound: the base tile and the largest grid of any pinpoint, in either orientation, with
        nothing cut by unpad; at most ``cap``."""
        self.check_cap(cap)
        g = self._grid(image)
        side = g.tile // g.patch
        grids = [(a // g.tile, b // g.tile) for a, b in g.pinpoints]
        most = side * side + max(r * side * (c * side + 1) for a, b in grids for r, c in ((a, b), (b, a)))
        return most if cap is None else min(most, cap)

    def _grid(self, image: dict):
        try:
            return anyres.AnyresSpec.from_dict(image["anyres"])
        except (KeyError, TypeError):
            raise UserError("the bundle's image section lacks its anyres settings: export it again") from None

    def image_path(self, image: dict, vision: dict, tokens_per_tile: int, arrays: dict,
                   max_tiles: int | None = None, cap: int | None = None) -> ImagePath:
        self.check_max_tiles(max_tiles)
        self.check_cap(cap)
        if NEWLINE not in arrays:
            raise UserError(f"the bundle lacks its {NEWLINE} vector: export it again")
        grid = self._grid(image)
        if max_tiles is not None:
            grid = dataclasses.replace(grid, max_tiles=max_tiles)
        if cap is not None:
            grid = dataclasses.replace(grid, max_positions=cap)
        spec = ImageSpec.from_dict({k: v for k, v in image.items() if k != "anyres"})
        return AnyresTiles(spec, grid, tokens_per_tile, arrays[NEWLINE], bool(image.get("several_images")),
                           bool(image.get("video")))

    def config_extra(self, tile: int, grids: list | None = None) -> dict:
        """``grids``, else LLaVA-1.6's five grids (1x2, 2x1, 2x2, 1x3, 3x1 tiles) at this tile size."""
        if grids:
            return {"image_grid_pinpoints": [list(g) for g in anyres.check_pinpoints(grids, tile)]}
        return {"image_grid_pinpoints": [[tile * a, tile * b] for a, b in ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))]}

    def hf_image_processor(self, resize: int, crop: int, config: dict):
        """transformers' PIL LlavaNext image processor: its default class needs torchvision, and the PIL one is
        what ``LlavaNextImageProcessor`` falls back to without it."""
        from transformers import LlavaNextImageProcessorPil

        return LlavaNextImageProcessorPil(size={"shortest_edge": resize}, crop_size={"height": crop, "width": crop},
                                          image_grid_pinpoints=config["image_grid_pinpoints"])

    def hf_tile_features(self, model, pixel_values):
        """The tower's feature layer (class token dropped for ``default``) through the projector, per tile: the
        ops ``LlavaNextModel.get_image_features`` runs before ``pack_image_features``, which has no way to
        return them unpacked."""
        import torch

        cfg = model.config
        hidden = model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states
        layers = cfg.vision_feature_layer
        h = (hidden[layers] if isinstance(layers, int) else torch.cat([hidden[i] for i in layers], dim=-1))
        if cfg.vision_feature_select_strategy == "default":
            h = h[:, 1:]
        return model.model.multi_modal_projector(h)

    def hf_recipe(self, recipe: dict) -> dict:
        """Without ``anyres_origin``: transformers' class tiles and packs its own way, so a checkpoint it trains
        is then read its way."""
        return {k: v for k, v in recipe.items() if k != "anyres_origin"}

    def hf_reads_as_trained(self, images: ImagePath) -> bool:
        return (images.grid.orientation, images.grid.rounding) == anyres.ORIGINS["hf"]

    def hf_image_features(self, model, prepared: PreparedImage, images: ImagePath):
        """``LlavaNextModel.get_image_features``: the tiles through tower and projector, then its own packing (the
        packed features are its output's ``pooler_output``, one tensor per picture). For a checkpoint trained
        with LLaVA's own code, whose pinpoints and unpad transformers reads otherwise, the class's tile features
        packed as LLaVA's code packs them (``anyres.pack``, tested against LLaVA's code)."""
        if not self.hf_reads_as_trained(images):
            import torch

            px = torch.from_numpy(prepared.pixels).to(model.device, model.dtype)
            tiles = self.hf_tile_features(model, px).float().cpu().numpy()
            return torch.from_numpy(images.pack(tiles, prepared)).to(model.device)
        inputs = self.hf_inputs([prepared])
        px = inputs["pixel_values"].to(model.device, model.dtype)
        cfg = model.config
        return model.model.get_image_features(
            pixel_values=px, image_sizes=inputs["image_sizes"].to(model.device),
            vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy).pooler_output[0]

    def hf_inputs(self, prepared: list[PreparedImage], per_sample: list[int] | None = None) -> dict:
        """``pixel_values`` (images, most tiles, 3, S, S), zero tiles after an image's own, and ``image_sizes`` as
        (height, width), as ``LlavaNextProcessor`` gives them."""
        import torch

        most = max(p.tiles for p in prepared)
        px = np.zeros((len(prepared), most, *prepared[0].pixels.shape[1:]), np.float32)
        for i, p in enumerate(prepared):
            px[i, : p.tiles] = p.pixels
        sizes = [[p.size[1], p.size[0]] for p in prepared]
        return {"pixel_values": torch.from_numpy(px), "image_sizes": torch.tensor(sizes)}
