"""The language model of a LLaVA checkpoint -> GGUF for llama.cpp, one tensor at a time.

Covers the Llama family LLaVA is built on (Vicuna / Llama 2, Llama 3, Mistral): all
are llama.cpp's ``llama`` architecture, as in llama.cpp's own converter. Written with
the ``gguf`` package: tensor names from its tensor-name map; Q/K rows (and biases)
permuted from Hugging Face's rotate-half layout to llama.cpp's interleaved pairs, K with
its own head count under grouped-query attention; rope base, linear scaling and Llama
3.1's ``llama3`` scaling (as the ``rope_freqs`` tensor of per-frequency divisors) from
``rope_parameters`` (transformers 5) or ``rope_theta``/``rope_scaling`` (4.x); RMS-norm
epsilon; head width when it is not ``hidden / heads``. The vocabulary is
:mod:`gguf_vocab`'s.

Memory: tensor infos are written first, then each tensor is read from its safetensors
file with plain reads, converted and written before the next is read, so an export
needs memory of the order of the largest tensor, not of the model
(``GGUFWriter.add_tensor`` keeps every array until the end).

Output types (``--llm-outtype``) as llama.cpp's converter chooses them: 1-D tensors
(norms, rope factors) stay f32; q8_0 falls back to f16 for a tensor whose rows are not
a multiple of its 32-value block.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
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


def rope_settings(tc: dict, head_dim: int) -> Rope:
    """Rope base and scaling from a text config of transformers 5 (``rope_parameters``) or 4.x."""
    p = {**(tc.get("rope_scaling") or {}), **(tc.get("rope_parameters") or {})}
    theta = float(p.get("rope_theta", tc.get("rope_theta", 10000.0)))
    kind = p.get("rope_type", p.get("type", "default"))
    if kind == "default":
        return Rope(theta)
    if kind == "linear":
        return Rope(theta, linear_factor=float(p["factor"]))
    if kind == "llama3":
        return Rope(theta, freq_factors=llama3_freq_factors(theta, head_dim, p))
    raise UserError(f"rope scaling {kind!r} is not supported by the GGUF export (supported: default, linear, llama3)")


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


def _plan(src: dict[str, StoredTensor], n_layer: int, n_head: int, n_head_kv: int, rope: Rope, outtype: str):
    import gguf

    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layer)
    plan: list[_Planned] = []
    for name, st in src.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        new = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise UserError(f"cannot map language-model tensor {name!r} to GGUF")
        heads = n_head if ".self_attn.q_proj." in name else n_head_kv if ".self_attn.k_proj." in name else None

        def load(st=st, heads=heads) -> np.ndarray:
            a = read_tensor(st)
            return permute_rotary(a, heads) if heads else a

        plan.append(_Planned(new, st.shape, target_type(st.shape, outtype), load))
    if rope.freq_factors is not None:
        ff = rope.freq_factors
        plan.append(_Planned(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", ff.shape,
                             gguf.GGMLQuantizationType.F32, lambda: ff))
    return plan


def check_exportable(ckpt: Checkpoint, outtype: str = "f32"):
    """Everything :func:`export_llm_gguf` refuses up front, from headers and tokenizer files only
    (no tensor is read): returns (tensors by Llama name, vocabulary, rope settings)."""
    if outtype not in OUTTYPES:
        raise UserError(f"unknown --llm-outtype {outtype!r}; choose one of {', '.join(OUTTYPES)}")
    tc = ckpt.text_config
    if tc.get("hidden_act", "silu") != "silu":
        raise UserError(f"unsupported language-model activation {tc['hidden_act']!r} (the Llama family uses silu)")
    n_head = int(tc["num_attention_heads"])
    rope = rope_settings(tc, int(tc.get("head_dim") or int(tc["hidden_size"]) // n_head))
    src = text_tensors(ckpt)
    emb = src.get("model.embed_tokens.weight")
    if emb is None:
        raise UserError(f"{ckpt.path} has no language-model token embedding")
    return src, read_vocab(ckpt.path, emb.shape[0]), rope


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

    src, vocab, rope = check_exportable(ckpt, outtype)
    tc = ckpt.text_config
    n_layer, n_head = int(tc["num_hidden_layers"]), int(tc["num_attention_heads"])
    n_head_kv = int(tc.get("num_key_value_heads") or n_head)
    n_embd = int(tc["hidden_size"])
    head_dim = int(tc.get("head_dim") or n_embd // n_head)
    n_ctx_train = int(tc.get("max_position_embeddings", 4096))
    n_rows = src["model.embed_tokens.weight"].shape[0]
    plan = _plan(src, n_layer, n_head, n_head_kv, rope, outtype)

    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]
    out_file = Path(out_file)
    with atomic.atomic_path(out_file) as tmp:
        w = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
        w.add_name(ckpt.path.name)
        w.add_context_length(n_ctx_train)
        w.add_embedding_length(n_embd)
        w.add_block_count(n_layer)
        w.add_feed_forward_length(int(tc["intermediate_size"]))
        w.add_head_count(n_head)
        w.add_head_count_kv(n_head_kv)
        if head_dim != n_embd // n_head:
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)
        w.add_rope_dimension_count(head_dim)
        w.add_rope_freq_base(rope.theta)
        if rope.linear_factor is not None:
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(rope.linear_factor)
        w.add_layer_norm_rms_eps(float(tc.get("rms_norm_eps", 1e-6)))
        w.add_vocab_size(n_rows)
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
        arch="llama", n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_head_kv=n_head_kv, n_vocab=n_rows,
        n_ctx_train=n_ctx_train, bos_id=ids.get("bos"), eos_id=ids.get("eos"),
    )
