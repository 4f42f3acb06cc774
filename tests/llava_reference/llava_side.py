"""LLaVA's own code as a reference: run with ``.venv-llava/bin/python`` (llava-torch 1.2.2.post1, transformers 4.36.2).

    llava_side.py SUBCOMMAND REQUEST.json   ->   one JSON object on stdout (everything else goes to stderr)

Subcommands (see ``tests/llava_reference/harness.py`` for the main-venv side):

``preprocess``  {"tokenizer_dir", "mode", "records": [LLaVA records], "train_rule": false}
    Each record through LLaVA's training data path: the tokenizer as ``train()`` loads it
    (slow, right padding, model_max_length 2048), ``train()``'s pad-token rule for ``--version mode``,
    ``llava.conversation.default_conversation = conv_templates[mode]`` (with ``"train_rule": true``:
    exactly ``train()``'s rule instead, which leaves it unchanged for v0/v0.5 and falls back to
    vicuna_v1 for unknown names), then ``LazySupervisedDataset.__getitem__`` itself (on a stand-in
    image, since only the image's presence matters for tokens). Result: {"mode", "conversation" (the
    conv_templates name in effect), "legacy", "pad_token_id", "records": [{"id", "input_ids", "labels",
    "pieces", "prompt" (the string LLaVA tokenized), "mismatch" (LLaVA printed "tokenization
    mismatch" and masked every label), "stdout" (what LLaVA printed)}]}; the image
    is LLaVA's IMAGE_TOKEN_INDEX (-200), ignored labels are -100. A record LLaVA fails on (e.g. ``plain``
    with more than one turn) gives {"id", "error", "stdout"} instead.
``prompt``  {"tokenizer_dir", "mode", "items": [{"question", "image": bool, "history": [[user, assistant], ...]}]}
    The generation prompt as LLaVA's CLI builds it (``<image>\\n`` before the first user message when
    there is an image) and its ids (``tokenizer_image_token``, or ``tokenizer(prompt).input_ids``
    without image). Result: {"mode", "items": [{"prompt", "input_ids", "pieces"} or {"error"}]}.
``make-checkpoint``  {"out", "tokenizer_dir", "seed": 0, "name": "llava-v1.5-tiny", "hidden_size": 64,
    "intermediate_size": 128, "num_layers": 2, "num_heads": 4, "initializer_range": 0.3,
    "vision_hidden_size": 32, "vision_intermediate_size": 64, "vision_layers": 3, "vision_heads": 2,
    "image_size": 56, "patch_size": 14, "model_type": optional}
    A tiny original-format LLaVA-1.5 checkpoint made with LLaVA's own classes (``LlavaConfig``,
    ``LlavaLlamaForCausalLM``) in ``out/name`` and its CLIP tower (transformers 4.36 ``CLIPVisionModel``
    + ``CLIPImageProcessor``) in ``out/clip-vit-tiny-patch<P>-<S>``. All weights are stored in
    float32 but rounded to float16 values, so that LLaVA's builder, which always loads in float16,
    loses nothing. config.json says LlavaConfig's model_type "llava_llama" unless "model_type" is given
    (the released llava-v1.5 configs say "llava"). Result: {"model_path", "vision_tower", "config"}.
``answer``  {"model_path", "image": file, "question", "max_new_tokens": 8, "mode": optional}
    run_llava.py on CPU in float32: ``load_pretrained_model`` (which loads float16), then the model is
    cast to float32, the checkpoint's own tensors are copied back from its *.safetensors (and the
    tower's), so any float32 checkpoint runs with its exact weights, and the rotary cos/sin caches,
    built in float16 at load, are rebuilt in float32 (this gives logits identical to a direct float32
    ``from_pretrained``; without it they are ~1e-2 off). Conv mode by run_llava.py's rule from the folder name unless "mode" is given; the
    image through ``process_images``; greedy ``generate``. Result: {"mode", "prompt", "input_ids",
    "output_ids" (what generate returned: a BOS, then the answer), "answer_ids" (the generated ids),
    "answer" (run_llava.py's decode), "answer_pieces", "first_logits" (the first generated token's
    logits), "first_margin" / "margins" (top-1 minus top-2 logit per step), "restored" (tensors
    that differed from the checkpoint after the float16 load; 0 for make-checkpoint's)}.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore")

# LLaVA prints (tokenization mismatch, loading messages): keep stdout for the one JSON answer
_STDOUT = sys.stdout
sys.stdout = sys.stderr

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def _pieces(tokenizer, ids) -> list[str]:
    from llava.constants import IMAGE_TOKEN_INDEX

    return ["<image>" if i == IMAGE_TOKEN_INDEX else tokenizer.convert_ids_to_tokens(int(i)) for i in ids]


# ---------------------------------------------------------------- preprocess

class _StandInProcessor:
    """What LazySupervisedDataset needs of a CLIP image processor; the pixels are not looked at."""

    image_mean = CLIP_MEAN
    crop_size = {"height": 2, "width": 2}

    def preprocess(self, image, return_tensors="pt"):
        import torch

        return {"pixel_values": torch.zeros(1, 3, 2, 2)}


def train_tokenizer(tokenizer_dir, mode: str, train_rule: bool = False):
    """The tokenizer and default conversation as LLaVA's ``train()`` sets them up for ``--version mode``."""
    import transformers
    from llava import conversation as conversation_lib

    tokenizer = transformers.AutoTokenizer.from_pretrained(
        tokenizer_dir, model_max_length=2048, padding_side="right", use_fast=False)
    if mode == "v0":
        if tokenizer.pad_token is None:  # smart_tokenizer_and_embedding_resize, tokenizer half
            tokenizer.add_special_tokens(dict(pad_token="[PAD]"))
    elif mode == "v0.5":
        tokenizer.pad_token = tokenizer.unk_token
    else:
        tokenizer.pad_token = tokenizer.unk_token
    templates = conversation_lib.conv_templates
    if train_rule:
        if mode not in ("v0", "v0.5"):
            conversation_lib.default_conversation = templates[mode] if mode in templates else templates["vicuna_v1"]
    else:
        conversation_lib.default_conversation = templates[mode]
    return tokenizer


def cmd_preprocess(req: dict) -> dict:
    from PIL import Image
    from llava import conversation as conversation_lib
    from llava.conversation import Conversation
    import llava.train.train as T

    mode = req["mode"]
    tokenizer = train_tokenizer(req["tokenizer_dir"], mode, bool(req.get("train_rule", False)))
    conv = conversation_lib.default_conversation
    templates = conversation_lib.conv_templates
    name = mode if templates.get(mode) is conv else next((k for k, v in templates.items() if v is conv), None)

    prompts: list[str] = []
    get_prompt = Conversation.get_prompt
    add_speaker = T._add_speaker_and_signal
    plain = T.preprocess_plain

    def get_prompt_hook(self):
        out = get_prompt(self)
        prompts.append(out)
        return out

    def add_speaker_hook(header, source, get_conversation=True):
        out = add_speaker(header, source, get_conversation)
        prompts.append(out)
        return out

    def plain_hook(sources, tokenizer):
        out = plain(sources, tokenizer)
        for source in sources:  # preprocess_plain's own string: it set source[0]['value'] to <image>
            prompts.append(source[0]["value"] + source[1]["value"] + conversation_lib.default_conversation.sep)
        return out

    Conversation.get_prompt = get_prompt_hook
    T._add_speaker_and_signal = add_speaker_hook
    T.preprocess_plain = plain_hook

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        Image.new("RGB", (2, 2)).save(os.path.join(tmp, "image.png"))
        records = copy.deepcopy(req["records"])
        for r in records:
            if "image" in r:
                r["image"] = "image.png"
        data_path = os.path.join(tmp, "data.json")
        with open(data_path, "w") as f:
            json.dump(records, f)
        data_args = T.DataArguments(data_path=data_path, lazy_preprocess=True, is_multimodal=True,
                                    image_folder=tmp, image_aspect_ratio="pad")
        data_args.image_processor = _StandInProcessor()
        data_args.mm_use_im_start_end = False
        dataset = T.LazySupervisedDataset(data_path=data_path, tokenizer=tokenizer, data_args=data_args)
        for i, record in enumerate(req["records"]):
            prompts.clear()
            buf = io.StringIO()
            try:
                with contextlib.redirect_stdout(buf):
                    item = dataset[i]
            except Exception as e:  # LLaVA's own failure (e.g. plain on a multi-turn record: an assert)
                results.append({"id": record.get("id", i), "error": f"{type(e).__name__}: {e}",
                                "stdout": buf.getvalue()})
                continue
            printed = buf.getvalue()
            if printed:
                print(printed, end="", file=sys.stderr)
            ids = item["input_ids"].tolist()
            results.append({
                "id": record.get("id", i),
                "input_ids": ids,
                "labels": item["labels"].tolist(),
                "pieces": _pieces(tokenizer, ids),
                "prompt": prompts[-1] if prompts else None,
                "mismatch": "tokenization mismatch" in printed,
                "stdout": printed,
            })
    return {"mode": mode, "conversation": name, "legacy": getattr(tokenizer, "legacy", None),
            "pad_token_id": tokenizer.pad_token_id, "records": results}


# ---------------------------------------------------------------- prompt

def build_prompt(mode: str, question: str, image: bool, history=()) -> str:
    """LLaVA's CLI (llava/serve/cli.py): <image>\\n before the first user message, then get_prompt()."""
    from llava.constants import DEFAULT_IMAGE_TOKEN
    from llava.conversation import conv_templates

    conv = conv_templates[mode].copy()
    users = [h[0] for h in history] + [question]
    if image:
        users[0] = DEFAULT_IMAGE_TOKEN + "\n" + users[0]
    for k, (_, assistant) in enumerate(history):
        conv.append_message(conv.roles[0], users[k])
        conv.append_message(conv.roles[1], assistant)
    conv.append_message(conv.roles[0], users[-1])
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


def cmd_prompt(req: dict) -> dict:
    import transformers
    from llava.constants import IMAGE_TOKEN_INDEX
    from llava.mm_utils import tokenizer_image_token

    from llava.conversation import conv_templates

    if req["mode"] not in conv_templates:
        raise KeyError(f"unknown conversation mode {req['mode']!r}; LLaVA has {sorted(conv_templates)}")
    tokenizer = transformers.AutoTokenizer.from_pretrained(req["tokenizer_dir"], use_fast=False)  # as the builder
    out = []
    for item in req["items"]:
        image = bool(item.get("image", False))
        try:
            prompt = build_prompt(req["mode"], item["question"], image, item.get("history") or ())
        except Exception as e:  # LLaVA's own failure (e.g. plain with history: its sep2 is None)
            out.append({"error": f"{type(e).__name__}: {e}"})
            continue
        if image:
            ids = tokenizer_image_token(prompt, tokenizer, IMAGE_TOKEN_INDEX)
        else:
            ids = tokenizer(prompt).input_ids
        out.append({"prompt": prompt, "input_ids": list(ids), "pieces": _pieces(tokenizer, ids)})
    return {"mode": req["mode"], "items": out}


# ---------------------------------------------------------------- make-checkpoint

def write_clip_tower(tower_dir: Path, vcfg, seed: int) -> None:
    """A random CLIP tower (weights exact in fp16) and its processor, in a folder of its own."""
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionModel

    size = int(vcfg.image_size)
    torch.manual_seed(seed)
    tower = CLIPVisionModel(vcfg).eval()
    _round_to_half(tower)
    tower.save_pretrained(tower_dir, safe_serialization=True)
    CLIPImageProcessor(
        do_resize=True, size={"shortest_edge": size}, resample=3, do_center_crop=True,
        crop_size={"height": size, "width": size}, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=CLIP_MEAN, image_std=CLIP_STD, do_convert_rgb=True,
    ).save_pretrained(tower_dir)


def _round_to_half(module) -> None:
    import torch

    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.to(torch.float16).to(p.dtype))


def cmd_make_checkpoint(req: dict) -> dict:
    import shutil

    import torch
    import transformers
    from transformers import CLIPVisionConfig
    from llava.model import LlavaConfig, LlavaLlamaForCausalLM

    out = Path(req["out"]).resolve()
    name = req.get("name", "llava-v1.5-tiny")
    if "llava" not in name.lower():
        raise ValueError(f"{name!r}: LLaVA's builder loads a folder as LLaVA only if its name says 'llava'")
    seed = int(req.get("seed", 0))
    size, patch = int(req.get("image_size", 56)), int(req.get("patch_size", 14))
    init = float(req.get("initializer_range", 0.3))
    tokenizer = transformers.AutoTokenizer.from_pretrained(req["tokenizer_dir"], use_fast=False)

    # the CLIP tower, in its own folder, as openai/clip-vit-* is next to LLaVA
    tower_dir = out / f"clip-vit-tiny-patch{patch}-{size}"
    vcfg = CLIPVisionConfig(
        hidden_size=int(req.get("vision_hidden_size", 32)), intermediate_size=int(req.get("vision_intermediate_size", 64)),
        num_hidden_layers=int(req.get("vision_layers", 3)), num_attention_heads=int(req.get("vision_heads", 2)),
        image_size=size, patch_size=patch, projection_dim=int(req.get("vision_hidden_size", 32)),
        hidden_act="quick_gelu", layer_norm_eps=1e-5)
    write_clip_tower(tower_dir, vcfg, seed)

    cfg = LlavaConfig(
        vocab_size=len(tokenizer), hidden_size=int(req.get("hidden_size", 64)),
        intermediate_size=int(req.get("intermediate_size", 128)), num_hidden_layers=int(req.get("num_layers", 2)),
        num_attention_heads=int(req.get("num_heads", 4)), num_key_value_heads=int(req.get("num_heads", 4)),
        max_position_embeddings=2048, rms_norm_eps=1e-5, initializer_range=init, hidden_act="silu",
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False, use_cache=True,
        rope_theta=10000.0, rope_scaling=None, pretraining_tp=1, torch_dtype="float32",
        # LLaVA-1.5's multimodal fields (what train() writes into config.json)
        mm_vision_tower=str(tower_dir), mm_hidden_size=vcfg.hidden_size, mm_projector_type="mlp2x_gelu",
        mm_vision_select_layer=-2, mm_vision_select_feature="patch", mm_patch_merge_type="flat",
        image_aspect_ratio="pad", image_grid_pinpoints=None, mm_use_im_start_end=False,
        mm_use_im_patch_token=False, mm_projector_lr=None, use_mm_proj=True, tune_mm_mlp_adapter=False,
        freeze_mm_mlp_adapter=False, tokenizer_model_max_length=2048, tokenizer_padding_side="right",
    )
    torch.manual_seed(seed + 1)
    model = LlavaLlamaForCausalLM(cfg).eval()
    _round_to_half(model)
    model_dir = out / name
    model.save_pretrained(model_dir, safe_serialization=True)
    if req.get("model_type"):  # e.g. "llava", as the released llava-v1.5 config.json files say
        cfg_file = model_dir / "config.json"
        cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "model_type": req["model_type"]}, indent=2) + "\n")
    for f in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"):
        src = Path(req["tokenizer_dir"]) / f
        if src.exists():
            shutil.copyfile(src, model_dir / f)
    return {"model_path": str(model_dir), "vision_tower": str(tower_dir),
            "config": json.loads((model_dir / "config.json").read_text())}


# ---------------------------------------------------------------- answer

def conv_mode_for(model_name: str) -> str:
    """run_llava.py's rule, as its ``eval_model`` writes it inline (LLaVA has no function to call for it)."""
    n = model_name.lower()
    if "llama-2" in n:
        return "llava_llama_2"
    if "mistral" in n:
        return "mistral_instruct"
    if "v1.6-34b" in n:
        return "chatml_direct"
    if "v1" in n:
        return "llava_v1"
    if "mpt" in n:
        return "mpt"
    return "llava_v0"


def to_float32(model, model_path: str) -> int:
    """Cast LLaVA's float16 model to float32 with the checkpoint's own float32 values; return how many tensors changed."""
    import torch
    from safetensors.torch import load_file
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    model.to(torch.float32)
    changed = 0

    def restore(module, folder):
        nonlocal changed
        params = dict(module.named_parameters())
        for f in sorted(Path(folder).glob("*.safetensors")):
            for k, v in load_file(str(f)).items():
                if k in params and v.is_floating_point():
                    with torch.no_grad():
                        if not torch.equal(params[k], v.to(torch.float32)):
                            changed += 1
                        params[k].copy_(v)

    restore(model, model_path)
    tower = model.get_vision_tower()
    restore(tower.vision_tower, tower.vision_tower_name)
    for m in model.modules():  # cos/sin were cached in float16 (the default dtype while loading)
        if type(m) is LlamaRotaryEmbedding:
            m.inv_freq = 1.0 / (m.base ** (torch.arange(0, m.dim, 2).float().to(m.inv_freq.device) / m.dim))
            m._set_cos_sin_cache(seq_len=m.max_position_embeddings, device=m.inv_freq.device, dtype=torch.float32)
    return changed


def cmd_answer(req: dict) -> dict:
    import re

    import torch
    from PIL import Image
    from llava.constants import (DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_TOKEN,
                                 IMAGE_PLACEHOLDER, IMAGE_TOKEN_INDEX)
    from llava.conversation import conv_templates
    from llava.mm_utils import get_model_name_from_path, process_images, tokenizer_image_token
    from llava.model.builder import load_pretrained_model
    from llava.utils import disable_torch_init

    torch.manual_seed(0)
    disable_torch_init()
    model_path = req["model_path"]
    model_name = get_model_name_from_path(model_path)
    tokenizer, model, image_processor, _ = load_pretrained_model(
        model_path, None, model_name, device_map="cpu", device="cpu")
    changed = to_float32(model, model_path)
    model.eval()

    qs = req["question"]  # run_llava.py from here on
    image_token_se = DEFAULT_IM_START_TOKEN + DEFAULT_IMAGE_TOKEN + DEFAULT_IM_END_TOKEN
    if IMAGE_PLACEHOLDER in qs:
        qs = re.sub(IMAGE_PLACEHOLDER, image_token_se if model.config.mm_use_im_start_end else DEFAULT_IMAGE_TOKEN, qs)
    else:
        qs = (image_token_se if model.config.mm_use_im_start_end else DEFAULT_IMAGE_TOKEN) + "\n" + qs
    mode = req.get("mode") or conv_mode_for(model_name)
    conv = conv_templates[mode].copy()
    conv.append_message(conv.roles[0], qs)
    conv.append_message(conv.roles[1], None)
    prompt = conv.get_prompt()

    images = [Image.open(req["image"]).convert("RGB")]
    image_sizes = [x.size for x in images]
    images_tensor = process_images(images, image_processor, model.config).to(model.device, dtype=torch.float32)
    input_ids = tokenizer_image_token(prompt, tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt").unsqueeze(0)
    with torch.inference_mode():
        out = model.generate(
            input_ids, images=images_tensor, image_sizes=image_sizes, do_sample=False, temperature=0,
            top_p=None, num_beams=1, max_new_tokens=int(req.get("max_new_tokens", 8)), use_cache=True,
            output_scores=True, return_dict_in_generate=True)
    # LLaVA generates from inputs_embeds, so the prompt does not come back; transformers 4.36 starts the
    # sequence with a BOS it did not generate (run_llava.py's decode skips it as a special token)
    output_ids = out.sequences
    answer = tokenizer.batch_decode(output_ids, skip_special_tokens=True)[0].strip()
    answer_ids = output_ids[0, output_ids.shape[1] - len(out.scores):].tolist()
    margins = [float(d[0] - d[1]) for d in (torch.topk(s[0].float(), 2).values for s in out.scores)]
    return {
        "mode": mode, "prompt": prompt, "input_ids": input_ids[0].tolist(),
        "output_ids": output_ids[0].tolist(), "answer_ids": answer_ids, "answer": answer,
        "answer_pieces": _pieces(tokenizer, answer_ids),
        "first_logits": out.scores[0][0].float().tolist(), "first_margin": margins[0], "margins": margins,
        "restored": changed,
    }


COMMANDS = {"preprocess": cmd_preprocess, "prompt": cmd_prompt, "make-checkpoint": cmd_make_checkpoint,
            "answer": cmd_answer}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] not in COMMANDS:
        print(f"usage: llava_side.py {{{','.join(COMMANDS)}}} REQUEST.json", file=sys.stderr)
        return 2
    req = json.loads(Path(argv[1]).read_text(encoding="utf-8"))
    result = COMMANDS[argv[0]](req)
    _STDOUT.write(json.dumps(result, ensure_ascii=False))
    _STDOUT.write("\n")
    _STDOUT.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
