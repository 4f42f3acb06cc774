"""Vision tower + projector of a LLaVA checkpoint -> llama.cpp's multimodal projector GGUF ("mmproj").

The file is what llama.cpp's ``tools/mtmd`` (``clip.cpp``) loads beside the
language-model GGUF: ``llama-mtmd-cli -m llm.gguf --mmproj mmproj.gguf``,
llama-cpp-python's ``mtmd_cpp`` and Ollama (a second ``FROM`` line) all take it.

llama.cpp's current ``convert_hf_to_gguf.py`` converts llava-hf checkpoints only
for Pixtral/Mistral towers; LLaVA-1.5 (CLIP tower + 2-layer MLP) is left to its
legacy ``convert_image_encoder_to_gguf.py``. This module writes what that
legacy route writes, with the key names of gguf-py's current constants:

- ``general.architecture = clip``, ``general.type = mmproj``,
  ``clip.projector_type = mlp``, ``clip.has_vision_encoder``;
- ``clip.vision.*``: image and patch size, width, FFN width, heads, layer-norm
  epsilon, image mean/std (the checkpoint's processor config), ``projection_dim``
  = the language model's width; ``clip.use_gelu`` false for CLIP's quick-GELU;
- ``clip.vision.feature_layer``: LLaVA's ``vision_feature_layer`` as a
  non-negative ``hidden_states`` index, and ``clip.vision.block_count`` equal to
  the deepest one. clip.cpp's LLaVA graph runs exactly that many encoder
  layers and takes the hidden state there, so the layers after it are neither
  written nor computed, and CLIP's ``post_layernorm`` (which LLaVA does not
  apply to ``hidden_states[-2]``) is not written either: clip.cpp would apply
  it if present;
- tensors ``v.*`` named by gguf-py's MMPROJ tensor map, and the projector as
  ``mm.0`` / ``mm.2`` (the indices of LLaVA-1.5's ``nn.Sequential``, which
  clip.cpp's ``mlp`` projector reads; gguf-py's map says ``mm.1`` for
  ``linear_1``, the Pixtral convention, so these two names are set here).

LLaVA-NeXT (LLaVA-1.6) checkpoints get the same tower and projector, plus what
clip.cpp's tiled path reads (``tools/mtmd/clip.cpp``, ``mtmd.cpp``,
``mtmd-image.cpp`` in llama-cpp-python 0.3.36's llama.cpp):

- ``clip.vision.image_grid_pinpoints``: the pinpoints flattened, each pair as
  (width, height), which is how clip.cpp reads it (``clip_image_size{w, h}``);
  llava-hf configs list (height, width), so their pairs are swapped, as
  llama.cpp's own Granite-Vision converter does. Its presence is what makes mtmd
  tile (``mtmd_image_preprocessor_llava_uhd``) instead of letterboxing;
- ``clip.vision.mm_patch_merge_type = spatial_unpad`` and the tensor
  ``v.image_newline``: what the model does; this llama.cpp loads both and uses
  neither (no unpad, no newline);
- ``clip.vision.image_crop_resolution``: the tile size, as the legacy converter
  writes it; read by older clip.cpp builds, ignored by this one.

:func:`llama_cpp_positions` predicts how many positions llama.cpp gives a
picture with such a file (docs/MMPROJ.md compares it with the model's count).

A SigLIP tower in a ``LlavaForConditionalGeneration`` (LLaVA-Interleave: no class
token, strategy ``full``, layer -1) gets the same layout less what the tower lacks:
no ``v.class_embd`` (clip.cpp then keeps every token, positions from 0), no
``v.pre_ln``, a ``v.patch_embd.bias``, ``clip.use_gelu`` for ``gelu_pytorch_tanh``
(ggml_gelu is that tanh form), and neither ``post_layernorm`` nor the pooling
``head``. :mod:`llava_edge.towers` says which tower has what. llama.cpp's path then
equals the model's on the same pixels; it letterboxes non-square pictures where
SigLIP's processor squashes them. A SigLIP tower in a tiled checkpoint (LLaVA-OneVision's
packing) is refused: llama.cpp has no such path.

Tensors are read one at a time from the safetensors files and written in
streaming order (tensor infos, then data), as :mod:`llava_edge.export.llm_gguf`
does, so memory stays of the order of one tensor.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llava_edge import anyres, atomic, towers
from llava_edge.checkpoint import Checkpoint
from llava_edge.weights import StoredTensor, read_safetensors_header_bytes, stored_tensors
from llava_edge.errors import UserError
from llava_edge.preprocess import ImageSpec

from .llm_gguf import check_finite, encode

# bf16: llama.cpp's CPU matmuls use AVX512-BF16 dot products where the CPU has them (Zen 4, Sapphire Rapids):
# its CLIP-L/336 ran 1.36x faster than with f16 on 2 Zen 4 cores (docs/BENCHMARKS.md); 1-D tensors stay f32
OUTTYPES = ("f32", "f16", "bf16")
PROJECTOR_TYPE = "mlp"  # clip.cpp's name for LLaVA-1.5's Linear-GELU-Linear projector
SUPPORTED = ("a CLIP vision tower with vision_feature_select_strategy 'default' (LLaVA-1.5, LLaVA-NeXT) or a "
             "SigLIP one with 'full' in one tile (LLaVA-Interleave), and the 2-layer MLP projector "
             "(projector type 'mlp')")
FEATURE_LAYER_KEY = "clip.vision.feature_layer"  # read by clip.cpp; gguf-py 0.19 has no constant for it
PINPOINTS_KEY = "clip.vision.image_grid_pinpoints"  # flat int32 [w0, h0, w1, h1, ...]: clip.cpp's order
MERGE_TYPE_KEY = "clip.vision.mm_patch_merge_type"
MERGE_TYPE = "spatial_unpad"  # LLaVA-NeXT's packing (unpad + a newline per row), recorded; this llama.cpp skips it
CROP_RESOLUTION_KEY = "clip.vision.image_crop_resolution"  # legacy converter's key; older clip.cpp builds read it
NEWLINE_TENSOR = "v.image_newline"  # clip.cpp's TN_IMAGE_NEWLINE (older builds: "model.image_newline")
# written by llama.cpp's legacy LLaVA converter and read by older clip.cpp builds; current ones ignore them
HAS_LLAVA_PROJECTOR_KEY = "clip.has_llava_projector"
HAS_TEXT_ENCODER_KEY = "clip.has_text_encoder"
LLAMA_CPP_PAD_COLOR = (122, 116, 104)  # clip.cpp's fixed letterbox colour for the 'mlp' projector
# llama.cpp defects that change what this file computes there, for towers with a class token (measured in
# docs/MMPROJ.md); without one clip.cpp's LLaVA graph has no token to misplace
LLAMA_CPP_KNOWN_ISSUES = (
    "llama.cpp's LLaVA graph places the class token last (ggml-org/llama.cpp#25814, present in "
    "llama-cpp-python 0.3.36): image tokens come out shifted by one patch, see docs/MMPROJ.md",
)
# how llama.cpp's tiled path (mtmd's llava_uhd preprocessor with pinpoints) differs from LLaVA-NeXT, for every
# LLaVA-NeXT checkpoint (docs/MMPROJ.md, measured there)
LLAMA_CPP_TILED_DIFFERENCES = (
    "llama.cpp gives a tiled picture (1 + tiles) x {n} positions: no unpad and no image_newline (the file "
    "holds both; this llama.cpp uses neither), and the whole-picture tile comes after the grid tiles, not before",
    "pictures whose sides both fit in one {tile} px tile get the whole-picture tile only ({n} positions); the "
    "model tiles them as well",
    "llama.cpp's bicubic resize always runs the horizontal pass first; Pillow sometimes the vertical one, so "
    "some resized tiles differ by a few levels",
)

# checkpoint key prefixes -> the canonical llava-hf (transformers 4) names gguf-py's map knows
_TOWER_PREFIXES = (
    "model.vision_tower.vision_model.",
    "model.vision_tower.",
    "vision_tower.vision_model.",
    "vision_tower.",
)
_PROJECTOR_PREFIXES = ("model.multi_modal_projector.", "multi_modal_projector.")
_PROJECTOR_NAMES = {"linear_1": "mm.0", "linear_2": "mm.2"}
_GELU_PROJECTOR_ACTS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast")
# hidden_act -> clip.use_gelu: clip.cpp's tower runs ggml_gelu (the tanh form, SigLIP's gelu_pytorch_tanh) when
# it is set, else quick-GELU (CLIP's); erf-GELU has no key and gets the tanh form
_TOWER_ACTS = {"quick_gelu": False, "gelu": True, "gelu_pytorch_tanh": True}


@dataclass(frozen=True)
class PlannedTensor:
    """One GGUF tensor: where it comes from and how it is stored."""

    gguf_name: str
    file: Path
    key: str
    shape: tuple[int, ...]
    dtype: str  # "f32", "f16" or "bf16"


def positive_feature_layers(config: dict) -> list[int]:
    """LLaVA's ``vision_feature_layer`` (int or list, negative from the end) as ``hidden_states`` indices >= 0.

    ``hidden_states[0]`` is the input of the first encoder layer (after CLIP's
    pre-layernorm), ``hidden_states[i]`` the output of layer ``i - 1``: the
    numbering clip.cpp uses for ``clip.vision.feature_layer``.
    """
    n = int(config["vision_config"]["num_hidden_layers"])
    raw = config.get("vision_feature_layer", -2)
    layers = [int(x) for x in (raw if isinstance(raw, (list, tuple)) else [raw])]
    out = [x if x >= 0 else n + 1 + x for x in layers]
    if not out or any(not 0 <= x <= n for x in out):
        raise UserError(f"vision_feature_layer {raw!r} is outside the tower's {n} layers")
    if out != sorted(set(out)):
        # clip.cpp concatenates the selected hidden states in layer order; Hugging Face in list order
        raise UserError(f"vision_feature_layer {raw!r} must list distinct layers in increasing order for llama.cpp")
    return out


def llama_cpp_pinpoints(spec: anyres.AnyresSpec) -> list[tuple[int, int]]:
    """The checkpoint's pinpoints as (width, height) pairs, the order clip.cpp reads
    ``clip.vision.image_grid_pinpoints`` in, so that llama.cpp fits a picture into the canvas the model would
    (transformers' (height, width) pairs swapped; LLaVA's own (width, height) ones kept)."""
    return [(b, a) if spec.orientation == "hw" else (a, b) for a, b in spec.pinpoints]


def llama_cpp_grid(width: int, height: int, tile: int, pinpoints: list[tuple[int, int]]) -> tuple[int, int]:
    """(rows, cols) of the tiles llama.cpp cuts a ``width`` x ``height`` picture into; (0, 0): none.

    mtmd's ``llava_uhd`` preprocessor: no tiles when both sides are at most one tile; otherwise the (width,
    height) pinpoint that keeps most of the picture's pixels, then wastes least, the first on a tie, computed in
    float32 as ``select_best_resolution`` in ``mtmd-image.cpp`` does (LLaVA's and transformers' use float64).
    """
    if width < 1 or height < 1:
        raise UserError(f"the picture has no pixels ({width} x {height})")
    if width <= tile and height <= tile:
        return 0, 0
    f32 = np.float32
    best, best_kept, best_waste = None, 0, np.iinfo(np.int32).max
    for w, h in pinpoints:
        scale = min(f32(w) / f32(width), f32(h) / f32(height))
        kept = min(int(f32(width) * scale) * int(f32(height) * scale), width * height)
        waste = w * h - kept
        if kept > best_kept or (kept == best_kept and waste < best_waste):
            best, best_kept, best_waste = (w, h), kept, waste
    if best is None:
        # every pinpoint scales one side to 0 px; llama.cpp then reads an unset size
        raise UserError(f"a {width} x {height} picture fits no pinpoint with a whole pixel on each side")
    return best[1] // tile, best[0] // tile  # pinpoints are whole tiles (anyres.check_pinpoints)


def llama_cpp_positions(width: int, height: int, tile: int, patch: int,
                        pinpoints: list[tuple[int, int]] | None = None) -> int:
    """The positions llama.cpp's mtmd gives a ``width`` x ``height`` picture with an mmproj from this module.

    Every tile and the whole-picture tile give ``(tile // patch)^2`` positions each (clip.cpp's
    ``clip_n_output_tokens`` for 'mlp'), nothing else: ``(1 + rows * cols)`` of them with ``pinpoints`` (as
    written in the file: (width, height)), one without (LLaVA-1.5's letterboxed picture).
    """
    rows, cols = llama_cpp_grid(width, height, tile, pinpoints) if pinpoints else (0, 0)
    return (tile // patch) ** 2 * (1 + rows * cols)


def llama_cpp_preprocessing_notes(spec: ImageSpec, image_size: int) -> list[str]:
    """Where llama.cpp's own image path will differ from this checkpoint's preprocessing (empty: none known).

    llama.cpp (``mtmd`` fixed-size path for 'mlp') scales the image to fit
    ``image_size`` x ``image_size`` with a Pillow-equivalent bicubic, then pads it
    centred with ``LLAMA_CPP_PAD_COLOR``. It never center-crops.
    """
    notes = []
    if spec.squash:
        notes.append(f"non-square pictures: the checkpoint resizes them to {spec.crop} x {spec.crop} (aspect not "
                     f"kept), llama.cpp resizes them to fit and pads them centred with {LLAMA_CPP_PAD_COLOR}")
        if spec.resample != 3:
            notes.append(f"the checkpoint resamples with PIL filter {spec.resample}; llama.cpp with bicubic")
    elif spec.pad == "square":
        notes.append("the checkpoint center-crops non-square images (pad mode 'square'); llama.cpp letterboxes them")
    else:
        fill = tuple(int(x * 255) for x in spec.mean)
        if fill != LLAMA_CPP_PAD_COLOR:
            notes.append(f"the checkpoint pads with {fill}; llama.cpp always pads with {LLAMA_CPP_PAD_COLOR}")
        notes.append("non-square images: the checkpoint pads then resizes, llama.cpp resizes then pads "
                     "(the edges of the picture are resampled differently)")
    if spec.resize != spec.crop or spec.crop != image_size:
        notes.append(f"the checkpoint resizes to {spec.resize} and crops {spec.crop}; llama.cpp resizes the whole "
                     f"image to {image_size} and crops nothing")
    return notes


def llama_cpp_tiled_notes(spec: ImageSpec, grid: anyres.AnyresSpec) -> list[str]:
    """Where llama.cpp's tiled path will differ from this LLaVA-NeXT checkpoint's own (empty: none known).

    llama.cpp resizes the whole picture to one tile (aspect not kept) and fits it into the pinpoint on black,
    both with its port of Pillow's bicubic: the model's own steps when its processor resizes to the tile size and
    crops nothing; its tiles get the same normalization. What differs for every checkpoint is
    ``LLAMA_CPP_TILED_DIFFERENCES``.
    """
    n = grid.side * grid.side
    notes = [d.format(n=n, tile=grid.tile) for d in LLAMA_CPP_TILED_DIFFERENCES]
    if spec.resize != spec.crop:
        notes.append(f"the checkpoint resizes each tile's shortest side to {spec.resize} and crops {spec.crop}; "
                     "llama.cpp crops nothing")
    if spec.resample != 3:
        notes.append(f"the checkpoint resamples with PIL filter {spec.resample}; llama.cpp with bicubic")
    return notes


def check_supported(ckpt: Checkpoint) -> None:
    """Refuse, in one line, what clip.cpp's LLaVA graph would compute differently."""
    cfg, vc = ckpt.config, ckpt.vision_config
    if ckpt.family.no_mmproj:
        raise UserError(f"no mmproj for {ckpt.family.title}: {ckpt.family.no_mmproj}")
    tower = tower_of(ckpt)
    if ckpt.family.tiled and tower.llama_cpp_no_tiles:
        raise UserError(f"no mmproj for a {ckpt.family.title} checkpoint with a {tower.name} tower: "
                        f"{tower.llama_cpp_no_tiles}")
    if vc.get("hidden_act", "quick_gelu") not in _TOWER_ACTS:
        raise UserError(f"unsupported vision activation {vc.get('hidden_act')!r} for --target mmproj; "
                        f"supported: {', '.join(_TOWER_ACTS)}")
    act = cfg.get("projector_hidden_act", "gelu")
    if act not in _GELU_PROJECTOR_ACTS:
        raise UserError(f"unsupported projector activation {act!r} for --target mmproj; supported: {SUPPORTED}")
    if not cfg.get("multimodal_projector_bias", True):
        raise UserError(f"unsupported projector without bias for --target mmproj; supported: {SUPPORTED}")
    strategy = cfg.get("vision_feature_select_strategy", "default")
    if strategy != tower.llama_cpp_strategy:
        has = "has one" if tower.class_token else "has none"
        raise UserError(f"vision_feature_select_strategy {strategy!r} with a {tower.name} tower is not what "
                        f"llama.cpp's 'mlp' projector computes (every patch, less the class token where the tower "
                        f"has one; {tower.name} {has}): use {tower.llama_cpp_strategy!r}; supported: {SUPPORTED}")


def tower_of(ckpt: Checkpoint) -> towers.Tower:
    """The checkpoint's vision tower, refused in one line if llava-edge writes no mmproj for it."""
    try:
        return towers.for_config(ckpt.vision_config)
    except UserError:
        raise UserError(f"unsupported vision tower {ckpt.vision_config.get('model_type')!r} for --target mmproj; "
                        f"supported: {SUPPORTED}") from None


def _canonical(key: str) -> tuple[str, str] | None:
    """A checkpoint key -> ("tower", name under vision_model.) or ("projector", name), else None."""
    for p in _TOWER_PREFIXES:
        if key.startswith(p):
            return "tower", key[len(p):]
    for p in _PROJECTOR_PREFIXES:
        if key.startswith(p):
            return "projector", key[len(p):]
    return None


def plan_tensors(ckpt: Checkpoint, outtype: str, block_count: int) -> list[PlannedTensor]:
    """Every tensor the mmproj holds, from the safetensors headers only (no weights read)."""
    import gguf

    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, int(ckpt.vision_config["num_hidden_layers"]))
    tower = tower_of(ckpt)
    plan: list[PlannedTensor] = []
    seen_projector = set()
    for f in ckpt.weight_files():
        for key, info in json.loads(read_safetensors_header_bytes(f)).items():
            if key == "__metadata__":
                continue
            hit = _canonical(key)
            if key.split(".")[-1] == "image_newline" and ckpt.family.tiled:
                plan.append(PlannedTensor(NEWLINE_TENSOR, f, key, tuple(int(s) for s in info["shape"]), "f32"))
                continue
            if hit is None:
                continue
            part, rest = hit
            shape = tuple(int(s) for s in info["shape"])
            if part == "tower":
                if rest.startswith(tower.unused_modules) or rest.endswith("position_ids"):
                    continue  # LLaVA's features are hidden states: before post_layernorm, and no pooling head
                m = re.match(r"encoder\.layers\.(\d+)\.", rest)
                if m and int(m.group(1)) >= block_count:
                    continue  # after the feature layer: LLaVA never uses it
                new = name_map.get_name("vision_tower.vision_model." + rest, try_suffixes=(".weight", ".bias"))
                if new is None:
                    raise UserError(f"cannot map vision tensor {key!r} to GGUF; supported: {SUPPORTED}")
            else:
                m = re.match(r"(linear_[12])\.(weight|bias)$", rest)
                if not m:
                    raise UserError(f"unsupported projector tensor {key!r}; supported: {SUPPORTED}")
                new = f"{_PROJECTOR_NAMES[m.group(1)]}.{m.group(2)}"
                seen_projector.add(new)
            # 1-D tensors (norms, biases, class embedding) stay f32, as llama.cpp's converters keep them
            dtype = "f32" if len(shape) == 1 else outtype
            plan.append(PlannedTensor(new, f, key, shape, dtype))
    missing = {"mm.0.weight", "mm.0.bias", "mm.2.weight", "mm.2.bias"} - seen_projector
    if missing:
        raise UserError(f"{ckpt.path} lacks projector tensors {', '.join(sorted(missing))}; supported: {SUPPORTED}")
    if not any(t.gguf_name == "v.patch_embd.weight" for t in plan):
        raise UserError(f"no vision tower weights found in {ckpt.path}")
    names = {t.gguf_name for t in plan}
    # clip.cpp skips a first token exactly when v.class_embd is there, and normalizes the embeddings when
    # v.pre_ln is: weights that disagree with the tower's description would compute another model
    for name, expected, what in (("v.class_embd", tower.class_token, "a class embedding"),
                                 ("v.pre_ln.weight", tower.pre_layernorm, "a pre-layernorm")):
        if (name in names) != expected:
            raise UserError(f"{ckpt.path}'s vision weights {'lack' if expected else 'have'} {what}, which a "
                            f"{tower.name} tower {'has' if expected else 'does not have'}")
    newlines = [t for t in plan if t.gguf_name == NEWLINE_TENSOR]
    if ckpt.family.tiled and len(newlines) != 1:
        raise UserError(f"{ckpt.path} has {len(newlines)} image_newline tensors (a {ckpt.family.title} checkpoint "
                        "has one)")
    return plan


def export_mmproj_gguf(
    ckpt: Checkpoint,
    path: str | Path,
    outtype: str = "f32",
    log: Callable[[str], None] = print,
) -> dict:
    """Write ``path`` (atomically); return what the manifest may record about it.

    ``outtype`` ``f16`` or ``bf16`` stores matrices and the patch convolution in
    that type and keeps 1-D tensors in f32, like llama.cpp's own mmproj files.
    """
    import gguf

    if outtype not in OUTTYPES:
        raise UserError(f"unknown mmproj outtype {outtype!r}; choose one of {', '.join(OUTTYPES)}")
    check_supported(ckpt)
    vc, tc = ckpt.vision_config, ckpt.text_config
    feature_layers = positive_feature_layers(ckpt.config)
    block_count = max(feature_layers)
    plan = plan_tensors(ckpt, outtype, block_count)
    spec = ckpt.image_spec()
    image_size = int(vc.get("image_size", 336))
    patch_size = int(vc.get("patch_size", 14))
    n_embd_text = int(tc["hidden_size"])
    proj_out = next(t.shape[0] for t in plan if t.gguf_name == "mm.2.weight")
    if proj_out != n_embd_text:
        raise UserError(f"projector output width {proj_out} differs from the language model's {n_embd_text}")

    grid = anyres_settings(ckpt)
    pinpoints = llama_cpp_pinpoints(grid) if grid else None
    if grid is not None:
        if (grid.tile, grid.patch) != (image_size, patch_size):
            raise UserError(f"the anyres tiles are {grid.tile} px of {grid.patch} px patches, the tower's "
                            f"{image_size} px of {patch_size} px")
        newline = next(t for t in plan if t.gguf_name == NEWLINE_TENSOR)
        if newline.shape != (n_embd_text,):
            raise UserError(f"image_newline has shape {list(newline.shape)}, not [{n_embd_text}]")
        notes = llama_cpp_tiled_notes(spec, grid)
    else:
        notes = llama_cpp_preprocessing_notes(spec, image_size)
    path = Path(path)
    log(f"vision tower ({block_count} of {vc['num_hidden_layers']} layers) + projector -> mmproj GGUF ({outtype})")
    with atomic.atomic_path(path) as tmp:
        w = gguf.GGUFWriter(tmp, "clip")
        w.add_type(gguf.GGUFType.MMPROJ)
        w.add_name(ckpt.path.name)
        w.add_description("image encoder for LLaVA (llava-edge)")
        w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                         "bf16": gguf.LlamaFileType.MOSTLY_BF16}[outtype])
        w.add_clip_projector_type(PROJECTOR_TYPE)
        w.add_clip_has_vision_encoder(True)
        w.add_bool(HAS_TEXT_ENCODER_KEY, False)
        w.add_bool(HAS_LLAVA_PROJECTOR_KEY, True)
        w.add_vision_projection_dim(n_embd_text)
        w.add_vision_image_size(image_size)
        w.add_vision_patch_size(patch_size)
        w.add_vision_embedding_length(int(vc["hidden_size"]))
        w.add_vision_feed_forward_length(int(vc["intermediate_size"]))
        w.add_vision_block_count(block_count)
        w.add_vision_head_count(int(vc["num_attention_heads"]))
        w.add_vision_attention_layernorm_eps(float(vc.get("layer_norm_eps", 1e-5)))
        w.add_vision_image_mean(list(spec.mean))
        w.add_vision_image_std(list(spec.std))
        w.add_vision_use_gelu(_TOWER_ACTS[vc.get("hidden_act", "quick_gelu")])
        w.add_array(FEATURE_LAYER_KEY, feature_layers)
        if pinpoints:
            w.add_array(PINPOINTS_KEY, [int(x) for pair in pinpoints for x in pair])
            w.add_string(MERGE_TYPE_KEY, MERGE_TYPE)
            w.add_uint32(CROP_RESOLUTION_KEY, image_size)
        qtypes = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
                  "bf16": gguf.GGMLQuantizationType.BF16}
        for t in plan:
            q = qtypes[t.dtype]
            nbytes = int(np.prod(t.shape)) * gguf.GGML_QUANT_SIZES[q][1]
            w.add_tensor_info(t.gguf_name, t.shape, np.dtype(np.float32), nbytes, raw_dtype=q)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        stored: dict[Path, dict[str, StoredTensor]] = {}
        try:
            for t in plan:  # one tensor in memory at a time, read without a memory map (weights.py)
                if t.file not in stored:
                    stored[t.file] = stored_tensors(t.file, check=False)
                a = stored[t.file][t.key].float32()
                check_finite(a, t.key)
                w.write_tensor_data(encode(a, qtypes[t.dtype]))
                del a
        finally:
            w.close()
    for note in notes:
        log(f"note: llama.cpp's image preprocessing differs: {note}")
    for issue in LLAMA_CPP_KNOWN_ISSUES if tower_of(ckpt).class_token else ():
        log(f"note: {issue}")
    return dict(
        projector_type=PROJECTOR_TYPE, outtype=outtype, feature_layers=feature_layers, block_count=block_count,
        image_size=image_size, patch_size=patch_size, n_image_tokens=(image_size // patch_size) ** 2,
        n_embd=n_embd_text, n_tensors=len(plan), llama_cpp_preprocessing_notes=notes,
        pinpoints=[list(p) for p in pinpoints] if pinpoints else None, merge_type=MERGE_TYPE if pinpoints else None,
    )


def anyres_settings(ckpt: Checkpoint) -> anyres.AnyresSpec | None:
    """The checkpoint's tiling as its family exports it (the manifest's ``image.anyres``); None: one tile."""
    section = ckpt.family.image_section(ckpt).get("anyres")
    return anyres.AnyresSpec.from_dict(section) if section else None
