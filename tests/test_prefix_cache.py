"""Prompt beginnings are decoded once and loaded after: the fixed one (BOS, system prompt,
``USER:`` up to the image) and, while the language model runs on the CPU, the one through an image.

A fresh process with a saved beginning must answer exactly as one without it,
while decoding fewer positions (and, for an image seen before, running no vision
graph); a bad file or an unwritable cache directory must cost nothing but the
saving; the directory stays under its size limit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from llava_edge.errors import UserError
from llava_edge.runtimes.prefix_cache import (LIMIT_ENV, MIN_POSITIONS, SUBDIR, PrefixCache, decode_slots,
                                              encode_slots, fixed_beginning, through_last_image)

QUESTION = "What shape is at the top left?"
OTHER_QUESTION = "How many shapes are there?"


@pytest.fixture()
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("LLAVA_EDGE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / SUBDIR


@pytest.fixture()
def image(toy_data) -> Path:
    return sorted((toy_data / "images").glob("eval_*.png"))[3]


def load(bundle, **kw):
    from llava_edge import EdgeLLaVA

    return EdgeLLaVA.load(bundle, device="cpu", threads=2, **kw)


def first_turn(m, image, question: str = QUESTION) -> tuple[list, np.ndarray, np.ndarray, int]:
    """(slots, embeddings, logits of the last prompt position, positions decoded) of a first question."""
    key, emb = m.image_embeddings(image)
    slots = m.slots_for(m.template.prompt(question, image=True, history=[]), key, len(emb))
    before = m.stats["prefill_tokens"]
    logits = m.prefill(slots, emb)
    return slots, emb, logits, m.stats["prefill_tokens"] - before


def asked(m, image, question: str) -> tuple[str, int, np.ndarray]:
    """(answer, positions decoded before the first token, that token's logits) of ``m.chat``."""
    before = m.stats["prefill_tokens"]
    seen: list = []
    prefill = m.prefill
    m.prefill = lambda *a, **kw: seen.append(prefill(*a, **kw)) or seen[-1]
    try:
        answer = m.chat(image, question, max_tokens=8)
    finally:
        del m.prefill
    return answer, m.stats["prefill_tokens"] - before, seen[0]


@dataclass
class Asked:
    answer: str
    decoded: int  # positions decoded before the first token
    logits: np.ndarray  # the first token's
    stats: dict
    slots: list  # the prompt's positions
    held: list  # what the context held after the answer


def ask_new_process(bundle, image, question: str = QUESTION, **kw) -> Asked:
    """``chat`` through a freshly loaded ``EdgeLLaVA``: a new llama.cpp context, as a new process has."""
    m = load(bundle, **kw)
    try:
        picture, _ = m.lazy_image(image)
        slots = m.slots_for(m.template.prompt(question, image=True, history=[]), picture.key, picture.positions)
        answer, decoded, logits = asked(m, image, question)
        return Asked(answer, decoded, logits, dict(m.stats), slots, list(m.llm.slots))
    finally:
        m.close()


def test_a_second_process_loads_the_beginning_and_computes_the_same(bundle, image, cache):
    first = load(bundle, cache_images=False)
    try:
        slots, _, logits_a, decoded_a = first_turn(first, image)
        answer_a = first.chat(image, QUESTION, max_tokens=8)
    finally:
        first.close()
    head = fixed_beginning(slots)
    assert len(head) >= MIN_POSITIONS and decoded_a == len(slots)  # nothing saved yet: all decoded
    assert [p.suffix for p in cache.iterdir()] == [".kv"] and not list(cache.glob(".*"))  # one file, no temporaries

    second = load(bundle, cache_images=False)  # a new llama.cpp context, as a new process has
    try:
        _, _, logits_b, decoded_b = first_turn(second, image)
        assert second.llm.slots[: len(head)] == head
        answer_b = second.chat(image, QUESTION, max_tokens=8)
    finally:
        second.close()
    assert decoded_b == len(slots) - len(head)
    assert np.array_equal(logits_a, logits_b)  # the same cells: bit-identical logits
    assert answer_a == answer_b


def test_a_new_process_asked_about_a_picture_seen_before_decodes_only_the_question(bundle, image, cache):
    """The KV cache through the image, saved after the first answer, spares the vision graph and the
    image's prefill; the answer and the first token's logits are those of a process that saved nothing."""
    first = ask_new_process(bundle, image)  # on the CPU: images are saved
    assert first.decoded == len(first.slots)  # nothing saved before: all decoded
    assert len(list(cache.glob("*.kv"))) == 2 and not list(cache.glob(".*"))  # the beginning, the image

    want = ask_new_process(bundle, image, OTHER_QUESTION, prefix_cache=False)
    got = ask_new_process(bundle, image, OTHER_QUESTION)
    through = through_last_image(got.slots)
    assert got.stats["vision_encodes"] == 0 and got.stats["image_prefix_loads"] == 1
    assert want.decoded == len(want.slots) and got.decoded == len(got.slots) - len(through)  # only the question
    assert np.array_equal(got.logits, want.logits) and got.answer == want.answer

    again = ask_new_process(bundle, image)  # the first question again: the same answer
    assert again.decoded == len(again.slots) - len(through) and again.answer == first.answer


def test_only_the_picture_is_saved_never_the_question_or_the_answer(bundle, image, cache):
    """The file through the image holds its positions only, and only its owner may read it."""
    import json
    import stat

    from llava_edge.runtimes.prefix_cache import _HASH, _LEN, MAGIC

    first = ask_new_process(bundle, image)
    slots = first.slots
    assert first.held[: len(slots)] == slots and len(first.held) > len(slots)  # the context keeps the conversation
    files = sorted(cache.glob("*.kv"), key=lambda p: p.stat().st_size)
    body = files[-1].read_bytes()[len(MAGIC) + _HASH :]
    n = int.from_bytes(body[:_LEN], "little")
    assert decode_slots(json.loads(body[_LEN : _LEN + n])) == through_last_image(slots)
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files)
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700


def test_another_picture_or_vision_graph_does_not_match_a_saved_image(bundle, image, toy_data, cache):
    ask_new_process(bundle, image)
    other = ask_new_process(bundle, sorted((toy_data / "images").glob("eval_*.png"))[4])
    slots = other.slots
    assert other.stats["vision_encodes"] == 1 and other.stats["image_prefix_loads"] == 0
    assert other.decoded == len(slots) - len(fixed_beginning(slots))  # the beginning loaded, the picture decoded
    c = PrefixCache(bundle / "llm.f32.gguf", "ab" * 32, "f16", directory=cache, vision={"sha256": "1"})
    d = PrefixCache(bundle / "llm.f32.gguf", "ab" * 32, "f16", directory=cache, vision={"sha256": "2"})
    assert c.path_for(slots) != d.path_for(slots)  # another vision variant (or backend) embeds differently
    assert c.path_for(fixed_beginning(slots)) == d.path_for(fixed_beginning(slots))  # no image: shared


def test_images_are_saved_only_where_the_language_model_runs_on_the_cpu(bundle, tmp_path):
    gguf = bundle / "llm.f32.gguf"
    vision = {"sha256": "1"}
    assert PrefixCache(gguf, "ab" * 32, "f16", directory=tmp_path, vision=vision).images
    assert not PrefixCache(gguf, "ab" * 32, "f16", offloaded=True, directory=tmp_path, vision=vision).images
    assert not PrefixCache(gguf, "ab" * 32, "f16", directory=tmp_path, vision=vision, images=False).images
    assert not PrefixCache(gguf, "ab" * 32, "f16", directory=tmp_path).images  # no vision identity, no images


def test_a_damaged_image_file_is_decoded_over_and_replaced(bundle, image, cache):
    want = ask_new_process(bundle, image)
    (big,) = sorted(cache.glob("*.kv"), key=lambda p: p.stat().st_size)[1:]
    good = bytearray(big.read_bytes())
    good[-1] ^= 0xFF  # one flipped bit in the cells
    big.write_bytes(bytes(good))
    got = ask_new_process(bundle, image)
    assert got.stats["vision_encodes"] == 1 and got.stats["image_prefix_loads"] == 0
    assert got.answer == want.answer and got.decoded == len(got.slots) - len(fixed_beginning(got.slots))
    good[-1] ^= 0xFF
    assert big.read_bytes() == bytes(good)  # rewritten whole after the answer


def test_the_directory_is_kept_under_its_limit_least_recently_used_first(tmp_path, monkeypatch, bundle):
    import os

    c = PrefixCache(bundle / "llm.f32.gguf", "ab" * 32, "f16", directory=tmp_path)
    for i, name in enumerate(["old", "used", "new"]):
        (tmp_path / f"{name}.kv").write_bytes(b"x" * 400)
        os.utime(tmp_path / f"{name}.kv", ns=(10**18 + i * 10**9, 10**18 + i * 10**9))
    os.utime(tmp_path / "used.kv", ns=(10**18 + 9 * 10**9, 10**18 + 9 * 10**9))  # loaded after "new" was saved
    c.limit = 1000
    c.prune(keep=tmp_path / "new.kv")
    assert sorted(p.stem for p in tmp_path.glob("*.kv")) == ["new", "used"]
    c.limit = 100
    c.prune(keep=tmp_path / "new.kv")  # the file just written stays even when alone over the limit
    assert [p.stem for p in tmp_path.glob("*.kv")] == ["new"]

    monkeypatch.setenv(LIMIT_ENV, "lots")
    with pytest.raises(UserError, match=LIMIT_ENV):
        PrefixCache(bundle / "llm.f32.gguf", "ab" * 32, "f16", directory=tmp_path)
    monkeypatch.setenv(LIMIT_ENV, "0.5")
    assert PrefixCache(bundle / "llm.f32.gguf", "ab" * 32, "f16", directory=tmp_path).limit == 1 << 19


def test_a_zero_limit_saves_nothing(bundle, image, cache, monkeypatch):
    monkeypatch.setenv(LIMIT_ENV, "0")
    ask_new_process(bundle, image)
    assert not cache.exists() or not list(cache.iterdir())


def test_positions_are_written_compactly_and_read_back():
    from llava_edge.runtimes.llm import ImageSlot as S

    slots = [1, 2, S("a", 0), S("a", 1), S("a", 2), 7, S("b", 0), S("b", 1), 9]
    assert encode_slots(slots) == [1, 2, ["image", "a", 0, 3], 7, ["image", "b", 0, 2], 9]
    assert decode_slots(encode_slots(slots)) == slots
    assert through_last_image(slots) == slots[:-1] and through_last_image([1, 2]) == []


def test_the_file_belongs_to_one_model_and_kv_cache_type(bundle, image, cache):
    for kv in ("f16", "f32"):
        m = load(bundle, kv_cache=kv)
        try:
            first_turn(m, image)
        finally:
            m.close()
    assert len(list(cache.iterdir())) == 2  # an f32 cache is not loaded from f16 cells, nor the other way


def test_a_corrupt_file_is_decoded_over_and_replaced(bundle, image, cache):
    m = load(bundle)
    try:
        slots, _, want, _ = first_turn(m, image)
    finally:
        m.close()
    (saved,) = cache.iterdir()  # prefill alone saves the beginning; the image is saved after an answer
    good = saved.read_bytes()
    saved.write_bytes(good[: len(good) // 2])  # a truncated file
    m = load(bundle)
    try:
        _, _, got, decoded = first_turn(m, image)
    finally:
        m.close()
    assert decoded == len(slots) and np.array_equal(got, want)
    assert saved.read_bytes() == good  # rewritten whole


def test_an_unwritable_cache_or_prefix_cache_false_change_nothing(bundle, image, tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the cache directory would be")
    monkeypatch.setenv("LLAVA_EDGE_CACHE", str(blocker))
    m = load(bundle)
    try:
        slots, _, want, decoded = first_turn(m, image)
        assert decoded == len(slots) and m.chat(image, QUESTION, max_tokens=4)
    finally:
        m.close()
    monkeypatch.setenv("LLAVA_EDGE_CACHE", str(tmp_path / "cache"))
    m = load(bundle, prefix_cache=False)
    try:
        _, _, got, decoded = first_turn(m, image)
        first_turn(m, image)
    finally:
        m.close()
    assert np.array_equal(got, want) and decoded == len(slots)
    assert not (tmp_path / "cache" / "prefix-kv").exists()


def test_prompt_logits_never_use_it(bundle, image, cache):
    """Drift and parity checks need logits at every position, so they decode the beginning themselves."""
    m = load(bundle)
    try:
        first_turn(m, image)  # saves the beginning
        text = m.template.prompt(QUESTION, image=True, history=[])
        n = len(m.slots_for(text, "k", m.manifest.vision["num_image_tokens"]))
        assert m.prompt_logits(image, text).shape[0] == n
    finally:
        m.close()


def test_fixed_beginning_is_what_comes_before_the_image():
    from llava_edge.runtimes.llm import ImageSlot

    assert fixed_beginning([1, 2, 3, ImageSlot("img", 0), ImageSlot("img", 1), 4]) == [1, 2, 3]
    assert fixed_beginning([1, 2, 3]) == []  # no image: no fixed beginning to save
    assert fixed_beginning([ImageSlot("img", 0), 5]) == []


def test_a_gguf_replaced_behind_the_manifest_gets_a_new_key(tmp_path):
    import os

    gguf = tmp_path / "llm.gguf"
    gguf.write_bytes(b"weights")
    before = PrefixCache(gguf, "ab" * 32, "f16", directory=tmp_path).path_for(list(range(10)))
    st = gguf.stat()
    os.utime(gguf, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same bytes count, rewritten later
    assert PrefixCache(gguf, "ab" * 32, "f16", directory=tmp_path).path_for(list(range(10))) != before
    assert PrefixCache(gguf, "ab" * 32, "f32", directory=tmp_path).path_for(list(range(10))) != before
