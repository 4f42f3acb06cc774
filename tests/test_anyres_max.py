"""The anyres_max_N cap of llava_edge.anyres against transformers 5.24 (this venv), with torch only as the reference.

* ``anyres.resize_bilinear`` against ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)``;
* counts and packed features against ``LlavaOnevisionModel.pack_image_features`` (tiny SigLIP / CLIP towers,
  a tiny Qwen2 LM) and ``LlavaOnevisionProcessor`` with ``LlavaOnevisionImageProcessorPil`` (built in memory:
  without torchvision the processor cannot be given a video processor, see _HF);
* one-line errors for a bad N.

Three towers: LLaVA-OneVision's SigLIP at 384 px with 14 px patches (27 x 27 per tile) and its 36 pinpoints,
CLIP-336 with LLaVA-1.6's five (the cap as an option for LLaVA-NeXT), and a 28 px tile with strips among its
pinpoints, where N = 1 shrinks a 1000 x 100 picture's 2 x 10 patch grid to no rows at all.
"""

from __future__ import annotations

import itertools
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from llava_edge import anyres
from llava_edge.anyres import AnyresSpec
from llava_edge.errors import UserError
from llava_edge.families import FAMILIES


def onevision_spec(config: dict) -> AnyresSpec:
    """The OneVision family's reading of a checkpoint's config (its cap from ``vision_aspect_ratio``)."""
    return FAMILIES["llava-onevision"].anyres_spec(SimpleNamespace(config=config))

torch = pytest.importorskip("torch")

LLAVA16 = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
TINY = [[28, 56], [56, 28], [56, 56], [84, 84], [28, 140], [140, 28]]
NS = (1, 2, 9)
SIZES = [
    (384, 384), (1000, 1000), (336, 336),  # square: a tie between transposed pinpoints
    (300, 200), (200, 300), (20, 12), (1, 1),  # within one tile (of one tower or all)
    (100, 1000), (1000, 100), (2000, 200),  # strips, 1:10 and 10:1
    (3000, 2000), (2600, 2500),  # larger than every pinpoint (OneVision's largest is 2304 x 2304)
    (640, 480), (1920, 1080), (480, 640), (1280, 720),
]
HIDDEN = 8  # the LM width of the tiny models: packing moves and mixes vectors, any width does
REL = 1e-6  # the bilinear resize's allowance, relative to the largest magnitude: float32 rounding of torch's sums


def _towers():
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil)

    return {  # name: (tile, patch, pinpoints, vision model_type, feature strategy)
        "siglip384": (384, 14, LlavaOnevisionImageProcessorPil.image_grid_pinpoints, "siglip_vision_model", "full"),
        "clip336": (336, 14, LLAVA16, "clip_vision_model", "default"),
        "tiny": (28, 14, TINY, "siglip_vision_model", "full"),
    }


TOWER_NAMES = ("siglip384", "clip336", "tiny")
CASES = [(t, n, w, h) for t in TOWER_NAMES for n in NS for w, h in SIZES]


def _picture(w, h) -> Image.Image:
    return Image.fromarray(np.random.default_rng([w, h]).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _torch_resize(x: np.ndarray, height: int, width: int, channels_last: bool) -> np.ndarray:
    t = torch.from_numpy(x)[None].permute(0, 3, 1, 2)  # (1, C, h, w), channels-last in memory
    if not channels_last:
        t = t.contiguous()  # torch picks another CPU kernel for each layout; both are references
    out = torch.nn.functional.interpolate(t, size=(height, width), mode="bilinear", align_corners=False)
    return out[0].permute(1, 2, 0).numpy()


def _rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got.astype(np.float64) - ref).max() / max(np.abs(ref).max(), 1e-30))


# ---------------------------------------------------------------- the bilinear resize alone

# (input, output) side pairs: upscale, downscale, equal, to and from one pixel, integer and non-integer ratios
SIDE_PAIRS = [(1, 1), (1, 5), (5, 1), (2, 3), (3, 2), (4, 1), (7, 7), (7, 3), (3, 7), (13, 6), (27, 13), (27, 40),
              (40, 27), (54, 27), (81, 53), (100, 31), (31, 100), (162, 99), (135, 108), (9, 81), (75, 60)]


@pytest.mark.parametrize("channels", [5, 16])  # under and over the CPU kernels' vector width
def test_resize_bilinear_equals_torch(channels):
    rng = np.random.default_rng(channels)
    worst, exact, n = 0.0, 0, 0
    pairs = list(itertools.product(SIDE_PAIRS, SIDE_PAIRS[::-1]))[:: 3]  # heights crossed with widths, thinned
    pairs += [((162, 120), (80, 60)), ((20, 300), (10, 150))]  # outputs over 128 px a side: torch's generic kernel
    for (ih, oh), (iw, ow) in pairs:
        x = (rng.standard_normal((ih, iw, channels)) * rng.uniform(0.01, 100)).astype(np.float32)
        got = anyres.resize_bilinear(x, oh, ow)
        assert got.dtype == np.float32 and got.shape == (oh, ow, channels)
        for channels_last in (True, False):
            ref = _torch_resize(x, oh, ow, channels_last)
            err = _rel_err(got, ref)
            assert err <= REL, ((ih, iw), (oh, ow), channels_last, err)
            worst, exact, n = max(worst, err), exact + bool((got == ref).all()), n + 1
    print(f"resize_bilinear vs torch, C={channels}: {n} maps, max relative error {worst:.2e}, {exact} bit-equal")
    assert n >= 150


def test_resize_bilinear_same_size_is_a_copy_and_refuses_bad_input():
    x = np.random.default_rng(1).standard_normal((6, 9, 3)).astype(np.float32)
    np.testing.assert_array_equal(anyres.resize_bilinear(x, 6, 9), x)
    np.testing.assert_array_equal(anyres.resize_bilinear(x, 6, 9), _torch_resize(x, 6, 9, True))
    for bad, size in ((x.astype(np.float64), (3, 3)), (x[0], (3, 3)), (x, (0, 3)), (x[:0], (3, 3))):
        with pytest.raises(ValueError, match="resize_bilinear"):
            anyres.resize_bilinear(bad, *size)


# ---------------------------------------------------------------- transformers' OneVision model and processor

class _HF:
    """Per tower: a tiny LlavaOnevisionModel, and per (tower, N) a LlavaOnevisionProcessor with a word tokenizer."""

    def __init__(self):
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import (LlavaOnevisionConfig, LlavaOnevisionModel, LlavaOnevisionProcessor,
                                  PreTrainedTokenizerFast, ProcessorMixin)
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
            LlavaOnevisionImageProcessorPil)

        words = Tokenizer(models.WordLevel({"[UNK]": 0, "<image>": 1, "<video>": 2, "hi": 3}, unk_token="[UNK]"))
        words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tok = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]",
                                      additional_special_tokens=["<image>", "<video>"])
        self.towers = _towers()
        self.model, self.processor, self._done = {}, {}, {}
        # ProcessorMixin checks each sub-processor's class, and the video processor's base class needs
        # torchvision, absent here (NOTES.md); images never reach the video processor, so None is let through
        check = ProcessorMixin.check_argument_for_proper_class

        def lenient(proc, name, arg):
            return None if name == "video_processor" and arg is None else check(proc, name, arg)

        for name, (tile, patch, pins, vision_type, strategy) in self.towers.items():
            cfg = LlavaOnevisionConfig(
                vision_config={"model_type": vision_type, "image_size": tile, "patch_size": patch, "hidden_size": 8,
                               "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2},
                text_config={"model_type": "qwen2", "hidden_size": HIDDEN, "intermediate_size": 16,
                             "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
                             "vocab_size": 8},
                image_grid_pinpoints=pins, vision_feature_select_strategy=strategy)
            self.model[name] = LlavaOnevisionModel(cfg).eval()
            ip = LlavaOnevisionImageProcessorPil(size={"height": tile, "width": tile}, image_grid_pinpoints=pins)
            side = tile // patch
            for n in NS:
                ProcessorMixin.check_argument_for_proper_class = lenient
                try:  # "default" counts the class token, then drops it, as llava-hf's CLIP processors do
                    self.processor[name, n] = LlavaOnevisionProcessor(
                        image_processor=ip, tokenizer=tok, vision_feature_select_strategy=strategy,
                        num_image_tokens=side * side + (strategy == "default"), vision_aspect_ratio=f"anyres_max_{n}")
                finally:
                    ProcessorMixin.check_argument_for_proper_class = check

    def config(self, tower, n) -> dict:
        return {**self.model[tower].config.to_dict(), "vision_aspect_ratio": f"anyres_max_{n}"}

    def run(self, tower, n, w, h) -> dict:
        if (tower, n, w, h) not in self._done:
            self._done[tower, n, w, h] = self._run(tower, n, w, h)
        return self._done[tower, n, w, h]

    def _run(self, tower, n, w, h) -> dict:
        from transformers.models.llava_onevision.modeling_llava_onevision import (get_anyres_image_grid_shape,
                                                                                  unpad_image)

        tile, patch, pins, _, _ = self.towers[tower]
        proc, model = self.processor[tower, n], self.model[tower]
        out = proc(images=_picture(w, h), text="<image>", return_tensors="np")
        side = tile // patch
        rows, cols = get_anyres_image_grid_shape([h, w], pins, tile)
        features = np.random.default_rng([w, h, n]).standard_normal((1 + rows * cols, side * side, HIDDEN))
        features = features.astype(np.float32)
        res = {"tokens": int((out["input_ids"] == proc.image_token_id).sum()), "grid": (rows, cols),
               "tiles": out["pixel_values"].shape[1], "features": features,
               "newline": model.image_newline.detach().numpy(),
               "unpadded": tuple(unpad_image(torch.zeros(1, rows * side, cols * side), [h, w]).shape[1:]),
               "count": proc._get_number_of_features(h, w, tile, tile) - (proc.vision_feature_select_strategy
                                                                          == "default")}
        try:
            with torch.no_grad():
                packed, lens = model.pack_image_features([torch.from_numpy(features)], torch.tensor([[h, w]]),
                                                         image_newline=model.image_newline,
                                                         vision_aspect_ratio=f"anyres_max_{n}")
            res["packed"] = packed[0].numpy()
            assert int(lens[0]) == len(res["packed"])
        except RuntimeError as e:  # torch's interpolate refuses an empty output
            res["model_error"] = str(e)
        return res


@pytest.fixture(scope="module")
def hf():
    pytest.importorskip("transformers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _HF()


def _id(tower, n, w, h) -> str:
    return f"{tower}-max{n}-{w}x{h}"


@pytest.mark.parametrize("tower,n,w,h", CASES, ids=[_id(*c) for c in CASES])
def test_equals_transformers(hf, tower, n, w, h):
    ref = hf.run(tower, n, w, h)
    spec = onevision_spec(hf.config(tower, n))
    tile, patch = hf.towers[tower][:2]
    assert (spec.tile, spec.patch, spec.max_grid, spec.orientation, spec.rounding) == (tile, patch, n, "hw", "hf")
    assert anyres.grid(w, h, spec) == ref["grid"] and ref["tiles"] == 1 + ref["grid"][0] * ref["grid"][1]
    assert anyres.unpadded_size(w, h, spec) == ref["unpadded"]
    if "model_error" in ref:  # transformers' model has no answer here; its processor still counts (see below)
        assert "greater than 0" in ref["model_error"]
        with pytest.raises(UserError, match=f"under anyres_max_{n}: too thin") as e:
            anyres.num_positions(w, h, spec)
        assert "\n" not in str(e.value)
        with pytest.raises(UserError, match="too thin"):
            anyres.pack(ref["features"], w, h, spec, ref["newline"])
        return
    assert anyres.num_positions(w, h, spec) == ref["tokens"] == ref["count"] == len(ref["packed"])
    packed = anyres.pack(ref["features"], w, h, spec, ref["newline"])
    assert packed.dtype == np.float32 and packed.shape == ref["packed"].shape
    if anyres.packed_grid_size(w, h, spec) == anyres.unpadded_size(w, h, spec):
        np.testing.assert_array_equal(packed, ref["packed"])  # uncapped: only moved, so equal
    else:
        assert _rel_err(packed, ref["packed"]) <= REL


def test_the_cap_is_exercised(hf):
    """The cases above include capped and uncapped pictures for every N and tower whose largest grid can exceed
    the cap (more than 1.21 N tiles' patches), and none for the others (N = 9 with LLaVA-1.6's grids of at
    most 4 tiles, or the tiny tower's 9)."""
    for tower, n in itertools.product(TOWER_NAMES, NS):
        spec = onevision_spec(hf.config(tower, n))
        capped = {(w, h) for w, h in SIZES if "model_error" not in hf.run(tower, n, w, h)
                  and anyres.packed_grid_size(w, h, spec) != anyres.unpadded_size(w, h, spec)}
        most = max((a // spec.tile) * (b // spec.tile) for a, b in spec.pinpoints)
        if most <= 1.21 * n:
            assert not capped, (tower, n)
        else:
            assert capped and len(capped) < len(SIZES), (tower, n)
    assert [n for n in NS if max(a * b for a, b in LLAVA16) / 336**2 <= 1.21 * n] == [9]


def test_processor_counts_what_the_model_cannot_pack(hf):
    """The one disagreement inside transformers found here: where the cap shrinks a side to nothing (the tiny
    tower's 1 x 5 grid, a 1000 x 100 picture, N = 1: 2 x 10 patches, ratio sqrt(5)), the processor counts the
    base tile alone while the model's interpolate raises. llava-edge refuses those pictures in one line, and
    only those."""
    spec = onevision_spec(hf.config("tiny", 1))
    assert anyres.unpadded_size(1000, 100, spec) == (2, 10)
    ref = hf.run("tiny", 1, 1000, 100)
    assert "model_error" in ref and ref["tokens"] == ref["count"] == spec.side ** 2

    def refused(tower, n, w, h):
        try:
            anyres.num_positions(w, h, onevision_spec(hf.config(tower, n)))
        except UserError:
            return True
        return False

    failed = {c for c in CASES if "model_error" in hf.run(*c)}
    assert ("tiny", 1, 1000, 100) in failed and failed == {c for c in CASES if refused(*c)}
    print("model refuses, processor counts:", {c: hf.run(*c)["tokens"] for c in sorted(failed)})
    assert all(hf.run(*c)["tokens"] == hf.run(*c)["count"] for c in failed)  # the processor's two paths agree


@pytest.mark.parametrize("tower", TOWER_NAMES)
def test_counts_over_many_sizes_equal_the_processors(hf, tower):
    """Counts only, over a sweep of sizes: the processor's own method, for each N and uncapped."""
    tile = hf.towers[tower][0]
    rng = np.random.default_rng(tile)
    sizes = {(int(w), int(h)) for w, h in rng.integers(1, 3200, (300, 2))}
    sizes |= {(w, h) for w in range(tile - 2, tile + 3) for h in (1, tile // 2, tile, 3 * tile)}
    near = 0
    for n in NS:
        proc, spec = hf.processor[tower, n], onevision_spec(hf.config(tower, n))
        drop = proc.vision_feature_select_strategy == "default"
        for w, h in sorted(sizes):
            try:
                ours = anyres.num_positions(w, h, spec)
            except UserError:
                assert tower == "tiny"  # only its strips shrink to nothing
                continue
            assert ours == proc._get_number_of_features(h, w, tile, tile) - drop, (w, h, n)
            uh, uw = anyres.unpadded_size(w, h, spec)
            near += 1 < uh * uw / (n * spec.side ** 2) <= 1.21  # over N tiles' patches, but within the 1.1 slack
    print(f"{tower}: {len(sizes)} sizes x {len(NS)} N, {near} over N tiles' patches but within the slack")
    assert near or tower == "tiny"  # the sweep crosses the threshold's slack, not only far-off sizes


def test_the_documented_counts(hf):
    """The numbers in docs/FAMILIES.md, each from llava-edge and from transformers' processor (the literals
    document them)."""
    clip = AnyresSpec(336, 14, LLAVA16, "hw", "hf")
    onevision = AnyresSpec(384, 14, hf.towers["siglip384"][2], "hw", "hf")
    for spec, tower, table in [
        (clip, "clip336", {None: 1948, 9: 1948, 2: 1948, 1: 1152}),
        (onevision, "siglip384", {None: 10929, 9: 7269, 2: 2185, 1: 1469}),
    ]:
        for n, count in table.items():
            capped = AnyresSpec(**{**spec.__dict__, "max_grid": n})
            assert anyres.num_positions(1920, 1080, capped) == count
            if n is not None:
                assert hf.run(tower, n, 1920, 1080)["tokens"] == count
    assert anyres.grid(1920, 1080, onevision) == (3, 5)
    assert anyres.unpadded_size(1920, 1080, onevision) == (75, 135)
    assert anyres.packed_grid_size(1920, 1080, AnyresSpec(**{**onevision.__dict__, "max_grid": 9})) == (60, 108)


# ---------------------------------------------------------------- settings and errors

def _one_line_error(fn, *args, match, **kw) -> str:
    with pytest.raises(UserError, match=match) as e:
        fn(*args, **kw)
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("bad", [0, -1, True, 2.5, 9.0, "9", [9]])
def test_bad_max_grid(bad):
    msg = _one_line_error(AnyresSpec, 336, 14, LLAVA16, "hw", "hf", max_grid=bad, match="max_grid")
    assert "anyres_max_N" in msg and repr(bad) in msg
    good = AnyresSpec(336, 14, LLAVA16, "hw", "hf", max_grid=9).to_dict()
    _one_line_error(AnyresSpec.from_dict, {**good, "max_grid": bad}, match="whole number >= 1")


@pytest.mark.parametrize("aspect", ["anyres_max_0", "anyres", "anyres_max_", "anyres_max_x", "anyres_max_-1", 9,
                                    None])
def test_bad_vision_aspect_ratio(aspect):
    cfg = {"model_type": "llava_onevision", "vision_config": {"image_size": 384, "patch_size": 14},
           "image_grid_pinpoints": [[384, 768]], "vision_aspect_ratio": aspect}
    msg = _one_line_error(onevision_spec, cfg, match="vision_aspect_ratio")
    assert repr(aspect) in msg


def test_settings_round_trip_and_where_the_cap_comes_from():
    import json

    capped = AnyresSpec(384, 14, [[384, 768], [768, 384]], "hw", "hf", max_tiles=4, max_grid=9)
    assert AnyresSpec.from_dict(json.loads(json.dumps(capped.to_dict()))) == capped
    uncapped = AnyresSpec(336, 14, LLAVA16, "hw", "hf")
    assert "max_grid" not in uncapped.to_dict()  # an uncapped bundle's manifest keeps its old form
    assert AnyresSpec.from_dict(uncapped.to_dict()) == uncapped and uncapped.max_grid is None
    tower = {"image_size": 384, "patch_size": 14}
    onevision = {"model_type": "llava_onevision", "vision_config": tower, "image_grid_pinpoints": [[384, 768]]}
    assert onevision_spec(onevision).max_grid == 9  # transformers' default when the key is absent
    assert onevision_spec({**onevision, "vision_aspect_ratio": "anyres_max_4"}).max_grid == 4
    assert AnyresSpec.from_config(onevision, "hf", max_grid=2).max_grid == 2
    # transformers' LLaVA-NeXT model reads no vision_aspect_ratio: a LLaVA-NeXT config stays uncapped
    nxt = {"model_type": "llava_next", "vision_config": {"image_size": 336, "patch_size": 14},
           "vision_aspect_ratio": "anyres_max_1"}
    assert FAMILIES["llava-next"].anyres_spec(SimpleNamespace(config=nxt, recipe={})).max_grid is None
    assert AnyresSpec.from_config(nxt, "hf").max_grid is None
    assert AnyresSpec.from_config(nxt, "hf", max_grid=3).max_grid == 3


def test_count_and_pack_agree_everywhere_on_a_small_tower():
    """Every picture size up to 200 x 200 px in steps, every N in 1..4: pack's length is the count (pack
    asserts it; this also checks the grid it packs)."""
    rng = np.random.default_rng(0)
    for n in range(1, 5):
        spec = AnyresSpec(28, 14, TINY, "hw", "hf", max_grid=n)
        for w, h in itertools.product(range(1, 200, 13), range(1, 200, 11)):
            rows, cols = anyres.grid(w, h, spec)
            feats = rng.standard_normal((1 + rows * cols, 4, 3)).astype(np.float32)
            try:
                count = anyres.num_positions(w, h, spec)
            except UserError:
                _one_line_error(anyres.pack, feats, w, h, spec, np.ones(3, np.float32), match="too thin")
                continue
            out = anyres.pack(feats, w, h, spec, np.ones(3, np.float32))
            gh, gw = anyres.packed_grid_size(w, h, spec)
            assert out.shape == (count, 3) and count == 4 + gh * (gw + 1)
            np.testing.assert_array_equal(out[4 + gw :: gw + 1], 1.0)  # a newline ends each packed row
