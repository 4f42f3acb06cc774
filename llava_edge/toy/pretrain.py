"""Stand-ins for the pretrained halves LLaVA starts from, trained on the toy world.

LLaVA begins with a CLIP ViT that already sees and a Vicuna that already
speaks. The toy's tower and language model start random, so before the LLaVA
stages they get a short pretraining of their own:

- vision: the CLIP tower learns to recognise what is in each quadrant (shape,
  colour, size) from its layer -2 features, the layer LLaVA reads;
- language: the Llama learns the toy world's sentences (next-token prediction).

Both run on freshly rendered scenes / generated text, never on the evaluation split.
"""

from __future__ import annotations

import random

import numpy as np

from ..preprocess import ImageSpec, preprocess
from .scenes import CELLS, COLORS, SHAPES, SIZES, random_scene, render


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
    hidden = tower.config.hidden_size
    side = tower.config.image_size // tower.config.patch_size
    half = side // 2
    cell_dim = hidden * half * half  # a quadrant's patch tokens, concatenated: the head sees where each one is
    heads = torch.nn.ModuleList([torch.nn.Linear(cell_dim, n) for n in (1 + len(SHAPES), 1 + len(COLORS), 1 + len(SIZES))])
    params = list(tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    rng = random.Random(f"vision-pretrain-{seed}")
    tower.train()
    losses = []
    for step in range(steps):
        scenes = [random_scene(rng) for _ in range(batch)]
        px = torch.from_numpy(np.stack([preprocess(render(s, image_size, rng), spec) for s in scenes]))
        y = torch.tensor([_labels(s) for s in scenes])  # (batch, 4 cells, 3 attributes)
        h = tower(px, output_hidden_states=True).hidden_states[-2][:, 1:]  # the features LLaVA uses
        grid = h.reshape(batch, side, side, hidden)
        cells = torch.stack([grid[:, r * half:(r + 1) * half, c * half:(c + 1) * half].flatten(1)
                             for r in (0, 1) for c in (0, 1)], 1)  # (batch, 4, hidden) in CELLS order
        logits = [head(cells) for head in heads]
        loss = sum(F.cross_entropy(lg.flatten(0, 1), y[..., k].flatten()) for k, lg in enumerate(logits))
        acc = [float((lg.argmax(-1) == y[..., k]).float().mean()) for k, lg in enumerate(logits)]
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss))
        if (step + 1) % 50 == 0:
            log(f"vision pretraining step {step + 1}/{steps}: loss {np.mean(losses[-50:]):.3f}, "
                f"accuracy shape {acc[0]:.2f} colour {acc[1]:.2f} size {acc[2]:.2f}")
    tower.eval()
    return losses


def pretrain_language(model, tokenizer, steps: int = 300, batch: int = 32, lr: float = 2e-3, seed: int = 0,
                      log=print) -> list[float]:
    """Next-token training of ``model.model.language_model`` + ``lm_head`` on toy sentences."""
    import torch

    from .tokenizer import corpus

    lines = corpus(n_scenes=4000, seed=10_000 + seed)
    rng = random.Random(f"language-pretrain-{seed}")
    lm_params = list(model.model.language_model.parameters()) + list(model.lm_head.parameters())
    opt = torch.optim.AdamW(lm_params, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    pad = tokenizer.pad_token_id
    losses = []
    model.train()
    for step in range(steps):
        texts = [" ".join(rng.sample(lines, 3)) for _ in range(batch)]
        enc = tokenizer(texts, padding=True, return_tensors="pt")
        ids, mask = enc["input_ids"], enc["attention_mask"]
        labels = ids.masked_fill(ids == pad, -100)
        out = model.model.language_model(input_ids=ids, attention_mask=mask)
        logits = model.lm_head(out.last_hidden_state)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss))
        if (step + 1) % 50 == 0:
            log(f"language pretraining step {step + 1}/{steps}: loss {np.mean(losses[-50:]):.3f}")
    model.eval()
    return losses
