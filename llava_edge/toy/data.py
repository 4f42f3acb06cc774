"""Toy datasets in LLaVA's own JSON conversation format.

Like LLaVA, which turned COCO captions and boxes into instructions with GPT-4,
the instructions here are generated from ground truth (the scene), in the
paper's three categories: multi-turn conversation, detailed description and
complex reasoning; plus, as in LLaVA-1.5's mix, short-answer VQA questions
packed several to an image. Stage 1 gets brief captions; the held-out evaluation file
asks short questions (LLaVA-1.5's "single word or phrase" prompt) whose gold
answers are scored exactly.

The detail world (``detail_world=True``, opt-in) draws the objects with a fill pattern
(``scenes.random_detail_scene``) at ``DETAIL_IMAGE_SIZE`` and adds one question
kind, ``pattern``, whose answer only a view at the picture's own pixels shows.
Its captions and descriptions name the pattern too. Without it the data are the
default world's, byte for byte.

Two pictures (``several=True``, opt-in, for model families trained with several
pictures in a conversation): one more kind, ``more``, "Which picture has more
shapes?" over two scenes with different counts, answered "The first picture." or
"The second picture."; its records name both pictures as LLaVA-NeXT's multi-image
data does (``"image": [a, b]``, one ``<image>`` per picture in the human turn).
Without it the data are the one-picture world's, byte for byte.
"""

from __future__ import annotations

import random
from pathlib import Path

from .. import atomic
from ..scenes import CELLS, COLORS, NUMBER_WORDS, SHAPES, Scene, random_detail_scene, random_scene, render

SHORT = "Answer the question using a single word or phrase."
CAPTION_PROMPTS = (
    "Describe the image briefly.",
    "Give a short caption for the image.",
    "Summarize the picture in one sentence.",
    "What does the image show?",
)
DETAIL_PROMPTS = (
    "Describe the image in detail.",
    "Explain everything you see in the picture.",
    "Give a detailed description of the scene.",
)
# LLaVA's three instruction categories, plus LLaVA-1.5's short-answer VQA (the bulk of its 665k mix)
CATEGORIES = ("conversation", "detail", "reasoning", "vqa")
CATEGORY_WEIGHTS = (0.2, 0.2, 0.2, 0.4)
VQA_PER_IMAGE = (3, 6)  # short questions packed into one VQA record
FILES = {"stage1": "stage1_captions.json", "stage2": "stage2_instruct.json", "eval": "eval.json"}
# The detail world's pictures: LLaVA-NeXT's 2x2 grid of the toy's 112 px tiles holds them at their own pixels (no
# resize, so a one-pixel pattern reaches the tower), while LLaVA-1.5's one tile and NeXT's base tile shrink them
# about two times, below the pattern's lines.
DETAIL_IMAGE_SIZE = 224


def plural(word: str, n: int) -> str:
    return word if n == 1 else word + "s"


def join_phrases(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _what(scene: Scene) -> str:
    """"a large red circle" / "three large red circles"."""
    o, n = scene.objects[0], len(scene.objects)
    return o.phrase() if n == 1 else f"{NUMBER_WORDS[n]} {o.size} {o.look()} {plural(o.shape, n)}"


def _where(scene: Scene) -> str:
    return join_phrases([f"the {o.cell}" for o in scene.objects])


def caption(scene: Scene) -> str:
    return f"{_what(scene)} at {_where(scene)}."


def detail(scene: Scene) -> str:
    n = len(scene.objects)
    lines = [f"The image shows {_what(scene)} on a light background.",
             f"{'It is' if n == 1 else 'They are'} at {_where(scene)}."]
    empty = [c for c in CELLS if scene.at(c) is None]
    if empty:
        lines.append(f"The {join_phrases(empty)} {'is' if len(empty) == 1 else 'are'} empty.")
    return " ".join(lines)


KINDS = ("shape", "color", "size", "count", "where", "exists")
DETAIL_KIND = "pattern"  # asked of the detail world's scenes only
MORE_KIND = "more"  # two pictures: which one holds more shapes
MORE_QUESTION = "Which picture has more shapes?"
MORE_ANSWERS = ("The first picture.", "The second picture.")
# the share of held-out questions and stage-2 records that show two pictures (``several``): the held-out set asks
# the kind about as often as each one-picture kind
MORE_SHARE = 1 / 7


# How often each kind is asked in the stage-2 mix (the held-out set asks them evenly).
# "Is there a blue square?" is asked more: the answer needs the question's own words
# compared with the image, which a small language model learns last (docs/TRAINING.md).
TRAIN_KIND_WEIGHTS = {"shape": 1, "color": 1, "size": 1, "count": 1, "where": 1, "exists": 3, DETAIL_KIND: 1}


def short_qa(scene: Scene, rng: random.Random, weights: dict[str, float] | None = None) -> tuple[str, str, str]:
    """One question with a one-word (or one-phrase) gold answer: (kind, question, answer)."""
    o, n = scene.objects[0], len(scene.objects)
    kinds = KINDS if n == 1 else KINDS[:4] + KINDS[5:]  # "where" needs a single object
    if scene.pattern:
        kinds += (DETAIL_KIND,)
    kind = rng.choice(kinds) if weights is None else rng.choices(kinds, [weights[k] for k in kinds])[0]
    it = "the shape" if n == 1 else "the shapes"
    if kind == "shape":
        return kind, "What shape is in the image?", o.shape
    if kind == "color":
        return kind, f"What color {'is' if n == 1 else 'are'} {it}?", o.color
    if kind == "size":
        return kind, f"{'Is' if n == 1 else 'Are'} {it} large or small?", o.size
    if kind == "count":
        return kind, "How many shapes are there?", str(n)
    if kind == "where":
        return kind, "Where is the shape?", o.cell
    if kind == DETAIL_KIND:
        return kind, f"What pattern {'does' if n == 1 else 'do'} {it} have?", o.pattern
    shape, color = (o.shape, o.color) if rng.random() < 0.5 else (rng.choice(SHAPES), rng.choice(list(COLORS)))
    return kind, f"Is there a {color} {shape}?", "Yes" if scene.count(shape, color) else "No"


def long_answer(scene: Scene, kind: str, question: str, answer: str) -> str:
    """The same fact as a full sentence, for the conversation category."""
    n = len(scene.objects)
    if kind == "count":
        return f"There {'is' if n == 1 else 'are'} {NUMBER_WORDS[n]} {plural('shape', n)} in the image."
    if kind == "exists":
        what = " ".join(question.rstrip("?").split()[3:])
        return f"Yes, there is a {what} in the image." if answer == "Yes" else f"No, there is no {what}."
    if kind == "where":
        return f"It is at the {answer}."
    if kind == "shape":
        return f"The image shows {_what(scene)}."
    return f"{'It is' if n == 1 else 'They are'} {answer}."


def reasoning(scene: Scene, rng: random.Random) -> tuple[str, str]:
    a, b = rng.sample(SHAPES, 2)
    na, nb = scene.count(a), scene.count(b)
    q = f"Are there more {a}s than {b}s?"
    verdict = "Yes" if na > nb else "No"
    relation = "more" if na > nb else ("as many" if na == nb else "fewer")
    than = "as" if na == nb else "than"
    return q, (
        f"{verdict}. There {'is' if na == 1 else 'are'} {NUMBER_WORDS[na]} {plural(a, na)} and "
        f"{NUMBER_WORDS[nb]} {plural(b, nb)}, so there are {relation} {a}s {than} {b}s."
    )


def record(rid: str, image: str | None, turns: list[tuple[str, str]], image_first: bool = True) -> dict:
    conv = []
    for i, (q, a) in enumerate(turns):
        if i == 0 and image is not None:
            q = f"<image>\n{q}" if image_first else f"{q}\n<image>"
        conv += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    out = {"id": rid}
    if image is not None:
        out["image"] = image
    out["conversations"] = conv
    return out


def two_scenes(new_scene, rng: random.Random) -> tuple[Scene, Scene]:
    """Two scenes whose shape counts differ (the question never has a tie), first or second the larger one
    with equal chance."""
    a = new_scene(rng)
    b = new_scene(rng)
    while len(b.objects) == len(a.objects):
        b = new_scene(rng)
    return a, b


def more_answer(a: Scene, b: Scene) -> str:
    return MORE_ANSWERS[0] if len(a.objects) > len(b.objects) else MORE_ANSWERS[1]


def two_picture_record(rid: str, names: list[str], question: str, answer: str) -> dict:
    """One question about two pictures, in LLaVA-NeXT's multi-image layout: ``image`` lists them and the human
    turn opens with one ``<image>`` line per picture."""
    markers = "".join("<image>\n" for _ in names)
    return {"id": rid, "image": list(names), "conversations": [{"from": "human", "value": markers + question},
                                                               {"from": "gpt", "value": answer}]}


def _two_pictures(split: str, i: int, out: Path, rng: random.Random, new_scene, image_size: int) -> dict:
    a, b = two_scenes(new_scene, rng)
    names = [f"images/{split}_{i:05d}_{k}.png" for k in "ab"]
    for scene, name in zip((a, b), names):
        render(scene, image_size, rng).save(out / name)
    answer = more_answer(a, b)
    rec = two_picture_record(f"{split}_{i:05d}", names, MORE_QUESTION, answer)
    if split == "eval":
        rec.update(category=MORE_KIND, answer=answer, scenes=[a.to_dict(), b.to_dict()])
    else:
        rec["category"] = MORE_KIND
    return rec


TEXT_ONLY = (
    ("What shapes can appear in these pictures?", "Circles, squares and triangles."),
    ("Which colors do the shapes have?", "Red, green, blue or yellow."),
    ("How many places can hold a shape?", "Four: the top left, top right, bottom left and bottom right."),
)


def make_split(split: str, n: int, out: Path, seed: int, image_size: int, detail_world: bool = False,
               several: bool = False) -> list[dict]:
    rng = random.Random(f"llava-edge-toy-{seed}-{split}")
    new_scene = random_detail_scene if detail_world else random_scene
    records = []
    for i in range(n):
        # the draw happens only with ``several``: without it the random stream is the one-picture world's
        if several and split != "stage1" and rng.random() < MORE_SHARE:
            records.append(_two_pictures(split, i, out, rng, new_scene, image_size))
            continue
        scene = new_scene(rng)
        name = f"images/{split}_{i:05d}.png"
        render(scene, image_size, rng).save(out / name)
        rid = f"{split}_{i:05d}"
        if split == "stage1":
            records.append(record(rid, name, [(rng.choice(CAPTION_PROMPTS), caption(scene))], rng.random() < 0.5))
        elif split == "eval":
            kind, q, a = short_qa(scene, rng)
            rec = record(rid, name, [(f"{q}\n{SHORT}", a)])
            rec.update(category=kind, answer=a, scene=scene.to_dict())
            records.append(rec)
        else:
            category = rng.choices(CATEGORIES, weights=CATEGORY_WEIGHTS)[0]
            if category == "detail":
                turns = [(rng.choice(DETAIL_PROMPTS), detail(scene))]
            elif category == "reasoning":
                turns = [reasoning(scene, rng)]
            elif category == "vqa":  # LLaVA-1.5 packs an image's short VQA questions into one conversation
                turns = [(f"{q}\n{SHORT}", a) for _, q, a in (short_qa(scene, rng, TRAIN_KIND_WEIGHTS) for _ in range(rng.randint(*VQA_PER_IMAGE)))]
            else:
                turns = []
                for _ in range(rng.randint(1, 3)):
                    kind, q, a = short_qa(scene, rng, TRAIN_KIND_WEIGHTS)
                    turns.append((q, long_answer(scene, kind, q, a)))
            rec = record(rid, name, turns)
            rec["category"] = category
            records.append(rec)
            if rng.random() < 0.02:
                records.append(record(f"text_{i:05d}", None, [rng.choice(TEXT_ONLY)]))
    return records


def write_dataset(out: str | Path, seed: int = 0, n_stage1: int = 2000, n_stage2: int = 2000,
                  n_eval: int = 200, image_size: int = 128, detail_world: bool = False,
                  several: bool = False) -> dict[str, Path]:
    """Write images and the three JSON files under ``out``; returns the JSON paths. ``detail_world``: the detail world
    (give it ``DETAIL_IMAGE_SIZE``); ``several``: the two-picture kind too (for families trained with several
    pictures a conversation)."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, n in (("stage1", n_stage1), ("stage2", n_stage2), ("eval", n_eval)):
        records = make_split(split, n, out, seed, image_size, detail_world, several)
        paths[split] = out / FILES[split]
        atomic.write_json(paths[split], records)
    return paths


def write_eval_questions(folder: str | Path, n: int = 50, seed: int = 0) -> Path:
    """``n`` held-out questions of the toy world (the toy build's eval split for ``seed``) in ``folder``:
    ``eval.json`` in the toy format, images under ``images/``. ``drift``'s questions when none are given."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    records = make_split("eval", n, folder, seed, 128)
    atomic.write_json(folder / "eval.json", records)
    return folder / "eval.json"


if __name__ == "__main__":  # `python -m llava_edge.toy.data EVAL_JSON ID`: the ground truth of a held-out image
    import json
    import sys

    record = next(r for r in json.load(open(sys.argv[1])) if r["id"] == sys.argv[2])
    print(detail(Scene.from_dict(record["scene"])))
