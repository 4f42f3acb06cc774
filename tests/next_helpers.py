"""What the model-family tests share: pictures of any shape, transformers' own image-token count, and its
reference answers."""

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


def hf_answer(hf, eos_id: int, max_new_tokens: int, **inputs) -> tuple[np.ndarray, list[int]]:
    """transformers' reference for a prompt: the last position's logits and the greedy answer's ids (up to EOS).
    ``inputs``: ``input_ids`` (1, n) or ``inputs_embeds`` and the model's picture inputs."""
    import torch

    with torch.no_grad():
        logits = hf(**inputs).logits[0, -1].numpy()
        out = hf.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos_id,
                          pad_token_id=eos_id)
    # generate returns the prompt's ids before the answer's, except for a prompt given as embeddings
    new = out[0, inputs["input_ids"].shape[1]:].tolist() if "input_ids" in inputs else out[0].tolist()
    return logits, new[: new.index(eos_id)] if eos_id in new else new


def assert_logits_close(got: np.ndarray, want: np.ndarray) -> None:
    """First-answer-token logits within 1e-3 of their largest magnitude."""
    assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max()


def toy_bundle(tmp_path_factory, preset: str, seed: int = 0, shape: dict | None = None):
    """(checkpoint, bundle): ``toy model --preset PRESET`` exported by the same code as a hub checkpoint."""
    from llava_edge.checkpoint import open_checkpoint
    from llava_edge.export.bundle import export_bundle
    from llava_edge.toy.model import write_toy_model

    model = write_toy_model(tmp_path_factory.mktemp(preset) / "model", preset=preset, seed=seed, shape=shape)
    out = tmp_path_factory.mktemp(f"{preset}-bundle") / "b"
    export_bundle(open_checkpoint(model), out, log=lambda _: None)
    return model, out
