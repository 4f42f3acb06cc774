"""The language model of a LLaVA checkpoint -> GGUF for llama.cpp, one tensor at a time.

One :class:`TextArch` per llama.cpp architecture, registered under the Hugging Face
text ``model_type`` values it reads (as llama.cpp's converter registers one class per model):

- ``llama`` (Llama 1/2/3, Vicuna, Mistral): Q/K rows (and biases) permuted from Hugging
  Face's rotate-half layout to llama.cpp's interleaved pairs, K with its own head count
  under grouped-query attention; rope linear scaling and Llama 3.1's ``llama3`` scaling
  (as the ``rope_freqs`` tensor of per-frequency divisors); head width when it is not
  ``hidden / heads``.
- ``qwen2`` (Qwen1.5/2/2.5; LLaVA-OneVision, LLaVA-Interleave): llama.cpp rotates halves
  as Hugging Face does, so no permutation; q/k/v biases; tied embeddings when there is no
  ``lm_head`` (llama.cpp then reads the token embedding as the output).
- ``phi3`` (Phi-3, Phi-3.5 mini): the fused ``qkv_proj`` and ``gate_up_proj`` are what
  llama.cpp's ``attn_qkv`` and doubled ``ffn_up`` hold (q, k, v rows; gate rows, then
  up), so they are written as stored; partial rotary width, the original context length
  and the sliding window as llama.cpp's converter writes them.

Rope base and scaling come from ``rope_parameters`` (transformers 5) or
``rope_theta``/``rope_scaling`` (4.x); what an architecture does not support (LongRoPE,
yarn, a sliding window llama.cpp would ignore) is refused on one line. The vocabulary is
:mod:`gguf_vocab`'s.

Memory: tensor infos are written first, then each tensor is read from its safetensors
file with plain reads, converted and written before the next is read, so an export
needs memory of the order of the largest tensor, not of the model
(``GGUFWriter.add_tensor`` keeps every array until the end).

Output types (``--llm-outtype``) as llama.cpp's converter chooses them: 1-D tensors
(norms, biases, rope factors) stay f32; q8_0 falls back to f16 for a tensor whose rows
are not a multiple of its 32-value block.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar
from pathlib import Path

import numpy as np

from llava_edge import atomic
from llava_edge.checkpoint import Checkpoint
from llava_edge.errors import UserError
from llava_edge.weights import FLOAT_NUMPY, StoredTensor, stored_tensors

from .gguf_vocab import read_vocab

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
_TEXT_PREFIXES = {  # saved llava-hf layout and transformers 5's in-memory layout
    "language_model.model.": "model.",
    "model.language_model.": "model.",
    "language_model.lm_head.": "lm_head.",
    "lm_head.": "lm_head.",
}
_QUANT_CHUNK = 1 << 20  # values quantized per call: gguf's numpy quantizer makes several temporaries


def text_tensors(ckpt: Checkpoint) -> dict[str, StoredTensor]:
    """Language-model tensors by their plain Llama name (``model.layers.0...``), from headers only."""
    out: dict[str, StoredTensor] = {}
    for f in ckpt.weight_files():
        for key, st in stored_tensors(f, check=False).items():
            for prefix, canon in _TEXT_PREFIXES.items():
                if key.startswith(prefix):
                    if st.dtype not in FLOAT_NUMPY:
                        raise UserError(f"unsupported weight dtype {st.dtype} for {key} in {f.name} "
                                        f"(supported: {', '.join(FLOAT_NUMPY)})")
                    out[canon + key[len(prefix) :]] = st
                    break
    if not any(k.startswith("model.layers.") for k in out):
        raise UserError(f"no language-model weights found in {ckpt.path}")
    return out


def read_tensor(st: StoredTensor) -> np.ndarray:
    """One tensor as float32, read alone (``weights.StoredTensor.float32``: no memory map)."""
    return st.float32()


def permute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """Hugging Face's Q/K rows (rotate-half pairs) -> llama.cpp's interleaved pairs; weights or biases."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclass(frozen=True)
class Rope:
    theta: float
    linear_factor: float | None = None  # positions divided by this (rope_type "linear")
    freq_factors: np.ndarray | None = None  # per-frequency divisors (rope_type "llama3"), llama.cpp's rope_freqs


def llama3_freq_factors(theta: float, head_dim: int, p: dict) -> np.ndarray:
    """Llama 3.1's rope scaling as divisors of the base frequencies (what llama.cpp's ``rope_freqs`` holds).

    Frequencies whose wavelength is shorter than ``original_max_position_embeddings /
    high_freq_factor`` are kept, those longer than ``... / low_freq_factor`` divided by
    ``factor``, and those between interpolated smoothly (Meta's published rule, as
    transformers' ``_compute_llama3_parameters`` implements it).
    """
    factor, low, high = float(p["factor"]), float(p["low_freq_factor"]), float(p["high_freq_factor"])
    old_ctx = float(p["original_max_position_embeddings"])
    inv_freq = theta ** -(np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_ctx / wavelen - low) / (high - low)
    mid = 1.0 / ((1 - smooth) / factor + smooth)
    out = np.where(wavelen < old_ctx / high, 1.0, np.where(wavelen > old_ctx / low, factor, mid))
    return out.astype(np.float32)


ROPE_KINDS = ("default", "linear", "llama3")


def rope_settings(tc: dict, head_dim: int, supported: tuple[str, ...] = ROPE_KINDS) -> Rope:
    """Rope base and scaling from a text config of transformers 5 (``rope_parameters``) or 4.x."""
    p = rope_parameters(tc)
    theta = float(p.get("rope_theta", tc.get("rope_theta", 10000.0)))
    kind = p.get("rope_type", p.get("type", "default"))
    if kind not in supported:
        raise UserError(f"rope scaling {kind!r} is not supported by the GGUF export "
                        f"(supported: {', '.join(supported)})")
    if kind == "default":
        return Rope(theta)
    if kind == "linear":
        return Rope(theta, linear_factor=float(p["factor"]))
    return Rope(theta, freq_factors=llama3_freq_factors(theta, head_dim, p))


def rope_parameters(tc: dict) -> dict:
    """transformers 4.x's ``rope_scaling`` overlaid with 5's ``rope_parameters`` (either may be absent)."""
    return {**(tc.get("rope_scaling") or {}), **(tc.get("rope_parameters") or {})}


def partial_rotary_factor(tc: dict) -> float:
    """The share of each head that is rotated (transformers 5 keeps it in ``rope_parameters``, 4.x beside it)."""
    return float(rope_parameters(tc).get("partial_rotary_factor", tc.get("partial_rotary_factor", 1.0)))


def target_type(shape: tuple[int, ...], outtype: str):
    """The GGML type a tensor is stored as for ``outtype`` (llama.cpp's converter's choices)."""
    import gguf

    Q = gguf.GGMLQuantizationType
    if len(shape) == 1 or outtype == "f32":
        return Q.F32
    if outtype == "q8_0" and shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0] != 0:
        return Q.F16
    return {"f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[outtype]


def check_finite(a: np.ndarray, name: str) -> None:
    """Refuse weights with NaN or infinity: they export fine and then answer with empty or garbage text."""
    if not np.isfinite(a).all():
        bad = int(a.size - np.isfinite(a).sum())
        raise UserError(f"the checkpoint's tensor {name} holds {bad} NaN or infinite value(s): the weights are damaged "
                        "(or a training run diverged); nothing was exported")


def encode(a: np.ndarray, qtype) -> np.ndarray:
    """A float32 array in ``qtype``: f32/f16 as numpy arrays, bf16/q8_0 as gguf's packed bytes."""
    import gguf

    Q = gguf.GGMLQuantizationType
    if qtype == Q.F32:
        return np.ascontiguousarray(a, dtype=np.float32)
    if qtype == Q.F16:
        return a.astype(np.float16)
    rows = a.reshape(-1, a.shape[-1])
    out = np.empty(gguf.quant_shape_to_byte_shape(rows.shape, qtype), dtype=np.uint8)
    step = max(1, _QUANT_CHUNK // rows.shape[1])
    for r in range(0, rows.shape[0], step):  # in row chunks: the quantizer's temporaries stay small
        out[r : r + step] = gguf.quants.quantize(rows[r : r + step], qtype)
    return out.reshape(gguf.quant_shape_to_byte_shape(a.shape, qtype))


@dataclass(frozen=True)
class _Planned:
    name: str  # GGUF name
    shape: tuple[int, ...]
    qtype: object
    load: Callable[[], np.ndarray]  # float32, already in llama.cpp's layout


@dataclass(frozen=True)
class Dims:
    """The sizes every architecture writes, from the text config and the embedding."""

    n_layer: int
    n_head: int
    n_head_kv: int
    n_embd: int
    head_dim: int
    n_ff: int
    n_ctx_train: int
    n_rows: int  # the token embedding's rows (the vocabulary padded)

    @classmethod
    def of(cls, tc: dict, n_rows: int) -> "Dims":
        n_head, n_embd = int(tc["num_attention_heads"]), int(tc["hidden_size"])
        return cls(n_layer=int(tc["num_hidden_layers"]), n_head=n_head,
                   n_head_kv=int(tc.get("num_key_value_heads") or n_head), n_embd=n_embd,
                   head_dim=int(tc.get("head_dim") or n_embd // n_head), n_ff=int(tc["intermediate_size"]),
                   n_ctx_train=int(tc.get("max_position_embeddings", 4096)), n_rows=n_rows)


class TextArch:
    """How one llama.cpp architecture stores a Hugging Face language model: its name, what it refuses, its
    hyper-parameters and the layout of its tensors. Subclasses change only what differs from ``llama``."""

    name: ClassVar[str]  # llama.cpp's architecture name (general.architecture)
    model_types: ClassVar[tuple[str, ...]]  # the text configs' model_type values it reads
    rope_kinds: ClassVar[tuple[str, ...]] = ("default", "linear")
    # llama.cpp sizes attention's output as n_embd x n_embd for most architectures: a head width other than
    # hidden / heads cannot be stored for them
    free_head_dim: ClassVar[bool] = False
    partial_rotary: ClassVar[bool] = False  # whether it rotates only part of each head

    @property
    def gguf_arch(self):
        import gguf

        return next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == self.name)

    def check(self, tc: dict, dims: Dims, where: Path) -> None:
        """Refuse, on one line, what this architecture's llama.cpp graph would compute differently."""
        if tc.get("hidden_act", "silu") != "silu":
            raise UserError(f"unsupported language-model activation {tc['hidden_act']!r} for llama.cpp's "
                            f"{self.name} (silu only)")
        if not self.free_head_dim and dims.head_dim * dims.n_head != dims.n_embd:
            raise UserError(f"{where}: head width {dims.head_dim} x {dims.n_head} heads != hidden size "
                            f"{dims.n_embd}, which llama.cpp's {self.name} cannot store")
        if not self.partial_rotary and partial_rotary_factor(tc) != 1.0:
            raise UserError(f"{where}: a partial rotary width is not supported for llama.cpp's {self.name}")

    def rope(self, tc: dict, dims: Dims) -> Rope:
        return rope_settings(tc, dims.head_dim, self.rope_kinds)

    def rope_dims(self, tc: dict, dims: Dims) -> int:
        return dims.head_dim

    def layout(self, name: str, a: np.ndarray, dims: Dims) -> np.ndarray:
        """A tensor from Hugging Face's layout to llama.cpp's (float32 in, float32 out)."""
        return a

    def plan(self, src: dict[str, StoredTensor], dims: Dims, rope: Rope, outtype: str) -> list[_Planned]:
        import gguf

        name_map = gguf.get_tensor_name_map(self.gguf_arch, dims.n_layer)
        plan: list[_Planned] = []
        for name, st in src.items():
            if name.endswith("rotary_emb.inv_freq"):
                continue
            new = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
            if new is None:
                raise UserError(f"cannot map language-model tensor {name!r} to GGUF ({self.name})")

            def load(st=st, name=name) -> np.ndarray:
                return self.layout(name, read_tensor(st), dims)

            plan.append(_Planned(new, st.shape, target_type(st.shape, outtype), load))
        if rope.freq_factors is not None:
            ff = rope.freq_factors
            plan.append(_Planned(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", ff.shape,
                                 gguf.GGMLQuantizationType.F32, lambda: ff))
        return plan

    def write_hparams(self, w, tc: dict, dims: Dims, rope: Rope) -> None:
        """The ``{arch}.*`` keys, in the order llama's have always been written (its files stay byte-identical)."""
        import gguf

        w.add_context_length(dims.n_ctx_train)
        w.add_embedding_length(dims.n_embd)
        w.add_block_count(dims.n_layer)
        w.add_feed_forward_length(dims.n_ff)
        w.add_head_count(dims.n_head)
        w.add_head_count_kv(dims.n_head_kv)
        if dims.head_dim != dims.n_embd // dims.n_head:
            w.add_key_length(dims.head_dim)
            w.add_value_length(dims.head_dim)
        w.add_rope_dimension_count(self.rope_dims(tc, dims))
        w.add_rope_freq_base(rope.theta)
        if rope.linear_factor is not None:
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(rope.linear_factor)
        w.add_layer_norm_rms_eps(float(tc.get("rms_norm_eps", 1e-6)))
        w.add_vocab_size(dims.n_rows)


ARCHITECTURES: dict[str, TextArch] = {}  # text model_type -> its architecture


def register(cls: type[TextArch]) -> type[TextArch]:
    for mt in cls.model_types:
        ARCHITECTURES[mt] = cls()
    return cls


@register
class LlamaArch(TextArch):
    name = "llama"
    model_types = ("llama", "mistral")
    rope_kinds = ROPE_KINDS
    free_head_dim = True  # llama.cpp's llama reads key_length/value_length

    def layout(self, name: str, a: np.ndarray, dims: Dims) -> np.ndarray:
        # llama.cpp's llama rotates interleaved pairs (GPT-J style), Hugging Face's halves
        heads = dims.n_head if ".self_attn.q_proj." in name else dims.n_head_kv if ".self_attn.k_proj." in name else None
        return permute_rotary(a, heads) if heads else a

    def rope(self, tc: dict, dims: Dims) -> Rope:
        return rope_settings(tc, dims.head_dim)


@register
class Qwen2Arch(TextArch):
    name = "qwen2"
    model_types = ("qwen2",)

    def check(self, tc: dict, dims: Dims, where: Path) -> None:
        super().check(tc, dims, where)
        if tc.get("use_sliding_window") or "sliding_attention" in (tc.get("layer_types") or ()):
            raise UserError(f"{where}: Qwen2 with sliding-window attention is not supported "
                            "(llama.cpp's qwen2 attends to the whole context)")


@register
class Phi3Arch(TextArch):
    name = "phi3"
    model_types = ("phi3",)
    rope_kinds = ("default",)
    partial_rotary = True

    def check(self, tc: dict, dims: Dims, where: Path) -> None:
        super().check(tc, dims, where)
        p = rope_parameters(tc)
        if p.get("long_factor") or p.get("short_factor") or p.get("rope_type", p.get("type")) in ("longrope", "su"):
            raise UserError(f"{where}: Phi-3 LongRoPE scaling (long/short factors, the 128k models) is not "
                            "supported by the GGUF export; the 4k-context models are")
        rot = self.rope_dims(tc, dims)
        if rot % 2 or rot != int(dims.head_dim * partial_rotary_factor(tc)):
            raise UserError(f"{where}: partial rotary factor {partial_rotary_factor(tc)} gives no whole, even rotary "
                            f"width per head of {dims.head_dim}")

    def rope_dims(self, tc: dict, dims: Dims) -> int:
        # llama.cpp's converter's rule; Hugging Face's int(head_dim * factor) is checked equal in `check`
        return int(partial_rotary_factor(tc) * dims.n_embd) // dims.n_head

    def write_hparams(self, w, tc: dict, dims: Dims, rope: Rope) -> None:
        super().write_hparams(w, tc, dims, rope)
        p = rope_parameters(tc)
        w.add_rope_scaling_orig_ctx_len(int(p.get("original_max_position_embeddings",
                                                  tc.get("original_max_position_embeddings", dims.n_ctx_train))))
        # llama.cpp 0.3.36 reads the window and then attends to the whole context (its phi3 SWA is disabled):
        # written as its converter writes it, so a later llama.cpp that honours it needs no new export
        w.add_sliding_window(int(tc.get("sliding_window") or 0))


def text_arch(tc: dict, where: Path | str = "") -> TextArch:
    """The architecture of a text config (LlavaConfig's default text model is Llama)."""
    mt = tc.get("model_type", "llama")
    if mt not in ARCHITECTURES:
        raise UserError(f"{where}: language model {mt!r} has no GGUF export "
                        f"(supported: {', '.join(sorted(ARCHITECTURES))})")
    return ARCHITECTURES[mt]


def check_exportable(ckpt: Checkpoint, outtype: str = "f32"):
    """Everything :func:`export_llm_gguf` refuses up front, from headers and tokenizer files only
    (no tensor is read): returns (tensors by Llama name, vocabulary, rope settings, architecture, dims)."""
    if outtype not in OUTTYPES:
        raise UserError(f"unknown --llm-outtype {outtype!r}; choose one of {', '.join(OUTTYPES)}")
    tc = ckpt.text_config
    arch = text_arch(tc, ckpt.path)
    src = text_tensors(ckpt)
    emb = src.get("model.embed_tokens.weight")
    if emb is None:
        raise UserError(f"{ckpt.path} has no language-model token embedding")
    dims = Dims.of(tc, emb.shape[0])
    arch.check(tc, dims, ckpt.path)
    rope = arch.rope(tc, dims)
    return src, read_vocab(ckpt.path, emb.shape[0], arch.name), rope, arch, dims


def export_llm_gguf(
    ckpt: Checkpoint,
    out_file: str | Path,
    outtype: str = "f32",
    add_bos: bool | None = None,
    chat_template: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Write the GGUF; returns the dims the manifest records.

    ``add_bos`` and ``chat_template`` default to what the checkpoint's tokenizer files say.
    """
    import gguf

    src, vocab, rope, arch, dims = check_exportable(ckpt, outtype)
    tc = ckpt.text_config
    plan = arch.plan(src, dims, rope, outtype)

    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]
    out_file = Path(out_file)
    with atomic.atomic_path(out_file) as tmp:
        w = gguf.GGUFWriter(tmp, arch.name)
        w.add_name(ckpt.path.name)
        arch.write_hparams(w, tc, dims, rope)
        w.add_file_type(ftype)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        vocab.write(w, add_bos=add_bos, chat_template=chat_template)
        for t in plan:
            if t.qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                dt = np.dtype(np.float32 if t.qtype == gguf.GGMLQuantizationType.F32 else np.float16)
                w.add_tensor_info(t.name, t.shape, dt, math.prod(t.shape) * dt.itemsize)
            else:
                byte_shape = gguf.quant_shape_to_byte_shape(t.shape, t.qtype)
                w.add_tensor_info(t.name, byte_shape, np.dtype(np.uint8), math.prod(byte_shape), raw_dtype=t.qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        try:
            for i, t in enumerate(plan):
                a = t.load()  # one tensor in memory at a time
                check_finite(a, t.name)
                w.write_tensor_data(encode(a, t.qtype))
                if progress:
                    progress(i + 1, len(plan))
        finally:
            w.close()
    ids = vocab.special_ids
    return dict(
        arch=arch.name, n_embd=dims.n_embd, n_layer=dims.n_layer, n_head=dims.n_head, n_head_kv=dims.n_head_kv,
        n_vocab=dims.n_rows, n_ctx_train=dims.n_ctx_train, bos_id=ids.get("bos"), eos_id=ids.get("eos"),
    )
