"""The language model of a LLaVA checkpoint -> GGUF for llama.cpp, one tensor at a time.

Written with the ``gguf`` package: Llama tensor names from its tensor-name map,
Q/K rows permuted to llama.cpp's rotary layout, the SentencePiece vocabulary
with its scores and token types plus the checkpoint's added tokens (``<image>``,
``<pad>``) and ``[PAD*]`` fillers up to the embedding's row count. Tensors are
read from the safetensors files and written one by one (tensor infos first,
then data), so memory stays of the order of the largest tensor, not the model:
``GGUFWriter.add_tensor`` would keep every array until the end.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llava_edge import atomic
from llava_edge.checkpoint import Checkpoint
from llava_edge.errors import UserError

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
_TEXT_PREFIXES = {  # saved llava-hf layout and transformers 5's in-memory layout
    "language_model.model.": "model.",
    "model.language_model.": "model.",
    "language_model.lm_head.": "lm_head.",
    "lm_head.": "lm_head.",
}


@dataclass(frozen=True)
class SourceTensor:
    file: Path
    key: str
    shape: tuple[int, ...]


def text_tensors(ckpt: Checkpoint) -> dict[str, SourceTensor]:
    """Language-model tensors by their plain Llama name (``model.layers.0...``), from headers only."""
    from llava_edge.checkpoint import read_safetensors_header_bytes

    out: dict[str, SourceTensor] = {}
    for f in ckpt.weight_files():
        for key, info in json.loads(read_safetensors_header_bytes(f)).items():
            if key == "__metadata__":
                continue
            for prefix, canon in _TEXT_PREFIXES.items():
                if key.startswith(prefix):
                    out[canon + key[len(prefix) :]] = SourceTensor(f, key, tuple(info["shape"]))
                    break
    if not any(k.startswith("model.layers.") for k in out):
        raise UserError(f"no language-model weights found in {ckpt.path}")
    return out


def permute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """Hugging Face's Q/K rows (rotate-half pairs) -> llama.cpp's interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_theta(tc: dict) -> float:
    if "rope_theta" in tc:
        return float(tc["rope_theta"])
    return float((tc.get("rope_parameters") or {}).get("rope_theta", 10000.0))


def _vocab(ckpt: Checkpoint, n_rows: int):
    """Tokens, scores and types: SentencePiece pieces, then added tokens, then fillers."""
    import gguf
    import sentencepiece as spm

    sp_file = ckpt.path / "tokenizer.model"
    if not sp_file.is_file():
        raise UserError(f"{ckpt.path} has no tokenizer.model (only SentencePiece vocabularies are exported so far)")
    sp = spm.SentencePieceProcessor(model_file=str(sp_file))
    T = gguf.TokenType
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i).encode("utf-8"))
        scores.append(sp.get_score(i))
        types.append(
            T.UNKNOWN if sp.is_unknown(i) else T.CONTROL if sp.is_control(i) else T.UNUSED if sp.is_unused(i)
            else T.BYTE if sp.is_byte(i) else T.NORMAL
        )
    added = {}
    tj = ckpt.path / "tokenizer.json"
    if tj.is_file():
        for t in json.loads(tj.read_text()).get("added_tokens", []):
            added[int(t["id"])] = (t["content"], bool(t.get("special", False)))
    n_vocab = max([len(tokens) - 1, *added]) + 1
    if n_vocab > n_rows:
        raise UserError(f"the tokenizer has {n_vocab} tokens but the embedding matrix only {n_rows} rows")
    for i in range(n_rows):
        if i in added:
            text, special = added[i]
            if i < len(tokens):
                tokens[i] = text.encode("utf-8")
                types[i] = T.CONTROL if special else T.USER_DEFINED
                continue
            tokens.append(text.encode("utf-8"))
            scores.append(-1000.0)
            types.append(T.CONTROL if special else T.USER_DEFINED)
        elif i >= len(tokens):
            tokens.append(f"[PAD{i}]".encode())
            scores.append(-1000.0)
            types.append(T.UNUSED)
    add_space_prefix = True
    try:  # the SentencePiece model's own normalizer settings, as llama.cpp's converter reads them
        from sentencepiece import sentencepiece_model_pb2 as pb

        proto = pb.ModelProto()
        proto.ParseFromString(sp_file.read_bytes())
        add_space_prefix = proto.normalizer_spec.add_dummy_prefix
    except Exception:  # noqa: BLE001 - older protobuf builds; Llama's default stands
        pass
    ids = dict(bos=sp.bos_id(), eos=sp.eos_id(), unk=sp.unk_id())
    return tokens, scores, types, ids, add_space_prefix


def _target_type(name: str, shape: tuple[int, ...], outtype: str):
    import gguf

    Q = gguf.GGMLQuantizationType
    if len(shape) == 1 or outtype == "f32":
        return Q.F32
    if outtype == "q8_0" and shape[-1] % 32 != 0:
        return Q.F16
    return {"f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[outtype]


def _encode(a: np.ndarray, qtype) -> np.ndarray:
    import gguf

    Q = gguf.GGMLQuantizationType
    if qtype == Q.F32:
        return a.astype(np.float32)
    if qtype == Q.F16:
        return a.astype(np.float16)
    return gguf.quants.quantize(a.astype(np.float32), qtype)


def export_llm_gguf(
    ckpt: Checkpoint,
    out_file: str | Path,
    outtype: str = "f32",
    add_bos: bool = True,
    chat_template: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Write the GGUF; returns the dims the manifest records."""
    import gguf
    import torch
    from safetensors import safe_open

    if outtype not in OUTTYPES:
        raise UserError(f"unknown --llm-outtype {outtype!r}; choose one of {', '.join(OUTTYPES)}")
    tc = ckpt.text_config
    n_layer, n_head = int(tc["num_hidden_layers"]), int(tc["num_attention_heads"])
    n_head_kv = int(tc.get("num_key_value_heads") or n_head)
    n_embd = int(tc["hidden_size"])
    head_dim = int(tc.get("head_dim") or n_embd // n_head)
    src = text_tensors(ckpt)
    emb = src.get("model.embed_tokens.weight")
    if emb is None:
        raise UserError(f"{ckpt.path} has no language-model token embedding")
    n_rows = emb.shape[0]
    tokens, scores, types, ids, add_space_prefix = _vocab(ckpt, n_rows)

    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layer)
    plan = []  # (gguf name, source, target type)
    for name, st in src.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        new = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise UserError(f"cannot map language-model tensor {name!r} to GGUF")
        plan.append((new, name, st, _target_type(new, st.shape, outtype)))

    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]
    out_file = Path(out_file)
    with atomic.atomic_path(out_file) as tmp:
        w = gguf.GGUFWriter(tmp, "llama")
        w.add_name(ckpt.path.name)
        w.add_context_length(int(tc.get("max_position_embeddings", 4096)))
        w.add_embedding_length(n_embd)
        w.add_block_count(n_layer)
        w.add_feed_forward_length(int(tc["intermediate_size"]))
        w.add_rope_dimension_count(head_dim)
        w.add_head_count(n_head)
        w.add_head_count_kv(n_head_kv)
        w.add_layer_norm_rms_eps(float(tc.get("rms_norm_eps", 1e-6)))
        w.add_rope_freq_base(_rope_theta(tc))
        w.add_vocab_size(n_rows)
        w.add_file_type(ftype)
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_bos_token_id(ids["bos"])
        w.add_eos_token_id(ids["eos"])
        w.add_unk_token_id(ids["unk"])
        pad = tc.get("pad_token_id")
        if pad is not None and 0 <= int(pad) < n_rows:
            w.add_pad_token_id(int(pad))
        w.add_add_bos_token(add_bos)
        w.add_add_eos_token(False)
        w.add_add_space_prefix(add_space_prefix)
        if chat_template:
            w.add_chat_template(chat_template)
        if outtype == "q8_0":
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for new, _, st, qt in plan:
            if qt in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                dt = np.float32 if qt == gguf.GGMLQuantizationType.F32 else np.float16
                w.add_tensor_info(new, st.shape, np.dtype(dt), int(np.prod(st.shape)) * np.dtype(dt).itemsize)
            else:
                byte_shape = gguf.quant_shape_to_byte_shape(st.shape, qt)
                w.add_tensor_info(new, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=qt)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        handles: dict[Path, object] = {}
        try:
            for i, (new, name, st, qt) in enumerate(plan):
                if st.file not in handles:
                    handles[st.file] = safe_open(str(st.file), framework="pt")
                a = handles[st.file].get_tensor(st.key).to(torch.float32).numpy()
                if name.endswith("self_attn.q_proj.weight"):
                    a = permute_rotary(a, n_head)
                elif name.endswith("self_attn.k_proj.weight"):
                    a = permute_rotary(a, n_head_kv)
                w.write_tensor_data(_encode(a, qt))
                del a
                if progress:
                    progress(i + 1, len(plan))
        finally:
            handles.clear()
            w.close()
    return dict(
        arch="llama", n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_head_kv=n_head_kv, n_vocab=n_rows,
        n_ctx_train=int(tc.get("max_position_embeddings", 4096)), bos_id=ids["bos"], eos_id=ids["eos"],
    )
