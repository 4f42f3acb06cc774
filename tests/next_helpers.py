"""What the LLaVA-NeXT tests share: pictures of any shape, and transformers' own image-token count."""

from __future__ import annotations

import numpy as np
from PIL import Image


def picture(w: int, h: int, seed: int = 0) -> Image.Image:
    """Smooth colours with some edges: every tile differs, and resampling is exercised."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    a = np.stack([(x * 255 // max(w - 1, 1)), (y * 255 // max(h - 1, 1)), ((x + y) * 7) % 256], -1)
    a = (a + rng.integers(0, 40, a.shape)).clip(0, 255).astype(np.uint8)
    return Image.fromarray(a, "RGB")


def hf_count(model_dir, im: Image.Image) -> int:
    """The number of image tokens transformers' LlavaNextProcessor puts in a prompt for ``im``."""
    from transformers import AutoTokenizer, LlavaNextImageProcessorPil, LlavaNextProcessor

    proc = LlavaNextProcessor(image_processor=LlavaNextImageProcessorPil.from_pretrained(model_dir),
                              tokenizer=AutoTokenizer.from_pretrained(model_dir), patch_size=14,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1)
    ids = proc(text="<image>", images=im, return_tensors="np")["input_ids"][0]
    return int((ids == proc.tokenizer.convert_tokens_to_ids("<image>")).sum())
