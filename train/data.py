"""LLaVA's JSON conversation files -> tokenized, label-masked training examples.

The file format is LLaVA's own (``blip_laion_cc_sbu_558k.json``,
``llava_v1_5_mix665k.json``): records with ``id``, optional ``image`` and
``conversations`` of ``human``/``gpt`` turns, ``<image>`` in the turn that
shows the image, text-only records allowed.

Ids and labels are LLaVA's own (``labels.py`` follows LLaVA's ``preprocess``
for the conversation mode); the image token is then expanded to the positions
the model family gives the picture (LLaVA-1.5: the tower's patches, the same for
every picture; LLaVA-NeXT: its tiles and unpadded grid, by the picture's size),
all ignored by the loss. A record LLaVA would zero ("tokenization mismatch") is
zeroed here too and counted (``LlavaDataset.mismatched``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from llava_edge.errors import UserError
from llava_edge.families import DEFAULT, FAMILIES, Family, ImagePath
from llava_edge.families.llava15 import OneTile
from llava_edge.preprocess import ImageSpec
from llava_edge.templates import IMAGE_PLACEHOLDER, Template, Turn, expand_image, turns_from_llava
from llava_edge.tokenizer import Tokenizer

from .labels import IGNORE_INDEX, Labeled, label


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


def _label(record: Record, template: Template, tokenizer: Tokenizer, image_token_id: int,
           max_length: int) -> Labeled:
    try:
        return label(record.turns, template, tokenizer, image_token_id, record.image is not None, max_length)
    except ValueError as e:
        raise UserError(f"record {record.id}: {e}") from None


def expand(rid: str, lab: Labeled, image_token_id: int, positions: int | None,
           max_length: int) -> tuple[list[int], list[int]]:
    """Ids and labels with the image token as ``positions`` positions the loss ignores (None: no image), cut at
    ``max_length``."""
    ids, labels = lab.input_ids, lab.labels
    if positions is not None:
        i = ids.index(image_token_id)
        if i + positions > max_length:
            raise UserError(f"record {rid}: the image ({positions} positions) does not fit in max length "
                            f"{max_length} (--max-length)")
        ids = expand_image(ids, image_token_id, [image_token_id] * positions)
        labels = labels[:i] + [IGNORE_INDEX] * positions + labels[i + 1 :]
    return ids[:max_length], labels[:max_length]


def _check_answer(rid: str, labels: list[int], mismatch: bool, max_length: int) -> None:
    if not mismatch and all(x == IGNORE_INDEX for x in labels):
        raise UserError(f"record {rid}: no answer token fits in max length {max_length}")


def encode(record: Record, template: Template, tokenizer: Tokenizer, image_token_id: int, n_image_tokens: int,
           max_length: int) -> Encoded:
    """LLaVA's ids and labels, with the image expanded to ``n_image_tokens`` positions the loss ignores."""
    has_image = record.image is not None
    lab = _label(record, template, tokenizer, image_token_id, max_length)
    ids, labels = expand(record.id, lab, image_token_id, n_image_tokens if has_image else None, max_length)
    _check_answer(record.id, labels, lab.mismatch, max_length)
    return Encoded(ids, labels, has_image, lab.mismatch)


class LlavaDataset:
    """Map-style dataset: labeled upfront (cheap), pictures read per item and only then expanded.

    ``images``: the checkpoint family's image path (``Family.image_path``), or an ``ImageSpec`` for one tile with
    ``positions`` positions each (LLaVA-1.5's; a reduced-token run's). ``positions``: the most positions one
    picture can take. Every record is checked upfront as if its picture took that many (it fits, an answer token
    is left), so a run never stops on a record halfway; an item then takes its own picture's count. The items
    keep one image token each: a LLaVA-NeXT picture's count is known only once it is read, and unexpanded ids
    hold a few hundred entries a record where expanded ones would hold thousands.
    """

    def __init__(self, records: list[Record], template: Template, tokenizer, image_token_id: int, positions: int,
                 images: ImagePath | ImageSpec, max_length: int, family: Family | None = None):
        self.records = records
        self.images = OneTile(images, positions) if isinstance(images, ImageSpec) else images
        self.family = family or FAMILIES[DEFAULT]
        self.image_token_id, self.max_length = image_token_id, max_length
        self.items = [_label(r, template, tokenizer, image_token_id, max_length) for r in records]
        self._lengths = []
        for r, lab in zip(records, self.items):
            ids, labels = expand(r.id, lab, image_token_id, positions if r.image is not None else None, max_length)
            _check_answer(r.id, labels, lab.mismatch, max_length)
            self._lengths.append(len(ids) if r.image is not None else -len(ids))
        self.mismatched = [r.id for r, e in zip(records, self.items) if e.mismatch]

    def __len__(self) -> int:
        return len(self.items)

    def lengths(self) -> list[int]:
        """Signed lengths as LLaVA's modality grouping wants them: negative for text-only (a picture counted at
        the most positions it can take)."""
        return self._lengths

    def __getitem__(self, i: int) -> dict:
        lab, r = self.items[i], self.records[i]
        prepared = None
        if r.image is not None:
            try:
                prepared = self.images.prepare(r.image)
            except UserError as e:
                raise UserError(f"record {r.id}: {e}") from None
        ids, labels = expand(r.id, lab, self.image_token_id, prepared.positions if prepared else None,
                             self.max_length)
        return {"input_ids": ids, "labels": labels, "image": prepared}


def collate(batch: list[dict], pad_id: int, family: Family | None = None) -> dict:
    """Right-padded ids, labels and mask, and the family's model inputs for the batch's pictures (items without
    an ``image`` have none)."""
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
    pictures = [b["image"] for b in batch if b.get("image") is not None]
    if pictures:
        out.update((family or FAMILIES[DEFAULT]).hf_inputs(pictures))
    return out
