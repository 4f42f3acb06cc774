"""``llava-edge export``: a checkpoint -> a bundle directory with its manifest.

Each output file is written under a temporary name and renamed when complete;
the manifest is written last, so an interrupted export never leaves a bundle
that looks complete. Re-running into the same bundle replaces what it exports.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from llava_edge import atomic, manifest
from llava_edge.checkpoint import Checkpoint, load_hf_model
from llava_edge.errors import UserError
from llava_edge.runtimes.tokenizer import TextTokenizer

from .llm_gguf import export_llm_gguf
from .vision_onnx import OPSET, export_vision_onnx

TARGETS = ("onnx", "gguf", "all")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def prepare_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not manifest.is_bundle(out):
        raise UserError(f"--out {out} is an existing directory that is not a bundle; choose a new or empty one")
    out.mkdir(parents=True, exist_ok=True)
    atomic.remove_partials(out)


def export_bundle(ckpt: Checkpoint, out: str | Path, target: str = "all", llm_outtype: str = "f32",
                  log: Callable[[str], None] = print) -> manifest.Manifest:
    if target not in TARGETS:
        raise UserError(f"unknown --target {target!r}; choose one of {', '.join(TARGETS)}")
    out = Path(out)
    prepare_out_dir(out)
    if not (ckpt.path / "tokenizer.json").is_file():
        raise UserError(f"{ckpt.path} has no tokenizer.json (the runtime tokenizes with it)")
    for name in TOKENIZER_FILES:
        if (ckpt.path / name).is_file():
            with atomic.atomic_path(out / name) as tmp:
                shutil.copyfile(ckpt.path / name, tmp)
    tok = TextTokenizer(out / "tokenizer.json")
    spec = ckpt.image_spec()
    tc = ckpt.text_config
    m = manifest.read(out) if manifest.is_bundle(out) else manifest.Manifest(
        source={}, template="", image={}, vision={}, llm={}, tokenizer={}
    )
    m.source = {"model": str(ckpt.path), "fingerprint": ckpt.fingerprint()}
    m.template = ckpt.recipe["template"]
    m.image = spec.to_dict()
    m.tokenizer = {"file": "tokenizer.json", "adds_bos": tok.adds_bos}
    m.vision = {
        "feature_layer": ckpt.config.get("vision_feature_layer", -2),
        "select_strategy": ckpt.config.get("vision_feature_select_strategy", "default"),
        "num_image_tokens": ckpt.num_image_tokens(),
        "embed_dim": int(tc["hidden_size"]),
        "image_size": int(ckpt.vision_config.get("image_size", 336)),
        "opset": OPSET,
    }
    if target in ("onnx", "all"):
        log(f"vision tower + projector -> ONNX (opset {OPSET})")
        model = load_hf_model(ckpt)
        export_vision_onnx(model, out / "vision.fp32.onnx", m.vision["image_size"])
        del model
        m.add_variant(out, "fp32", "vision", "fp32", "vision.fp32.onnx")
    if target in ("gguf", "all"):
        name = f"llm.{llm_outtype}.gguf"
        log(f"language model -> GGUF ({llm_outtype})")
        dims = export_llm_gguf(ckpt, out / name, llm_outtype, add_bos=tok.adds_bos)
        m.llm = {**m.llm, **dims}
        m.add_variant(out, llm_outtype, "llm", llm_outtype, name)
    m.llm["image_token_id"] = ckpt.image_token_id
    manifest.write(out, m)
    return m
