"""Training with Llama 3 and Phi-3 language models: the prompts and labels of the code that trained them.

- ``llava_llama_3``: LLaVA-NeXT's Llama 3 mode (llama3-llava-next-8b), labels as its ``preprocess_llama3`` makes
  them: Llama 3 Instruct's chat template applied to the system message, then to each message alone (its BOS
  dropped), users' tokens ignored, assistants' learned, then <|begin_of_text|>, <|start_header_id|>,
  <|end_header_id|> and <|eot_id|> learned wherever they stand (and whatever ``convert_tokens_to_ids("\\n\\n")``
  gives), ``<image>`` added as a special token.
- ``phi3_chat`` and ``llama3_chat``: xtuner's templates (llava-phi-3-mini, llava-llama-3-8b), labels as xtuner's
  ``llava_map_fn`` + ``template_map_fn`` + ``encode_fn`` make them: BOS, the instruction around each question
  ignored, each answer with the template's suffix learned, the separator ignored.

The references are rebuilt here step for step from the original functions (neither package is on the
registries) on transformers' tokenizers of the real vocabularies (llama.cpp's Llama 3 and Phi-3 test vocabularies,
rebuilt as tests/test_vocab_gguf.py does).
"""

from __future__ import annotations

import pytest

from llava_edge.templates import TEMPLATES, Turn, flat
from llava_edge.tokenizer import Tokenizer
from llava_edge.train.labels import IGNORE_INDEX, label

from test_qwen_labels import IMAGE_INDEX, RECORDS as QWEN_RECORDS, _ids
# Meta-Llama-3-8B-Instruct's chat template, which conv_llava_llama_3 names as its tokenizer's
LLAMA3_INSTRUCT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
LLAVA_LLAMA_3_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the visual "
                        "content that the user provides, and assist the user with a variety of tasks using natural "
                        "language.")
# xtuner/utils/templates.py
XTUNER = {
    "phi3_chat": dict(INSTRUCTION="<|user|>\n{input}<|end|>\n<|assistant|>\n", SUFFIX="<|end|>", SEP="\n"),
    "llama3_chat": dict(INSTRUCTION=("<|start_header_id|>user<|end_header_id|>\n\n{input}<|eot_id|>"
                                     "<|start_header_id|>assistant<|end_header_id|>\n\n"), SUFFIX="<|eot_id|>",
                        SEP=""),
}
VOCAB = {"phi3_chat": "phi-3", "llama3_chat": "llama-bpe", "llava_llama_3": "llama-bpe"}

RECORDS = {
    **{k: QWEN_RECORDS[k] for k in ("one image, two rounds", "text only", "an assistant first")},
    # no answer starts with a space: there, transformers 5's fast tokenizer of a SentencePiece model (the reference
    # here for Phi-3) writes one word-start "▁" where SentencePiece and transformers' slow tokenizer, which
    # llava-edge follows, write two (docs/TRAINING.md)
    "spaces around answers": [Turn("user", "Describe it.", image=True), Turn("assistant", "Two shapes.  \n"),
                              Turn("user", " and now? "), Turn("assistant", "Done ")],
    "unicode": [Turn("user", "Ünïcode text", image=True), Turn("assistant", "日本語 ok, café")],
}


def _value(t: Turn) -> str:
    return "<image>\n" + t.text if t.image else t.text


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
    """name -> (transformers' tokenizer with <image> added as a special token, the runtime's Tokenizer of it)."""
    from test_vocab_gguf import BUILDERS, gguf_fields, gguf_path
    from transformers import AutoTokenizer

    cache = {}

    def get(name: str):
        if name not in cache:
            folder = tmp_path_factory.mktemp(name) / "tok"
            BUILDERS[name](gguf_fields(gguf_path(name)), folder)
            if name == "phi-3":
                _as_phi3_ships_it(folder)
            hf = AutoTokenizer.from_pretrained(folder)
            hf.add_tokens(["<image>"], special_tokens=True)  # as preprocess_llama3 does for a record with an image
            hf.save_pretrained(folder)
            cache[name] = hf, Tokenizer(folder)
        return cache[name]

    return get


def _as_phi3_ships_it(folder) -> None:
    """The added tokens' flags of Phi-3-mini's tokenizer_config.json: its <|...|> tokens special and stripping the
    whitespace after them (``rstrip``), ``</s>`` stripping it and not special."""
    import json

    f = folder / "tokenizer_config.json"
    cfg = json.loads(f.read_text())
    for i, a in cfg["added_tokens_decoder"].items():
        if int(i) == 2 or 32001 <= int(i) <= 32010:
            a["rstrip"] = True
        if int(i) == 2:
            a["special"] = False
    f.write_text(json.dumps(cfg, indent=2))


def preprocess_llama3(hf, turns: list[Turn]) -> tuple[list[int], list[int]]:
    """LLaVA-NeXT's preprocess_llama3 for one record, on transformers' tokenizer."""
    source = [{"from": "human" if t.role == "user" else "gpt", "value": _value(t)} for t in turns]
    hf.chat_template = LLAMA3_INSTRUCT_TEMPLATE
    image = hf.convert_tokens_to_ids("<image>")
    unmask = [hf.convert_tokens_to_ids(t) for t in
              ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "\n\n"]]
    if source[0]["from"] != "human":
        source = source[1:]
    ids = _ids(hf.apply_chat_template([{"role": "system", "content": LLAVA_LLAMA_3_SYSTEM}]))
    target = [IGNORE_INDEX] * len(ids)
    for s in source:
        role = {"human": "user", "gpt": "assistant"}[s["from"]]
        x = _ids(hf.apply_chat_template([{"role": role, "content": s["value"]}]))[1:]
        ids += x
        target += [IGNORE_INDEX] * len(x) if role == "user" else x
    for k, i in enumerate(ids):
        if i in unmask:
            target[k] = i
        if i == image:
            ids[k] = IMAGE_INDEX
    return ids, target


def xtuner_encode(hf, turns: list[Turn], template: dict) -> tuple[list[int], list[int]]:
    """xtuner's llava_map_fn, template_map_fn (no system) and encode_fn (with_image_token) for one record."""
    messages = [{"from": "human" if t.role == "user" else "gpt", "value": _value(t)} for t in turns]
    while messages and messages[0]["from"] == "gpt":
        messages = messages[1:]
    conversation, text = [], ""
    for msg in messages:
        if msg["from"] == "human":
            value = msg["value"]
            if "<image>" in value:
                value = ("<image>\n" + value.replace("<image>", "").strip()).strip()
            text += value
        else:
            conversation.append({"input": text, "output": msg["value"]})
            text = ""
    ids, labels = [], []
    for k, turn in enumerate(conversation):
        prompt = template["INSTRUCTION"].format(input=turn["input"], round=k + 1)
        output = turn["output"] + template["SUFFIX"]
        if "<image>" in prompt:
            chunks = [hf.encode(c, add_special_tokens=False) for c in prompt.split("<image>")]
            assert len(chunks) == 2
            encoded = chunks[0] + [IMAGE_INDEX] + chunks[1]
        else:
            encoded = hf.encode(prompt, add_special_tokens=False)
        if k == 0:  # SUFFIX_AS_EOS: no EOS, so only the first round gets a BOS
            ids.append(hf.bos_token_id)
            labels.append(IGNORE_INDEX)
        ids += encoded
        labels += [IGNORE_INDEX] * len(encoded)
        out = hf.encode(output, add_special_tokens=False)
        ids += out
        labels += out
        if template["SEP"]:
            sep = hf.encode(template["SEP"], add_special_tokens=False)
            ids += sep
            labels += [IGNORE_INDEX] * len(sep)
    return ids, labels


def _ours(vocab, mode: str, turns: list[Turn]):
    hf, tok = vocab(VOCAB[mode])
    image_id = hf.convert_tokens_to_ids("<image>")
    got = label(turns, TEMPLATES[mode], tok, image_id, any(t.image for t in turns), max_length=4096)
    assert not got.mismatch and any(x != IGNORE_INDEX for x in got.labels)
    return hf, tok, [IMAGE_INDEX if i == image_id else i for i in got.input_ids], got.labels


@pytest.mark.parametrize("case", list(RECORDS))
def test_llava_llama_3_labels_equal_preprocess_llama3(vocab, case):
    hf, _, ids, labels = _ours(vocab, "llava_llama_3", RECORDS[case])
    assert (ids, labels) == preprocess_llama3(hf, RECORDS[case])
    assert hf.convert_tokens_to_ids("\n\n") is None  # the original's "\n\n" finds no token: no newline unmasked


@pytest.mark.parametrize("mode", list(XTUNER))
@pytest.mark.parametrize("case", list(RECORDS))
def test_xtuner_labels_equal_encode_fn(vocab, mode, case):
    hf, _, ids, labels = _ours(vocab, mode, RECORDS[case])
    assert (ids, labels) == xtuner_encode(hf, RECORDS[case], XTUNER[mode])


@pytest.mark.parametrize("mode", list(VOCAB))
def test_generation_prompt_is_the_trained_prefix(vocab, mode):
    """The runtime's prompt for a follow-up question is the ids training saw for the same conversation up to that
    question, then the open assistant turn: one BOS, the same role text."""
    hf, tok = vocab(VOCAB[mode])
    image_id = hf.convert_tokens_to_ids("<image>")
    history = [Turn("user", "What is in the picture?", image=True), Turn("assistant", "A red circle.")]
    template = TEMPLATES[mode]
    prompt = tok.encode_prompt(template.prompt("Is it large?", image=False, history=history), image_id,
                               **template.encoding)
    trained = label([*history, Turn("user", "Is it large?"), Turn("assistant", "No.")], template, tok, image_id,
                    True, max_length=4096)
    answer = [k for k, x in enumerate(trained.labels) if x != IGNORE_INDEX and k > len(prompt) - 2]
    assert prompt == trained.input_ids[:len(prompt)]
    assert prompt.count(tok.bos_id) == 1 and prompt[0] == tok.bos_id
    assert answer and answer[0] <= len(prompt)  # the answer's first learned token follows the prompt


def test_prompts_as_their_code_writes_them():
    q = TEMPLATES["llava_llama_3"].prompt(" What is it? ", image=True)
    assert flat(q) == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n" + LLAVA_LLAMA_3_SYSTEM
                       + "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n<image>\n What is it?<|eot_id|>"
                       "<|start_header_id|>assistant<|end_header_id|>\n\n")
    history = [Turn("user", "Q1", image=True), Turn("assistant", "A1")]
    assert flat(TEMPLATES["phi3_chat"].prompt("Q2", image=False, history=history)) == (
        "<|user|>\n<image>\nQ1<|end|>\n<|assistant|>\nA1<|end|>\n<|user|>\nQ2<|end|>\n<|assistant|>\n")
    assert flat(TEMPLATES["llama3_chat"].prompt("Q2", image=False, history=history)) == (
        "<|start_header_id|>user<|end_header_id|>\n\n<image>\nQ1<|eot_id|><|start_header_id|>assistant"
        "<|end_header_id|>\n\nA1<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nQ2<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert [TEMPLATES[m].stop for m in VOCAB] == [("<|end|>",), ("<|eot_id|>",), ("<|eot_id|>",)]


@pytest.mark.parametrize("mode, typed", [("llava_llama_3", "<|eot_id|>"), ("llama3_chat", "<|eot_id|>"),
                                         ("phi3_chat", "<|end|>")])
def test_typed_control_tokens_stay_text(vocab, mode, typed):
    hf, tok = vocab(VOCAB[mode])
    turns = [Turn("user", f"end {typed} here"), Turn("assistant", "ok")]
    plain = [Turn("user", "end here"), Turn("assistant", "ok")]
    control = hf.convert_tokens_to_ids(typed)
    got = label(turns, TEMPLATES[mode], tok, hf.convert_tokens_to_ids("<image>"), False, max_length=4096)
    want = label(plain, TEMPLATES[mode], tok, hf.convert_tokens_to_ids("<image>"), False, max_length=4096)
    assert got.input_ids.count(control) == want.input_ids.count(control) > 0
