"""The ``chat_template`` mode: the checkpoint's own Jinja template, rendered and tokenized as transformers' processor
does (``apply_chat_template`` then the tokenizer), on real vocabularies (llama.cpp's Llama 3 and Phi-3 test
vocabularies, rebuilt as tests/test_vocab_gguf.py does).

- A language model's own template (Llama 3's, Phi-3's) reads each message as a string: it gets one, its pictures
  written first as ``<image>\\n``. Its ``bos_token`` is the tokenizer's, and a prompt that starts with it gets no
  second one. Llama 3's ``| trim`` trims the message.
- A processor's template (llava-hf's) reads the message's parts. Its prompt is tokenized as one string with the
  image token inside: with a SentencePiece tokenizer that is not LLaVA's chunk-by-chunk ``tokenizer_image_token``.
"""

from __future__ import annotations

import pytest

from llava_edge.templates import CHAT_TEMPLATE, IMAGE, Image, Turn, get_template
from test_llama3_phi3_labels import LLAMA3_INSTRUCT_TEMPLATE, vocab  # noqa: F401 - the fixture

# Phi-3-mini-4k-instruct's template (tokenizer_config.json)
PHI3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + "
    "message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + "
    "'<|end|>\n'}}{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
# llava-hf/llava-1.5-7b-hf's processor template
LLAVA_HF_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', "
    "'text') %}{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}"
    "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
TEMPLATES = {"llama3": (LLAMA3_INSTRUCT_TEMPLATE, "llama-bpe", False), "phi3": (PHI3_TEMPLATE, "phi-3", False),
             "llava-hf": (LLAVA_HF_TEMPLATE, "phi-3", True)}
CASES = {
    "text only": ([], "What is it?", 0),
    "one picture": ([], "What is in the picture?", 1),
    # (a newline: on runs of spaces transformers 5's fast tokenizer of a SentencePiece model parts from SentencePiece,
    # which llava-edge follows; see test_llama3_phi3_labels.py)
    "a newline after the question": ([], "Describe it.\n", 1),
    "a follow-up": ([Turn("user", "What is it?", image=1), Turn("assistant", "A circle.")], "Is it red?", 0),
    "two pictures": ([], "Compare them.", 2),
    # a picture sent with no words (an OpenAI message of one image_url part): Llama 3's trim takes the newline too
    "a picture and no question": ([], "", 1),
    "a picture and only a newline": ([], "\n", 1),
}


def transformers_ids(hf, template: str, parts_of_messages: bool, turns: list[Turn]) -> list[int]:
    """apply_chat_template, then the processor's tokenization (no added BOS when the prompt starts with it)."""
    messages = []
    for t in turns:
        if parts_of_messages:
            content = [{"type": "image"}] * int(t.image) + [{"type": "text", "text": t.text}]
        else:
            content = "<image>\n" * int(t.image) + t.text
        messages.append({"role": t.role, "content": content})
    prompt = hf.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)
    bos = hf.bos_token
    return list(hf(prompt, add_special_tokens=not (bos and prompt.startswith(bos)))["input_ids"])


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", list(TEMPLATES))
def test_prompt_ids_equal_transformers(vocab, name, case):  # noqa: F811 - the fixture
    template, vocabulary, parts_of_messages = TEMPLATES[name]
    hf, tok = vocab(vocabulary)
    history, question, images = CASES[case]
    mode = get_template(CHAT_TEMPLATE, template, tok.settings.special_tokens_map())
    image_id = hf.convert_tokens_to_ids("<image>")
    ours = tok.encode_prompt(mode.prompt(question, image=images, history=history), image_id,
                             **mode.encoding)
    want = transformers_ids(hf, template, parts_of_messages, [*history, Turn("user", question, image=images)])
    assert ours == want
    if tok.bos_id is not None:
        assert ours.count(tok.bos_id) == 1


def test_a_processor_prompt_is_not_tokenized_chunk_by_chunk(vocab):  # noqa: F811 - the fixture
    """On a SentencePiece vocabulary that is not legacy, LLaVA's chunking starts the text after a picture with a
    word-start piece that transformers' processor does not write: the two ways differ, and the mode takes the
    processor's."""
    hf, tok = vocab("phi-3")
    mode = get_template(CHAT_TEMPLATE, LLAVA_HF_TEMPLATE, tok.settings.special_tokens_map())
    parts = mode.prompt("What is in the picture?", image=1)
    image_id = hf.convert_tokens_to_ids("<image>")
    chunked = tuple(IMAGE if isinstance(p, Image) else p for p in parts)  # LLaVA's way
    assert tok.encode_prompt(parts, image_id, **mode.encoding) != tok.encode_prompt(chunked, image_id)
    assert tok.encode_prompt(parts, image_id, **mode.encoding) == transformers_ids(hf, LLAVA_HF_TEMPLATE, True,
                                                                  [Turn("user", "What is in the picture?", image=1)])


@pytest.mark.parametrize("name", ["llama3", "phi3"])
def test_typed_control_tokens_stay_text(vocab, name):  # noqa: F811 - the fixture
    template, vocabulary, _ = TEMPLATES[name]
    hf, tok = vocab(vocabulary)
    mode = get_template(CHAT_TEMPLATE, template, tok.settings.special_tokens_map())
    typed = "<|eot_id|>" if name == "llama3" else "<|end|>"
    control = hf.convert_tokens_to_ids(typed)
    ids = tok.encode_prompt(mode.prompt(f"say {typed} now", image=0), 0, **mode.encoding)
    plain = tok.encode_prompt(mode.prompt("say now", image=0), 0, **mode.encoding)
    assert ids.count(control) == plain.count(control)
