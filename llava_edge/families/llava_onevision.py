"""LLaVA-OneVision: LLaVA-NeXT's tiles with a SigLIP tower, a cap on the grid, and a Qwen2 language model.

A single picture goes through anyres as in LLaVA-NeXT, on OneVision's 36 pinpoints (1 to 6 tiles a side),
and its unpadded grid is shrunk bilinearly when it holds more than about N tiles' worth of patches
(``vision_aspect_ratio: anyres_max_N``, 9 for the released checkpoints; :mod:`llava_edge.anyres`). The
reference is transformers' ``LlavaOnevisionForConditionalGeneration`` with ``LlavaOnevisionImageProcessor``.
Checkpoints are prompted with their own chat template, as transformers' processor prompts them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from .. import anyres
from ..errors import UserError
from ..templates import CHAT_TEMPLATE
from .base import PreparedImage
from .llava_next import LlavaNext

if TYPE_CHECKING:
    from ..checkpoint import Checkpoint

ONEVISION_GRID = range(1, 7)  # LLaVA-OneVision's pinpoints: every grid of 1 to 6 tiles a side


class LlavaOnevision(LlavaNext):
    name = "llava-onevision"
    title = "LLaVA-OneVision"
    model_type = "llava_onevision"
    hf_class_name = "LlavaOnevisionForConditionalGeneration"
    hf_config_class_name = "LlavaOnevisionConfig"
    hf_processor_class_name = "LlavaOnevisionProcessor"
    text_models = ("qwen2", "llama", "mistral")
    vision_models = ("siglip_vision_model", "clip_vision_model", "clip")
    no_mmproj = ("llama.cpp has no LLaVA-OneVision image path (its anyres_max cap and SigLIP tiles); llava-edge "
                 "runs it exactly")
    supported = ("LlavaOnevisionForConditionalGeneration (model_type 'llava_onevision') with a SigLIP or CLIP tower "
                 "and a qwen2, llama or mistral language model")

    def check(self, config: dict, path) -> None:
        super(LlavaNext, self).check(config, path)  # the pinpoints have transformers' default when absent

    takes_video = True

    def several_images(self, ckpt: Checkpoint) -> bool:
        return True

    def image_section(self, ckpt: Checkpoint, max_tiles: int | None = None) -> dict:
        """LLaVA-NeXT's, and ``video``: OneVision answers about videos (frames pooled 2x2, one newline)."""
        return {**super().image_section(ckpt, max_tiles), "video": self.takes_video}

    def anyres_spec(self, ckpt: Checkpoint, max_tiles: int | None = None):
        """Always transformers' reading: OneVision checkpoints come from transformers' conversion, and the cap
        comes from the config's ``vision_aspect_ratio``."""
        aspect = ckpt.config.get("vision_aspect_ratio", anyres.ONEVISION_DEFAULT_ASPECT)  # transformers' default
        return anyres.AnyresSpec.from_config(ckpt.config, "hf", max_tiles=max_tiles,
                                             max_grid=anyres.parse_vision_aspect_ratio(aspect))

    def default_conv_mode(self, ckpt: Checkpoint) -> str:
        """The checkpoint's own chat template, as transformers' processor renders OneVision's prompts (the
        Qwen2 ChatML of ``conv_qwen_1_5`` in the released checkpoints)."""
        return CHAT_TEMPLATE if ckpt.chat_template() else "chatml_direct"

    def config_extra(self, tile: int, grids: list | None = None) -> dict:
        """``grids``, else OneVision's 36 pinpoints at this tile size; the released checkpoints' cap."""
        pins = [list(g) for g in anyres.check_pinpoints(grids, tile)] if grids else \
            [[tile * a, tile * b] for a in ONEVISION_GRID for b in ONEVISION_GRID]
        return {"image_grid_pinpoints": pins, "vision_aspect_ratio": anyres.ONEVISION_DEFAULT_ASPECT}

    def hf_image_processor(self, resize: int, crop: int, config: dict):
        """transformers' PIL OneVision image processor (its default class needs torchvision): the tower's mean and
        std, pictures and tiles resized to the tile as they are."""
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
            LlavaOnevisionImageProcessorPil)

        from .. import towers

        tower = towers.for_config(config.get("vision_config") or {})
        return LlavaOnevisionImageProcessorPil(size={"height": crop, "width": crop},
                                               image_grid_pinpoints=config["image_grid_pinpoints"],
                                               image_mean=list(tower.mean), image_std=list(tower.std))

    def write_hf_processor(self, folder, image_processor, tokenizer, *, patch_size: int, strategy: str,
                           class_token: bool) -> None:
        """The files llava-hf's OneVision checkpoints ship, written without the processor object: transformers
        cannot build ``LlavaOnevisionProcessor`` without its video processor, whose class needs torchvision."""
        folder = Path(folder)
        tokenizer.save_pretrained(str(folder))
        image_processor.save_pretrained(str(folder))
        size = image_processor.size
        side = int(size["height"] if isinstance(size, dict) else size.height) // patch_size
        (folder / "processor_config.json").write_text(json.dumps({
            "processor_class": self.hf_processor_class_name, "image_token": "<image>", "video_token": "<video>",
            "num_image_tokens": side * side + int(class_token), "vision_feature_select_strategy": strategy,
            "vision_aspect_ratio": anyres.ONEVISION_DEFAULT_ASPECT}, indent=2) + "\n")

    def hf_image_features(self, model, prepared: PreparedImage, images):
        """``LlavaOnevisionModel.get_image_features`` for one picture: tiles through tower and projector, then its
        own packing with the config's cap (``pooler_output``, one tensor per picture)."""
        inputs = self.hf_inputs([prepared])
        cfg = model.config
        return model.model.get_image_features(
            pixel_values=inputs["pixel_values"].to(model.device, model.dtype),
            image_sizes=inputs["image_sizes"].to(model.device), vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
            vision_aspect_ratio=cfg.vision_aspect_ratio, batch_num_images=inputs["batch_num_images"],
        ).pooler_output[0]

    def hf_inputs(self, prepared: list[PreparedImage], per_sample: list[int] | None = None) -> dict:
        """LLaVA-NeXT's, and ``batch_num_images``: the model tiles a sample's only picture and takes each of a
        sample's several as one tile; videos as ``pixel_values_videos`` (videos, frames, 3, S, S)."""
        import numpy as np
        import torch

        counts = per_sample or [1] * len(prepared)
        if sum(counts) != len(prepared):
            raise ValueError(f"{len(prepared)} pictures for samples of {counts}")
        out, at, images = {}, 0, []
        for n in counts:  # a sample's pictures, its videos left out
            images.append(sum(not p.video for p in prepared[at: at + n]))
            at += n
        pictures, videos = [p for p in prepared if not p.video], [p for p in prepared if p.video]
        if pictures:
            out = {**super().hf_inputs(pictures), "batch_num_images": torch.tensor([n for n in images if n])}
        if videos:
            frames = sorted({p.tiles for p in videos})
            if len(frames) > 1:
                raise UserError(f"videos of {' and '.join(map(str, frames))} frames in one batch: transformers' "
                                "model takes one frame count a batch (--per-device-batch 1)")
            out["pixel_values_videos"] = torch.from_numpy(np.stack([p.pixels for p in videos]))
        return out
