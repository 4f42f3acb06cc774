"""Score a model on the toy's held-out questions (exact match, LLaVA's VQA normalisation).

The answer is compared after stripping whitespace and a final period and
lower-casing, as LLaVA's short-answer evaluation does.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path


from ..drift.formats import normalize_short as normalize  # LLaVA's short-answer normalisation
from ..drift.reference import generation_inputs  # transformers' inputs for one picture or several as one sample
from .data import MORE_ANSWERS, MORE_KIND


def question_of(record: dict) -> str:
    return record["conversations"][0]["value"].replace("<image>", "").strip()


def score(records: list[dict], answers: list[str]) -> dict:
    per = defaultdict(lambda: [0, 0])
    for r, a in zip(records, answers):
        ok = normalize(a) == normalize(r["answer"])
        per[r.get("category", "all")][0] += ok
        per[r.get("category", "all")][1] += 1
    right = sum(v[0] for v in per.values())
    out = {
        "accuracy": right / max(1, len(records)),
        "n": len(records),
        "per_category": {k: v[0] / v[1] for k, v in sorted(per.items())},
    }
    if MORE_KIND in per:  # two answers, equally likely: a model that cannot tell the pictures apart scores 50%
        out["two_pictures"] = {"accuracy": per[MORE_KIND][0] / per[MORE_KIND][1], "n": per[MORE_KIND][1],
                               "chance": 1 / len(MORE_ANSWERS)}
    return out


def pictures_of(record: dict) -> list[str]:
    """The record's pictures: one name, or LLaVA-NeXT's list of several."""
    image = record["image"]
    return list(image) if isinstance(image, list) else [image]


def evaluate_hf(model_dir: str | Path, eval_file: str | Path, max_new_tokens: int = 12) -> dict:
    """Greedy answers of the Hugging Face model, prompted exactly as the runtime (and LLaVA's evaluation) prompts,
    each picture prepared by the checkpoint's family as export and the runtime prepare it (one of several pictures
    as the family takes a picture among others)."""
    import torch

    from ..checkpoint import load_hf_model, open_checkpoint
    from ..errors import UserError
    from ..templates import expand_images, get_template
    from ..tokenizer import Tokenizer

    ckpt = open_checkpoint(model_dir)
    model = load_hf_model(ckpt).to("cuda" if torch.cuda.is_available() else "cpu")
    tok = Tokenizer(ckpt.path)
    template = get_template(ckpt.conv_mode, ckpt.chat_template(), tok.settings.special_tokens_map())
    family, images = ckpt.family, ckpt.family.checkpoint_image_path(ckpt)  # one tile, or anyres tiles
    eval_file = Path(eval_file)
    records = json.loads(eval_file.read_text())
    img_id = ckpt.image_token_id
    answers = []
    for r in records:
        names = pictures_of(r)
        if len(names) > 1 and not family.several_images(ckpt):
            raise UserError(f"{eval_file}: record {r['id']} shows {len(names)} pictures, and {family.title} "
                            "checkpoints take one picture a conversation")
        alone = len(names) == 1
        pictures = [images.prepare(eval_file.parent / n, alone=alone) for n in names]
        prompt = tok.encode_prompt(template.prompt(question_of(r), image=len(names)), img_id,
                                   **template.encoding)
        ids = expand_images(prompt, img_id, [[img_id] * p.positions for p in pictures])
        inputs = generation_inputs(model, family, ids, pictures, images)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tok.eos_id,
                                 pad_token_id=tok.pad_id)
        answers.append(tok.decode(out[0, len(ids):].tolist()))
    result = score(records, answers)
    result["answers"] = [{"id": r["id"], "gold": r["answer"], "answer": a} for r, a in zip(records, answers)]
    return result
