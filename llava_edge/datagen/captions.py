"""``llava-edge data captions``: an image-caption dataset as LLaVA's stage-1 data.

LLaVA pretrains its projector on image-caption pairs, each given as a one-turn
conversation: a brief-description instruction (drawn from the list below, the one in
LLaVA's paper) with ``<image>`` before or after it, and the caption as the answer
(``blip_laion_cc_sbu_558k.json``). Under the ``plain`` mode stage 1 trains with, only the
image and the caption reach the model; the instruction matters to the other modes.

Inputs: COCO's ``captions_*.json`` (one record per caption), a JSON list or a JSONL file
of ``{"image": ..., "caption": ...}``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from .. import atomic
from ..errors import UserError
from .generate import IMAGE

# the brief-description instructions listed in LLaVA's paper ("the list of instructions for brief image
# description"); stage-1 records draw one at random
BRIEF = (
    "Describe the image concisely.",
    "Provide a brief description of the given image.",
    "Offer a succinct explanation of the picture presented.",
    "Summarize the visual content of the image.",
    "Give a short and clear explanation of the subsequent image.",
    "Share a concise interpretation of the image provided.",
    "Present a compact description of the photo's key features.",
    "Relay a brief, clear account of the picture shown.",
    "Render a clear and concise summary of the photo.",
    "Write a terse but informative summary of the picture.",
    "Create a compact narrative representing the image presented.",
)


def read_pairs(path: Path) -> list[tuple[str, str, str]]:
    """(id, image, caption) from COCO captions, a JSON list or JSONL of {image, caption}."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"input not found: {path}") from None
    try:
        doc = json.loads(text)
        rows = None
    except ValueError:
        doc, rows = None, []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    raise UserError(f"{path} line {n} is not JSON") from None
    out = []
    if isinstance(doc, dict) and "annotations" in doc and "images" in doc:  # COCO
        names = {im.get("id"): im.get("file_name") for im in doc["images"] if isinstance(im, dict)}
        for a in doc["annotations"]:
            if isinstance(a, dict) and a.get("image_id") in names and isinstance(a.get("caption"), str):
                out.append((str(a.get("id", len(out))), str(names[a["image_id"]]), a["caption"].strip()))
        return out
    if isinstance(doc, dict):  # a JSONL file of one record parses as one JSON object
        doc, rows = None, [doc]
    for i, r in enumerate(doc if isinstance(doc, list) else rows or []):
        if not isinstance(r, dict) or not isinstance(r.get("image"), str) or not isinstance(r.get("caption"), str):
            raise UserError(f"{path}: record {i} is not {{\"image\": ..., \"caption\": ...}}")
        out.append((str(r.get("id", i)), r["image"], r["caption"].strip()))
    if not out and not isinstance(doc, list) and not rows:
        raise UserError(f"{path}: neither COCO captions nor a list of {{\"image\", \"caption\"}}")
    return out


def to_stage1(pairs: list[tuple[str, str, str]], seed: int = 0) -> list[dict]:
    out = []
    for rid, image, caption in pairs:
        if not caption:
            continue
        rng = random.Random(f"{seed}:{rid}")
        q = rng.choice(BRIEF)
        human = f"{q}\n{IMAGE}" if rng.random() < 0.5 else f"{IMAGE}\n{q}"
        out.append({"id": rid, "image": image, "conversations": [{"from": "human", "value": human},
                                                                 {"from": "gpt", "value": caption}]})
    return out


def write_stage1(src: Path, out: Path, seed: int = 0) -> int:
    records = to_stage1(read_pairs(src), seed)
    atomic.write_bytes(out, json.dumps(records, indent=1, ensure_ascii=False).encode())
    return len(records)
