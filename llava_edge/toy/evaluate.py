"""Score a model on the toy's held-out questions (exact match, LLaVA's VQA normalisation).

The answer is compared after stripping whitespace and a final period and
lower-casing, as LLaVA's short-answer evaluation does.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path


from ..drift.formats import normalize_short as normalize  # LLaVA's short-answer normalisation


def question_of(record: dict) -> str:
    return record["conversations"][0]["value"].replace("<image>", "").strip()


def score(records: list[dict], answers: list[str]) -> dict:
    per = defaultdict(lambda: [0, 0])
    for r, a in zip(records, answers):
        ok = normalize(a) == normalize(r["answer"])
        per[r.get("category", "all")][0] += ok
        per[r.get("category", "all")][1] += 1
    right = sum(v[0] for v in per.values())
    return {
        "accuracy": right / max(1, len(records)),
        "n": len(records),
        "per_category": {k: v[0] / v[1] for k, v in sorted(per.items())},
    }


def evaluate_hf(model_dir: str | Path, eval_file: str | Path, max_new_tokens: int = 12) -> dict:
    """Greedy answers of the Hugging Face model, prompted exactly as the runtime (and LLaVA's evaluation) prompts,
    each picture prepared by the checkpoint's family as export and the runtime prepare it."""
    import torch

    from ..checkpoint import load_hf_model, open_checkpoint
    from ..templates import expand_image, get_template
    from ..tokenizer import Tokenizer

    ckpt = open_checkpoint(model_dir)
    model = load_hf_model(ckpt).to("cuda" if torch.cuda.is_available() else "cpu")
    tok = Tokenizer(ckpt.path)
    template = get_template(ckpt.conv_mode, ckpt.chat_template())
    family, images = ckpt.family, ckpt.family.checkpoint_image_path(ckpt)  # one tile, or anyres tiles
    eval_file = Path(eval_file)
    records = json.loads(eval_file.read_text())
    img_id = ckpt.image_token_id
    answers = []
    for r in records:
        picture = images.prepare(eval_file.parent / r["image"])
        ids = expand_image(tok.encode_prompt(template.prompt(question_of(r)), img_id), img_id,
                           [img_id] * picture.positions)
        with torch.no_grad():
            out = model.generate(**family.hf_generation_inputs(model, ids, picture, images),
                                 max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tok.eos_id,
                                 pad_token_id=tok.pad_id)
        answers.append(tok.decode(out[0, len(ids):].tolist()))
    result = score(records, answers)
    result["answers"] = [{"id": r["id"], "gold": r["answer"], "answer": a} for r, a in zip(records, answers)]
    return result
