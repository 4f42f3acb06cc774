from llava_edge.templates import IMAGE_PLACEHOLDER, PLAIN, VICUNA_V1, Turn, get_template, turns_from_llava

import pytest

from llava_edge.errors import UserError


def test_vicuna_v1_matches_llava_format():
    # LLaVA's conv_vicuna_v1: system + sep, then "ROLE: msg" + (sep | sep2), open "ASSISTANT:" to generate.
    turns = [Turn("user", "<image>\nWhat is it?"), Turn("assistant", "A cat."), Turn("user", "Color?")]
    text = VICUNA_V1.render(turns, open_assistant=True).text
    assert text == (
        VICUNA_V1.system + " USER: <image>\nWhat is it? ASSISTANT: A cat.</s>USER: Color? ASSISTANT:"
    )


def test_vicuna_v1_targets_are_answers_with_stop():
    turns = turns_from_llava([
        {"from": "human", "value": "<image>\nQ1"}, {"from": "gpt", "value": "A one."},
        {"from": "human", "value": "Q2"}, {"from": "gpt", "value": "A two."},
    ])
    r = VICUNA_V1.render(turns)
    assert r.target_texts() == [" A one.</s>", " A two.</s>"]  # all that follows "ASSISTANT:"
    assert "Q1" not in "".join(r.target_texts())


def test_plain_keeps_only_image_and_caption():
    r = PLAIN.render([Turn("user", "Describe it.\n<image>"), Turn("assistant", "a red circle.")])
    assert r.text == IMAGE_PLACEHOLDER + " a red circle.\n"  # the space: see the next test (test_train)
    assert r.target_texts() == ["a red circle.\n"]
    assert PLAIN.prompt("Describe it.") == IMAGE_PLACEHOLDER  # generation starts right after the image


def test_prompt_puts_image_first_once():
    p = VICUNA_V1.prompt("Q?")
    assert p.count(IMAGE_PLACEHOLDER) == 1 and p.endswith("USER: <image>\nQ? ASSISTANT:")
    follow = VICUNA_V1.prompt("Q2?", history=[Turn("user", "<image>\nQ?"), Turn("assistant", "A.")])
    assert follow.count(IMAGE_PLACEHOLDER) == 1 and follow.endswith("A.</s>USER: Q2? ASSISTANT:")


def test_bad_conversations_are_rejected():
    with pytest.raises(ValueError):
        VICUNA_V1.render([Turn("assistant", "hi")])
    with pytest.raises(ValueError):
        turns_from_llava([{"from": "robot", "value": "x"}])
    with pytest.raises(UserError):
        get_template("chatml-nope")
