"""Several pictures in one conversation, against transformers' own models.

* LLaVA-Interleave's build (a SigLIP ``LlavaForConditionalGeneration``, ``toy-siglip``): every picture is one
  tile, wherever it comes; the reference is ``LlavaForConditionalGeneration`` given all the pictures' pixels.
* LLaVA-OneVision (``toy-onevision``): a picture alone is tiled (anyres_max_9); among several, each is padded
  to a square with the mean colour into one tile, then its patches and one newline. The reference is
  ``LlavaOnevisionImageProcessorPil`` given the conversation's pictures as one sample (``batch_num_images``)
  and ``LlavaOnevisionForConditionalGeneration``.
* A family trained with one picture a conversation (LLaVA-NeXT) refuses a second in one line.

The prompt is the runtime's own (its slots); the reference gets the same ids with the image token repeated
for each picture's positions, in order.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from next_helpers import assert_logits_close, hf_answer, picture, toy_bundle

from llava_edge.errors import UserError
from llava_edge.runtimes.llm import ImageSlot

Q1, Q2 = "What is in these pictures?", "And now?"


def _bundle(tmp_path_factory, preset: str):
    return toy_bundle(tmp_path_factory, preset, seed=1)


@pytest.fixture(scope="module")
def interleave(tmp_path_factory):
    return _bundle(tmp_path_factory, "toy-siglip")


@pytest.fixture(scope="module")
def onevision(tmp_path_factory):
    return _bundle(tmp_path_factory, "toy-onevision")


def _load(bundle):
    from llava_edge import EdgeLLaVA

    return EdgeLLaVA.load(bundle, device="cpu", kv_cache="f32", threads=1, prefix_cache=False)


def _ids(slots: list, image_token_id: int) -> list[int]:
    return [image_token_id if isinstance(s, ImageSlot) else s for s in slots]


def _runs(slots: list) -> list[tuple[str, int]]:
    """(picture key, positions) of each picture in the slots, in order."""
    out: list[list] = []
    for s in slots:
        if isinstance(s, ImageSlot):
            if not out or out[-1][0] != s.key or s.index == 0:
                out.append([s.key, 0])
            out[-1][1] += 1
    return [tuple(x) for x in out]


def _prompt_logits(m, session, slots) -> np.ndarray:
    """The runtime's logits after ``slots``, every position decoded from an empty context."""
    m.llm.reset()
    return m.prefill(slots, {p.key: fn for p, fn in session._prepared()}, logits="all")[-1]


def _last_slots(m, session, prompt) -> list:
    prepared = [p for p, _ in session._prepared()]
    return session._fit(prompt, prepared, 1)


def test_interleave_answers_two_pictures_then_a_third_as_transformers(interleave):
    """Two pictures open the first question, a third comes with a follow-up: the prompt holds all three, each
    at 64 positions, and the last answer's first-token logits and greedy ids equal transformers'."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model, bundle = interleave
    hf = LlavaForConditionalGeneration.from_pretrained(model, attn_implementation="eager").eval()
    proc = AutoProcessor.from_pretrained(model).image_processor
    pics = [picture(300, 200, seed=1), picture(120, 260, seed=2), picture(640, 480, seed=3)]
    m = _load(bundle)
    try:
        s = m.session(pics[:2])
        s.ask(Q1, max_tokens=4)
        assert s.history[0].image == 2
        slots = None
        s.pictures.append(pics[2])
        slots = _last_slots(m, s, Q2)
        s.pictures.pop()
        answer = s.ask(Q2, images=[pics[2]], max_tokens=6)
        assert s.history[2].image == 1 and isinstance(answer, str)
        runs = _runs(slots)
        assert [n for _, n in runs] == [m.n_image_tokens] * 3 and len({k for k, _ in runs}) == 3
        ids = _ids(slots, m.image_token_id)
        px = torch.from_numpy(np.concatenate([np.asarray(proc(images=p, return_tensors="np")["pixel_values"],
                                                         np.float32) for p in pics]))
        want, new = hf_answer(hf, m.eos_id, 6, input_ids=torch.tensor([ids]), pixel_values=px)
        assert_logits_close(_prompt_logits(m, s, slots), want)
        assert m.last_ids[: len(new)] == new
    finally:
        m.close()


def test_onevision_takes_each_of_several_pictures_as_one_padded_tile(onevision):
    from transformers import LlavaOnevisionForConditionalGeneration
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil)

    model, bundle = onevision
    hf = LlavaOnevisionForConditionalGeneration.from_pretrained(model, attn_implementation="eager").eval()
    proc = LlavaOnevisionImageProcessorPil.from_pretrained(model)
    pics = [picture(640, 480, seed=4), picture(90, 300, seed=5)]
    m = _load(bundle)
    try:
        alone = m.prepare_image(pics[0])
        assert alone.tiles > 1  # alone, a picture is tiled
        ref = proc(images=[pics], return_tensors="np")  # one sample with two pictures
        assert list(ref["batch_num_images"]) == [2]
        ours = [m.prepare_image(p, alone=False) for p in pics]
        side = m.images.grid.side
        for i, p in enumerate(ours):
            assert p.tiles == 1 and p.positions == side * side + 1 and p.key != alone.key
            np.testing.assert_allclose(p.pixels[0], np.asarray(ref["pixel_values"][i, 0], np.float32), atol=1e-5)
        s = m.session(pics)
        slots = _last_slots(m, s, Q1)
        answer = s.ask(Q1, max_tokens=6)
        assert isinstance(answer, str)
        assert [n for _, n in _runs(slots)] == [side * side + 1] * 2
        ids = _ids(slots, m.image_token_id)
        inputs = {"pixel_values": torch.from_numpy(np.asarray(ref["pixel_values"], np.float32)),
                  "image_sizes": torch.from_numpy(np.asarray(ref["image_sizes"])),
                  "batch_num_images": torch.from_numpy(np.asarray(ref["batch_num_images"]))}
        want, new = hf_answer(hf, m.eos_id, 6, input_ids=torch.tensor([ids]), **inputs)
        assert_logits_close(_prompt_logits(m, s, slots), want)
        assert m.last_ids[: len(new)] == new
    finally:
        m.close()


def test_a_one_picture_family_refuses_a_second_in_one_line(tmp_path_factory):
    _, bundle = _bundle(tmp_path_factory, "toy-next")
    m = _load(bundle)
    try:
        with pytest.raises(UserError) as e:
            m.chat([picture(100, 100), picture(200, 100)], Q1, max_tokens=2)
        assert "\n" not in str(e.value) and "one picture a conversation" in str(e.value)
        s = m.session(picture(100, 100))
        s.ask(Q1, max_tokens=2)
        with pytest.raises(UserError, match="one picture a conversation"):
            s.ask(Q2, images=[picture(50, 80)], max_tokens=2)
        assert len(s.pictures) == 1 and len(s.history) == 2  # the refused picture is not kept
        assert isinstance(s.ask(Q2, max_tokens=2), str)
    finally:
        m.close()


def test_cli_and_interactive_chat_take_several_pictures(interleave, tmp_path):
    """`chat --image a --image b` asks about both; in an interactive chat `/image` adds a picture to the next
    question; a one-picture family refuses a second `--image` in one line."""
    from cli_run import le

    from llava_edge.runtimes import interactive

    _, bundle = interleave
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    picture(300, 200, seed=1).save(a)
    picture(120, 260, seed=2).save(b)
    r = le("chat", "--bundle", bundle, "--image", a, "--image", b, "--max-tokens", "3", "--device", "cpu",
           "--explain", "--no-prefix-cache", Q1, block_torch=True)
    assert r.returncode == 0, r.stderr
    assert f"{a}: one 112 px tile" in r.stderr and f"{b}: one 112 px tile" in r.stderr

    m = _load(bundle)
    try:
        s = m.session(None)
        lines = iter([f"/image {a}", Q1, f"/image {b}", Q2, "/quit"])
        said: list[str] = []
        interactive.run(s, {"max_tokens": 3}, said.append, read_line=lambda _: next(lines))
        assert not [x for x in said if x.startswith("error")], said
        assert len(s.pictures) == 2 and [t.image for t in s.history[::2]] == [1, 1]
    finally:
        m.close()


def test_cli_refuses_a_second_picture_for_a_one_picture_family(tmp_path_factory, tmp_path):
    from cli_run import assert_one_line_error, le

    _, bundle = _bundle(tmp_path_factory, "toy")
    a = tmp_path / "a.png"
    picture(300, 200).save(a)
    r = le("chat", "--bundle", bundle, "--image", a, "--image", a, "--max-tokens", "2", "--device", "cpu", Q1,
           block_torch=True)
    assert_one_line_error(r, "one picture a conversation")


def _expected(m, question: str, pics: list, history: list) -> tuple[str, int]:
    """The runtime's greedy answer to the conversation, and its prompt's positions."""
    from llava_edge.runtimes.pipeline import Sampling

    slots, prepared, _ = m.conversation_slots(question, pics, history)
    emb = {p.key: (lambda p=p: m.encode([p])[0]) for p in prepared}
    m.llm.reset()
    return "".join(m.generate(slots, emb, Sampling(max_tokens=8))).strip(), len(slots)


def test_serve_takes_several_pictures_in_one_message_and_across_turns(interleave, tmp_path):
    """`serve` driven by the official openai and ollama clients: two image_url parts in one message, a third
    picture in a later turn, and Ollama's `images`; each answer and its prompt_tokens equal the runtime's
    own for the same conversation."""
    import ollama
    from openai import OpenAI
    from serve_helpers import data_uri, serving

    from llava_edge.templates import Turn

    _, bundle = interleave
    paths = []
    for i, size in enumerate([(300, 200), (120, 260), (640, 480)]):
        paths.append(tmp_path / f"p{i}.png")
        picture(*size, seed=i + 1).save(paths[-1])
    m = _load(bundle)
    try:
        first, n_first = _expected(m, Q1, paths[:2], [])
        second, n_second = _expected(m, Q2, paths, [Turn("user", Q1, image=2), Turn("assistant", first)])
    finally:
        m.close()

    def part(p):
        return {"type": "image_url", "image_url": {"url": data_uri(p)}}

    with serving(bundle, tmp_path, "--device", "cpu", "--threads", "1", "--no-prefix-cache") as s:
        c = OpenAI(base_url=s.url + "/v1", api_key="-")
        msgs = [{"role": "user", "content": [{"type": "text", "text": Q1}, part(paths[0]), part(paths[1])]}]
        r = c.chat.completions.create(model="b", messages=msgs, max_tokens=8, temperature=0)
        assert (r.choices[0].message.content.strip(), r.usage.prompt_tokens) == (first, n_first)
        msgs += [{"role": "assistant", "content": r.choices[0].message.content},
                 {"role": "user", "content": [{"type": "text", "text": Q2}, part(paths[2])]}]
        r = c.chat.completions.create(model="b", messages=msgs, max_tokens=8, temperature=0)
        assert (r.choices[0].message.content.strip(), r.usage.prompt_tokens) == (second, n_second)
        o = ollama.Client(host=s.url).chat(model="b", options={"temperature": 0, "num_predict": 8}, messages=[
            {"role": "user", "content": Q1, "images": [paths[0].read_bytes(), paths[1].read_bytes()]}])
        assert o.message.content.strip() == first and o.prompt_eval_count == n_first
