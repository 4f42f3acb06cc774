"""Evaluation sets in LLaVA's own formats, and their scoring as LLaVA's evaluation scripts score them.

Three formats, each read into the same :class:`EvalItem` list:

- ``toy``: LLaVA's conversation JSON (a list of records with ``image`` and
  ``conversations``), as the toy's held-out ``eval.json``; the question is the
  first human turn without ``<image>`` (LLaVA's ``model_vqa.py``), the gold
  answer the record's ``answer`` key, else the first gpt turn. Scored by exact
  match after LLaVA's short-answer normalisation (:func:`normalize_short`).
- ``scienceqa``: ``llava_test_CQM-A.json`` (``scripts/convert_sqa_to_llava.py``:
  human turn ``Context: ...\\nQuestion...\\nOptions: (A) x (B) y\\n<image>``,
  gpt turn ``The answer is B.``). Prompted as ``model_vqa_science.py
  --single-pred-prompt`` prompts; the predicted letter is extracted as
  ``eval_science_qa.py`` does. Accuracy is over the items with an image
  (ScienceQA-IMG, LLaVA's "IMG-Accuracy"); ``accuracy_all`` counts every item.
- ``pope``: ``llava_pope_test.jsonl`` lines (``question_id``, ``image``,
  ``text``, ``category``), labels from a ``label`` key on the line or from
  ``coco_pope_<category>.json`` annotation files (beside the question file or
  in its ``coco/`` folder). Answers are read as yes/no as ``eval_pope.py``
  does; accuracy, precision, recall, F1 and the yes ratio per category.

A toy-format record may name several pictures (``"image": ["a.png", "b.png"]``, as LLaVA-Interleave's and
LLaVA-OneVision's data do); they are placed where the conversation mode places a turn's pictures, in order.
:func:`with_pictures` asks each one-picture question again with more pictures, for models trained with
several a conversation.

The scoring functions re-state LLaVA's rules rather than import LLaVA (not a
dependency, and its scripts are command-line programs reading files).
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from llava_edge.errors import UserError
from llava_edge.templates import IMAGE_PLACEHOLDER

FORMATS = ("toy", "scienceqa", "pope")
SQA_OPTIONS = ("A", "B", "C", "D", "E")  # eval_science_qa.py's --options
# what model_vqa_science.py --single-pred-prompt appends to the question
SQA_PROMPT = "Answer with the option's letter from the given choices directly."
SQA_FAILED = "FAILED"


@dataclass(frozen=True)
class EvalItem:
    """One question: what the model is asked, about which image, and the gold answer if known."""

    id: str
    question: str  # the user turn without <image>, exactly as LLaVA's evaluation script prompts it
    image: Path | None  # the picture asked about; with ``others``, the last of the prompt's pictures
    gold: str | None = None  # toy: answer text; scienceqa: option letter; pope: "yes" / "no"
    category: str | None = None
    choices: int = 0  # scienceqa: number of options
    others: tuple[Path, ...] = ()  # pictures the prompt shows before ``image``

    @property
    def pictures(self) -> tuple[Path, ...]:
        """Every picture of the prompt, in the order the prompt shows them."""
        return (*self.others, self.image) if self.image is not None else self.others


@dataclass
class EvalSet:
    format: str
    items: list[EvalItem]
    source: str  # the file read, or what generated the set
    notes: list[str] = field(default_factory=list)

    @property
    def has_gold(self) -> bool:
        return any(i.gold is not None for i in self.items)

    def picture_counts(self) -> dict[str, int]:
        """How many prompts show 0, 1, 2, ... pictures (keys are the counts as text, as JSON keeps them)."""
        counts: dict[int, int] = defaultdict(int)
        for i in self.items:
            counts[len(i.pictures)] += 1
        return {str(n): counts[n] for n in sorted(counts)}

    def score(self, answers: list[str]) -> dict | None:
        """LLaVA-style scores of ``answers`` (one per item); None when the set has no gold answers."""
        if not self.has_gold:
            return None
        if len(answers) != len(self.items):
            raise ValueError(f"{len(answers)} answers for {len(self.items)} items")
        return SCORERS[self.format](self.items, answers)


# ---- reading ----------------------------------------------------------------------------------------------------


def read_eval(path: str | Path, fmt: str = "auto", image_folder: str | Path | None = None,
              limit: int | None = None) -> EvalSet:
    """Read an evaluation file (format ``fmt``, or detected); images relative to ``image_folder`` or its folder."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"evaluation file not found: {path}")
    if fmt != "auto" and fmt not in FORMATS:
        raise UserError(f"unknown evaluation format {fmt!r}; known: auto, {', '.join(FORMATS)}")
    data = _load_json_or_jsonl(path)
    fmt = detect_format(path, data) if fmt == "auto" else fmt
    base = Path(image_folder) if image_folder else path.parent
    if image_folder and not base.is_dir():
        raise UserError(f"--image-folder {base} is not a directory")
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise UserError(f"{path.name}: expected a list of records (JSON array or JSON lines)")
    reader = {"toy": _read_toy, "scienceqa": _read_scienceqa, "pope": _read_pope}[fmt]
    try:
        items, notes = reader(data, base, path)
    except (KeyError, IndexError, TypeError) as e:
        raise UserError(f"{path.name} is not a {fmt} evaluation file (record without {e})") from None
    if limit is not None:
        items = items[:limit]
    if not items:
        raise UserError(f"{path.name}: no questions to evaluate")
    missing = [p for i in items for p in i.pictures if not p.is_file()]
    if missing:
        raise UserError(f"{len(missing)} image(s) of {path.name} not found, first {missing[0]} "
                        "(pass --image-folder)")
    return EvalSet(fmt, items, str(path), notes)


def _load_json_or_jsonl(path: Path):
    text = path.read_text(encoding="utf-8")
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except ValueError as e:
        raise UserError(f"{path.name} is neither JSON nor JSON lines ({e})") from None


def detect_format(path: Path, data) -> str:
    """POPE: JSON lines with ``text``; ScienceQA: conversations whose question lists ``Options:``; else toy."""
    records = data if isinstance(data, list) else []
    first = records[0] if records and isinstance(records[0], dict) else {}
    if "text" in first and "conversations" not in first:
        return "pope"
    if "conversations" in first:
        question = str(first["conversations"][0].get("value", "")) if first["conversations"] else ""
        if re.search(r"(^|\n)Options: ", question) or "CQM" in path.name or "QCM" in path.name:
            return "scienceqa"
        return "toy"
    raise UserError(f"cannot tell the format of {path.name}: pass --format {'|'.join(FORMATS)}")


def _image(record: dict, base: Path) -> Path | None:
    return base / record["image"] if record.get("image") else None


def _pictures(record: dict, base: Path) -> tuple[Path | None, tuple[Path, ...]]:
    """(the last picture, the ones before it) of a record whose ``image`` is a file or a list of files."""
    image = record.get("image")
    if not isinstance(image, list):
        return _image(record, base), ()
    if not all(isinstance(x, str) and x for x in image):
        raise TypeError("an image list of file names")
    paths = tuple(base / x for x in image)
    return (paths[-1], paths[:-1]) if paths else (None, ())


def _human(record: dict) -> str:
    return record["conversations"][0]["value"]


def _gpt(record: dict) -> str | None:
    conv = record["conversations"]
    return conv[1]["value"] if len(conv) > 1 else None


def _read_toy(records: list[dict], base: Path, _path: Path) -> tuple[list[EvalItem], list[str]]:
    items = []
    for r in records:
        question = _human(r).replace(IMAGE_PLACEHOLDER, "").strip()  # model_vqa.py
        gold = r.get("answer", _gpt(r))
        image, others = _pictures(r, base)
        items.append(EvalItem(str(r["id"]), question, image, None if gold is None else str(gold),
                              r.get("category"), others=others))
    return items, []


def sqa_choices(question: str) -> int:
    """How many options a ScienceQA question offers: ``Options: (A) x (B) y`` (or lines ``A. x``)."""
    m = re.search(r"(?:^|\n)Options: (.*)", question)
    letters = re.findall(r"\(([A-E])\)", m.group(1)) if m else re.findall(r"(?m)^([A-E])\. ", question)
    return len(letters)


def _read_scienceqa(records: list[dict], base: Path, _path: Path) -> tuple[list[EvalItem], list[str]]:
    items = []
    for r in records:
        question = _human(r).replace(IMAGE_PLACEHOLDER, "").strip()
        question = f"{question}\n{SQA_PROMPT}"  # model_vqa_science.py --single-pred-prompt
        n = sqa_choices(question)
        gold = r.get("answer")
        if isinstance(gold, int):  # ScienceQA's problems.json holds the option's index
            gold = SQA_OPTIONS[gold]
        elif gold is None and _gpt(r) is not None:
            letter = scienceqa_letter(_gpt(r))
            gold = None if letter == SQA_FAILED else letter
        items.append(EvalItem(str(r["id"]), question, _image(r, base), gold, r.get("category"), n))
    return items, []


def _read_pope(lines: list[dict], base: Path, path: Path) -> tuple[list[EvalItem], list[str]]:
    labels: dict[str, str] = {}
    notes = []
    if any("label" not in q for q in lines):
        for folder in (path.parent, path.parent / "coco"):
            for f in sorted(folder.glob("coco_pope_*.json")):
                for a in _load_json_or_jsonl(f):
                    labels[str(a["question_id"])] = str(a["label"])
                notes.append(f"labels from {f}")
    items = []
    for q in lines:
        label = q.get("label", labels.get(str(q["question_id"])))
        items.append(EvalItem(str(q["question_id"]), q["text"], _image(q, base),
                              None if label is None else str(label).strip().lower(), q.get("category")))
    return items, notes


# ---- several pictures a prompt -------------------------------------------------------------------------------


def parse_picture_counts(text: str) -> tuple[int, ...]:
    """``--pictures``: picture counts, comma-separated (``1,2,3``), each at least 1; sorted, without repeats."""
    try:
        counts = sorted({int(x) for x in text.split(",")})
    except ValueError:
        counts = []
    if not counts or counts[0] < 1:
        raise UserError(f"--pictures takes picture counts of at least 1, comma-separated (e.g. 1,2,3), not {text!r}")
    return tuple(counts)


def with_pictures(eval_set: EvalSet, counts: tuple[int, ...]) -> EvalSet:
    """Each one-picture question asked once per count in ``counts``: as it is for 1; for N > 1 after N - 1 other
    pictures of the set, its own picture last. Questions with no picture or several stay as they are.

    The other pictures are the set's next distinct pictures (in the order the set first shows them, wrapping
    around), so every prompt is reproducible and shows N different pictures. A question asked among other
    pictures may be about any of them, so such prompts carry no gold answer: they are measured against the
    reference (KL, top-1, answers equal to its), not scored.
    """
    def single(i: EvalItem) -> bool:
        return i.image is not None and not i.others

    singles = [i for i in eval_set.items if single(i)]
    distinct = list(dict.fromkeys(i.image for i in singles))
    most = max(counts)
    if most > 1 and len(distinct) < most:
        raise UserError(f"--pictures {most} needs {most} different pictures in the evaluation set; it has "
                        f"{len(distinct)}")
    at = {p: k for k, p in enumerate(distinct)}
    items = [i for i in eval_set.items if 1 in counts or not single(i)]
    for n in (c for c in counts if c > 1):
        for i in singles:
            k = at[i.image]
            others = tuple(distinct[(k + j) % len(distinct)] for j in range(1, n))
            items.append(EvalItem(f"{i.id}+{n - 1}", i.question, i.image, None, i.category, i.choices, others))
    return EvalSet(eval_set.format, items, eval_set.source, list(eval_set.notes))


# ---- scoring ----------------------------------------------------------------------------------------------------


def normalize_short(answer: str) -> str:
    """LLaVA's short-answer normalisation: strip, drop a final period, lower-case."""
    return answer.strip().rstrip(".").strip().lower()


def _accuracy(ok: list[bool], items: list[EvalItem]) -> dict:
    per: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for good, item in zip(ok, items):
        per[item.category or "all"][0] += good
        per[item.category or "all"][1] += 1
    return {"accuracy": sum(ok) / max(1, len(ok)), "n": len(ok),
            "per_category": {k: v[0] / v[1] for k, v in sorted(per.items())}}


def score_toy(items: list[EvalItem], answers: list[str]) -> dict:
    scored = [(i, a) for i, a in zip(items, answers) if i.gold is not None]
    ok = [normalize_short(a) == normalize_short(i.gold) for i, a in scored]
    return _accuracy(ok, [i for i, _ in scored])


def scienceqa_letter(text: str, options: tuple[str, ...] = SQA_OPTIONS) -> str:
    """The option letter in a prediction, extracted as LLaVA's ``eval_science_qa.py`` does, or ``FAILED``.

    In order: the whole answer is a letter; it starts with ``X. ``; it contains
    ``The answer is X.`` or ``The answer is X``. Anything else fails.
    """
    text = text.replace("\n", ". ")
    if text.strip() in options:
        return text.strip()
    if len(text) >= 3 and text[0] in options and text[1:3] == ". ":
        return text[0]
    if "The answer is " in text:
        m = re.search(r"The answer is ([A-E])\.", text) or re.search(r"The answer is ([A-E])", text)
        if m and m.group(1) in options:
            return m.group(1)
    return SQA_FAILED


def score_scienceqa(items: list[EvalItem], answers: list[str]) -> dict:
    """Accuracy on the items with an image (ScienceQA-IMG) and on all; a letter past the item's choices is wrong."""
    scored = [(i, a) for i, a in zip(items, answers) if i.gold is not None]
    ok = []
    for item, answer in scored:
        letter = scienceqa_letter(answer)
        valid = SQA_OPTIONS[: item.choices] if item.choices else SQA_OPTIONS  # get_pred_idx: options[:len(choices)]
        ok.append(letter in valid and letter == item.gold)
    with_image = [(good, i) for good, (i, _) in zip(ok, scored) if i.image is not None]
    if with_image:
        out = _accuracy([g for g, _ in with_image], [i for _, i in with_image])
    else:
        out = _accuracy(ok, [i for i, _ in scored])
    out["accuracy_all"] = sum(ok) / max(1, len(ok))
    out["n_all"] = len(ok)
    out["failed_extractions"] = sum(scienceqa_letter(a) == SQA_FAILED for _, a in scored)
    return out


def pope_yes_no(text: str) -> str:
    """``eval_pope.py``: the first sentence, commas dropped, 'no' if a word is No / no / not, else 'yes'."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def _pope_metrics(pred: list[str], gold: list[str]) -> dict:
    tp = sum(p == "yes" and g == "yes" for p, g in zip(pred, gold))
    fp = sum(p == "yes" and g != "yes" for p, g in zip(pred, gold))
    tn = sum(p == "no" and g != "yes" for p, g in zip(pred, gold))
    fn = sum(p == "no" and g == "yes" for p, g in zip(pred, gold))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / max(1, len(pred)), "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": pred.count("yes") / max(1, len(pred)), "n": len(pred),
            "tp": tp, "fp": fp, "tn": tn, "fn": fn}


def score_pope(items: list[EvalItem], answers: list[str]) -> dict:
    """POPE's metrics over all items and per category (``eval_pope.py`` reports them per category)."""
    scored = [(i, pope_yes_no(a)) for i, a in zip(items, answers) if i.gold is not None]
    out = _pope_metrics([p for _, p in scored], [i.gold for i, _ in scored])
    cats = sorted({i.category or "all" for i, _ in scored})
    out["per_category"] = {
        c: _pope_metrics([p for i, p in scored if (i.category or "all") == c],
                         [i.gold for i, _ in scored if (i.category or "all") == c])
        for c in cats
    }
    return out


SCORERS = {"toy": score_toy, "scienceqa": score_scienceqa, "pope": score_pope}
