"""LLaVA's JSON conversation files -> tokenized, label-masked training examples.

The file format is LLaVA's own (``blip_laion_cc_sbu_558k.json``,
``llava_v1_5_mix665k.json``): records with ``id``, optional ``image`` and
``conversations`` of ``human``/``gpt`` turns, ``<image>`` in the turn that
shows the image, text-only records allowed.

Ids and labels are LLaVA's own (``labels.py`` follows LLaVA's ``preprocess``
for the conversation mode); the image is then expanded to the vision tower's
number of positions, all ignored by the loss. A record LLaVA would zero
("tokenization mismatch") is zeroed here too and counted
(``LlavaDataset.mismatched``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llava_edge.errors import UserError
from llava_edge.preprocess import ImageSpec, preprocess
from llava_edge.templates import IMAGE_PLACEHOLDER, Template, Turn, expand_image, turns_from_llava
from llava_edge.tokenizer import Tokenizer

from .labels import IGNORE_INDEX, label



@dataclass
class Record:
    id: str
    image: Path | None
    turns: list[Turn]


def _image_first(rid: str, turns: list[Turn]) -> list[Turn]:
    """LLaVA's ``preprocess_multimodal``: the turn that holds ``<image>`` gets it first, its text stripped.

    One image per record, in a user turn; LLaVA's data always has it in the first.
    """
    where = [i for i, t in enumerate(turns) if IMAGE_PLACEHOLDER in t.text]
    if not where:
        raise UserError(f"record {rid} names an image but no turn holds {IMAGE_PLACEHOLDER}")
    if len(where) > 1 or turns[where[0]].text.count(IMAGE_PLACEHOLDER) > 1:
        raise UserError(f"record {rid} holds {IMAGE_PLACEHOLDER} more than once (one image per record)")
    i = where[0]
    if turns[i].role != "user":
        raise UserError(f"record {rid}: {IMAGE_PLACEHOLDER} is in an answer, not in a question")
    text = turns[i].text.replace(IMAGE_PLACEHOLDER, "").strip()
    return [*turns[:i], Turn("user", text, image=True), *turns[i + 1:]]


def load_records(data: str | Path, image_folder: str | Path | None, skip_bad: bool = False) -> tuple[list[Record], int]:
    """Validated records and the number skipped (only with ``skip_bad``; otherwise the first problem raises)."""
    data = Path(data)
    if not data.is_file():
        raise UserError(f"data file not found: {data}")
    try:
        raw = json.loads(data.read_text()) if data.suffix != ".jsonl" else [
            json.loads(line) for line in data.read_text().splitlines() if line.strip()
        ]
    except ValueError as e:
        raise UserError(f"{data} is not valid JSON ({e})") from None
    if not isinstance(raw, list) or not raw:
        raise UserError(f"{data} holds no records")
    root = Path(image_folder).resolve() if image_folder else None
    records, skipped = [], 0
    for n, r in enumerate(raw):
        try:
            records.append(_record(r, n, root))
        except UserError:
            if not skip_bad:
                raise
            skipped += 1
    if not records:
        raise UserError(f"{data}: every record was skipped")
    return records, skipped


def _record(r: dict, n: int, root: Path | None) -> Record:
    rid = str(r.get("id", f"#{n}")) if isinstance(r, dict) else f"#{n}"
    if not isinstance(r, dict) or not isinstance(r.get("conversations"), list):
        raise UserError(f"record {rid}: no 'conversations' list")
    try:
        turns = turns_from_llava(r["conversations"])
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"record {rid}: {e}") from None
    turns = [t for t in turns if t.text is not None]
    if len(turns) % 2:  # a trailing question without an answer teaches nothing
        turns = turns[:-1]
    if not any(t.role == "assistant" for t in turns):
        raise UserError(f"record {rid}: no assistant turn")
    for i, t in enumerate(turns):
        if t.role != ("user" if i % 2 == 0 else "assistant"):
            raise UserError(f"record {rid}: turns do not alternate human/gpt")
    image = None
    if "image" in r and r["image"] is not None:
        if root is None:
            raise UserError(f"record {rid} has an image but no --image-folder was given")
        image = (root / str(r["image"])).resolve()
        if root not in image.parents:
            raise UserError(f"record {rid}: image path {r['image']!r} escapes --image-folder")
        if not image.is_file():
            raise UserError(f"record {rid}: image not found: {image}")
        turns = _image_first(rid, turns)
    elif any(IMAGE_PLACEHOLDER in t.text for t in turns):
        raise UserError(f"record {rid}: text has {IMAGE_PLACEHOLDER} but the record names no image")
    return Record(rid, image, turns)


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    has_image: bool
    mismatch: bool = False  # LLaVA's "tokenization mismatch": labels zeroed as LLaVA zeroes them


def encode(record: Record, template: Template, tokenizer: Tokenizer, image_token_id: int, n_image_tokens: int,
           max_length: int) -> Encoded:
    """LLaVA's ids and labels, with the image expanded to ``n_image_tokens`` positions the loss ignores."""
    has_image = record.image is not None
    try:
        lab = label(record.turns, template, tokenizer, image_token_id, has_image, max_length)
    except ValueError as e:
        raise UserError(f"record {record.id}: {e}") from None
    ids, labels = lab.input_ids, lab.labels
    if has_image:
        i = ids.index(image_token_id)
        ids = expand_image(ids, image_token_id, [image_token_id] * n_image_tokens)
        labels = labels[:i] + [IGNORE_INDEX] * n_image_tokens + labels[i + 1 :]
        if i + n_image_tokens > max_length:
            raise UserError(f"record {record.id}: the image does not fit in max length {max_length}")
    ids, labels = ids[:max_length], labels[:max_length]
    if not lab.mismatch and all(x == IGNORE_INDEX for x in labels):
        raise UserError(f"record {record.id}: no answer token fits in max length {max_length}")
    return Encoded(ids, labels, has_image, lab.mismatch)


class LlavaDataset:
    """Map-style dataset: tokenized upfront (cheap), images read per item."""

    def __init__(self, records: list[Record], template: Template, tokenizer, image_token_id: int,
                 n_image_tokens: int, spec: ImageSpec, max_length: int):
        self.records = records
        self.spec = spec
        self.items = [encode(r, template, tokenizer, image_token_id, n_image_tokens, max_length) for r in records]
        self.mismatched = [r.id for r, e in zip(records, self.items) if e.mismatch]

    def __len__(self) -> int:
        return len(self.items)

    def lengths(self) -> list[int]:
        """Signed lengths as LLaVA's modality grouping wants them: negative for text-only."""
        return [len(e.input_ids) if e.has_image else -len(e.input_ids) for e in self.items]

    def __getitem__(self, i: int) -> dict:
        e, r = self.items[i], self.records[i]
        try:
            pixels = preprocess(r.image, self.spec) if r.image is not None else None
        except UserError as e:
            raise UserError(f"record {r.id}: {e}") from None
        return {"input_ids": e.input_ids, "labels": e.labels, "pixel_values": pixels}


def collate(batch: list[dict], pad_id: int) -> dict:
    import torch

    n = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), n), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for i, b in enumerate(batch):  # right padding, as LLaVA trains
        k = len(b["input_ids"])
        ids[i, :k] = torch.tensor(b["input_ids"])
        labels[i, :k] = torch.tensor(b["labels"])
        mask[i, :k] = 1
    out = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    pixels = [b["pixel_values"] for b in batch if b["pixel_values"] is not None]
    if pixels:
        out["pixel_values"] = torch.from_numpy(np.stack(pixels))
    return out
