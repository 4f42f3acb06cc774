"""A LLaVA checkpoint on disk: find it, validate it, read its settings, load it.

Everything except :func:`load_hf_model` and the conversion in :func:`resolve_model`
works without torch. A checkpoint is a llava-hf style directory (``config.json``
with ``model_type: llava``, safetensors weights, one file or shards with an
index, tokenizer and processor files) or a hub id (read from the local Hugging
Face cache when ``HF_HUB_OFFLINE=1``). The toy model and ``llava-edge train``
outputs are such directories. An original LLaVA repository checkpoint
(``LlavaLlamaForCausalLM``) is converted into one by :func:`resolve_model`
(see :mod:`llava_edge.original_llava`).

Every problem found here is a one-line :class:`UserError` naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import atomic, families
from .anyres import ORIGINS
from .errors import UserError
from .preprocess import PAD_MODES, ImageSpec
from .templates import MODES, mode_for_model_name
from .weights import check_safetensors, read_safetensors_header_bytes

RECIPE_FILE = "llava_edge.json"  # what the config does not say: conversation mode and pad mode
ORIGINAL_SUPPORTED = "original LLaVA LlavaLlamaForCausalLM / LlavaMistralForCausalLM checkpoints (converted on export)"
HUB_SIDE_FILES = ["*.json", "*.model", "*.txt", "*.jinja"]  # configs, tokenizer, processor, templates
DEFAULT_RECIPE = {"template": "vicuna_v1", "image_pad": "pad"}
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json", "tokenizer_config.json")


def write_recipe(folder: str | Path, template: str, image_pad: str, toy: bool = False,
                 anyres_origin: str | None = None) -> None:
    """``llava_edge.json``: the conversation mode the checkpoint was trained with (key ``template``), its pad mode,
    ``toy``: a synthetic model of ``llava_edge.toy`` (or trained from one), which quantize may calibrate on
    synthetic scenes, and for LLaVA-NeXT ``anyres_origin``: whose code tiles and packs pictures as the weights
    were trained (``llava`` for a converted original LLaVA-1.6; absent: transformers', ``hf``)."""
    if template not in MODES:
        raise UserError(f"unknown conversation mode {template!r}; known: {', '.join(MODES)}")
    if image_pad not in PAD_MODES:
        raise UserError(f"unknown image pad mode {image_pad!r}; known: {', '.join(PAD_MODES)}")
    if anyres_origin is not None and anyres_origin not in ORIGINS:
        raise UserError(f"unknown anyres origin {anyres_origin!r}; known: {', '.join(ORIGINS)}")
    recipe = {"template": template, "image_pad": image_pad, **({"toy": True} if toy else {}),
              **({"anyres_origin": anyres_origin} if anyres_origin else {})}
    atomic.write_json(Path(folder) / RECIPE_FILE, recipe)


@dataclass
class Checkpoint:
    path: Path
    config: dict
    recipe: dict
    origin: Path | None = None  # the original LLaVA checkpoint this one was converted from, if any
    family: families.Family = families.FAMILIES[families.DEFAULT]  # what every stage asks about this model

    @property
    def text_config(self) -> dict:
        return self.config["text_config"]

    @property
    def vision_config(self) -> dict:
        return self.config["vision_config"]

    @property
    def conv_mode(self) -> str:
        """The conversation mode to prompt with: the recipe's (what llava-edge trained or converted it with), else
        the default for a llava-hf checkpoint (:func:`default_conv_mode`)."""
        return self.recipe["template"]

    def chat_template(self) -> str | None:
        """The checkpoint's own Jinja chat template (what transformers' ``apply_chat_template`` renders)."""
        for name in CHAT_TEMPLATE_FILES:
            f = self.path / name
            if not f.is_file():
                continue
            if name.endswith(".jinja"):
                return f.read_text(encoding="utf-8")
            try:
                t = json.loads(f.read_text(encoding="utf-8")).get("chat_template")
            except (ValueError, AttributeError):
                raise UserError(f"unreadable {f}") from None
            if isinstance(t, str) and t:
                return t
        return None

    @property
    def image_token_id(self) -> int:
        c = self.config
        return int(c.get("image_token_index", c.get("image_token_id", 32000)))

    @property
    def video_token_id(self) -> int | None:
        """The token a video's positions hold in transformers' model (LLaVA-OneVision's); None: no video."""
        c = self.config
        v = c.get("video_token_index", c.get("video_token_id"))
        return int(v) if v is not None and self.family.takes_video else None

    def image_spec(self) -> ImageSpec:
        # transformers < 5 writes preprocessor_config.json; 5 nests it in processor_config.json
        cfg = {}
        pre, proc = self.path / "preprocessor_config.json", self.path / "processor_config.json"
        if pre.is_file():
            cfg = json.loads(pre.read_text())
        elif proc.is_file():
            cfg = json.loads(proc.read_text()).get("image_processor", {})
        if not cfg:
            size = self.vision_config.get("image_size", 336)
            cfg = {"size": {"shortest_edge": size}, "crop_size": {"height": size, "width": size}}
        return ImageSpec.from_processor_config(cfg, pad=self.recipe["image_pad"])

    def num_image_tokens(self) -> int:
        """What the vision graph gives per tile (for a one-tile family, the positions of every picture)."""
        return self.family.tokens_per_tile(self)

    def weight_map(self) -> dict[str, str] | None:
        """Tensor name -> shard file name from ``model.safetensors.index.json``; None for one file."""
        index = self.path / "model.safetensors.index.json"
        if not index.is_file():
            return None
        try:
            wm = json.loads(index.read_text())["weight_map"]
            if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            raise UserError(f"unreadable weight index {index} (no weight_map)") from None
        return wm

    def weight_files(self) -> list[Path]:
        wm = self.weight_map()
        if wm is not None:
            files = [self.path / n for n in sorted(set(wm.values()))]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise UserError(f"missing weight shard(s) in {self.path}: {', '.join(missing)}")
            return files
        single = self.path / "model.safetensors"
        if single.is_file():
            return [single]
        bins = sorted(p.name for p in self.path.glob("pytorch_model*.bin"))
        if bins:
            raise UserError(f"{self.path} has only PyTorch .bin weights ({bins[0]}); llava-edge reads safetensors: "
                            "re-save it with save_pretrained(safe_serialization=True)")
        raise UserError(f"no safetensors weights in {self.path} (model.safetensors or an index)")

    def check_weights(self) -> None:
        """Every shard present and whole, every indexed tensor in its shard: headers only, cheap at 7B."""
        wm = self.weight_map()
        headers = {f.name: check_safetensors(f) for f in self.weight_files()}
        if wm is not None:
            for name, shard in wm.items():
                if name not in headers[shard]:
                    raise UserError(f"{self.path / shard} lacks tensor {name} (its index lists it there)")

    def fingerprint(self) -> str:
        """sha256 over config.json and every safetensors header (names, dtypes, shapes, offsets).

        Cheap to compute at 7B size, and it changes whenever the weights' layout or the
        file sizes change; the bundle manifest additionally records full hashes of its outputs.
        """
        h = hashlib.sha256((self.path / "config.json").read_bytes())
        for f in self.weight_files():
            h.update(f.name.encode())
            h.update(str(f.stat().st_size).encode())
            h.update(read_safetensors_header_bytes(f))
        return h.hexdigest()


    def stamp(self) -> str:
        """sha256 of the names, sizes and modification times of the folder's files.

        The fingerprint hashes config and safetensors headers only, which retraining
        does not change; the stamp changes whenever a file is rewritten.
        """
        h = hashlib.sha256()
        for p in sorted(self.path.iterdir()):
            if p.name.startswith(".") or not p.is_file():
                continue
            st = p.stat()
            h.update(f"{p.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()


def source_record(ckpt: Checkpoint) -> dict:
    """A bundle manifest's ``source``: the model as the user named it, its fingerprint and stamp, the converted
    copy if any, and whether it is a synthetic model of llava-edge's toy module (``toy``)."""
    rec = {"model": str(ckpt.origin or ckpt.path), "fingerprint": ckpt.fingerprint(), "stamp": ckpt.stamp()}
    if ckpt.origin is not None:
        rec["converted"] = str(ckpt.path)
    if ckpt.recipe.get("toy"):
        rec["toy"] = True
    return rec


def _looks_like_hub_id(s: str) -> bool:
    return s.count("/") == 1 and not s.startswith((".", "/", "~")) and all(s.split("/"))


def hub_snapshot(repo_id: str, what: str = "model") -> Path:
    """A hub repository's local folder: from the Hugging Face cache only when ``HF_HUB_OFFLINE=1``.

    Online, one weight format is downloaded: safetensors when the repository has
    them, else PyTorch ``.bin`` (original LLaVA and older CLIP repositories).
    """
    from huggingface_hub import constants, list_repo_files, snapshot_download

    offline = bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    try:
        if offline:
            return Path(snapshot_download(repo_id, local_files_only=True))
        files = list_repo_files(repo_id)
        weights = ["*.safetensors"] if any(f.endswith(".safetensors") for f in files) else ["pytorch_model*.bin"]
        return Path(snapshot_download(repo_id, allow_patterns=HUB_SIDE_FILES + weights))
    except Exception as e:  # not cached, unknown repo, gated, no network...
        if offline:
            raise UserError(f"{what} {repo_id!r} is not a directory and not in the local Hugging Face cache "
                            f"({constants.HF_HUB_CACHE}); HF_HUB_OFFLINE is set") from None
        first = (str(e).strip().splitlines() or [""])[0][:120]
        raise UserError(f"{what} {repo_id!r} is neither a directory nor a reachable hub id "
                        f"({type(e).__name__}{': ' + first if first else ''})") from None


def resolve_path(model: str | Path, what: str = "model") -> Path:
    """A local directory, or a hub id's snapshot folder; a one-line error otherwise."""
    p = Path(model).expanduser()
    if p.exists():
        return p
    if _looks_like_hub_id(str(model)):
        return hub_snapshot(str(model), what)
    raise UserError(f"{what} directory not found: {p}")


def _read_config(path: Path) -> dict:
    if not path.is_dir():
        raise UserError(f"not a model directory: {path}")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        if (path / "adapter_config.json").is_file():
            raise UserError(f"{path} is a LoRA adapter, not a model: merge it into its base first "
                            "(llava-edge train merge-lora)")
        if any(path.glob("random_states*.pkl")) or (path / "optimizer.bin").is_file():
            raise UserError(f"{path} is a training state (continue it with --resume), not a model")
        raise UserError(f"not a LLaVA model directory (no config.json): {path}")
    try:
        config = json.loads(cfg_file.read_text())
        if not isinstance(config, dict):
            raise ValueError
    except ValueError:
        raise UserError(f"unreadable config.json in {path}") from None
    return config


def _is_original_llava(config: dict) -> bool:
    from .original_llava import is_original_llava  # torch-free at import

    return is_original_llava(config)


def open_checkpoint(model: str | Path) -> Checkpoint:
    """Find and validate a llava-hf style checkpoint; a one-line :class:`UserError` when it is not one."""
    path = resolve_path(model)
    config = _read_config(path)
    mtype = config.get("model_type")
    if _is_original_llava(config):
        arch = (config.get("architectures") or [mtype])[0]
        raise UserError(
            f"{path} is an original LLaVA repository checkpoint ({arch}); `llava-edge export` converts it "
            "(with --vision for its CLIP tower), other commands need the llava-hf layout"
        )
    try:
        family = families.for_config(config, path)
    except UserError as e:
        if mtype in {f.model_type for f in families.FAMILIES.values()}:
            raise
        raise UserError(f"{e}; {ORIGINAL_SUPPORTED}") from None
    recipe = dict(DEFAULT_RECIPE)
    rf = path / RECIPE_FILE
    if rf.is_file():
        try:
            recipe.update(json.loads(rf.read_text()))
        except ValueError:
            raise UserError(f"unreadable {RECIPE_FILE} in {path}") from None
        if recipe.get("template") not in MODES:
            raise UserError(f"{rf} names an unknown conversation mode {recipe.get('template')!r}")
    ckpt = Checkpoint(path, config, recipe, family=family)
    if not rf.is_file():
        recipe["template"] = default_conv_mode(ckpt)
    ckpt.check_weights()  # fail early on missing shards and damaged files
    return ckpt


def default_conv_mode(ckpt: Checkpoint) -> str:
    """The mode of a llava-hf checkpoint that records none: what its weights were trained with (its family's
    rule, ``Family.default_conv_mode``)."""
    return ckpt.family.default_conv_mode(ckpt)


def original_conv_mode(name: str) -> str:
    """The mode of an original LLaVA checkpoint named ``name``.

    LLaVA's ``run_llava.py`` and ``serve/cli.py`` pick it from the name
    (:func:`templates.mode_for_model_name`; ``llava-v1.5-7b`` gets ``llava_v1``). LLaVA's
    loader runs a checkpoint as a LLaVA model only when its name holds "llava"; for
    other names the rule says nothing meaningful, and the mode LLaVA-1.5 trains with
    (``--version v1``: ``vicuna_v1``) is taken.
    """
    return mode_for_model_name(name) if "llava" in name.lower() else "vicuna_v1"


def llava_model_name(model: str | Path) -> str:
    """LLaVA's ``get_model_name_from_path``: the folder name, or ``PARENT_checkpoint-N`` for a training checkpoint."""
    parts = str(model).strip("/").split("/")
    if parts[-1].startswith("checkpoint-") and len(parts) > 1:
        return parts[-2] + "_" + parts[-1]
    return parts[-1]


def resolve_model(model: str | Path, vision: str | Path | None = None, cache_dir: str | Path | None = None,
                  log: Callable[[str], None] = print) -> Checkpoint:
    """What ``export`` takes: a llava-hf checkpoint as it is, an original LLaVA one converted.

    An original LLaVA checkpoint (``LlavaLlamaForCausalLM``) is converted with its
    CLIP tower (``vision``, else the config's ``mm_vision_tower``: a directory or
    a hub id) into ``cache_dir/converted/NAME-KEY`` (default
    :func:`llava_edge.cache_dir.default_cache_dir`, i.e. ``$LLAVA_EDGE_CACHE``
    or ``~/.cache/llava-edge``). The key hashes both sources' file names, sizes
    and times, so a second export reuses the conversion and a changed source
    converts again. The folder is written under a temporary name and renamed when
    complete. ``vision`` with a llava-hf checkpoint is an error (it has its tower).
    """
    path = resolve_path(model)
    config = _read_config(path)
    if not _is_original_llava(config):
        if vision is not None:
            raise UserError(f"--vision is only for original LLaVA checkpoints; {path} already has its vision tower")
        return open_checkpoint(path)
    from . import original_llava

    original_llava.inspect_original(path)  # unsupported variants fail before anything is fetched
    if vision is None:
        vision = config.get("mm_vision_tower")
        if not vision:
            raise UserError(f"{path} does not name its vision tower (mm_vision_tower): give --vision DIR")
    vision_path = resolve_path(vision, what="vision tower")
    if not vision_path.is_dir():
        raise UserError(f"vision tower is not a directory: {vision_path}")
    mode = original_conv_mode(llava_model_name(model))
    how = "as LLaVA's scripts pick it from the name" if "llava" in llava_model_name(model).lower() else "LLaVA-1.5's"
    log(f"conversation mode: {mode} ({how}; --conv-mode on export overrides it)")
    out = original_llava.convert_cached(path, vision_path, Path(cache_dir) if cache_dir else None, log=log,
                                        conv_mode=mode)
    ckpt = open_checkpoint(out)
    ckpt.origin = path
    return ckpt


def _cannot_load(ckpt: Checkpoint, e: Exception) -> UserError:
    """transformers' loading error as one line naming the checkpoint."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return UserError(f"cannot load {ckpt.path}: {first}")


def load_hf_vision_half(ckpt: Checkpoint, dtype: str = "float32", attn_implementation: str = "eager"):
    """The Hugging Face model with its language model cut to nothing: vision tower + projector exactly.

    Exporting the vision graph of a 7B LLaVA must not load 28 GB of fp32 language
    model. transformers has no option to load part of a model, so the config's text
    model gets zero decoder layers and a one-row vocabulary (the projector still
    maps to its real width); ``from_pretrained`` then reads only the tensors that
    exist (the language model's are reported unexpected or mismatched and skipped).
    ``get_image_features`` equals the full model's (tested bit for bit).
    """
    import torch
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    try:
        config = AutoConfig.from_pretrained(ckpt.path)
        text = config.text_config
        text.num_hidden_layers, text.vocab_size, text.pad_token_id = 0, 1, None
        if getattr(text, "layer_types", None) is not None:
            text.layer_types = []
        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the load report lists every skipped language-model tensor
        try:
            model = ckpt.family.hf_class().from_pretrained(
                ckpt.path, config=config, ignore_mismatched_sizes=True, dtype=getattr(torch, dtype),
                attn_implementation=attn_implementation,
            )
        finally:
            hf_logging.set_verbosity(level)
    except (OSError, ValueError, RuntimeError) as e:
        raise _cannot_load(ckpt, e) from None
    return model.eval()


def load_hf_model(ckpt: Checkpoint, dtype: str = "float32", attn_implementation: str = "eager"):
    """The Hugging Face model of the checkpoint's family (needs the ``export`` extra: torch + transformers).

    Eager attention by default: the ONNX exporter traces it and it is the exact reference.
    """
    import torch

    try:
        model = ckpt.family.hf_class().from_pretrained(
            ckpt.path, dtype=getattr(torch, dtype), attn_implementation=attn_implementation
        )
    except (OSError, ValueError, RuntimeError) as e:
        raise _cannot_load(ckpt, e) from None
    return model.eval()
