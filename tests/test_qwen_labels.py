"""LLaVA-NeXT's Qwen conversation mode (``qwen_1_5``: LLaVA-OneVision's and LLaVA-Interleave's training): the
prompt as its ``conv_qwen`` renders it, and training labels as its ``preprocess_qwen`` makes them.

The reference is built here from transformers alone, step for step as LLaVA-NeXT's ``llava/train/train.py``
does it (its package is not on the registries): a Qwen2 tokenizer (the real Qwen2 vocabulary, rebuilt from
llama.cpp's test GGUF as tests/test_vocab_gguf.py does) with ``<image>`` added as a special token,
``apply_chat_template`` with the chat template that function installs, one message at a time, users'
tokens ignored, assistants' learned, then the ids 198 (Qwen's "\\n"), ``<|im_start|>`` and ``<|im_end|>``
learned wherever they stand, ``<image>`` replaced by the image index.
"""

from __future__ import annotations

import pytest

from llava_edge.templates import TEMPLATES, Turn, flat
from llava_edge.tokenizer import Tokenizer
from llava_edge.train.labels import IGNORE_INDEX, label

IMAGE_INDEX = -200  # LLaVA's IMAGE_TOKEN_INDEX
RESET_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                  "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                  "{% endif %}")
RECORDS = {
    "one image, two rounds": [Turn("user", "What is in the picture?", image=True), Turn("assistant", "A red circle."),
                              Turn("user", "Is it large?\nAnswer briefly."), Turn("assistant", "No, small.\n")],
    "text only": [Turn("user", "Say hi."), Turn("assistant", "Hi!")],
    "an assistant first": [Turn("assistant", "Hello."), Turn("user", "Count: 1 2 3", image=True),
                           Turn("assistant", "4")],
    "unicode and spaces": [Turn("user", "  Ünïcode   spaces  ", image=True), Turn("assistant", "日本語 ok")],
}


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    from test_vocab_gguf import _qwen2_folder, gguf_fields, gguf_path
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("qwen") / "tok"
    _qwen2_folder(gguf_fields(gguf_path("qwen2")), folder)
    hf = AutoTokenizer.from_pretrained(folder)
    hf.add_tokens(["<image>"], special_tokens=True)  # as preprocess_qwen does when the record has an image
    hf.save_pretrained(folder)
    return hf, Tokenizer(folder)


def _ids(out) -> list[int]:
    """apply_chat_template's ids (transformers 5 returns them in a BatchEncoding)."""
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def reference(hf, turns: list[Turn], has_image: bool) -> tuple[list[int], list[int]]:
    """LLaVA-NeXT's preprocess_qwen, on transformers' tokenizer."""
    return reference_source(hf, [{"from": "human" if t.role == "user" else "gpt",
                                  "value": ("<image>\n" + t.text if t.image else t.text)} for t in turns])


def reference_source(hf, source: list[dict]) -> tuple[list[int], list[int]]:
    """LLaVA-NeXT's preprocess_qwen of a record's ``conversations`` (after its preprocess_multimodal)."""
    image = hf.convert_tokens_to_ids("<image>")
    im_start, im_end = hf.convert_tokens_to_ids("<|im_start|>"), hf.convert_tokens_to_ids("<|im_end|>")
    hf.chat_template = RESET_TEMPLATE
    if source[0]["from"] != "human":
        source = source[1:]
    ids = _ids(hf.apply_chat_template([{"role": "system", "content": "You are a helpful assistant."}]))
    target = [IGNORE_INDEX] * len(ids)
    for s in source:
        role = {"human": "user", "gpt": "assistant"}[s["from"]]
        x = _ids(hf.apply_chat_template([{"role": role, "content": s["value"]}]))
        ids += x
        target += [IGNORE_INDEX] * len(x) if role == "user" else x
    for k, i in enumerate(ids):
        if i in (198, im_start, im_end):
            target[k] = i
        if i == image:
            ids[k] = IMAGE_INDEX
    return ids, target


@pytest.mark.parametrize("case", list(RECORDS))
def test_labels_equal_llava_next_preprocess_qwen(qwen, case):
    hf, tok = qwen
    turns = RECORDS[case]
    has_image = any(t.image for t in turns)
    image_id = hf.convert_tokens_to_ids("<image>")
    got = label(turns, TEMPLATES["qwen_1_5"], tok, image_id, has_image, max_length=4096)
    want_ids, want_labels = reference(hf, turns, has_image)
    ids = [IMAGE_INDEX if i == image_id else i for i in got.input_ids]
    assert ids == want_ids and got.labels == want_labels and not got.mismatch
    assert any(x != IGNORE_INDEX for x in got.labels)
    assert tok.encode("\n", add_special_tokens=False) == [198]  # the id the original hard-codes


def test_the_prompt_is_conv_qwen_s():
    """``conv_qwen.get_prompt`` (SeparatorStyle.CHATML) for a question about an image, as LLaVA-NeXT's eval
    scripts put it ("<image>\\n" + question)."""
    parts = TEMPLATES["qwen_1_5"].prompt("What is it?", image=True)
    assert flat(parts) == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                           "<image>\nWhat is it?<|im_end|>\n<|im_start|>assistant\n")
    assert TEMPLATES["qwen_1_5"].stop == ("<|im_end|>",)


def test_typed_control_tokens_stay_text(qwen):
    """Where LLaVA-NeXT's apply_chat_template would read a user's typed "<|im_end|>" as the control token,
    llava-edge keeps it text (the one place this mode's ids differ from the original's, on purpose)."""
    hf, tok = qwen
    turns = [Turn("user", "end <|im_end|> here"), Turn("assistant", "ok")]
    got = label(turns, TEMPLATES["qwen_1_5"], tok, hf.convert_tokens_to_ids("<image>"), False, max_length=4096)
    im_end = hf.convert_tokens_to_ids("<|im_end|>")
    assert got.input_ids.count(im_end) == 3  # the system's, the user's and the assistant's separators only
