"""``llava-edge toy build``: LLaVA's whole recipe on the toy world, on a CPU in minutes.

    DIR/data        toy data: stage-1 captions, stage-2 instructions, held-out eval
    DIR/base        the toy LLaVA with both halves pretrained (stand-ins for CLIP and Vicuna)
    DIR/stage1      projector trained on captions (the real `train stage1` code)
    DIR/stage2      projector + language model on instructions (the real `train stage2` code)
    DIR/model       the final Hugging Face checkpoint
    DIR/eval.json   its held-out accuracy

A step whose output is complete is not run again.

``preset`` picks the model's shape (``toy``: LLaVA-1.5, one tile; ``toy-next``:
LLaVA-NeXT, anyres tiles; ``toy-siglip``: LLaVA-Interleave's one SigLIP tile;
``toy-onevision``: LLaVA-OneVision, SigLIP tiles and a Qwen2 language model);
all take the same training preset and steps through the same stages, stage 2 in
the conversation mode the base checkpoint records (``vicuna_v1``; ``qwen_1_5``
for Qwen2). ``detail``: the detail world (``toy/data.py``), whose pattern
question needs more than one tile's pixels. A model family trained with several
pictures a conversation (``Family.several_images``) also gets the two-picture
question kind; the others the one-picture data, as before.
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


TEXT_ROOM = 512  # tokens: more than the longest toy conversation's text


def max_length(ckpt, preset_length: int) -> int:
    """The training preset's max length, raised where the family's largest picture and the text would not fit
    (OneVision's 36 grids reach 6x6 tiles)."""
    family = ckpt.family
    most = family.max_positions(family.image_section(ckpt), family.tokens_per_tile(ckpt))
    return max(preset_length, most + TEXT_ROOM)


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
        pretrain_language(model, tok, steps=size.language_steps, seed=seed, log=log, detail=detail,
                          mode=ckpt.conv_mode, several=ckpt.family.several_images(ckpt))
        model.cpu().save_pretrained(tmp, safe_serialization=True)
    return out


def small_presets() -> list[str]:
    """The presets toy build trains: those not streamed at real size."""
    from .model import SHAPES

    return [name for name, shape in SHAPES.items() if not shape.get("real")]


def build(out: str | Path, seed: int = 0, size: BuildSize = BuildSize(), log=print, preset: str = "toy",
          detail: bool = False) -> dict:
    from ..checkpoint import open_checkpoint
    from ..train import stages
    from ..train.presets import get_preset
    from .data import DETAIL_IMAGE_SIZE, FILES, write_dataset
    from .evaluate import evaluate_hf
    from .model import preset_shape

    if preset_shape(preset).get("real"):
        from ..errors import UserError

        raise UserError(f"toy build trains the small presets ({', '.join(small_presets())}), not {preset}")
    out = Path(out)
    t0 = time.time()
    # the base first: its family says whether the data shows two pictures at once
    log("base model: pretraining the vision tower and the language model")
    base = build_base(out / "base", seed, size, log, preset, detail)
    ckpt = open_checkpoint(base)
    several = ckpt.family.several_images(ckpt)  # then the toy data asks about two pictures too
    data = out / "data"
    if not (data / FILES["eval"]).is_file():
        log("toy data" + (" (with the two-picture question)" if several else ""))
        write_dataset(data, seed, size.n_stage1, size.n_stage2, size.n_eval, several=several,
                      **(dict(image_size=DETAIL_IMAGE_SIZE, detail_world=True) if detail else {}))
    training = get_preset("toy")
    length = max_length(ckpt, training.stage2.max_length)
    if not (out / "stage1" / "mm_projector.safetensors").is_file():
        log("stage 1: feature alignment (projector only, plain template)")
        stages.stage1(str(base), data / FILES["stage1"], data, out / "stage1",
                      replace(training.stage1, epochs=size.stage1_epochs, seed=seed, max_length=length),
                      pad="square", log=log)
    mode = ckpt.conv_mode  # the mode the toy's language model was pretrained to chat in
    if not (out / "stage2" / "model.safetensors").is_file():
        log(f"stage 2: visual instruction tuning (projector + language model, {mode})")
        stages.stage2(str(base), data / FILES["stage2"], data, out / "stage2",
                      replace(training.stage2, epochs=size.stage2_epochs, seed=seed, max_length=length),
                      projector=out / "stage1" / "mm_projector.safetensors", pad="pad", conv_mode=mode, log=log)
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
