"""LLaVA's JSON conversation files -> tokenized, label-masked training examples.

The file format is LLaVA's own (``blip_laion_cc_sbu_558k.json``,
``llava_v1_5_mix665k.json``): records with ``id``, optional ``image`` and
``conversations`` of ``human``/``gpt`` turns, ``<image>`` in the turn that
shows the image, text-only records allowed; LLaVA-NeXT's ``image`` lists
(several pictures) and ``video`` (a file whose frames LLaVA-NeXT's training
samples: about one a second, at most ``frames_upbound``, with ``<image>`` where
the video goes), for families that take them.

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
from functools import partial
from pathlib import Path

from llava_edge.errors import UserError
from llava_edge.families import DEFAULT, FAMILIES, Family, ImagePath
from llava_edge.families.llava15 import OneTile
from llava_edge.preprocess import ImageSpec
from llava_edge.templates import IMAGE_PLACEHOLDER, Template, Turn, expand_images, turns_from_llava
from llava_edge.tokenizer import Tokenizer
from llava_edge.video import Video, llava_next_training_frames, read_frames

from .labels import IGNORE_INDEX, Labeled, label


@dataclass
class Record:
    id: str
    turns: list[Turn]
    images: tuple[Path, ...] = ()  # every picture, in the order of the ``<image>`` markers
    video: bool = False  # the one picture is a video file

    @property
    def image(self) -> Path | None:
        """The record's picture, the first of several."""
        return self.images[0] if self.images else None


def _placed(rid: str, turns: list[Turn], n: int, origin: str) -> list[Turn]:
    """``preprocess_multimodal``: where a record's ``n`` pictures go in its turns, by the code of the mode's
    ``origin``.

    LLaVA's (1.2.2; xtuner's ``llava_map_fn`` does the same): the turn that holds ``<image>`` gets it first
    (``<image>\n`` + its text stripped), and takes one picture a record. LLaVA-NeXT's: a turn with a lone
    ``<image>`` that does not open it gets it first likewise; any other turn is left as written, its pictures
    where its markers stand (several pictures, or one that already opens the turn: ``<image>`` directly followed
    by text stays so).
    """
    counts = [t.text.count(IMAGE_PLACEHOLDER) for t in turns]
    if sum(counts) != n:
        raise UserError(f"record {rid} names {n} picture(s) but its turns hold {sum(counts)} {IMAGE_PLACEHOLDER}")
    if any(c and t.role != "user" for c, t in zip(counts, turns)):
        raise UserError(f"record {rid}: {IMAGE_PLACEHOLDER} is in an answer, not in a question")
    if origin != "llava-next" and n > 1:
        raise UserError(f"record {rid} has {n} pictures: LLaVA's and xtuner's modes take one a record; train "
                        "with a mode of LLaVA-NeXT's (qwen_1_5, qwen_2, llava_llama_3)")
    out = []
    for c, t in zip(counts, turns):
        if c == 1 and (origin != "llava-next" or not t.text.startswith(IMAGE_PLACEHOLDER)):
            t = Turn("user", t.text.replace(IMAGE_PLACEHOLDER, "").strip(), image=True)
        elif c:
            t = Turn("user", t.text, image=c, inline=True)
        out.append(t)
    return out


def load_records(data: str | Path, image_folder: str | Path | None, skip_bad: bool = False,
                 origin: str = "llava", video_folder: str | Path | None = None) -> tuple[list[Record], int]:
    """Validated records and the number skipped (only with ``skip_bad``; otherwise the first problem raises).
    ``origin``: whose ``preprocess_multimodal`` places the pictures (``Template.origin`` of the training mode);
    ``video_folder``: where video records' files are (LLaVA-NeXT's ``--video_folder``; default ``image_folder``)."""
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
    video_root = Path(video_folder).resolve() if video_folder else root
    records, skipped = [], 0
    for n, r in enumerate(raw):
        try:
            records.append(_record(r, n, root, origin, video_root))
        except UserError:
            if not skip_bad:
                raise
            skipped += 1
    if not records:
        raise UserError(f"{data}: every record was skipped")
    return records, skipped


def _record(r: dict, n: int, root: Path | None, origin: str = "llava", video_root: Path | None = None) -> Record:
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
    if r.get("video") is not None:
        if r.get("image") not in (None, []):
            raise UserError(f"record {rid} names both an image and a video: LLaVA-NeXT's records take one or the "
                            "other")
        if video_root is None:
            raise UserError(f"record {rid} has a video but no --video-folder or --image-folder was given")
        video = _image_file(rid, video_root, r["video"], "video")
        turns = [Turn(t.role, t.text, t.image, videos=int(bool(t.image)), inline=t.inline)
                 for t in _placed(rid, turns, 1, origin)]
        return Record(rid, turns, (video,), video=True)
    names = r.get("image")
    if names is None or names == []:
        if any(IMAGE_PLACEHOLDER in t.text for t in turns):
            raise UserError(f"record {rid}: text has {IMAGE_PLACEHOLDER} but the record names no image")
        return Record(rid, turns)
    if root is None:
        raise UserError(f"record {rid} has an image but no --image-folder was given")
    names = names if isinstance(names, list) else [names]  # LLaVA-NeXT's several pictures: a list of paths
    images = tuple(_image_file(rid, root, name) for name in names)
    return Record(rid, _placed(rid, turns, len(images), origin), images)


def _image_file(rid: str, root: Path, name, what: str = "image") -> Path:
    if not isinstance(name, str) or not name:
        raise UserError(f"record {rid}: {what} {name!r} is not a file name")
    image = (root / name).resolve()
    if root not in image.parents:
        raise UserError(f"record {rid}: {what} path {name!r} escapes --{what}-folder")
    if not image.is_file():
        raise UserError(f"record {rid}: {what} not found: {image}")
    return image


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


def expand(rid: str, lab: Labeled, image_token_id: int, positions: list[int], max_length: int,
           tokens: list[int] | None = None) -> tuple[list[int], list[int]]:
    """Ids and labels with each image token, in order, as that picture's ``positions`` positions the loss ignores
    (none: no picture), cut at ``max_length``; ``tokens``: the id each picture's positions hold (the model's video
    token for a video; by default the image token)."""
    ids, labels = lab.input_ids, lab.labels
    if positions:
        where = [i for i, t in enumerate(ids) if t == image_token_id]
        if len(where) != len(positions):
            raise UserError(f"record {rid}: {len(where)} image tokens for {len(positions)} picture(s)")
        if where[-1] - (len(positions) - 1) + sum(positions) > max_length:
            what = f"the image ({positions[0]} positions)" if len(positions) == 1 else \
                f"its {len(positions)} pictures ({sum(positions)} positions)"
            raise UserError(f"record {rid}: {what} does not fit in max length {max_length} (--max-length)")
        tokens = tokens or [image_token_id] * len(positions)
        ids = expand_images(ids, image_token_id, [[t] * p for t, p in zip(tokens, positions)])
        out, at = [], 0
        for i, p in zip(where, positions):
            out += labels[at:i] + [IGNORE_INDEX] * p
            at = i + 1
        labels = out + labels[at:]
    return ids[:max_length], labels[:max_length]


def _check_answer(rid: str, labels: list[int], mismatch: bool, max_length: int) -> None:
    if not mismatch and all(x == IGNORE_INDEX for x in labels):
        raise UserError(f"record {rid}: no answer token fits in max length {max_length}")


def encode(record: Record, template: Template, tokenizer: Tokenizer, image_token_id: int, n_image_tokens: int,
           max_length: int) -> Encoded:
    """LLaVA's ids and labels, with the image expanded to ``n_image_tokens`` positions the loss ignores."""
    has_image = record.image is not None
    lab = _label(record, template, tokenizer, image_token_id, max_length)
    ids, labels = expand(record.id, lab, image_token_id, [n_image_tokens] * len(record.images), max_length)
    _check_answer(record.id, labels, lab.mismatch, max_length)
    return Encoded(ids, labels, has_image, lab.mismatch)


class LlavaDataset:
    """Map-style dataset: labeled upfront (cheap), pictures read per item and only then expanded.

    ``images``: the checkpoint family's image path (``Family.image_path``), or an ``ImageSpec`` for one tile with
    ``positions`` positions each (LLaVA-1.5's; a reduced-token run's). ``positions``: the most positions a
    record's only picture can take; each of a record's several pictures takes the family's count for one among
    several (``ImagePath.several_positions``; LLaVA-OneVision: one padded tile and a newline), and only a family
    trained with several takes them. Every record is checked upfront as if its pictures took that many (they fit,
    an answer token is left), so a run never stops on a record halfway; an item then takes its own pictures'
    counts. The items keep one image token a picture: a tiled picture's count is known only once it is read, and
    unexpanded ids hold a few hundred entries a record where expanded ones would hold thousands.
    """

    def __init__(self, records: list[Record], template: Template, tokenizer, image_token_id: int, positions: int,
                 images: ImagePath | ImageSpec, max_length: int, family: Family | None = None,
                 video_token_id: int | None = None, frames_upbound: int = 32, video_fps: float = 1.0):
        self.records = records
        self.images = OneTile(images, positions) if isinstance(images, ImageSpec) else images
        self.family = family or FAMILIES[DEFAULT]
        self.image_token_id, self.max_length = image_token_id, max_length
        self.video_token_id, self.frames_upbound, self.video_fps = video_token_id, frames_upbound, video_fps
        for r in records:
            if len(r.images) > 1 and not self.images.several:
                raise UserError(f"record {r.id} has {len(r.images)} pictures: {self.family.title} checkpoints like "
                                "this one were trained with one picture a conversation")
            if r.video and video_token_id is None:  # the checkpoint's family takes no video (Family.takes_video)
                raise UserError(f"record {r.id} holds a video: {self.family.title} checkpoints like this one take "
                                "no video (LLaVA-OneVision does; --skip-bad leaves it out)")
        self.items = [_label(r, template, tokenizer, image_token_id, max_length) for r in records]
        self._lengths = []
        for r, lab in zip(records, self.items):
            most = [positions] if len(r.images) == 1 else [self.images.several_positions] * len(r.images)
            if r.video:
                most = [self.images.video_positions(frames_upbound)]
            ids, labels = expand(r.id, lab, image_token_id, most if r.images else [], max_length)
            _check_answer(r.id, labels, lab.mismatch, max_length)
            self._lengths.append(len(ids) if r.images else -len(ids))
        self.mismatched = [r.id for r, e in zip(records, self.items) if e.mismatch]

    def __len__(self) -> int:
        return len(self.items)

    def lengths(self) -> list[int]:
        """Signed lengths as LLaVA's modality grouping wants them: negative for text-only (a picture counted at
        the most positions it can take)."""
        return self._lengths

    def __getitem__(self, i: int) -> dict:
        """Ids and labels with every picture expanded, and ``images``: the prepared pictures in order (several:
        each one as the family takes one among several)."""
        lab, r = self.items[i], self.records[i]
        alone = len(r.images) == 1
        try:
            if r.video:
                pick = partial(llava_next_training_frames, video_fps=self.video_fps, upbound=self.frames_upbound)
                prepared = [self.images.prepare_video(read_frames(Video(r.images[0]), pick), str(r.images[0]))]
            else:
                prepared = [self.images.prepare(path, alone=alone) for path in r.images]
        except UserError as e:
            raise UserError(f"record {r.id}: {e}") from None
        tokens = [self.video_token_id if p.video else self.image_token_id for p in prepared]
        ids, labels = expand(r.id, lab, self.image_token_id, [p.positions for p in prepared], self.max_length,
                             tokens)
        return {"input_ids": ids, "labels": labels, "images": prepared}


def collate(batch: list[dict], pad_id: int, family: Family | None = None) -> dict:
    """Right-padded ids, labels and mask, and the family's model inputs for the batch's pictures, item by item
    (the family is told how many each item has)."""
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
    pictures = [p for b in batch for p in b["images"]]
    if pictures:
        out.update((family or FAMILIES[DEFAULT]).hf_inputs(pictures, [len(b["images"]) for b in batch
                                                                      if b["images"]]))
    return out
