"""A LLaVA checkpoint on disk: find it, validate it, read its settings, load it.

Everything except :func:`load_hf_model` works without torch. A checkpoint is a
llava-hf style directory (``config.json`` with ``model_type: llava``,
safetensors weights, tokenizer and processor files) or a hub id already in the
local Hugging Face cache. The toy model is such a directory: there is no other path.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path

from . import atomic
from .errors import UserError
from .preprocess import PAD_MODES, ImageSpec
from .templates import TEMPLATES

RECIPE_FILE = "llava_edge.json"  # what the config does not say: template and pad mode
SUPPORTED_TEXT_MODELS = ("llama", "mistral")
DEFAULT_RECIPE = {"template": "vicuna_v1", "image_pad": "pad"}


def write_recipe(folder: str | Path, template: str, image_pad: str) -> None:
    if template not in TEMPLATES:
        raise UserError(f"unknown template {template!r}; known: {', '.join(TEMPLATES)}")
    if image_pad not in PAD_MODES:
        raise UserError(f"unknown image pad mode {image_pad!r}; known: {', '.join(PAD_MODES)}")
    atomic.write_json(Path(folder) / RECIPE_FILE, {"template": template, "image_pad": image_pad})


@dataclass
class Checkpoint:
    path: Path
    config: dict
    recipe: dict

    @property
    def text_config(self) -> dict:
        return self.config["text_config"]

    @property
    def vision_config(self) -> dict:
        return self.config["vision_config"]

    @property
    def image_token_id(self) -> int:
        c = self.config
        return int(c.get("image_token_index", c.get("image_token_id", 32000)))

    def image_spec(self) -> ImageSpec:
        # transformers < 5 writes preprocessor_config.json; 5 nests it in processor_config.json
        cfg = {}
        pre, proc = self.path / "preprocessor_config.json", self.path / "processor_config.json"
        if pre.is_file():
            cfg = json.loads(pre.read_text())
        elif proc.is_file():
            cfg = json.loads(proc.read_text()).get("image_processor", {})
        if not cfg:
            size = self.vision_config.get("image_size", 336)
            cfg = {"size": {"shortest_edge": size}, "crop_size": {"height": size, "width": size}}
        return ImageSpec.from_processor_config(cfg, pad=self.recipe["image_pad"])

    def num_image_tokens(self) -> int:
        v = self.vision_config
        n = (v.get("image_size", 336) // v.get("patch_size", 14)) ** 2
        return n + (1 if self.config.get("vision_feature_select_strategy", "default") == "full" else 0)

    def weight_files(self) -> list[Path]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            files = [self.path / n for n in names]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise UserError(f"missing weight shard(s) in {self.path}: {', '.join(missing)}")
            return files
        single = self.path / "model.safetensors"
        if single.is_file():
            return [single]
        raise UserError(f"no safetensors weights in {self.path} (model.safetensors or an index)")

    def fingerprint(self) -> str:
        """sha256 over config.json and every safetensors header (names, dtypes, shapes, offsets).

        Cheap to compute at 7B size, and it changes whenever the weights' layout or the
        file sizes change; the bundle manifest additionally records full hashes of its outputs.
        """
        h = hashlib.sha256((self.path / "config.json").read_bytes())
        for f in self.weight_files():
            h.update(f.name.encode())
            h.update(str(f.stat().st_size).encode())
            h.update(read_safetensors_header_bytes(f))
        return h.hexdigest()


def read_safetensors_header_bytes(path: Path) -> bytes:
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise UserError(f"corrupt safetensors file (truncated header): {path}")
        (n,) = struct.unpack("<Q", raw)
        if n > 100_000_000:
            raise UserError(f"corrupt safetensors file (header size {n}): {path}")
        header = fh.read(n)
        if len(header) != n:
            raise UserError(f"corrupt safetensors file (truncated header): {path}")
    try:
        json.loads(header)
    except ValueError:
        raise UserError(f"corrupt safetensors file (header is not JSON): {path}") from None
    return header


def _resolve_path(model: str | Path) -> Path:
    p = Path(model).expanduser()
    if p.exists():
        return p
    s = str(model)
    if s.count("/") == 1 and not s.startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(s, allow_patterns=["*.json", "*.safetensors", "*.model"]))
        except Exception as e:  # offline, unknown repo, gated...
            raise UserError(f"model {s!r} is neither a directory nor a reachable hub id ({type(e).__name__})") from None
    raise UserError(f"model directory not found: {p}")


def open_checkpoint(model: str | Path) -> Checkpoint:
    """Find and validate a LLaVA checkpoint; a one-line :class:`UserError` when it is not one."""
    path = _resolve_path(model)
    if not path.is_dir():
        raise UserError(f"not a model directory: {path}")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise UserError(f"not a LLaVA model directory (no config.json): {path}")
    try:
        config = json.loads(cfg_file.read_text())
    except ValueError:
        raise UserError(f"unreadable config.json in {path}") from None
    mtype = config.get("model_type")
    if mtype in ("llava_llama", "llava_mistral"):
        raise UserError(
            f"{path} is an original LLaVA repository checkpoint ({mtype}); "
            "convert it to the llava-hf layout first (supported: model_type 'llava')"
        )
    if mtype != "llava":
        raise UserError(f"not a LLaVA model directory: {path} has model_type {mtype!r} (supported: 'llava')")
    tmt = config.get("text_config", {}).get("model_type", "llama")
    if tmt not in SUPPORTED_TEXT_MODELS:
        raise UserError(f"unsupported language model {tmt!r} in {path} (supported: {', '.join(SUPPORTED_TEXT_MODELS)})")
    recipe = dict(DEFAULT_RECIPE)
    rf = path / RECIPE_FILE
    if rf.is_file():
        recipe.update(json.loads(rf.read_text()))
    ckpt = Checkpoint(path, config, recipe)
    ckpt.weight_files()  # fail early on missing weights
    return ckpt


def load_hf_model(ckpt: Checkpoint, dtype: str = "float32", attn_implementation: str = "eager"):
    """The Hugging Face model (needs the ``export`` extra: torch + transformers).

    Eager attention by default: the ONNX exporter traces it and it is the exact reference.
    """
    import torch
    from transformers import LlavaForConditionalGeneration

    try:
        model = LlavaForConditionalGeneration.from_pretrained(
            ckpt.path, dtype=getattr(torch, dtype), attn_implementation=attn_implementation
        )
    except (OSError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load {ckpt.path}: {first}") from None
    return model.eval()
