"""Convert an original LLaVA repository checkpoint into the llava-hf layout, streaming.

The original repository (haotian-liu/LLaVA) saves ``LlavaLlamaForCausalLM`` /
``LlavaMistralForCausalLM``: a Llama/Mistral config with ``mm_*`` fields, the
language model under ``model.*`` + ``lm_head``, the projector under
``model.mm_projector.{0,2}`` (``mlp2x_gelu``) or ``model.mm_projector``
(``linear``), a SentencePiece tokenizer without an ``<image>`` token, and only
the *name* of its CLIP tower (``mm_vision_tower``), whose weights live in that
CLIP checkpoint (``--vision DIR`` or the hub id from the config).

The result is what ``LlavaForConditionalGeneration.from_pretrained`` and the
rest of llava-edge read: ``config.json`` (``LlavaConfig`` with
``image_token_index``), safetensors in the llava-hf hub key layout
(``language_model.model.*``, ``language_model.lm_head.*``,
``vision_tower.vision_model.*``, ``multi_modal_projector.linear_{1,2}.*``),
tokenizer and processor files with ``<image>`` (and ``<pad>`` when the tokenizer
has no pad token of its own) added after the vocabulary like llava-hf, and
``llava_edge.json`` (the conversation mode LLaVA's scripts pick from the model's name, ``llava_v1`` for
``llava-v1.5-*``; ``image_aspect_ratio: pad`` -> pad mode ``pad``), and the tokenizer settings LLaVA's
transformers took from the source (``legacy``, ``add_bos_token``) written into ``tokenizer_config.json``.

A LLaVA-1.6 checkpoint (``image_aspect_ratio: anyres``, ``mm_patch_merge_type: spatial_unpad``, its
``image_grid_pinpoints``) becomes a ``LlavaNextForConditionalGeneration`` layout instead: ``LlavaNextConfig``
with the pinpoints as LLaVA lists them, ``model.image_newline`` renamed ``image_newline`` (where
``save_pretrained`` puts it), a ``LlavaNextImageProcessor`` with the tower's normalization, and the recipe's
``anyres_origin: llava``. transformers reads pinpoints as (height, width) and rounds unpad differently from
LLaVA (see :mod:`llava_edge.anyres`); the recipe tells llava-edge to tile and pack as LLaVA's own code does.

Differences from transformers' ``convert_llava_weights_to_hf.py`` (read, not copied):
it loads the whole state dict and samples the new embedding rows at random; here
tensors are read one at a time (memory-mapped ``.bin`` or safetensors) and written
one at a time, so converting a 7B model needs memory of the order of its largest
tensor, and new rows are the mean of the existing rows (deterministic; the mean
logit is never the arg-max, so greedy answers are unchanged). Tensor bytes are
copied unchanged in their source dtype.

torch and transformers are imported inside functions: this module is part of export.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from . import atomic
from .cache_dir import default_cache_dir
from .errors import UserError
from .weights import MAX_SHARD_BYTES, TORCH_NAMES, OutTensor, stored_tensors, write_sharded

ARCHITECTURES = {"LlavaLlamaForCausalLM": "llama", "LlavaMistralForCausalLM": "mistral"}
ORIGINAL_MODEL_TYPES = {"llava_llama": "llama", "llava_mistral": "mistral"}
PROJECTOR_TYPES = ("mlp2x_gelu", "linear")
CONVERTER_VERSION = 3  # part of the cache key: bump when the output changes
PROVENANCE_FILE = "llava_edge_converted_from.json"
VOCAB_MULTIPLE = 64  # llava-hf pads 32002 tokens to 32064 rows
# config fields of the original LLaVA training code that are not language-model settings
LLAVA_ONLY_FIELDS = {
    "architectures", "model_type", "_name_or_path", "transformers_version", "image_aspect_ratio",
    "image_grid_pinpoints", "tokenizer_model_max_length", "tokenizer_padding_side", "tune_mm_mlp_adapter",
    "freeze_mm_mlp_adapter", "tune_mm_vision_resampler", "freeze_mm_vision_resampler", "unfreeze_mm_vision_tower",
    "use_mm_proj", "s2", "s2_scales", "mm_vision_resampler",
}
IMAGE_TOKEN, PAD_TOKEN, PATCH_TOKEN = "<image>", "<pad>", "<im_patch>"
ANYRES, UNPAD = "anyres", "spatial_unpad"  # LLaVA-1.6's image_aspect_ratio and mm_patch_merge_type
NEWLINE_SRC, NEWLINE_DST = "model.image_newline", "image_newline"  # LLaVA's name, LlavaNext's saved name


def is_original_llava(config: dict) -> bool:
    """True for a config written by the original LLaVA code (some of those say ``model_type: llava``)."""
    archs = config.get("architectures") or []
    return (any(a in ARCHITECTURES for a in archs) or config.get("model_type") in ORIGINAL_MODEL_TYPES
            or ("mm_vision_tower" in config and "text_config" not in config))


# --------------------------------------------------------------------------- reading tensors


@dataclass
class SourceTensor:
    """One tensor of a checkpoint: its shape and dtype now, its data when ``load()`` is called."""

    file: Path
    shape: tuple[int, ...]
    dtype: object  # torch.dtype
    load: Callable[[], object]


def _torch_bin_tensors(path: Path) -> dict[str, SourceTensor]:
    import torch

    try:
        # mmap: the tensors stay in the file until touched, so a 10 GB shard costs no memory here
        sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # truncated zip, old pickle format, not a torch file...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise UserError(f"cannot read PyTorch weights {path}: {first}") from None
    if not isinstance(sd, dict):
        raise UserError(f"{path} holds a {type(sd).__name__}, not a state dict")
    return {k: SourceTensor(path, tuple(v.shape), v.dtype, (lambda v=v: v))
            for k, v in sd.items() if isinstance(v, torch.Tensor)}


def _safetensors_tensors(path: Path) -> dict[str, SourceTensor]:
    """A safetensors file's tensors, each read (by ``weights.StoredTensor``, no memory map) when loaded."""
    import torch

    out = {}
    for k, t in stored_tensors(path).items():  # checked: a clear error for a truncated or damaged file
        name = TORCH_NAMES.get(t.dtype)
        if name is None:
            raise UserError(f"unsupported tensor dtype {t.dtype} for {k} in {path}")
        dtype = getattr(torch, name)
        out[k] = SourceTensor(path, t.shape, dtype, (lambda t=t, dtype=dtype: torch.from_numpy(t.raw()).view(dtype)
                                                     .reshape(t.shape)))
    return out


_TORCH_TO_SAFETENSORS = {v: k for k, v in TORCH_NAMES.items()}


def _index_shards(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError):
        raise UserError(f"unreadable weight index {index}") from None
    files = [index.parent / n for n in sorted(set(weight_map.values()))]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise UserError(f"missing weight shard(s) in {index.parent}: {', '.join(missing)} (listed in {index.name})")
    return files


def read_tensors(folder: Path) -> dict[str, SourceTensor]:
    """Every tensor of ``folder``'s weights: safetensors or PyTorch ``.bin``, sharded (with an index) or not."""
    for name in ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                 "pytorch_model.bin"):
        p = folder / name
        if not p.is_file():
            continue
        files = _index_shards(p) if name.endswith(".index.json") else [p]
        out: dict[str, SourceTensor] = {}
        for f in files:
            out.update(_safetensors_tensors(f) if f.suffix == ".safetensors" else _torch_bin_tensors(f))
        return out
    shards = sorted(folder.glob("pytorch_model-*.bin")) or sorted(folder.glob("model-*.safetensors"))
    if shards:
        raise UserError(f"weight shards in {folder} but no index file (pytorch_model.bin.index.json or "
                        "model.safetensors.index.json)")
    raise UserError(f"no weights in {folder} (model.safetensors, pytorch_model.bin or a sharded index)")


# --------------------------------------------------------------------------- writing tensors


def _tensor_bytes(t) -> object:
    """The raw little-endian bytes of a torch tensor as a numpy uint8 array (any dtype, bf16 included)."""
    import torch

    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()


# --------------------------------------------------------------------------- the conversion


@dataclass
class OriginalLlava:
    """What the conversion needs to know about the source, read and checked before anything is written."""

    path: Path
    config: dict
    text_model_type: str
    projector_type: str
    select_layer: int
    select_strategy: str  # llava-hf's name: default (patches) | full (CLS + patches)
    image_pad: str  # pad | square
    pinpoints: list | None = None  # LLaVA-1.6's image_grid_pinpoints as (width, height) pairs; None: LLaVA-1.5

    @property
    def anyres(self) -> bool:
        return self.pinpoints is not None


def _anyres_pinpoints(cfg: dict, path: Path) -> list | None:
    """LLaVA-1.6's pinpoints when the config is the anyres + spatial_unpad variant, None when it is LLaVA-1.5 style
    (flat); a one-line error naming any other variant."""
    import ast

    from .anyres import check_pinpoints

    aspect = str(cfg.get("image_aspect_ratio") or "")
    merge = cfg.get("mm_patch_merge_type") or "flat"
    if not aspect.startswith(ANYRES) and merge == "flat":
        return None
    what = f"{path} is a LLaVA-NeXT variant (image_aspect_ratio {aspect!r}, mm_patch_merge_type {merge!r})"
    if aspect != ANYRES or merge != UNPAD:
        raise UserError(f"{what}; supported: LLaVA-1.6's image_aspect_ratio {ANYRES!r} with mm_patch_merge_type "
                        f"{UNPAD!r}, or LLaVA-1.5's one image with mm_patch_merge_type 'flat'")
    if cfg.get("mm_vision_select_feature", "patch") != "patch":
        # LLaVA's spatial merge lays out a square of patches per tile: a class token has no place in it
        raise UserError(f"{path} is a LLaVA-NeXT checkpoint with mm_vision_select_feature "
                        f"{cfg.get('mm_vision_select_feature')!r}; its anyres merge needs 'patch'")
    pins = cfg.get("image_grid_pinpoints")
    if pins is None:
        raise UserError(f"{path} is a LLaVA-NeXT (anyres) checkpoint without image_grid_pinpoints")
    if isinstance(pins, str):  # some LLaVA configs write the list as a string, which LLaVA literal_evals
        try:
            pins = ast.literal_eval(pins)
        except (ValueError, SyntaxError):
            raise UserError(f"{path}: image_grid_pinpoints {pins[:80]!r} is not a list of pairs") from None
    try:
        return [list(p) for p in check_pinpoints(pins, 1)]  # multiples of the tile: checked with the tower
    except UserError as e:
        raise UserError(f"{path} (LLaVA-NeXT): {e}") from None


def inspect_original(path: Path) -> OriginalLlava:
    """Read and check an original LLaVA config; a one-line error for what the converter cannot represent."""
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        raise UserError(f"unreadable config.json in {path}") from None
    archs = cfg.get("architectures") or []
    arch = next((a for a in archs if a in ARCHITECTURES), None)
    tmt = ARCHITECTURES.get(arch) or ORIGINAL_MODEL_TYPES.get(cfg.get("model_type"), "llama")
    if archs and arch is None:
        raise UserError(f"unsupported original LLaVA architecture {archs[0]!r} in {path} "
                        f"(supported: {', '.join(ARCHITECTURES)})")
    if (path / "adapter_config.json").is_file() or (path / "non_lora_trainables.bin").is_file():
        raise UserError(f"{path} is an original LLaVA LoRA checkpoint: merge it into its base first "
                        "(LLaVA's scripts/merge_lora_weights.py)")
    if (path / "mm_projector.bin").is_file() and not any(
            (path / n).is_file() for n in ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.safetensors",
                                           "model.safetensors.index.json")):
        raise UserError(f"{path} holds only a projector (mm_projector.bin, a LLaVA stage-1 output), "
                        "not a full model")
    pinpoints = _anyres_pinpoints(cfg, path)
    if cfg.get("mm_use_im_start_end"):
        raise UserError(f"{path} wraps images in <im_start>/<im_end> tokens (mm_use_im_start_end), "
                        "which the llava-hf layout does not represent")
    if cfg.get("s2") or cfg.get("mm_vision_resampler"):
        raise UserError(f"{path} uses a multi-scale (S2) tower or a vision resampler; not supported")
    ptype = cfg.get("mm_projector_type", "linear")
    if ptype not in PROJECTOR_TYPES:
        raise UserError(f"unsupported projector {ptype!r} in {path} (supported: {', '.join(PROJECTOR_TYPES)})")
    feature = cfg.get("mm_vision_select_feature", "patch")
    strategies = {"patch": "default", "cls_patch": "full"}
    if feature not in strategies:
        raise UserError(f"unsupported mm_vision_select_feature {feature!r} in {path} (supported: patch, cls_patch)")
    return OriginalLlava(
        path=path, config=cfg, text_model_type=tmt, projector_type=ptype,
        select_layer=int(cfg.get("mm_vision_select_layer", -1)),  # LLaVA's training default
        select_strategy=strategies[feature],
        image_pad="pad" if cfg.get("image_aspect_ratio") == "pad" else "square",
        pinpoints=pinpoints,
    )


def _vision_config(vision: Path):
    from transformers import CLIPVisionConfig

    try:
        raw = json.loads((vision / "config.json").read_text())
    except (OSError, ValueError):
        raise UserError(f"not a CLIP model directory (no readable config.json): {vision}") from None
    if raw.get("model_type") not in ("clip", "clip_vision_model"):
        raise UserError(f"the vision tower {vision} has model_type {raw.get('model_type')!r} "
                        "(supported: clip, clip_vision_model)")
    return CLIPVisionConfig.from_pretrained(str(vision))  # takes vision_config out of a full CLIP config


def _layer_indices(names: Iterable[str], prefix: str) -> set[int]:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return {int(m.group(1)) for n in names if (m := pat.match(n))}


def _mean_row_chunks(st: SourceTensor, extra_rows: int) -> Callable[[], Iterator[object]]:
    """The tensor's rows, then ``extra_rows`` copies of their mean (computed in float64, in blocks)."""

    def chunks():
        import torch

        t = st.load()
        yield _tensor_bytes(t)
        if extra_rows:
            acc = torch.zeros(t.shape[1], dtype=torch.float64)
            for block in t.split(4096):
                acc += block.to(torch.float64).sum(0)
            mean = (acc / t.shape[0]).to(t.dtype)
            yield _tensor_bytes(mean.unsqueeze(0).expand(extra_rows, -1))

    return chunks


def _plain(st: SourceTensor) -> Callable[[], Iterator[object]]:
    return lambda: iter([_tensor_bytes(st.load())])


def _st_dtype(dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in _TORCH_TO_SAFETENSORS:
        raise UserError(f"unsupported tensor dtype {name}")
    return _TORCH_TO_SAFETENSORS[name]


def tcfg_of(src: Path, name: str = "tokenizer_config.json") -> dict:
    """The source's ``tokenizer_config.json`` (or another JSON file ``name``; {} when absent or unreadable)."""
    try:
        d = json.loads((src / name).read_text())
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


def _prepare_tokenizer(src: Path, patch_token: bool):
    """The source tokenizer with LLaVA's optional ``<im_patch>``, then llava-hf's ``<image>`` (and ``<pad>``)."""
    from transformers import AutoTokenizer, LlamaTokenizer

    if not any((src / n).is_file() for n in ("tokenizer.model", "tokenizer.json")):
        raise UserError(f"no tokenizer in {src} (tokenizer.model or tokenizer.json)")
    tcfg = tcfg_of(src)
    llama_sp = str(tcfg.get("tokenizer_class", "")).startswith("LlamaTokenizer") and (src / "tokenizer.model").is_file()
    try:
        # LLaVA loads Llama/Vicuna with the slow SentencePiece LlamaTokenizer; transformers' Llama class
        # rebuilds the same pipeline (Metaspace, legacy flag) that llava-hf's tokenizer.json has
        tok = (LlamaTokenizer if llama_sp else AutoTokenizer).from_pretrained(str(src))
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise UserError(f"cannot read the tokenizer in {src}: {first}") from None
    if patch_token:  # LLaVA's builder adds it when mm_use_im_patch_token is set; the embedding has its row
        tok.add_tokens([PATCH_TOKEN], special_tokens=True)
    base = len(tok)
    if IMAGE_TOKEN not in tok.get_vocab():  # as llava-hf: a special token right after the vocabulary
        tok.add_tokens([IMAGE_TOKEN], special_tokens=True)
    if tok.pad_token is None or tok.pad_token == tok.unk_token:  # LLaVA-1.5 pads with <unk>; llava-hf adds <pad>
        tok.add_special_tokens({"pad_token": PAD_TOKEN})
    return tok, base


def plan_tensors(orig: OriginalLlava, text: dict[str, SourceTensor], vision: dict[str, SourceTensor],
                 vision_path: Path, vcfg, n_rows: int) -> list[OutTensor]:
    """Rename and check every tensor; nothing is read yet. Errors name the missing or mismatched tensor."""
    cfg, path = orig.config, orig.path
    hidden, n_layers = int(cfg["hidden_size"]), int(cfg["num_hidden_layers"])
    out: list[OutTensor] = []
    used: set[str] = set()

    def need(name: str, source: dict[str, SourceTensor], where: Path) -> SourceTensor:
        if name not in source:
            raise UserError(f"tensor {name} missing from {where}")
        used.add(name)
        return source[name]

    def add(new: str, st: SourceTensor, shape=None, chunks=None):
        out.append(OutTensor(new, _st_dtype(st.dtype), tuple(shape or st.shape), chunks or _plain(st)))

    # language model
    emb = need("model.embed_tokens.weight", text, path)
    if len(emb.shape) != 2 or emb.shape[1] != hidden:
        raise UserError(f"model.embed_tokens.weight in {path} has shape {list(emb.shape)}, expected [*, {hidden}]")
    layers = _layer_indices(text, "model.layers.")
    if layers != set(range(n_layers)):
        missing = sorted(set(range(n_layers)) - layers)
        raise UserError(f"{path} has weights for {len(layers)} language-model layers, its config says {n_layers}"
                        + (f" (missing layer {missing[0]})" if missing else ""))
    head = text.get("lm_head.weight", emb)  # tied embeddings store no lm_head: write the embedding twice
    used.add("lm_head.weight")
    if tuple(head.shape) != tuple(emb.shape):
        raise UserError(f"lm_head.weight {list(head.shape)} and model.embed_tokens.weight {list(emb.shape)} "
                        f"differ in {path}")
    extra = n_rows - emb.shape[0]
    add("language_model.model.embed_tokens.weight", emb, (n_rows, hidden), _mean_row_chunks(emb, extra))
    add("language_model.lm_head.weight", head, (n_rows, hidden), _mean_row_chunks(head, extra))
    for name in sorted(text):
        if name.endswith(".rotary_emb.inv_freq"):  # a buffer old transformers saved; recomputed on load
            used.add(name)
        elif (name.startswith("model.layers.") or name == "model.norm.weight") and name not in used:
            add("language_model." + name, need(name, text, path))

    # projector
    v_hidden = int(vcfg.hidden_size)
    mm_hidden = cfg.get("mm_hidden_size")
    if mm_hidden is not None and int(mm_hidden) != v_hidden:
        raise UserError(f"the vision tower is {v_hidden} wide but {path} was trained on a {mm_hidden}-wide one "
                        "(mm_hidden_size): wrong --vision?")
    if orig.projector_type == "mlp2x_gelu":
        pairs = [("model.mm_projector.0", "linear_1", (hidden, v_hidden)),
                 ("model.mm_projector.2", "linear_2", (hidden, hidden))]
    else:
        pairs = [("model.mm_projector", "linear_1", (hidden, v_hidden))]
    for src, dst, shape in pairs:
        w, b = need(f"{src}.weight", text, path), need(f"{src}.bias", text, path)
        if tuple(w.shape) != shape or tuple(b.shape) != shape[:1]:
            raise UserError(f"{src}.weight in {path} has shape {list(w.shape)}, expected {list(shape)}: "
                            "wrong --vision or a damaged checkpoint?")
        add(f"multi_modal_projector.{dst}.weight", w)
        add(f"multi_modal_projector.{dst}.bias", b)
    if orig.projector_type == "linear":
        # llava-hf's projector is always linear -> act -> linear: LLaVA's single linear layer is
        # represented exactly with the identity activation and an identity second layer
        dtype = _st_dtype(text["model.mm_projector.weight"].dtype)

        def eye(dt=text["model.mm_projector.weight"].dtype):
            import torch

            yield _tensor_bytes(torch.eye(hidden, dtype=dt))

        def zeros(dt=text["model.mm_projector.weight"].dtype):
            import torch

            yield _tensor_bytes(torch.zeros(hidden, dtype=dt))

        out.append(OutTensor("multi_modal_projector.linear_2.weight", dtype, (hidden, hidden), eye))
        out.append(OutTensor("multi_modal_projector.linear_2.bias", dtype, (hidden,), zeros))

    if orig.anyres:  # LLaVA-1.6's learned vector after each row of the unpadded tile grid
        nl = need(NEWLINE_SRC, text, path)
        if tuple(nl.shape) != (hidden,):
            raise UserError(f"{NEWLINE_SRC} in {path} has shape {list(nl.shape)}, expected [{hidden}]")
        add(NEWLINE_DST, nl)

    # vision tower: the checkpoint's own copy when it has one (LLaVA saves it when the tower was trained)
    inner = "model.vision_tower.vision_tower.vision_model."
    if any(n.startswith(inner) for n in text):
        tower = {n[len("model.vision_tower.vision_tower."):]: st for n, st in text.items() if n.startswith(inner)}
        used.update(n for n in text if n.startswith("model.vision_tower."))
        tower_where = path
    else:
        tower = {n: st for n, st in vision.items() if n.startswith("vision_model.")}
        tower_where = vision_path
    tower = {n: st for n, st in tower.items() if not n.endswith(".position_ids")}  # a buffer, recomputed
    if not tower:
        raise UserError(f"no vision_model.* weights in {tower_where} (is it a CLIP checkpoint?)")
    v_layers = _layer_indices(tower, "vision_model.encoder.layers.")
    if len(v_layers) < int(vcfg.num_hidden_layers) or v_layers != set(range(len(v_layers))):
        raise UserError(f"{tower_where} has {len(v_layers)} vision layers, its config says {vcfg.num_hidden_layers}")
    pos = tower.get("vision_model.embeddings.position_embedding.weight")
    n_pos = (int(vcfg.image_size) // int(vcfg.patch_size)) ** 2 + 1
    if pos is None or tuple(pos.shape) != (n_pos, v_hidden):
        got = list(pos.shape) if pos is not None else None
        raise UserError(f"vision position embedding in {tower_where} is {got}, "
                        f"expected {[n_pos, v_hidden]} for {vcfg.image_size}px images")
    for name in sorted(tower):
        add("vision_tower." + name, tower[name])

    unknown = sorted(set(text) - used)
    if unknown:
        raise UserError(f"{len(unknown)} tensor(s) in {path} the converter does not know, e.g. {unknown[0]}")
    return out


def convert(src: str | Path, vision: str | Path, out: str | Path, max_shard_bytes: int = MAX_SHARD_BYTES,
            log: Callable[[str], None] = print, conv_mode: str = "llava_v1") -> Path:
    """Write the llava-hf style directory ``out`` (atomically: a temporary folder renamed when complete).

    ``conv_mode`` is recorded as the checkpoint's conversation mode (``resolve_model`` passes the one LLaVA's
    scripts pick from the model's name).
    """
    from transformers import CLIPImageProcessor
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from .anyres import AnyresSpec
    from .checkpoint import write_recipe
    from .families import DEFAULT, FAMILIES
    from .llava_hf import llava_config, write_side_files

    src, vision, out = Path(src), Path(vision), Path(out)
    orig = inspect_original(src)
    cfg = orig.config
    vcfg = _vision_config(vision)
    family = FAMILIES["llava-next" if orig.anyres else DEFAULT]
    extra = {}
    if orig.anyres:  # every pinpoint a whole number of the tower's tiles (a one-line error otherwise)
        AnyresSpec.from_config(cfg, "llava", tower={"image_size": vcfg.image_size, "patch_size": vcfg.patch_size})
        extra["image_grid_pinpoints"] = orig.pinpoints
    if not (vision / "preprocessor_config.json").is_file():
        raise UserError(f"no preprocessor_config.json in the vision tower {vision} (LLaVA preprocesses with it)")
    text = read_tensors(src)
    has_tower = any(n.startswith("model.vision_tower.") for n in text)
    vision_tensors = {} if has_tower else read_tensors(vision)

    tok, base = _prepare_tokenizer(src, bool(cfg.get("mm_use_im_patch_token", False)))
    rows = int(text["model.embed_tokens.weight"].shape[0]) if "model.embed_tokens.weight" in text else 0
    if base > rows:
        raise UserError(f"the tokenizer of {src} has {base} tokens but the embedding matrix only {rows} rows")
    n_rows = rows if len(tok) <= rows else -(-len(tok) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    tensors = plan_tensors(orig, text, vision_tensors, vision, vcfg, n_rows)

    fields = {k: v for k, v in cfg.items() if k not in LLAVA_ONLY_FIELDS and not k.startswith("mm_")
              and not (k == "rope_scaling" and v is None)}
    fields.update(vocab_size=n_rows, pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    text_config = CONFIG_MAPPING[orig.text_model_type](**fields)
    config = llava_config(vcfg, text_config, tok.convert_tokens_to_ids(IMAGE_TOKEN),
                          projector_act="gelu" if orig.projector_type == "mlp2x_gelu" else "linear",
                          feature_layer=orig.select_layer, strategy=orig.select_strategy,
                          multimodal_projector_bias=True, tie_word_embeddings=False, family=family, **extra)
    config.architectures = [family.hf_class_name]
    if cfg.get("torch_dtype") or cfg.get("dtype"):
        config.dtype = cfg.get("dtype") or cfg.get("torch_dtype")

    total = sum(t.nbytes for t in tensors)
    out.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out.parent).free
    if free < total * 1.02 + 50e6:
        raise UserError(f"not enough disk space in {out.parent} for the converted checkpoint "
                        f"({total / 1e9:.1f} GB needed, {free / 1e9:.1f} GB free)")
    log(f"converting the original LLaVA checkpoint {src} (+ vision tower {vision}) -> {out} ({total / 1e9:.2f} GB)")
    with atomic.atomic_path(out) as tmp:
        tmp.mkdir()
        write_sharded(tmp, tensors, max_shard_bytes)
        config.save_pretrained(str(tmp))
        image_processor = CLIPImageProcessor.from_pretrained(str(vision))
        if orig.anyres:
            image_processor = _family_processor(image_processor, family, extra)
        # the tokenizer settings are what LLaVA's transformers decided from the source config (legacy=True when
        # it is silent): the ids llava-edge makes follow them
        src_cfg = tcfg_of(src)
        write_side_files(tmp, tok, image_processor, patch_size=int(vcfg.patch_size), strategy=orig.select_strategy,
                         conv_mode=conv_mode, image_pad=orig.image_pad, legacy=bool(src_cfg.get("legacy", True)),
                         add_bos=bool(src_cfg.get("add_bos_token", True)),
                         add_eos=bool(src_cfg.get("add_eos_token", False)), family=family)
        _keep_additional_special(src, tmp)
        if orig.anyres:  # the recipe again, now saying that tiles and packing follow LLaVA's code, not transformers'
            write_recipe(tmp, template=conv_mode, image_pad=orig.image_pad, anyres_origin="llava")
        if (src / "tokenizer.model").is_file():  # the GGUF export reads the SentencePiece model itself
            shutil.copyfile(src / "tokenizer.model", tmp / "tokenizer.model")
        if (src / "generation_config.json").is_file():
            shutil.copyfile(src / "generation_config.json", tmp / "generation_config.json")
        (tmp / PROVENANCE_FILE).write_text(json.dumps({
            "original": str(src.resolve()), "vision": str(vision.resolve()), "converter_version": CONVERTER_VERSION,
        }, indent=2) + "\n")
    return out


def _keep_additional_special(src: Path, out: Path) -> None:
    """The source's ``additional_special_tokens`` (e.g. Yi's ChatML ``<|im_start|>``) written back into the output's
    ``tokenizer_config.json``: transformers 5 saves them as ``extra_special_tokens``, a key LLaVA's transformers and
    llava-edge's tokenizer do not read, and without them the word-start ``▁`` before such a token at the start of
    a prompt is kept where LLaVA's tokenizer drops it."""
    extra = (tcfg_of(src).get("additional_special_tokens")
             or tcfg_of(src, "special_tokens_map.json").get("additional_special_tokens") or [])
    extra = [x.get("content") if isinstance(x, dict) else x for x in extra]
    if not extra or not all(isinstance(x, str) for x in extra):
        return
    f = out / "tokenizer_config.json"
    written = json.loads(f.read_text())
    written["additional_special_tokens"] = extra
    f.write_text(json.dumps(written, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _family_processor(clip, family, config_extra: dict):
    """The tower's CLIP processor (what LLaVA preprocesses every tile with) as the family's own llava-hf processor,
    carrying the tower's sizes and normalization. Resampling is bicubic whatever the tower says: LLaVA's anyres
    resizes (the canvas, the base picture) call PIL's ``resize`` with its default, and the tower's own resize of
    a tile that already has its size does nothing."""
    from PIL import Image

    size, crop = clip.size.get("shortest_edge", clip.size.get("height")), clip.crop_size["height"]
    proc = family.hf_image_processor(int(size), int(crop), config_extra)
    for name in ("image_mean", "image_std", "rescale_factor", "do_convert_rgb"):
        setattr(proc, name, getattr(clip, name))
    proc.resample = Image.Resampling.BICUBIC
    return proc


# --------------------------------------------------------------------------- the cache


def _folder_stamp(folder: Path) -> list:
    """Names, sizes and modification times of a folder's files: changes when its content is replaced."""
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(folder.iterdir()) if p.is_file()]


def conversion_key(src: Path, vision: Path, conv_mode: str = "llava_v1") -> str:
    h = hashlib.sha256(json.dumps({
        "converter": CONVERTER_VERSION, "src": str(src.resolve()), "vision": str(vision.resolve()),
        "src_files": _folder_stamp(src), "vision_files": _folder_stamp(vision), "conv_mode": conv_mode,
    }).encode())
    return h.hexdigest()[:16]


def converted_path(src: Path, vision: Path, cache_dir: Path | None = None, conv_mode: str = "llava_v1") -> Path:
    key = conversion_key(src, vision, conv_mode)
    return (cache_dir or default_cache_dir()) / "converted" / f"{src.resolve().name}-{key}"


def convert_cached(src: Path, vision: Path, cache_dir: Path | None = None,
                   log: Callable[[str], None] = print, conv_mode: str = "llava_v1") -> Path:
    """The converted directory for (src, vision, mode): reused when already converted, else written now."""
    out = converted_path(src, vision, cache_dir, conv_mode)
    if (out / "config.json").is_file() and (out / PROVENANCE_FILE).is_file():
        log(f"using the converted checkpoint {out}")
        return out
    _remove_dead_partials(out.parent)
    return convert(src, vision, out, log=log, conv_mode=conv_mode)


def _remove_dead_partials(folder: Path) -> None:
    """Delete what killed conversions left (``.NAME.PID.partial``), not what a running one is writing."""
    if not folder.is_dir():
        return
    for p in folder.glob(f".*{atomic.TMP_SUFFIX}"):
        pid = p.name[: -len(atomic.TMP_SUFFIX)].rsplit(".", 1)[-1]
        try:
            os.kill(int(pid), 0)
            continue  # that process still runs
        except (ValueError, ProcessLookupError):
            pass
        except PermissionError:
            continue
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
