"""``--image-tokens K`` on a tiled family: at most K positions a picture, every part scaled by one factor.

The reference for the packing is torch and transformers: ``unpad_image`` from transformers' LLaVA-NeXT model
crops the tile grid, ``F.interpolate`` (bilinear, ``align_corners=False``) scales the base tile and the
grid, and the newlines are appended as ``pack_image_features`` does. The runtime side is the bundle's ONNX
graph and the numpy packing; drift measures the cap against the full transformers model.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from next_helpers import picture, toy_bundle

from llava_edge import anyres
from llava_edge.anyres import HF_DEFAULT_PINPOINTS, AnyresSpec
from llava_edge.errors import UserError

SPEC = AnyresSpec(336, 14, HF_DEFAULT_PINPOINTS, "hw", "hf")
SIZES = [(640, 480), (480, 640), (336, 336), (1000, 100), (100, 1000), (1, 1), (2000, 1500), (300, 200),
         (672, 672), (37, 501)]
CAPS = [5000, 2340, 1500, 576, 300, 64, 16, 8]


def capped(spec: AnyresSpec, k: int | None) -> AnyresSpec:
    return dataclasses.replace(spec, max_positions=k)


def test_a_capped_picture_takes_at_most_k_positions_and_the_most_that_fit():
    """Within the cap, nothing changes; over it, the count is at most K, and one patch more a tile side would
    not fit; the count never falls as K grows."""
    for w, h in SIZES:
        full = anyres.num_positions(w, h, SPEC)
        oh, ow = anyres.packed_grid_size(w, h, SPEC)
        counts = []
        for k in sorted(CAPS):
            c = capped(SPEC, k)
            try:
                n, t = anyres.num_positions(w, h, c), anyres.base_side(w, h, c)
            except UserError as e:
                assert "\n" not in str(e) and f"--image-tokens {k}" in str(e)
                assert 1 + oh // SPEC.side * (ow // SPEC.side + 1) > k or k < 4  # even one patch a tile is too many
                continue
            counts.append(n)
            if full <= k:
                assert (n, t) == (full, SPEC.side)
                continue
            assert n <= k and t < SPEC.side
            gh, gw = anyres.packed_grid_size(w, h, c)
            assert (gh, gw) == (max(1, oh * t // SPEC.side), max(1, ow * t // SPEC.side))
            bigger = (t + 1) ** 2 + max(1, oh * (t + 1) // SPEC.side) * (max(1, ow * (t + 1) // SPEC.side) + 1)
            assert bigger > k  # t is the largest scale that fits
        assert counts == sorted(counts)


def reference_pack(features: torch.Tensor, w: int, h: int, spec: AnyresSpec, newline: torch.Tensor, t: int,
                   out_hw: tuple[int, int]) -> torch.Tensor:
    """transformers' unpad_image on the stitched grid, then torch's bilinear resize of grid and base tile."""
    from transformers.models.llava_next.modeling_llava_next import unpad_image

    s, dim = spec.side, features.shape[-1]
    rows, cols = anyres.grid(w, h, spec)
    g = features[1:].view(rows, cols, s, s, dim).permute(4, 0, 2, 1, 3).reshape(dim, rows * s, cols * s)
    g = unpad_image(g, (h, w))
    g = F.interpolate(g[None], out_hw, mode="bilinear", align_corners=False)[0]
    g = torch.cat([g, newline[:, None, None].expand(dim, g.shape[1], 1)], dim=-1).flatten(1).T
    base = features[0].view(s, s, dim).permute(2, 0, 1)[None]
    base = F.interpolate(base, (t, t), mode="bilinear", align_corners=False)[0].flatten(1).T
    return torch.cat([base, g])


@pytest.mark.parametrize("size", [(640, 480), (480, 640), (1000, 100), (300, 200)])
@pytest.mark.parametrize("k", [1500, 576, 100])
def test_packing_under_the_cap_equals_torch(size, k):
    w, h = size
    c = capped(SPEC, k)
    rows, cols = anyres.grid(w, h, SPEC)
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((1 + rows * cols, SPEC.side**2, 16)).astype(np.float32)
    newline = rng.standard_normal(16).astype(np.float32)
    ours = anyres.pack(feats, w, h, c, newline)
    want = reference_pack(torch.from_numpy(feats), w, h, SPEC, torch.from_numpy(newline), anyres.base_side(w, h, c),
                          anyres.packed_grid_size(w, h, c)).numpy()
    assert ours.shape == want.shape == (anyres.num_positions(w, h, c), 16)
    np.testing.assert_allclose(ours, want, rtol=0, atol=1e-5)


def test_bad_caps_get_one_line_errors():
    for bad in (0, -3, 2.5, True):
        with pytest.raises(UserError) as e:
            capped(SPEC, bad)
        assert "\n" not in str(e.value) and "--image-tokens" in str(e.value)
    with pytest.raises(UserError) as e:
        anyres.num_positions(2000, 1500, capped(SPEC, 3))
    assert "\n" not in str(e.value) and "too few" in str(e.value)


# -- through a bundle ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return toy_bundle(tmp_path_factory, "toy-next", seed=0)


def test_the_runtime_s_capped_features_equal_transformers_tiles_packed_by_torch(toy):
    """The bundle under ``image_tokens=K``: a picture over the cap takes at most K positions, and what reaches
    the language model equals transformers' own tile features packed by the torch reference; its cells are keyed
    apart from the uncapped picture's; the context is sized for the cap."""
    from transformers import LlavaNextForConditionalGeneration

    from llava_edge import EdgeLLaVA

    model, bundle = toy
    hf = LlavaNextForConditionalGeneration.from_pretrained(model, attn_implementation="eager").eval()
    im = picture(640, 480)
    full = EdgeLLaVA.load(bundle, device="cpu", kv_cache="f32", threads=1, prefix_cache=False)
    try:
        whole = full.prepare_image(im)
        cap = whole.positions // 3
        m = EdgeLLaVA.load(bundle, device="cpu", kv_cache="f32", threads=1, prefix_cache=False, image_tokens=cap)
    finally:
        full.close()
    try:
        p = m.prepare_image(im)
        assert p.positions <= cap < whole.positions and p.key != whole.key
        assert np.array_equal(p.pixels, whole.pixels)
        _, emb = m.image_embeddings(im)
        assert emb.shape[0] == p.positions
        spec = m.images.grid
        with torch.no_grad():
            tiles = m.family.hf_tile_features(hf, torch.from_numpy(p.pixels)).float()
        newline = torch.from_numpy(m.images.newline)
        w, h = p.size
        want = reference_pack(tiles, w, h, dataclasses.replace(spec, max_positions=None), newline,
                              anyres.base_side(w, h, spec), anyres.packed_grid_size(w, h, spec)).numpy()
        assert want.shape == emb.shape
        assert np.abs(emb - want).max() <= 1e-4 * np.abs(want).max()
        assert f"at most {cap} a picture" in m.explain()
        assert "scaled to" in m.images.describe(p) and f"{whole.positions} uncapped" in m.images.describe(p)
        assert m.family.max_positions(m.manifest.image, m.n_image_tokens, cap) == cap
        answer = m.chat(im, "What is in the image?", max_tokens=3)
        assert isinstance(answer, str)
    finally:
        m.close()


def test_cli_chat_with_a_cap_and_its_one_line_errors(toy, tmp_path):
    from cli_run import assert_one_line_error, le

    _, bundle = toy
    img = tmp_path / "p.png"
    picture(640, 480).save(img)
    r = le("chat", "--bundle", bundle, "--image", img, "--image-tokens", "100", "--explain", "--max-tokens", "2",
           "--device", "cpu", "--no-prefix-cache", "What is it?", block_torch=True)
    assert r.returncode == 0, r.stderr
    assert "at most 100 a picture" in r.stderr and "scaled to" in r.stderr
    r = le("chat", "--bundle", bundle, "--image", img, "--image-tokens", "100", "--token-method", "pool",
           "--device", "cpu", "What is it?", block_torch=True)
    assert_one_line_error(r, "--token-method")
    r = le("chat", "--bundle", bundle, "--image", img, "--image-tokens", "0", "--device", "cpu", "What is it?",
           block_torch=True)
    assert_one_line_error(r, "--image-tokens")
    r = le("chat", "--bundle", bundle, "--image", img, "--image-tokens", "2", "--device", "cpu", "What is it?",
           block_torch=True)
    assert_one_line_error(r, "too few")
    r = le("quantize", bundle, "--image-tokens", "16", "--vision", "int8")
    assert_one_line_error(r, "--image-tokens K", progress=True)


def test_drift_measures_the_cap_against_the_full_model(toy, tmp_path, capsys):
    """`drift --image-tokens K`: every pair runs under the cap, against transformers' full model: its logits
    and answers are compared, its image features are not (they are fewer), the reduced-token gate covers it,
    and `--record` is refused."""
    from test_drift import write_scienceqa

    from llava_edge.cli import main

    model, bundle = toy
    sqa = write_scienceqa(tmp_path / "sqa", n=3)
    for i, size in enumerate([(640, 480), (300, 120), (90, 260)]):
        picture(*size, seed=i).save(tmp_path / "sqa" / "images" / f"s{i}.png")
    args = ["drift", str(bundle), "--reference", str(model), "--eval", str(sqa), "--variants", "fp32:f32",
            "--kv-cache", "f32", "--threads", "1", "--max-tokens", "3"]
    rc = main([*args, "--report", str(tmp_path / "full")])
    assert rc == 0, capsys.readouterr().err
    rc = main([*args, "--report", str(tmp_path / "cap"), "--image-tokens", "40"])
    assert rc == 0, capsys.readouterr().err
    full = json.loads((tmp_path / "full" / "drift.json").read_text())["pairs"][0]
    pair = json.loads((tmp_path / "cap" / "drift.json").read_text())["pairs"][0]
    assert full["token_drift"]["kl_mean"] < 1e-6  # uncapped, the bundle is the reference
    assert pair["token_reduction"] == {"method": "bilinear-cap", "tokens": 40}
    assert pair["token_drift"]["kl_mean"] > 1e-4  # the cap changes what the model sees: drift shows it
    assert "cos_min" not in pair["vision_drift"] and pair["prompt_mismatches"] == 0
    gates = json.loads((tmp_path / "cap" / "drift.json").read_text())["gates"]
    assert {g["gate"] for g in gates} == {"tokens"}
    capsys.readouterr()
    assert main([*args, "--image-tokens", "40", "--record"]) != 0
    err = capsys.readouterr().err.strip()
    assert "--record" in err and "\n" not in err


def test_serve_with_a_cap_counts_and_answers_as_chat_does(toy, tmp_path):
    """`serve --image-tokens K` on a LLaVA-NeXT bundle, driven by the official openai client: usage counts the
    capped positions and the greedy answer equals `EdgeLLaVA.chat`'s under the same cap."""
    from openai import OpenAI
    from serve_helpers import serving, user_message

    from llava_edge import EdgeLLaVA

    _, bundle = toy
    img = tmp_path / "p.png"
    picture(640, 480).save(img)
    m = EdgeLLaVA.load(bundle, device="cpu", threads=1, prefix_cache=False, image_tokens=100)
    try:
        want = m.chat(str(img), "What is it?", max_tokens=6)
        slots, _, _ = m.conversation_slots("What is it?", str(img))
        positions = m.prepare_image(str(img)).positions
    finally:
        m.close()
    assert positions <= 100
    with serving(bundle, tmp_path, "--device", "cpu", "--threads", "1", "--no-prefix-cache",
                 "--image-tokens", "100") as s:
        c = OpenAI(base_url=s.url + "/v1", api_key="-")
        r = c.chat.completions.create(model="b", messages=[user_message("What is it?", img)], max_tokens=6,
                                      temperature=0)
        assert r.choices[0].message.content == want
        assert r.usage.prompt_tokens == len(slots)
