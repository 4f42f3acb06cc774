"""The prompt's fixed beginning (BOS, system prompt, ``USER:`` up to the image) is decoded once and loaded after.

A fresh process with a saved beginning must answer exactly as one without it,
while decoding fewer positions; a bad file or an unwritable cache directory must
cost nothing but the saving.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from llava_edge.runtimes.prefix_cache import MIN_POSITIONS, SUBDIR, fixed_beginning

QUESTION = "What shape is at the top left?"


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


def first_turn(m, image) -> tuple[list, np.ndarray, np.ndarray, int]:
    """(slots, embeddings, logits of the last prompt position, positions decoded) of a first question."""
    key, emb = m.image_embeddings(image)
    slots = m.slots_for(m.template.prompt(QUESTION, image=True, history=[]), key, len(emb))
    before = m.stats["prefill_tokens"]
    logits = m.prefill(slots, emb)
    return slots, emb, logits, m.stats["prefill_tokens"] - before


def test_a_second_process_loads_the_beginning_and_computes_the_same(bundle, image, cache):
    first = load(bundle)
    try:
        slots, _, logits_a, decoded_a = first_turn(first, image)
        answer_a = first.chat(image, QUESTION, max_tokens=8)
    finally:
        first.close()
    head = fixed_beginning(slots)
    assert len(head) >= MIN_POSITIONS and decoded_a == len(slots)  # nothing saved yet: all decoded
    assert [p.suffix for p in cache.iterdir()] == [".kv"] and not list(cache.glob(".*"))  # one file, no temporaries

    second = load(bundle)  # a new llama.cpp context, as a new process has
    try:
        _, _, logits_b, decoded_b = first_turn(second, image)
        assert second.llm.slots[: len(head)] == head
        answer_b = second.chat(image, QUESTION, max_tokens=8)
    finally:
        second.close()
    assert decoded_b == len(slots) - len(head)
    assert np.array_equal(logits_a, logits_b)  # the same cells: bit-identical logits
    assert answer_a == answer_b


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
    (saved,) = cache.iterdir()
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
    assert not (tmp_path / "cache").exists()


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
    assert fixed_beginning([1, 2, 3, ("img", 0), ("img", 1), 4]) == [1, 2, 3]
    assert fixed_beginning([1, 2, 3]) == []  # no image: no fixed beginning to save
    assert fixed_beginning([("img", 0), 5]) == []


def test_a_gguf_replaced_behind_the_manifest_gets_a_new_key(tmp_path):
    import os

    from llava_edge.runtimes.prefix_cache import PrefixCache

    gguf = tmp_path / "llm.gguf"
    gguf.write_bytes(b"weights")
    before = PrefixCache(gguf, "ab" * 32, "f16", directory=tmp_path).path_for(list(range(10)))
    st = gguf.stat()
    os.utime(gguf, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same bytes count, rewritten later
    assert PrefixCache(gguf, "ab" * 32, "f16", directory=tmp_path).path_for(list(range(10))) != before
    assert PrefixCache(gguf, "ab" * 32, "f32", directory=tmp_path).path_for(list(range(10))) != before
