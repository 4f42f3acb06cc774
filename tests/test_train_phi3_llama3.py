"""Training a LLaVA whose language model is Phi-3 or Llama 3, in the format of the code that trained the popular
ones (xtuner's llava-phi-3-mini and llava-llama-3-8b), then exporting and chatting with it.

On tiny checkpoints of ``LlavaForConditionalGeneration`` built here (a CLIP tower with a random ``Phi3ForCausalLM``
or a Llama 3.1-shaped ``LlamaForCausalLM``): stage 1 in the language model's format (xtuner's pretraining renders
captions as conversations), stage 2 on top of its projector; the checkpoint records the mode; exported, the
runtime prompts in that format and answers as transformers' model of the trained checkpoint does. The labels
themselves are checked against the original functions in tests/test_llama3_phi3_labels.py.
"""

from __future__ import annotations

import json

import pytest
import torch

from cli_run import le
from next_helpers import hf_answer, picture
from test_several_images import _ids, _last_slots

MODES = {"phi3": "llava-phi-3-mini", "llama3": "llava-llama-3-8b"}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from llama_family import write_llama3_like
    from test_qwen2_phi3_gguf import write_phi3_like

    base = tmp_path_factory.mktemp("lm")
    return {"phi3": write_phi3_like(base / "phi3"), "llama3": write_llama3_like(base / "llama3")}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    for k in range(4):
        picture(40 + 8 * k, 30, seed=k).save(root / f"p{k}.png")
    captions = [{"id": f"c{k}", "image": f"p{k}.png",
                 "conversations": [{"from": "human", "value": "<image>\nDescribe the picture briefly."},
                                   {"from": "gpt", "value": f"Colours in {k + 2} bands."}]} for k in range(4)]
    instruct = [{"id": f"i{k}", "image": f"p{k}.png",
                 "conversations": [{"from": "human", "value": "What is in the picture?\n<image>"},
                                   {"from": "gpt", "value": "Colours."},
                                   {"from": "human", "value": "How many bands?"},
                                   {"from": "gpt", "value": f"{k + 2}"}]} for k in range(4)]
    instruct.append({"id": "text", "conversations": [{"from": "human", "value": "Say hi."},
                                                      {"from": "gpt", "value": "Hi!"}]})
    (root / "captions.json").write_text(json.dumps(captions))
    (root / "instruct.json").write_text(json.dumps(instruct))
    return root


@pytest.mark.parametrize("lm", list(MODES))
def test_stage1_then_stage2_then_chat(lm, checkpoints, data, tmp_path):
    from PIL import Image
    from transformers import LlavaForConditionalGeneration

    from llava_edge import EdgeLLaVA
    from llava_edge.checkpoint import open_checkpoint
    from llava_edge.export.bundle import export_bundle
    from llava_edge.templates import TEMPLATES
    from llava_edge.train import stages
    from llava_edge.train.presets import get_preset

    preset, toy = get_preset(MODES[lm]), get_preset("toy")
    small = dict(max_steps=2, global_batch=2, per_device_batch=2, max_length=512)
    s1 = stages.stage1(str(checkpoints[lm]), data / "captions.json", data, tmp_path / "s1",
                       toy.stage1.with_(**small), conv_mode=preset.stage1_mode, log=lambda _: None)
    s2 = stages.stage2(str(checkpoints[lm]), data / "instruct.json", data, tmp_path / "s2",
                       toy.stage2.with_(**small), projector=s1 / "mm_projector.safetensors",
                       conv_mode=preset.conv_mode, log=lambda _: None)
    ckpt = open_checkpoint(s2)
    assert open_checkpoint(s1).conv_mode == ckpt.conv_mode == preset.conv_mode
    assert TEMPLATES[ckpt.conv_mode].encoding["fast"]  # xtuner tokenizes with transformers' fast tokenizer
    before = LlavaForConditionalGeneration.from_pretrained(checkpoints[lm]).state_dict()
    hf = LlavaForConditionalGeneration.from_pretrained(s2, attn_implementation="eager").eval()
    after = hf.state_dict()
    moved = {k.split(".")[1] if k.startswith("model.") else k.split(".")[0]
             for k in before if not torch.equal(before[k], after[k])}
    assert "multi_modal_projector" in moved and "language_model" in moved and "vision_tower" not in moved, moved

    export_bundle(ckpt, tmp_path / "bundle", log=lambda _: None)
    pic = Image.open(data / "p1.png").convert("RGB")
    m = EdgeLLaVA.load(tmp_path / "bundle", device="cpu", kv_cache="f32", threads=1, prefix_cache=False)
    try:
        assert m.conv_mode == preset.conv_mode
        s = m.session([pic])
        question = "What is in the picture?"
        ids = _ids(_last_slots(m, s, question), m.image_token_id)
        s.ask(question, max_tokens=6)
        got = list(m.last_ids)
        images = ckpt.family.checkpoint_image_path(ckpt)
        prepared = [images.prepare(data / "p1.png", alone=True)]
        _, want = hf_answer(hf, m.eos_id, 6, input_ids=torch.tensor([ids]),
                            **ckpt.family.hf_inputs(prepared, [1]))
    finally:
        m.close()
    # the prompt is the one training built for the same question: BOS once, then the question in the mode's format
    assert ids[0] == m.tokenizer.bos_id and ids.count(m.tokenizer.bos_id) == 1
    assert got and want[:len(got)] == got  # the runtime may stop earlier, at the mode's stop text


def test_the_preset_picks_the_format_for_stage1(checkpoints, data, tmp_path):
    """``train stage1 --preset llava-phi-3-mini`` without ``--conv-mode`` renders the captions with phi3_chat, as
    xtuner's pretraining does, and records it."""
    from llava_edge.checkpoint import open_checkpoint

    out = tmp_path / "s1"
    r = le("train", "stage1", "--model", checkpoints["phi3"], "--data", data / "captions.json", "--image-folder",
           data, "--output", out, "--preset", "llava-phi-3-mini", "--max-steps", "1", "--global-batch", "2",
           "--per-device-batch", "2", "--max-length", "512", timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert open_checkpoint(out).conv_mode == "phi3_chat"
