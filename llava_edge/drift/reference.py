"""The reference: the Hugging Face model's answers, next-token logits and image features on an evaluation set.

fp16 on a GPU; fp32 on a CPU, because fp16 matrix products on a CPU are not a
trustworthy reference (PyTorch's CPU kernels for half precision differ in
accumulation and coverage from one build and instruction set to the next). The
device and dtype used are recorded, and the report prints them.

For each question the reference answers greedily (as LLaVA's evaluation
scripts do with ``--temperature 0``), and the logits it produced at each answer
step are kept: the variants are then fed the same answer (teacher forcing), so
their next-token distributions are compared position by position on the same
context. The prompt is the bundle's conversation template rendered by the same
code the runtime uses.

A prompt with several pictures (a model trained with several a conversation)
gives the model its pictures as one sample, as transformers' processor does for
nested images (``images=[[a, b]]``): each picture prepared as the runtime
prepares one of several, the model's own ``get_image_features`` and generation
on the pixels, told how many pictures the sample holds.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from llava_edge.errors import UserError

from .formats import EvalItem

CPU_REASON = "fp32 on the CPU (CPU fp16 matmul is not a trustworthy reference)"
GPU_REASON = "fp16 on the GPU"


@dataclass
class ReferenceItem:
    prompt_ids: list[int]  # the rendered prompt's token ids, one <image> token a picture, not yet expanded
    answer_ids: list[int]  # greedy answer, ending with EOS when the model stopped by itself
    answer: str
    logits: np.ndarray  # (len(answer_ids), vocab) float32: the logits each answer token was chosen from
    # per picture of the prompt, in order: (image tokens, LM width) float32, what the model puts at its positions
    image_features: list[np.ndarray] = field(default_factory=list)
    # the same with a token reduction applied before the projector, by TokenReduction.label
    reduced_features: dict[str, list[np.ndarray]] = field(default_factory=dict)
    positions: int = 0  # the prompt's length with every picture expanded to its positions


@dataclass
class Reference:
    model: str
    fingerprint: str  # config + safetensors headers: the architecture, not the weights
    stamp: str  # names, sizes and times of the checkpoint's files, as export records them
    device: str
    dtype: str
    note: str
    items: list[ReferenceItem] = field(default_factory=list)

    def info(self) -> dict:
        return {"model": self.model, "fingerprint": self.fingerprint, "stamp": self.stamp, "device": self.device,
                "dtype": self.dtype, "note": self.note}


def pick_device(device: str = "auto") -> tuple[str, str, str]:
    """(torch device, dtype name, note): fp16 on CUDA, fp32 on the CPU."""
    import torch

    if device not in ("auto", "cpu", "cuda"):
        raise UserError(f"unknown reference device {device!r} (auto, cpu, cuda)")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise UserError("reference device cuda asked for, but PyTorch sees no GPU")
        return "cuda", "float16", GPU_REASON
    return "cpu", "float32", CPU_REASON


def compute_reference(model: str | Path, items: list[EvalItem], conv_mode: str, chat_template: str | None = None, *,
                      max_new_tokens: int = 32, device: str = "auto", reductions: tuple = (),
                      projectors: dict | None = None, log: Callable[[str], None] = print) -> Reference:
    """Run the Hugging Face model over ``items``, prompted in the bundle's conversation mode with the ids LLaVA's
    evaluation gives (``<image>\\n`` + question, ``get_prompt``, ``tokenizer_image_token``).

    ``reductions`` (``image_tokens.TokenReduction``): the image features are also computed with each applied,
    what a reduced-token vision graph is compared with; the answers are always the full model's.
    ``projectors``: {key: (reduction, weights)}, projectors fine-tuned for a reduction (``image_tokens.
    read_projector``): the features with the reduction and that projector, under ``key``.
    """
    import torch

    from llava_edge.checkpoint import load_hf_model, resolve_model
    from llava_edge.image_tokens import reduced_patch_features
    from llava_edge.templates import expand_images, get_template
    from llava_edge.tokenizer import Tokenizer

    dev, dtype, note = pick_device(device)
    ckpt = resolve_model(model, log=log)
    hf = load_hf_model(ckpt, dtype=dtype).to(dev)
    tok = Tokenizer(ckpt.path)
    template = get_template(conv_mode, chat_template, tok.settings.special_tokens_map())
    images, img_id, family = ckpt.family.checkpoint_image_path(ckpt), ckpt.image_token_id, ckpt.family
    eos = tok.eos_id
    tuned = {}  # reduction -> [(key, a copy of the projector holding the tuned weights)]
    for key, (r, weights) in (projectors or {}).items():
        proj = copy.deepcopy(hf.model.multi_modal_projector)
        try:
            proj.load_state_dict({k: torch.from_numpy(v).to(dev, getattr(torch, dtype)) for k, v in weights.items()})
        except RuntimeError as e:
            raise UserError(f"the projector tuned for {r.label} does not fit the reference model "
                            f"({str(e).splitlines()[0]})") from None
        tuned.setdefault(r, []).append((key, proj))
        if r not in reductions:
            reductions = (*reductions, r)
    ref = Reference(str(model), ckpt.fingerprint(), ckpt.stamp(), dev, dtype, note)
    log(f"reference: {ckpt.path} in {dtype} on {dev}, conversation mode {conv_mode} ({len(items)} questions)")
    for item in items:
        pictures = item.pictures
        ids = tok.encode_prompt(template.prompt(item.question, image=len(pictures)), img_id,
                                **template.encoding)
        feats, reduced = [], {}
        full = ids
        kwargs = {"input_ids": torch.tensor([full], device=dev)}
        if pictures:
            # the runtime's preprocessing, the family's tiles; one of several pictures as the family takes it
            prepared = [images.prepare(p, alone=len(pictures) == 1) for p in pictures]
            full = expand_images(ids, img_id, [[img_id] * p.positions for p in prepared])
            with torch.no_grad():
                features = picture_features(hf, family, prepared, images)
                kwargs = generation_inputs(hf, family, full, prepared, images, features)
            feats = [f.float().cpu().numpy() for f in features]
            with torch.no_grad():
                for r in reductions:  # the tower runs once per reduction, then each projector on its tokens
                    for p in prepared:
                        px = torch.from_numpy(p.pixels).to(dev, getattr(torch, dtype))
                        patches = reduced_patch_features(hf, px, r)
                        for key, proj in [(r.label, hf.model.multi_modal_projector), *tuned.get(r, [])]:
                            reduced.setdefault(key, []).append(proj(patches)[0].float().cpu().numpy())
        with torch.no_grad():
            out = hf.generate(max_new_tokens=max_new_tokens,
                              do_sample=False, num_beams=1, eos_token_id=eos, pad_token_id=tok.pad_id or eos,
                              output_logits=True, return_dict_in_generate=True, **kwargs)
        new = out.sequences[0, len(full):].tolist()
        if eos in new:
            new = new[: new.index(eos) + 1]
        logits = torch.stack([s[0] for s in out.logits[: len(new)]]).float().cpu().numpy()
        answer = tok.decode(new)
        cut = [i for i in (answer.find(x) for x in template.stop) if i >= 0]  # where the runtime stops too
        ref.items.append(ReferenceItem(ids, new, answer[:min(cut)] if cut else answer, logits, feats, reduced,
                                       len(full)))
    del hf
    return ref


def picture_features(hf, family, prepared: list, images) -> list:
    """What the model puts at each picture's positions (torch, one tensor a picture). One picture: the family's
    own reading (``hf_image_features``). Several: the model's ``get_image_features`` on the family's inputs
    for one sample holding them all, the call its forward makes for nested images."""
    if len(prepared) == 1:
        return [family.hf_image_features(hf, prepared[0], images)]
    return list(hf.model.get_image_features(**_on(hf, family.hf_inputs(prepared, per_sample=[len(prepared)])))
                .pooler_output)


def generation_inputs(hf, family, ids: list[int], prepared: list, images, features: list | None = None) -> dict:
    """``generate``'s keyword arguments for the prompt ``ids`` (every picture expanded to its positions). Several
    pictures: the ids and every picture's pixels as one sample. (The families trained with several pictures
    are read by transformers' classes as they were trained; the embeddings route ``hf_generation_inputs``
    takes otherwise is for a converted LLaVA-1.6, which takes one picture.)"""
    import torch

    if len(prepared) == 1:
        return family.hf_generation_inputs(hf, ids, prepared[0], images, features[0] if features else None)
    return {"input_ids": torch.tensor([ids], device=hf.device),
            **_on(hf, family.hf_inputs(prepared, per_sample=[len(prepared)]))}


def _on(hf, inputs: dict) -> dict:
    """``inputs`` on the model's device, floating tensors in its dtype."""
    return {k: v.to(hf.device, hf.dtype if v.is_floating_point() else v.dtype) for k, v in inputs.items()}
