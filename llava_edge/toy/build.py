"""``llava-edge toy build``: LLaVA's whole recipe on the toy world, on a CPU in minutes.

    DIR/data        toy data: stage-1 captions, stage-2 instructions, held-out eval
    DIR/base        the toy LLaVA with both halves pretrained (stand-ins for CLIP and Vicuna)
    DIR/stage1      projector trained on captions (the real `train stage1` code)
    DIR/stage2      projector + language model on instructions (the real `train stage2` code)
    DIR/model       the final Hugging Face checkpoint
    DIR/eval.json   its held-out accuracy

A step whose output is complete is not run again.

``preset`` picks the model's shape (``toy``: LLaVA-1.5, one tile; ``toy-next``:
LLaVA-NeXT, anyres tiles); both take the same data, training preset and steps
through the same stages. ``detail``: the detail world (``toy/data.py``), whose
pattern question needs more than one tile's pixels.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

from .. import atomic


@dataclass(frozen=True)
class BuildSize:
    n_stage1: int = 2048
    n_stage2: int = 4096
    n_eval: int = 200
    vision_steps: int = 400
    language_steps: int = 300
    stage1_epochs: float = 1.0
    stage2_epochs: float = 3.0


def build_base(out: Path, seed: int, size: BuildSize, log=print, preset: str = "toy", detail: bool = False) -> Path:
    """Random toy LLaVA, then a short pretraining of its vision tower and its language model."""
    if (out / "config.json").is_file():
        return out
    import torch

    from ..checkpoint import load_hf_model, open_checkpoint
    from ..tokenizer import Tokenizer
    from .model import write_toy_model
    from .pretrain import pretrain_language, pretrain_vision

    torch.manual_seed(seed)
    with atomic.atomic_path(out) as tmp:
        write_toy_model(tmp, preset, seed=seed)
        ckpt = open_checkpoint(tmp)
        model = load_hf_model(ckpt).to("cuda" if torch.cuda.is_available() else "cpu")  # a GPU, where there is one
        tok = Tokenizer(tmp)
        pretrain_vision(model, ckpt.image_spec(), steps=size.vision_steps, seed=seed, log=log)
        pretrain_language(model, tok, steps=size.language_steps, seed=seed, log=log, detail=detail)
        model.cpu().save_pretrained(tmp, safe_serialization=True)
    return out


def build(out: str | Path, seed: int = 0, size: BuildSize = BuildSize(), log=print, preset: str = "toy",
          detail: bool = False) -> dict:
    from ..train import stages
    from ..train.presets import get_preset
    from .data import DETAIL_IMAGE_SIZE, FILES, write_dataset
    from .evaluate import evaluate_hf
    from .model import preset_shape

    if preset_shape(preset).get("real"):
        from ..errors import UserError

        raise UserError(f"toy build trains the small presets (toy, toy-next), not {preset}")
    out = Path(out)
    t0 = time.time()
    data = out / "data"
    if not (data / FILES["eval"]).is_file():
        log("toy data")
        write_dataset(data, seed, size.n_stage1, size.n_stage2, size.n_eval,
                      **(dict(image_size=DETAIL_IMAGE_SIZE, detail_world=True) if detail else {}))
    log("base model: pretraining the vision tower and the language model")
    base = build_base(out / "base", seed, size, log, preset, detail)
    training = get_preset("toy")
    if not (out / "stage1" / "mm_projector.safetensors").is_file():
        log("stage 1: feature alignment (projector only, plain template)")
        stages.stage1(str(base), data / FILES["stage1"], data, out / "stage1",
                      replace(training.stage1, epochs=size.stage1_epochs, seed=seed), pad="square", log=log)
    if not (out / "stage2" / "model.safetensors").is_file():
        log("stage 2: visual instruction tuning (projector + language model, vicuna_v1)")
        stages.stage2(str(base), data / FILES["stage2"], data, out / "stage2",
                      replace(training.stage2, epochs=size.stage2_epochs, seed=seed),
                      projector=out / "stage1" / "mm_projector.safetensors", pad="pad", log=log)
    model = out / "model"
    if not (model / "model.safetensors").is_file():
        with atomic.atomic_path(model) as tmp:
            shutil.copytree(out / "stage2", tmp, ignore=shutil.ignore_patterns("checkpoint-*"))
    log("evaluating on the held-out questions")
    result = evaluate_hf(model, data / FILES["eval"])
    result["seconds"] = round(time.time() - t0, 1)
    atomic.write_json(out / "eval.json", result)
    log(f"held-out accuracy {result['accuracy']:.1%} ({result['n']} questions) in {result['seconds']:.0f} s")
    return result
