"""LLaVA-1.5 (and LLaVA-1.0, BakLLaVA, TinyLLaVA): one picture, one tile, a fixed number of positions.

The picture is padded to a square with its mean colour (LLaVA's ``image_aspect_ratio:
pad``) or centre-cropped (CLIP's own processor), then goes through the tower as one tile;
the projected patch tokens are the positions, as many for every picture.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .. import towers
from ..preprocess import ImageSpec, preprocess
from ..templates import CHAT_TEMPLATE
from .base import Family, ImagePath, PreparedImage, pixels_key

if TYPE_CHECKING:
    from ..checkpoint import Checkpoint


class OneTile(ImagePath):
    def __init__(self, spec: ImageSpec, tokens: int, several: bool = False):
        self.spec, self.tokens_per_tile, self.several = spec, tokens, several

    def prepare(self, image, formats=None, alone: bool = True) -> PreparedImage:
        pixels = preprocess(image, self.spec, formats=formats)[None]
        return PreparedImage(pixels_key(pixels), pixels, self.tokens_per_tile, (self.spec.crop, self.spec.crop))

    def pack(self, features: np.ndarray, prepared: PreparedImage) -> np.ndarray:
        self.check_features(features, prepared)
        return features[0]

    def describe(self, prepared: PreparedImage) -> str:
        how = "padded to a square" if self.spec.pad == "pad" else "centre-cropped"
        return f"one {self.spec.crop} px tile ({how}): {prepared.positions} positions"


class Llava15(Family):
    name = "llava-1.5"
    title = "LLaVA-1.5"
    model_type = "llava"
    hf_class_name = "LlavaForConditionalGeneration"
    hf_config_class_name = "LlavaConfig"
    hf_processor_class_name = "LlavaProcessor"
    reduces_tokens = True
    vision_models = ("clip_vision_model", "clip", "siglip_vision_model")  # SigLIP: LLaVA-Interleave
    # Qwen2: LLaVA-Interleave (Qwen1.5); Phi-3: xtuner's llava-phi-3-mini; Llama 3 is "llama"
    text_models = ("llama", "mistral", "qwen2", "phi3")
    supported = ("LlavaForConditionalGeneration (model_type 'llava') with a CLIP or SigLIP tower and a llama, "
                 "mistral, qwen2 or phi3 language model")

    def several_images(self, ckpt: Checkpoint) -> bool:
        """A SigLIP tower in this layout is LLaVA-Interleave's build (llava-hf/llava-interleave-qwen-*), trained
        with several pictures a conversation; LLaVA-1.5's CLIP checkpoints with one."""
        return towers.for_config(ckpt.vision_config) is towers.SIGLIP

    def default_conv_mode(self, ckpt: Checkpoint) -> str:
        """llava-hf's LLaVA-1.5 checkpoints (a Llama/Vicuna language model) are conversions of LLaVA-1.5, trained
        with LLaVA's ``--version v1``: ``vicuna_v1``, the mode LLaVA's own benchmark scripts prompt them with.
        Other language models (Mistral: BakLLaVA) are prompted with the checkpoint's own chat template when it
        has one."""
        if ckpt.text_config.get("model_type", "llama") != "llama" and ckpt.chat_template():
            return CHAT_TEMPLATE
        return "vicuna_v1"

    def image_path(self, image: dict, vision: dict, tokens_per_tile: int, arrays: dict,
                   max_tiles: int | None = None, cap: int | None = None) -> ImagePath:
        self.check_max_tiles(max_tiles)
        self.check_cap(cap)
        return OneTile(ImageSpec.from_dict(image), tokens_per_tile, bool(image.get("several_images")))

    def hf_inputs(self, prepared: list[PreparedImage], per_sample: list[int] | None = None) -> dict:
        import torch

        return {"pixel_values": torch.from_numpy(np.concatenate([p.pixels for p in prepared]))}
