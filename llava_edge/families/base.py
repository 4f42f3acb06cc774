"""What every stage asks of a model family: the one description of LLaVA-1.5, LLaVA-NeXT, ...

A family says how it is recognised in a checkpoint's ``config.json``, which language
models and vision towers it takes, which Hugging Face class defines it, how a picture
becomes the vision graph's input (one tile or many), how the graph's per-tile features
become language-model positions and how many there are, what the bundle records for
that, and which conversation mode a checkpoint gets when it records none.

Two levels, so that the runtime never needs torch:

- :class:`Family`: checkpoint-level answers (export, train, drift, quantize), importing
  transformers only inside the methods that need it;
- :class:`ImagePath`: a bundle's image handling, built from its manifest, numpy and PIL
  only (``prepare`` a picture, ``pack`` the graph's features).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from .. import towers
from ..errors import UserError

if TYPE_CHECKING:  # annotations only: checkpoint imports this module
    from ..checkpoint import Checkpoint


@dataclass(frozen=True)
class PreparedImage:
    """One picture ready for the vision graph, and what its features will take in the language model."""

    key: str  # what the KV cache's image slots and saved image cells are keyed by
    pixels: np.ndarray  # (tiles, 3, S, S) float32: one batch of the vision graph
    positions: int  # language-model positions of the packed features
    size: tuple[int, int]  # (width, height) of the picture as loaded
    grid: tuple[int, int] | None = None  # (rows, cols) of tiles besides the base picture; None: one tile
    video: bool = False  # the tiles are a video's frames

    @property
    def tiles(self) -> int:
        return len(self.pixels)


def pixels_key(pixels: np.ndarray, *extra: object) -> str:
    """The sha256 prefix that keys a picture's cells: its preprocessed pixels, and for tiled pictures the layout
    (two pictures with equal tiles but different sizes unpad differently)."""
    h = hashlib.sha256(pixels.tobytes())
    for x in extra:
        h.update(repr(x).encode())
    return h.hexdigest()[:16]


class ImagePath:
    """A bundle's way from a picture to language-model positions (torch-free)."""

    tokens_per_tile: int  # what the vision graph gives per tile
    several: bool = False  # the model was trained with several pictures in a conversation

    def prepare(self, image: Any, formats: tuple[str, ...] | None = None, alone: bool = True) -> PreparedImage:
        """``alone``: the only picture of its conversation (a family may take a picture among several
        otherwise)."""
        raise NotImplementedError

    @property
    def several_positions(self) -> int:
        """The positions a picture takes among several (``prepare(alone=False)``)."""
        return self.tokens_per_tile

    def prepare_video(self, frames: list, name: str = "video") -> PreparedImage:
        """A video's sampled frames (PIL images) as the vision graph's batch and their positions."""
        raise UserError(f"this model takes no video ({name}): LLaVA-OneVision does")

    def pack(self, features: np.ndarray, prepared: PreparedImage) -> np.ndarray:
        """The graph's output for ``prepared`` ((tiles, tokens per tile, width)) -> (positions, width)."""
        raise NotImplementedError

    def describe(self, prepared: PreparedImage) -> str:
        """One line for ``chat --explain``: how the picture became its positions."""
        raise NotImplementedError

    def check_features(self, features: np.ndarray, prepared: PreparedImage) -> None:
        if features.shape[:2] != (prepared.tiles, self.tokens_per_tile):
            raise UserError(f"the vision graph gives {features.shape[0]} x {features.shape[1]} image tokens for "
                            f"{prepared.tiles} tile(s) of {self.tokens_per_tile}: the bundle is inconsistent, "
                            "export it again")


class Family:
    """One member of the LLaVA family, as every stage sees it. Subclasses are registered in ``families``."""

    name: ClassVar[str]  # what the manifest records and errors say: "llava-1.5", "llava-next"
    title: ClassVar[str]  # for people: "LLaVA-1.5"
    model_type: ClassVar[str]  # config.json's model_type in the llava-hf layout
    hf_class_name: ClassVar[str]  # the transformers class that defines the model and is the numeric reference
    hf_config_class_name: ClassVar[str]  # its config class
    hf_processor_class_name: ClassVar[str]  # the processor llava-hf checkpoints of the family ship
    text_models: ClassVar[tuple[str, ...]] = ("llama", "mistral")
    vision_models: ClassVar[tuple[str, ...]] = ("clip_vision_model", "clip")
    reduces_tokens: ClassVar[bool] = False  # whether `quantize --image-tokens` variants apply to it
    tiled: ClassVar[bool] = False  # a picture may take several tiles (``--max-tiles`` bounds them)
    takes_video: ClassVar[bool] = False  # answers (and trains) on videos: frames through the image path
    # ``--image-tokens K`` caps a picture's positions in the packing, at run time, with every vision variant
    caps_positions: ClassVar[bool] = False
    # why llava-edge writes no llama.cpp mmproj for this family (None: it writes one)
    no_mmproj: ClassVar[str | None] = None
    supported: ClassVar[str]  # one phrase for "unsupported model" errors

    # -- recognising and checking a checkpoint -------------------------------------------------------------------
    def detects(self, config: dict) -> bool:
        return config.get("model_type") == self.model_type

    def check(self, config: dict, path: Path) -> None:
        """The language model and the tower are ones this family's export and runtime handle."""
        tmt = (config.get("text_config") or {}).get("model_type", "llama")
        if tmt not in self.text_models:
            raise UserError(f"unsupported language model {tmt!r} in {path} for {self.title} "
                            f"(supported: {', '.join(self.text_models)})")
        vmt = (config.get("vision_config") or {}).get("model_type", "clip_vision_model")
        if vmt not in self.vision_models:
            raise UserError(f"unsupported vision tower {vmt!r} in {path} for {self.title} "
                            f"(supported: {', '.join(self.vision_models)})")

    # -- what export records ----------------------------------------------------------------------------------
    def tokens_per_tile(self, ckpt: Checkpoint) -> int:
        """What the vision graph gives per tile: the feature layer's tokens as the strategy selects them."""
        v = ckpt.vision_config
        return towers.for_config(v).tokens(v.get("image_size", 336), v.get("patch_size", 14),
                                           ckpt.config.get("vision_feature_select_strategy", "default"))

    def image_section(self, ckpt: Checkpoint, max_tiles: int | None = None) -> dict:
        """The manifest's ``image`` section: everything the runtime needs to turn a picture into positions
        (``max_tiles``: the most tiles a picture may take, for a tiled family)."""
        self.check_max_tiles(max_tiles)
        d = ckpt.image_spec().to_dict()
        if self.several_images(ckpt):  # absent for one picture a conversation: as such bundles always were
            d["several_images"] = True
        return d

    def several_images(self, ckpt: Checkpoint) -> bool:
        """Whether checkpoints of the family were trained with several pictures in a conversation (the runtime
        refuses more than one otherwise)."""
        return False

    def check_max_tiles(self, max_tiles: int | None) -> None:
        if max_tiles is not None and not self.tiled:
            raise UserError(f"--max-tiles is for tiled model families (LLaVA-NeXT); {self.title} takes every picture "
                            "as one tile")
        if max_tiles is not None and (isinstance(max_tiles, bool) or not isinstance(max_tiles, int)
                                      or max_tiles < 1):
            raise UserError(f"--max-tiles must be a whole number of at least 1, not {max_tiles!r}")

    def most_tiles(self, image: dict) -> int:
        """The most tiles one picture sends through the vision graph (the TensorRT profile's largest batch)."""
        return 1

    def side_arrays(self, ckpt: Checkpoint) -> dict[str, np.ndarray]:
        """Learned vectors the runtime's packing needs besides the graph (file stem -> float32 array)."""
        return {}

    def default_conv_mode(self, ckpt: Checkpoint) -> str:
        raise NotImplementedError

    # -- the runtime's image path --------------------------------------------------------------------------------
    def max_positions(self, image: dict, tokens_per_tile: int, cap: int | None = None) -> int:
        """The most positions one picture can take, from the manifest's image section (what the context must
        hold for the largest picture); ``cap``: ``--image-tokens`` of a family that :attr:`caps_positions`."""
        self.check_cap(cap)
        return tokens_per_tile

    def check_cap(self, cap: int | None) -> None:
        if cap is not None and not self.caps_positions:
            raise UserError(f"{self.title} takes a fixed number of positions a picture: --image-tokens picks one of "
                            "the bundle's reduced-token vision variants (quantize --image-tokens), not a cap")
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
            raise UserError(f"--image-tokens must be a whole number of at least 1, not {cap!r}")

    def image_path(self, image: dict, vision: dict, tokens_per_tile: int,
                   arrays: dict[str, np.ndarray], max_tiles: int | None = None, cap: int | None = None) -> ImagePath:
        """The bundle's image handling from its manifest sections (``arrays``: the side arrays, loaded;
        ``max_tiles``: a tighter bound on a picture's tiles than the bundle's; ``cap``: the most positions a
        picture may take, for a family that :attr:`caps_positions`)."""
        raise NotImplementedError

    def checkpoint_image_path(self, ckpt: Checkpoint) -> ImagePath:
        """The image path a bundle exported from ``ckpt`` would have: what training and the drift reference use, so
        that every stage prepares pictures with the same code."""
        return self.image_path(self.image_section(ckpt), {}, self.tokens_per_tile(ckpt), self.side_arrays(ckpt))

    # -- torch side (export, training, drift) ---------------------------------------------------------------------
    def config_extra(self, tile: int, grids: list | None = None) -> dict:
        """The family's own keys of a new checkpoint's config, for a tower of ``tile`` px (the toy, training's
        fresh assembly); ``grids``: a tiled family's pinpoints instead of its default ones."""
        return {}

    def hf_image_processor(self, resize: int, crop: int, config: dict):
        """The image processor a llava-hf checkpoint of the family ships (``config``: the model config's keys):
        its tower's."""
        return towers.for_config(config.get("vision_config") or {}).hf_image_processor(resize, crop)

    def write_hf_processor(self, folder, image_processor, tokenizer, *, patch_size: int, strategy: str,
                           class_token: bool) -> None:
        """Save the family's processor (tokenizer, image processor, image-token count) as llava-hf ships it."""
        import transformers

        processor = getattr(transformers, self.hf_processor_class_name)(
            image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
            vision_feature_select_strategy=strategy, num_additional_image_tokens=int(class_token))
        processor.save_pretrained(str(folder))

    def hf_class(self):
        import transformers

        return getattr(transformers, self.hf_class_name)

    def hf_tile_features(self, model, pixel_values):
        """Hugging Face's projected features of each tile, before any packing: (tiles, tokens per tile, width),
        what the vision graph must equal."""
        cfg = model.config
        feats = model.model.get_image_features(
            pixel_values=pixel_values, vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy, output_hidden_states=True,
        ).pooler_output
        import torch

        return torch.stack(list(feats))

    def hf_image_features(self, model, prepared: PreparedImage, images: ImagePath):
        """What the model puts at the picture's positions, (positions, width), torch: the Hugging Face class's own
        computation where it prepares pictures as the checkpoint was trained (:meth:`hf_reads_as_trained`)."""
        inputs = {k: v.to(model.device, model.dtype if v.is_floating_point() else v.dtype)
                  for k, v in self.hf_inputs([prepared]).items()}
        return self.hf_tile_features(model, inputs["pixel_values"])[0]

    def hf_reads_as_trained(self, images: ImagePath) -> bool:
        """Whether the Hugging Face class tiles and packs pictures as the checkpoint behind ``images`` was trained
        (not so for a converted original LLaVA-1.6: transformers reads its pinpoints transposed)."""
        return True

    def hf_recipe(self, recipe: dict) -> dict:
        """The checkpoint recipe under which transformers' class reads pictures as the checkpoint says it was
        trained: what training, which runs that class, continues with (the same recipe for most families)."""
        return recipe

    def hf_generation_inputs(self, model, ids: list[int], prepared: PreparedImage, images: ImagePath,
                             features=None) -> dict:
        """``generate``'s keyword arguments for the prompt ``ids`` (the image expanded to its positions): the ids
        and pixels where the class reads pictures as trained; else the prompt's embeddings with the picture's
        features (``features``, else :meth:`hf_image_features`) in place of its positions."""
        import torch

        if self.hf_reads_as_trained(images):
            return {"input_ids": torch.tensor([ids], device=model.device),
                    **{k: v.to(model.device, model.dtype if v.is_floating_point() else v.dtype)
                       for k, v in self.hf_inputs([prepared]).items()}}
        t = torch.tensor([ids], device=model.device)
        embeds = model.get_input_embeddings()(t).clone()
        mask = t[0] == model.config.image_token_id
        if features is None:
            features = self.hf_image_features(model, prepared, images)
        embeds[0, mask] = features.to(embeds.dtype)
        return {"input_ids": t, "inputs_embeds": embeds, "attention_mask": torch.ones_like(t)}

    def hf_inputs(self, prepared: list[PreparedImage], per_sample: list[int] | None = None) -> dict:
        """The keyword arguments the Hugging Face model takes for these pictures (torch tensors), in the order of
        their image tokens; ``per_sample``: how many belong to each sample of the batch (None: one each)."""
        raise NotImplementedError
