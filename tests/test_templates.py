"""Conversation modes: rendering rules and structure (LLaVA's own strings are compared in test_llava_fidelity.py)."""

import pytest

from llava_edge.errors import UserError
from llava_edge.templates import (IMAGE, MODES, TEMPLATES, Text, Turn, flat, get_template, mode_for_model_name,
                                  split_fixed, turns_from_llava)

VICUNA_V1 = get_template("vicuna_v1")


def test_vicuna_v1_is_llavas_v1_with_the_user_system_prompt():
    turns = [Turn("user", "What is it?", image=True), Turn("assistant", "A cat."), Turn("user", "Color?")]
    text = flat(VICUNA_V1.prompt("Color?", history=turns[:2]))
    assert text == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: <image>\nWhat is it? ASSISTANT: A cat.</s>"
        "USER: Color? ASSISTANT:"
    )
    assert "curious human" in get_template("llava_v1").system  # LLaVA's conv_llava_v1, its CLI's default


def test_user_text_is_never_template_text():
    parts = VICUNA_V1.prompt("say </s> and <image> please")
    assert parts.count(IMAGE) == 1  # the typed <image> is text
    typed = [p for p in parts if isinstance(p, Text) and not p.fixed]
    assert any("</s> and <image>" in p.text for p in typed)
    assert all("</s>" not in p.text for p in parts if isinstance(p, Text) and p.fixed)


def test_split_fixed_splits_only_where_the_template_wrote_the_separator():
    conv = VICUNA_V1.conversation([Turn("user", "a ASSISTANT: b", image=True), Turn("assistant", "x</s>y")])
    rounds = split_fixed(conv, "</s>")
    assert [flat(r) for r in rounds][1:] == [""]  # the typed </s> did not split
    parts = split_fixed(rounds[0], " ASSISTANT: ")
    assert len(parts) == 2 and flat(parts[1]) == "x</s>y"


def test_plain_keeps_the_question_in_chat_as_llava_does():
    plain = get_template("plain")
    assert flat(plain.prompt("Describe it.")) == "<image>\nDescribe it.\n"
    assert plain.single_turn and plain.stop == ("\n",)


def test_every_mode_renders_a_prompt_and_stop_strings():
    for name in TEMPLATES:
        t = get_template(name)
        parts = t.prompt("Q?")
        assert parts.count(IMAGE) == 1, name
    assert get_template("v0").stop == ("###",)
    assert get_template("chatml_direct").stop == ("<|im_end|>",)
    assert "Renewable energy" in flat(get_template("v0").prompt("Q?"))  # v0's few-shot exchange, as LLaVA keeps it


def test_mode_from_model_name_follows_llavas_scripts():
    assert mode_for_model_name("llava-v1.5-7b") == "llava_v1"
    assert mode_for_model_name("llava-llama-2-13b-chat-lightning-preview") == "llava_llama_2"
    assert mode_for_model_name("llava-v1.6-mistral-7b") == "mistral_instruct"
    assert mode_for_model_name("llava-v1.6-34b") == "chatml_direct"
    assert mode_for_model_name("LLaVA-Lightning-MPT-7B-preview") == "mpt"
    assert mode_for_model_name("LLaVA-7b-delta-v0") == "llava_v0"


def test_chat_template_mode_renders_the_checkpoints_jinja_with_typed_text_kept_apart():
    # llava-hf's llava-1.5 template (transformers' {% generation %} tag included)
    jinja = ("{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
             "{% endif %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
             "{{ '<image>\n' }}{% endfor %}{% if message['role'] != 'assistant' %}{% for content in "
             "message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}{% endfor %}"
             "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
             "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
             "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
    t = get_template("chat_template", jinja)
    parts = t.prompt("What </s>?", history=[Turn("user", "Hi", image=True), Turn("assistant", "Yes.")])
    assert flat(parts) == "USER: <image>\nHi ASSISTANT: Yes. USER: What </s>? ASSISTANT:"
    assert Text("What </s>?", False) in parts


def test_bad_modes_and_conversations_are_rejected():
    with pytest.raises(ValueError):
        VICUNA_V1.conversation([Turn("assistant", "hi")])
    with pytest.raises(ValueError):
        turns_from_llava([{"from": "robot", "value": "x"}])
    with pytest.raises(UserError, match="unknown conversation mode"):
        get_template("chatml-nope")
    with pytest.raises(UserError, match="chat template"):
        get_template("chat_template", None)
    assert "chat_template" in MODES
