"""Stand-ins for the pretrained halves LLaVA starts from, trained on the toy world.

LLaVA begins with a CLIP ViT that already sees and a Vicuna that already
speaks. The toy's tower and language model start random, so before the LLaVA
stages they get a short pretraining of their own:

- vision: every patch token of the layer the model reads (CLIP's -2 for LLaVA-1.5,
  SigLIP's last for OneVision) learns to tell its quadrant and the shape, colour and size of what is there;
- language: the Llama (or Qwen2) learns the toy world's text, and chats in the
  conversation mode stage 2 uses (``vicuna_v1``; ``qwen_1_5`` for a Qwen2 toy)
  that answer questions from a scene description given in the prompt (the stand-in for Vicuna's in-context reading). The text is
  documents of a few lines about one scene, one sentence a line, so the model
  knows that a line ends in a newline: stage 1's caption ends in one, and while
  the toy model could not predict it, that newline was half the stage-1 loss and
  the projector bent itself to it at the cost of colour (docs/TRAINING.md).

Measured limit of the stand-in: in a few hundred steps the toy Llama does not
learn to copy a colour from its context (text lookup stays at chance for colour,
docs/TRAINING.md), so its stage 1 aligns what it can read (places, counts,
sizes) and colour and shape are learned in stage 2.

Both run on freshly rendered scenes / generated text, never on the evaluation split.
In the detail world (``detail=True``) the language model's text is that world's
(patterns named, asked about); the tower is pretrained on the default world's
pictures either way: its one-tile view at pretraining is LLaVA-1.5's crop of a
128 px picture for one toy and a resize for the other, which would show a
one-pixel pattern to one tower only.
"""

from __future__ import annotations

import random

import numpy as np

from ..preprocess import ImageSpec, preprocess
from ..scenes import CELLS, COLORS, SHAPES, SIZES, random_detail_scene, random_scene, render


def _optimizer(params, lr: float, steps: int):
    import torch

    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    return opt, torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)


def _update(opt, sched, loss) -> float:
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
    return loss.item()


def _labels(scene) -> list[tuple[int, int, int]]:
    out = []
    for cell in CELLS:
        o = scene.at(cell)
        out.append((0, 0, 0) if o is None else
                   (1 + SHAPES.index(o.shape), 1 + list(COLORS).index(o.color), 1 + SIZES.index(o.size)))
    return out


def pretrain_vision(model, spec: ImageSpec, steps: int = 300, batch: int = 48, lr: float = 2e-3, seed: int = 0,
                    image_size: int = 128, log=print) -> list[float]:
    """Train ``model.model.vision_tower`` in place; returns the loss per step."""
    import torch
    import torch.nn.functional as F

    tower = model.model.vision_tower
    # the layer and tokens the model reads: CLIP's layer -2 without its class token (LLaVA-1.5), SigLIP's last
    # layer, every token (LLaVA-OneVision)
    layer = model.config.vision_feature_layer
    skip = 1 if model.config.vision_feature_select_strategy == "default" else 0
    dev = next(tower.parameters()).device
    hidden = tower.config.hidden_size
    side = tower.config.image_size // tower.config.patch_size
    half = side // 2
    # Dense targets: every patch token learns where it is and what its quadrant holds,
    # so each image token the language model later sees describes itself.
    n_classes = (len(CELLS), 1 + len(SHAPES), 1 + len(COLORS), 1 + len(SIZES))
    heads = torch.nn.ModuleList([torch.nn.Linear(hidden, n) for n in n_classes]).to(dev)
    # Shapes need a quadrant's tokens together (a 14-pixel patch sees an edge, not a shape):
    # one more head reads each quadrant's tokens concatenated, position by position.
    quad_shape = torch.nn.Linear(hidden * half * half, 1 + len(SHAPES)).to(dev)
    rows, cols = np.divmod(np.arange(side * side), side)
    token_cell = torch.from_numpy((rows >= half) * 2 + (cols >= half)).to(dev)  # CELLS order, per patch token
    params = list(tower.parameters()) + list(heads.parameters()) + list(quad_shape.parameters())
    opt, sched = _optimizer(params, lr, steps)
    rng = random.Random(f"vision-pretrain-{seed}")
    tower.train()
    losses = []
    for step in range(steps):
        scenes = [random_scene(rng) for _ in range(batch)]
        px = torch.from_numpy(np.stack([preprocess(render(s, image_size, rng), spec) for s in scenes])).to(dev)
        per_cell = torch.tensor([_labels(s) for s in scenes], device=dev)  # (batch, 4 cells, 3 attributes)
        y = torch.cat([token_cell.expand(batch, -1)[..., None], per_cell[:, token_cell]], -1)  # (batch, tokens, 4)
        h = tower(px, output_hidden_states=True).hidden_states[layer][:, skip:]  # the features the model reads
        logits = [head(h) for head in heads]
        loss = sum(F.cross_entropy(lg.flatten(0, 1), y[..., k].flatten()) for k, lg in enumerate(logits))
        acc = [float((lg.argmax(-1) == y[..., k]).float().mean()) for k, lg in enumerate(logits)]
        grid = h.reshape(batch, side, side, hidden)
        quads = torch.stack([grid[:, r * half:(r + 1) * half, c * half:(c + 1) * half].flatten(1)
                             for r in (0, 1) for c in (0, 1)], 1)  # (batch, 4, half*half*hidden), CELLS order
        q_logits = quad_shape(quads)
        loss = loss + F.cross_entropy(q_logits.flatten(0, 1), per_cell[..., 0].flatten())
        acc.append(float((q_logits.argmax(-1) == per_cell[..., 0]).float().mean()))
        losses.append(_update(opt, sched, loss))
        if (step + 1) % 50 == 0:
            log(f"vision pretraining step {step + 1}/{steps}: loss {np.mean(losses[-50:]):.3f}, "
                f"per-token accuracy cell {acc[0]:.2f} shape {acc[1]:.2f} colour {acc[2]:.2f} size {acc[3]:.2f}, "
                f"per-quadrant shape {acc[4]:.2f}")
    tower.eval()
    return losses


def document(scene, rng: random.Random) -> str:
    """A few lines of text about ``scene`` in random order, one sentence a line."""
    from . import data

    lines = [data.caption(scene), data.detail(scene), " ".join(data.reasoning(scene, rng))]
    for _ in range(2):
        kind, q, a = data.short_qa(scene, rng)
        lines.append(f"{q} {data.long_answer(scene, kind, q, a)}")
    rng.shuffle(lines)
    return "\n".join(lines[:rng.randint(2, len(lines))]) + "\n"


def two_descriptions(rng: random.Random, new_scene) -> list:
    """A chat about two scenes described in the prompt, one after the other: which one holds more shapes."""
    from ..templates import Turn
    from . import data

    a, b = data.two_scenes(new_scene, rng)
    return [Turn("user", f"{data.detail(a)}\n{data.detail(b)}\n{data.MORE_QUESTION}"),
            Turn("assistant", data.more_answer(a, b))]


def language_examples(n: int, seed: int, detail: bool = False, several: bool = False) -> list:
    """What the stand-in for Vicuna learns: toy sentences (str), and chats (list of turns)
    whose answers come from a scene description in the prompt.

    Vicuna arrives at LLaVA already able to answer questions about text in its
    context; the chats teach the toy model that (the image tokens later take the
    description's place). Chats are learned on their answers only, as in instruction tuning.
    ``several``: some chats describe two scenes and ask which holds more shapes (the two pictures' kind).
    """
    from ..templates import Turn
    from . import data

    rng = random.Random(f"language-pretrain-{seed}")
    new_scene = random_detail_scene if detail else random_scene
    out: list = []
    for _ in range(n):
        # drawn only with ``several``: without it the random stream is the one-picture world's
        if several and rng.random() < data.MORE_SHARE:
            out.append(two_descriptions(rng, new_scene))
            continue
        scene = new_scene(rng)
        if rng.random() < 0.3:
            out.append(document(scene, rng))
            continue
        turns = []
        for k in range(rng.randint(1, 4)):
            kind, q, a = data.short_qa(scene, rng)
            if rng.random() < 0.5:
                q = f"{q}\n{data.SHORT}"
            else:
                a = data.long_answer(scene, kind, q, a)
            turns += [Turn("user", f"{data.detail(scene)}\n{q}" if k == 0 else q), Turn("assistant", a)]
        out.append(turns)
    return out


def pretrain_language(model, tokenizer, steps: int = 300, batch: int = 32, lr: float = 2e-3, seed: int = 0,
                      log=print, detail: bool = False, mode: str | None = None,
                      several: bool = False) -> list[float]:
    """Next-token training of ``model.model.language_model`` + ``lm_head`` on :func:`language_examples`
    (``detail``: the detail world's; ``several``: with the two-scene chats), chats in conversation mode ``mode``
    (the one stage 2 will use; default the toy's ``vicuna_v1``)."""
    import torch

    from ..templates import get_template
    from ..train.data import Record, collate, encode
    from .tokenizer import MODE

    template = get_template(mode or MODE)

    def example(x) -> dict:
        if isinstance(x, str):
            ids = tokenizer.encode(x)
            return {"input_ids": ids, "labels": ids, "images": []}  # no picture
        e = encode(Record("pretrain", x), template, tokenizer, -1, 0, 2048)
        return {"input_ids": e.input_ids, "labels": e.labels, "images": []}

    examples = language_examples(steps * batch, seed, detail, several)
    dev = next(model.parameters()).device
    lm_params = list(model.model.language_model.parameters()) + list(model.lm_head.parameters())
    opt, sched = _optimizer(lm_params, lr, steps)
    losses = []
    model.train()
    for step in range(steps):
        b = collate([example(x) for x in examples[step * batch:(step + 1) * batch]], tokenizer.pad_id)
        b = {k: v.to(dev) for k, v in b.items() if v is not None}
        out = model.model.language_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        logits = model.lm_head(out.last_hidden_state)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), b["labels"][:, 1:].flatten(),
                                                 ignore_index=-100)
        losses.append(_update(opt, sched, loss))
        if (step + 1) % 50 == 0:
            log(f"language pretraining step {step + 1}/{steps}: loss {np.mean(losses[-50:]):.3f}")
    model.eval()
    return losses
