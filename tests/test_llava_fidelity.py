"""llava-edge against LLaVA's own code: prompts, token ids, training labels and a checkpoint's greedy answer.

The reference runs in its own virtualenv (``make llava-ref``: llava-torch 1.2.2.post1, the LLaVA 1.2.2
repository, with transformers 4.36.2 and tokenizers 0.15.0; see tests/llava_reference). The vocabulary
is LLaMA's SentencePiece one, rebuilt offline from llama.cpp's test vocabulary and checked against its
test vectors; the tokenizer files are LLaVA-1.5's (slow LlamaTokenizer), with ``legacy`` false (as
Vicuna-1.5's) and true (transformers' default when a config says nothing).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from llava_reference import build_llama_vocab, harness

from llava_edge.templates import TEMPLATES, Turn, get_template
from llava_edge.tokenizer import Tokenizer

ok, why = harness.available()
pytestmark = pytest.mark.skipif(not ok, reason=why)

LLAVA_IMAGE = -200  # LLaVA's IMAGE_TOKEN_INDEX: where tokenizer_image_token puts the image
CHATML_SPECIAL = ["<|im_start|>", "<|im_end|>"]  # Yi/Hermes' chat tokens, special in their tokenizers
# LLaVA 1.2.2's modes; LLaVA-NeXT's Qwen modes are not in LLaVA's code (tests/test_qwen_labels.py checks them)
MODES = sorted(m for m, t in TEMPLATES.items() if t.origin == "llava")  # LLaVA 1.2.2's own conv_templates
IMAGE = "images/pic.png"


def _records() -> list[dict]:
    """Records covering what the issue lists: multi-turn, <image> before and after the question, leading and
    double spaces, digits, unicode, newlines inside answers, and a text-only record."""
    h, g = "human", "gpt"

    def rec(rid, turns, image=True):
        r = {"id": rid, "conversations": [{"from": f, "value": v} for f, v in turns]}
        if image:
            r["image"] = IMAGE
        return r

    return [
        rec("single", [(h, "<image>\nWhat is in the picture?"), (g, "A red square and 3 circles.")]),
        rec("after", [(h, "Describe it.\n<image>"), (g, "Two shapes: a cup, a ball.")]),
        rec("multi", [(h, "<image>\nHow many balls?"), (g, "2 balls."), (h, "  How many are blue?"),
                      (g, "  None, 0 of 2 \u2014 \u00fcmlaut caf\u00e9 \U0001F999."), (h, "And  the  cup?"),
                      (g, "1. A cup\n2. Its handle\n\nDone.")]),
        rec("digits", [(h, "<image>\nWhich year?"), (g, "1999 was the year.")]),
        rec("newline", [(h, "<image>\nList them."), (g, "\nfirst\nsecond")]),
        rec("text", [(h, "What is  2+2?"), (g, "4, of course."), (h, "Sure?"), (g, "Yes \u2713")], image=False),
    ]


CAPTIONS = [  # stage-1 records: one image, one caption
    ("cap-digit", "1999 photo of a dog."), ("cap-list", "1. A cup on a table"), ("cap-space", " leading space"),
    ("cap-word", "two shapes: a red circle and a blue square"), ("cap-unicode", "caf\u00e9 \U0001F999 \u00fcber"),
    ("cap-newline", "line one\nline two"), ("cap-double", "a  double  space"),
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("llava_data")
    (root / "images").mkdir()
    Image.new("RGB", (80, 50), (200, 30, 40)).save(root / IMAGE)
    caps = [{"id": rid, "image": IMAGE, "conversations": [{"from": "human", "value": "<image>\nDescribe briefly."},
                                                          {"from": "gpt", "value": c}]} for rid, c in CAPTIONS]
    (root / "chats.json").write_text(json.dumps(_records()))
    (root / "captions.json").write_text(json.dumps(caps))
    return root


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama_tok")
    return {(legacy, extra): harness.llama_tokenizer_dir(root, legacy, CHATML_SPECIAL if extra else ())
            for legacy in (False, True) for extra in (False, True)}


def _tokenizer_dir(tokenizers, mode: str, legacy: bool) -> Path:
    return tokenizers[(legacy, TEMPLATES[mode].style == "mpt")]


def test_the_rebuilt_llama_vocabulary_reproduces_llamacpps_test_vectors():
    assert build_llama_vocab.check(harness.llama_model_file(), harness.GGUF) == []


def _ours(data: Path, file: str, mode: str, tok_dir: Path) -> dict:
    """llava-edge's training ids and labels for every record (an error message where it refuses one)."""
    from llava_edge.errors import UserError
    from llava_edge.train.data import encode, load_records

    tok = Tokenizer(tok_dir)
    out = {}
    for r in json.loads((data / file).read_text()):
        one = data / f"one-{r['id']}.json"
        one.write_text(json.dumps([r]))
        try:
            (record,), _ = load_records(one, data)
            e = encode(record, get_template(mode), tok, LLAVA_IMAGE, 1, 2048)
            out[r["id"]] = {"input_ids": e.input_ids, "labels": e.labels, "mismatch": e.mismatch}
        except UserError as err:
            out[r["id"]] = {"error": str(err)}
    return out


@pytest.mark.parametrize("legacy", [False, True], ids=["nonlegacy", "legacy"])
@pytest.mark.parametrize("mode", MODES)
def test_training_ids_and_labels_equal_llavas(data, tokenizers, mode, legacy):
    file = "captions.json" if TEMPLATES[mode].style == "plain" else "chats.json"
    tok_dir = _tokenizer_dir(tokenizers, mode, legacy)
    records = json.loads((data / file).read_text())
    ref = harness.run("preprocess", {"tokenizer_dir": str(tok_dir), "mode": mode, "records": records})
    ours = _ours(data, file, mode, tok_dir)
    compared = 0
    for r in ref["records"]:
        mine = ours[r["id"]]
        if "error" in r:  # LLaVA cannot take the record (plain with more than one exchange): neither do we
            assert "error" in mine, (r["id"], r["error"])
            continue
        assert "error" not in mine, (r["id"], mine)
        assert mine["input_ids"] == r["input_ids"], (r["id"], r["pieces"])
        assert mine["labels"] == r["labels"], (r["id"], r["pieces"])
        assert mine["mismatch"] == r["mismatch"], r["id"]
        compared += 1
    assert compared == len(records)


def test_plain_with_a_conversation_is_refused_as_llava_refuses_it(data, tokenizers):
    ref = harness.run("preprocess", {"tokenizer_dir": str(tokenizers[(False, False)]), "mode": "plain",
                                     "records": _records()[2:3]})
    assert "error" in ref["records"][0]
    assert "error" in _ours(data, "chats.json", "plain", tokenizers[(False, False)])["multi"]


QUESTIONS = ["What is in the picture?", "  How many  balls are there?", "Which year: 1999 or 2000?",
             "caf\u00e9 \U0001F999 \u2014 what?", "First line\nsecond line", "Is it a</s>or <image> here?"]
HISTORY = [("Describe it.", "A cup and 2 balls."), ("  Which color?", "Red, mostly.\nSome blue.")]


@pytest.mark.parametrize("legacy", [False, True], ids=["nonlegacy", "legacy"])
@pytest.mark.parametrize("mode", MODES)
def test_chat_prompts_and_ids_equal_llavas(tokenizers, mode, legacy):
    tok_dir = _tokenizer_dir(tokenizers, mode, legacy)
    items = [{"question": q, "image": img} for q in QUESTIONS[:-1] for img in (True, False)]
    if TEMPLATES[mode].style != "plain":
        items += [{"question": q, "image": True, "history": [list(h) for h in HISTORY]} for q in QUESTIONS[:3]]
    ref = harness.run("prompt", {"tokenizer_dir": str(tok_dir), "mode": mode, "items": items})
    tok, template = Tokenizer(tok_dir), get_template(mode)
    for item, r in zip(items, ref["items"]):
        history = []
        for k, (u, a) in enumerate(item.get("history", [])):
            history += [Turn("user", u, image=item["image"] and k == 0), Turn("assistant", a)]
        parts = template.prompt(item["question"], image=item["image"], history=history)
        from llava_edge.templates import flat

        assert flat(parts) == r["prompt"], item
        ids = tok.encode_prompt(parts, LLAVA_IMAGE) if item["image"] else tok.encode(parts)
        assert ids == r["input_ids"], (item, r["pieces"])


def test_typed_special_tokens_stay_text_where_llava_makes_control_tokens(tokenizers):
    # the one deliberate difference: LLaVA's string tokenization turns a typed "</s>" into the end-of-sequence
    # token (and a typed "<image>" into a second image); llava-edge keeps what a user typed as text
    tok_dir = tokenizers[(False, False)]
    q = QUESTIONS[-1]
    ref = harness.run("prompt", {"tokenizer_dir": str(tok_dir), "mode": "vicuna_v1",
                                 "items": [{"question": q, "image": True}]})["items"][0]
    ids = Tokenizer(tok_dir).encode_prompt(get_template("vicuna_v1").prompt(q), LLAVA_IMAGE)
    assert ref["input_ids"].count(2) == 1 and ref["input_ids"].count(LLAVA_IMAGE) == 2  # LLaVA: EOS, 2 images
    assert 2 not in ids and ids.count(LLAVA_IMAGE) == 1


@pytest.fixture(scope="module")
def original_tiny(tokenizers, tmp_path_factory):
    """A tiny LLaVA-1.5 checkpoint made by LLaVA's own classes, in its original format, with its CLIP tower."""
    out = tmp_path_factory.mktemp("original_tiny")
    made = harness.run("make-checkpoint", {"out": str(out), "tokenizer_dir": str(tokenizers[(False, False)]),
                                           "seed": 0, "model_type": "llava"})
    return Path(made["model_path"]), Path(made["vision_tower"])


@pytest.mark.parametrize("mode", [None, "vicuna_v1"], ids=["llavas-choice", "vicuna_v1"])
def test_an_original_checkpoint_answers_as_in_llava(original_tiny, data, tmp_path, mode):
    """Export (conversion included) then chat: LLaVA's prompt ids, greedy answer and first-token logits."""
    from llava_edge import EdgeLLaVA
    from llava_edge.checkpoint import resolve_model
    from llava_edge.export.bundle import export_bundle

    model, tower = original_tiny
    image = data / IMAGE
    question = "What is shown here?"
    req = {"model_path": str(model), "image": str(image), "question": question, "max_new_tokens": 10}
    if mode:
        req["mode"] = mode
    ref = harness.run("answer", req)
    assert ref["mode"] == (mode or "llava_v1")  # LLaVA's run_llava.py picks llava_v1 for "llava-v1.5-*"

    ckpt = resolve_model(model, vision=tower, cache_dir=tmp_path / "cache", log=lambda _: None)
    export_bundle(ckpt, tmp_path / "b", target="all", llm_outtype="f32", conv_mode=mode, log=lambda _: None)
    m = EdgeLLaVA.load(tmp_path / "b", device="cpu", kv_cache="f32", threads=1, prefix_cache=False)
    try:
        assert m.conv_mode == ref["mode"]
        parts = m.template.prompt(question)
        assert m.tokenizer.encode_prompt(parts, LLAVA_IMAGE) == ref["input_ids"]
        key, emb = m.image_embeddings(image)
        m.llm.reset()
        logits = m.prefill(m.slots_for(parts, key, len(emb)), emb)
        want = np.asarray(ref["first_logits"], dtype=np.float32)
        assert np.abs(logits[: len(want)] - want).max() <= 1e-3 * np.abs(want).max()
        answer = m.chat(image, question, max_tokens=10)
        ids = [i for i in ref["answer_ids"] if i != m.eos_id]
        assert m.last_ids == ids
        assert answer.strip() == ref["answer"].strip()
    finally:
        m.close()
