"""llava_edge.anyres (LLaVA-NeXT's tiling and feature packing) against its two references, exactly.

transformers 5.24 (this venv): ``LlavaNextImageProcessorPil`` for the pixels, ``LlavaNextProcessor`` for
how many image tokens the prompt gets, ``LlavaNextModel.pack_image_features`` for the packed features.
LLaVA's own code (llava-torch 1.2.2.post1 in .venv-llava, through tests/llava_reference/anyres_side.py):
``process_anyres_image``, ``select_best_resolution``, ``get_anyres_image_grid_shape``, ``unpad_image`` and
a tiny LLaVA-1.6 model's ``prepare_inputs_labels_for_multimodal``. Three towers: CLIP-336 with LLaVA-1.6's
five pinpoints, a 28 px tile with those pinpoints scaled down, and a 28 px tile with a list that is not
closed under transposition, where reading pinpoints as (height, width) or (width, height) changes the grid
of every picture here.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from llava_reference import harness
from PIL import Image

from llava_edge import anyres
from llava_edge.anyres import AnyresSpec
from llava_edge.errors import UserError
from llava_edge.preprocess import ImageSpec

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
LLAVA16 = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
TOWERS = {  # name: (tile, patch, pinpoints)
    "clip336": (336, 14, LLAVA16),
    "tiny": (28, 14, [[28, 56], [56, 28], [56, 56], [84, 28], [28, 84]]),
    "tiny-skew": (28, 14, [[28, 84], [56, 28], [84, 56]]),  # no pinpoint's transpose is listed
}
SIZES = [
    (336, 336), (500, 500), (28, 28),  # square: a tie between transposed pinpoints
    (300, 200), (200, 300), (100, 100), (20, 12), (12, 20),  # both sides within one tile (of one tower or both)
    (100, 1000), (1000, 100), (1, 1), (3000, 2000),  # strips, a single pixel, larger than every pinpoint
    (640, 480), (1920, 1080), (480, 640),
    # where int() and int(round(x, 7)) part in unpad (found by search): 110 x 176 on transformers' grid and
    # 176 x 110 on LLaVA's at 336 px tiles, 196 x 147 on both at 28 px tiles
    (110, 176), (176, 110), (196, 147),
]
CASES = [(t, w, h) for t in TOWERS for w, h in SIZES]
HIDDEN = 8  # the LM width of the tiny models: packing only moves vectors, so any width does


def _id(tower, w, h) -> str:
    return f"{tower}-{w}x{h}"


def _picture(w, h) -> np.ndarray:
    return np.random.default_rng([w, h]).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _image_spec(tower) -> ImageSpec:
    tile = TOWERS[tower][0]
    return ImageSpec(resize=tile, crop=tile, mean=tuple(CLIP_MEAN), std=tuple(CLIP_STD))


# ---------------------------------------------------------------- transformers' side

class _HF:
    """Per tower: the image processor, the processor (with a three-word tokenizer) and a tiny model."""

    def __init__(self):
        import torch  # noqa: F401  (transformers' model classes need it; the tested module does not)
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import (LlavaNextConfig, LlavaNextImageProcessorPil, LlavaNextModel, LlavaNextProcessor,
                                  PreTrainedTokenizerFast)

        words = Tokenizer(models.WordLevel({"[UNK]": 0, "<image>": 1, "hi": 2}, unk_token="[UNK]"))
        words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tok = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]", additional_special_tokens=["<image>"])
        self.processor, self.model, self._done = {}, {}, {}
        for name, (tile, patch, pins) in TOWERS.items():
            ip = LlavaNextImageProcessorPil(size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile},
                                            image_grid_pinpoints=pins, image_mean=CLIP_MEAN, image_std=CLIP_STD)
            # released llava-hf processors: CLIP's class token counted, then dropped ("default")
            self.processor[name] = LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=patch,
                                                      vision_feature_select_strategy="default",
                                                      num_additional_image_tokens=1)
            cfg = LlavaNextConfig(
                vision_config={"model_type": "clip_vision_model", "image_size": tile, "patch_size": patch,
                               "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
                               "num_attention_heads": 2},
                text_config={"model_type": "llama", "hidden_size": HIDDEN, "intermediate_size": 16,
                             "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
                             "vocab_size": 8},
                image_grid_pinpoints=pins)
            self.model[name] = LlavaNextModel(cfg).eval()

    def run(self, tower, w, h) -> dict:
        """Everything transformers says about one picture."""
        if (tower, w, h) not in self._done:
            self._done[tower, w, h] = self._run(tower, w, h)
        return self._done[tower, w, h]

    def _run(self, tower, w, h) -> dict:
        import torch
        from transformers.image_processing_utils import select_best_resolution
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

        tile, patch, pins = TOWERS[tower]
        proc, model = self.processor[tower], self.model[tower]
        out = proc(images=Image.fromarray(_picture(w, h)), text="<image>", return_tensors="np")
        pixels = out["pixel_values"][0]
        side = tile // patch
        features = np.random.default_rng([w, h, 1]).standard_normal((len(pixels), side * side, HIDDEN)).astype(np.float32)
        with torch.no_grad():
            packed, lens = model.pack_image_features([torch.from_numpy(features)], torch.tensor([[h, w]]), "default",
                                                     image_newline=model.image_newline)
        rows, cols = get_anyres_image_grid_shape([h, w], pins, tile)
        best_h, best_w = select_best_resolution([h, w], pins)
        return {"config": model.config.to_dict(), "image_spec": ImageSpec.from_processor_config(proc.image_processor.to_dict()),
                "pixels": pixels, "tokens": int((out["input_ids"] == proc.image_token_id).sum()),
                "features": features, "newline": model.image_newline.detach().numpy(), "packed": packed[0].numpy(),
                "best": (best_w, best_h), "grid": (rows, cols),
                "unpadded": tuple(unpad_image(torch.zeros(1, rows * side, cols * side), [h, w]).shape[1:])}


@pytest.fixture(scope="module")
def hf():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _HF()


# ---------------------------------------------------------------- LLaVA's side

@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    """LLaVA's answers for every case, from one run of anyres_side.py: {case id: result, with the arrays}."""
    ok, why = harness.available(vocab=False)
    if not ok:
        pytest.skip(why)
    out = tmp_path_factory.mktemp("anyres_llava")
    for w, h in SIZES:
        np.save(out / f"{w}x{h}.npy", _picture(w, h))
    request = {
        "out": str(out), "hidden": HIDDEN,
        "towers": [{"name": n, "tile": t, "patch": p, "pinpoints": pins, "mean": CLIP_MEAN, "std": CLIP_STD}
                   for n, (t, p, pins) in TOWERS.items()],
        "cases": [{"id": _id(t, w, h), "tower": t, "image": str(out / f"{w}x{h}.npy"), "seed": k}
                  for k, (t, w, h) in enumerate(CASES)],
    }
    res = harness.run("anyres", request, script=harness.HERE / "anyres_side.py")
    cases = {c["id"]: c for c in res["cases"]}
    for cid, c in cases.items():
        c.update({k: np.load(out / f"{cid}-{k}.npy") for k in ("pixels", "features", "packed")})
        c["newline"] = np.load(out / f"{cid.rsplit('-', 1)[0]}-newline.npy")
    return {"cases": cases, "configs": res["configs"]}


# ---------------------------------------------------------------- the two references, case by case

@pytest.mark.parametrize("tower,w,h", CASES, ids=[_id(*c) for c in CASES])
def test_equals_transformers(hf, tower, w, h):
    ref = hf.run(tower, w, h)
    spec = AnyresSpec.from_config(ref["config"], "hf")
    assert (spec.orientation, spec.rounding, spec.tile, spec.patch) == ("hw", "hf", *TOWERS[tower][:2])
    assert anyres.best_resolution(w, h, spec) == ref["best"]
    assert anyres.grid(w, h, spec) == ref["grid"]
    assert anyres.unpadded_size(w, h, spec) == ref["unpadded"]
    pixels = anyres.tiles(Image.fromarray(_picture(w, h)), spec, ref["image_spec"])
    assert pixels.dtype == np.float32 and pixels.shape == ref["pixels"].shape
    assert np.abs(pixels - ref["pixels"]).max() <= 1e-6
    assert anyres.num_positions(w, h, spec) == ref["tokens"] == len(ref["packed"])
    packed = anyres.pack(ref["features"], w, h, spec, ref["newline"])
    np.testing.assert_array_equal(packed, ref["packed"])


@pytest.mark.parametrize("tower,w,h", CASES, ids=[_id(*c) for c in CASES])
def test_equals_llava(llava, tower, w, h):
    ref = llava["cases"][_id(tower, w, h)]
    cfg = llava["configs"][tower]
    spec = AnyresSpec.from_config(cfg["config"], "llava", tower=cfg["tower"])
    assert (spec.orientation, spec.rounding, spec.tile, spec.patch) == ("wh", "llava", *TOWERS[tower][:2])
    assert list(anyres.best_resolution(w, h, spec)) == ref["best"]
    assert list(anyres.grid(w, h, spec)) == ref["grid_shape"][::-1]  # LLaVA's is (cols, rows)
    assert list(anyres.unpadded_size(w, h, spec)) == ref["unpadded"]
    pixels = anyres.tiles(Image.fromarray(_picture(w, h)), spec, _image_spec(tower))
    assert pixels.dtype == np.float32 and pixels.shape == ref["pixels"].shape
    assert np.abs(pixels - ref["pixels"]).max() <= 1e-6
    assert anyres.num_positions(w, h, spec) == ref["positions"] == len(ref["packed"])
    packed = anyres.pack(ref["features"], w, h, spec, ref["newline"])
    np.testing.assert_array_equal(packed, ref["packed"])


# ---------------------------------------------------------------- where the references part

def test_the_measured_counts(hf, llava):
    """The counts in NOTES.md, each from its reference here (the literals document them)."""
    spec_hf = AnyresSpec(336, 14, LLAVA16, "hw", "hf")
    spec_llava = AnyresSpec(336, 14, LLAVA16, "wh", "llava")
    for (w, h), n in {(336, 336): 1176, (640, 480): 2340, (1920, 1080): 1948, (300, 200): 1464}.items():
        assert anyres.num_positions(w, h, spec_hf) == hf.run("clip336", w, h)["tokens"] == n
    ref = llava["cases"]["clip336-300x200"]
    assert anyres.num_positions(300, 200, spec_llava) == ref["positions"] == 976
    assert ref["grid_shape"] == [1, 2]  # two rows of one tile, where transformers has one row of two


def test_orientation_decides_ties_and_skewed_lists(hf, llava):
    """With LLaVA-1.6's list the two grids differ only on ties (transposed); with a skewed list, everywhere."""
    differ = {(t, w, h) for t, w, h in CASES
              if list(hf.run(t, w, h)["grid"]) != llava["cases"][_id(t, w, h)]["grid_shape"][::-1]}
    assert ("clip336", 300, 200) in differ and ("clip336", 336, 336) in differ
    assert ("clip336", 1920, 1080) not in differ and ("clip336", 3000, 2000) not in differ
    assert {(t, w, h) for t, w, h in CASES if t == "tiny-skew"} <= differ
    for t, w, h in differ:
        if t != "tiny-skew":
            assert list(hf.run(t, w, h)["grid"]) == llava["cases"][_id(t, w, h)]["grid_shape"]  # transposed


@pytest.mark.parametrize("tower,w,h", [("clip336", 176, 110), ("tiny", 196, 147)])
def test_rounding_is_unpads_other_difference(llava, tower, w, h):
    """On LLaVA's own grid, transformers' unpad_image keeps more patches than LLaVA's where the scaled side
    is a whole number only up to float error; rounding="hf" with LLaVA's orientation gives transformers'."""
    import torch
    from transformers.models.llava_next.modeling_llava_next import unpad_image

    tile, patch, pins = TOWERS[tower]
    ref = llava["cases"][_id(tower, w, h)]
    cols, rows = ref["grid_shape"]
    side = tile // patch
    hf_unpadded = tuple(unpad_image(torch.zeros(1, rows * side, cols * side), [h, w]).shape[1:])
    assert anyres.unpadded_size(w, h, AnyresSpec(tile, patch, pins, "wh", "hf")) == hf_unpadded
    assert tuple(ref["unpadded"]) != hf_unpadded
    assert anyres.unpadded_size(w, h, AnyresSpec(tile, patch, pins, "wh", "llava")) == tuple(ref["unpadded"])


# ---------------------------------------------------------------- settings and errors

def _one_line_error(fn, *args, match, **kw) -> str:
    with pytest.raises(UserError, match=match) as e:
        fn(*args, **kw)
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("pins,match", [
    ([], "empty"), ([[336, 500]], "not a multiple of the 336 px tile"), ([[336.0, 672]], "not an integer"),
    ([[0, 336]], "not positive"), ([[-336, 672]], "not positive"), ([[336]], "not a pair"),
    ("[[336, 672]]", "list of"), ([[336, True]], "not an integer"),
])
def test_bad_pinpoints(pins, match):
    _one_line_error(AnyresSpec, 336, 14, pins, "hw", "hf", match=match)


def test_zero_size_picture():
    spec = AnyresSpec(336, 14, LLAVA16, "hw", "hf")
    for fn in (anyres.best_resolution, anyres.grid, anyres.num_positions, anyres.unpadded_size):
        _one_line_error(fn, 0, 100, spec, match=r"no pixels \(0 x 100\)")
        _one_line_error(fn, 100, 0, spec, match="no pixels")
    _one_line_error(anyres.tiles, Image.new("RGB", (0, 5)), spec, _image_spec("clip336"), match="no pixels")


def test_too_many_tiles():
    spec = AnyresSpec(336, 14, LLAVA16, "hw", "hf", max_tiles=3)
    msg = _one_line_error(anyres.num_positions, 1920, 1080, spec, match="needs 4 tiles")
    assert "limit of 3" in msg and "--max-tiles" in msg
    _one_line_error(anyres.tiles, Image.new("RGB", (1920, 1080)), spec, _image_spec("clip336"), match="needs 4")
    _one_line_error(anyres.pack, np.zeros((5, 576, 2), np.float32), 1920, 1080, spec, np.zeros(2, np.float32),
                    match="needs 4")
    assert anyres.num_positions(300, 200, spec) == 1464  # two tiles: within the limit
    assert anyres.num_positions(1920, 1080, AnyresSpec(336, 14, LLAVA16, "hw", "hf", max_tiles=4)) == 1948
    _one_line_error(AnyresSpec, 336, 14, LLAVA16, "hw", "hf", max_tiles=0, match="--max-tiles")


def test_settings_round_trip_and_refusals():
    import json

    spec = AnyresSpec(336, 14, LLAVA16, "wh", "llava", max_tiles=6)
    assert spec.pinpoints == tuple(map(tuple, LLAVA16))
    assert AnyresSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    _one_line_error(AnyresSpec.from_dict, {"tile": 336, "patch": 14}, match="lack pinpoints, orientation, rounding")
    _one_line_error(AnyresSpec.from_dict, {**spec.to_dict(), "orientation": "xy"}, match="orientation 'xy'")
    _one_line_error(AnyresSpec.from_dict, {**spec.to_dict(), "rounding": "ceil"}, match="rounding 'ceil'")
    _one_line_error(AnyresSpec.from_dict, {**spec.to_dict(), "patch": 400}, match="larger than the 336 px tile")
    assert AnyresSpec.from_dict({**spec.to_dict(), "patch": 15}).side == 22  # the tower drops the remainder
    _one_line_error(AnyresSpec.from_dict, {**spec.to_dict(), "pinpoints": [[336, 700]]}, match="multiple")
    llava_cfg = {"image_aspect_ratio": "anyres", "mm_patch_merge_type": "spatial_unpad",
                 "image_grid_pinpoints": str(LLAVA16), "mm_vision_tower": "openai/clip-vit-large-patch14-336"}
    tower = {"image_size": 336, "patch_size": 14}
    assert AnyresSpec.from_config(llava_cfg, "llava", tower=tower) == AnyresSpec(336, 14, LLAVA16, "wh", "llava")
    _one_line_error(AnyresSpec.from_config, llava_cfg, "llava", match="pass the tower's config.json")
    _one_line_error(AnyresSpec.from_config, {**llava_cfg, "image_aspect_ratio": "pad"}, "llava", tower=tower,
                    match="not a LLaVA-NeXT")
    _one_line_error(AnyresSpec.from_config, {}, "hf", match="no image_size and patch_size")
    _one_line_error(AnyresSpec.from_config, llava_cfg, "gguf", match="unknown config origin")
    assert AnyresSpec.from_config({"vision_config": tower}, "hf").pinpoints == tuple(map(tuple, LLAVA16))


def test_tile_and_feature_shapes_are_checked():
    spec = AnyresSpec(28, 14, TOWERS["tiny"][2], "hw", "hf")
    _one_line_error(anyres.tiles, Image.new("RGB", (40, 30)), spec, _image_spec("clip336"), match="crop 336 px")
    n = anyres.num_positions(40, 30, spec)
    rows, cols = anyres.grid(40, 30, spec)
    feats = np.random.default_rng(0).standard_normal((1 + rows * cols, 4, 3)).astype(np.float32)
    assert anyres.pack(feats, 40, 30, spec, np.ones(3, np.float32)).shape == (n, 3)
    with pytest.raises(ValueError, match="features"):
        anyres.pack(feats[:-1], 40, 30, spec, np.ones(3, np.float32))
    with pytest.raises(ValueError, match="image_newline"):
        anyres.pack(feats, 40, 30, spec, np.ones(4, np.float32))


def test_runtime_module_imports_neither_torch_nor_transformers():
    import subprocess
    import sys

    code = ("import sys, llava_edge.anyres; bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
            "print(bad); sys.exit(bool(bad))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
