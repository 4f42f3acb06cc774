"""The language-model GGUF export for the Llama family: parity with Hugging Face in llama.cpp.

Three checkpoints: the toy (Llama 2 / Vicuna shaped, SentencePiece), a Llama 3 shaped
one (GQA, rope theta 5e5 with ``llama3`` scaling, tied embeddings, byte-level BPE) and
a Mistral shaped one (GQA, head width 48 != 128 / 4, SentencePiece); see
``tests/llama_family.py``.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from llava_edge.checkpoint import load_hf_model, open_checkpoint
from llava_edge.errors import UserError
from llava_edge.export import llm_gguf
from llava_edge.export.llm_gguf import export_llm_gguf

from llama_family import EXTRA_TEXT, LLAMA3_SPECIALS, USER_WORD, write_llama3_like, write_mistral_like
from test_export_runtime import BATTERY

PARITY = 1e-3  # max abs logit difference, f32 GGUF with an f32 KV cache and no flash attention

# Plain text for llama.cpp's tokenizers, beyond the shared battery: contractions in both
# cases, digit runs (Llama 3 splits them in threes), whitespace runs before text and at
# the end, carriage returns, scripts and emoji sequences, control bytes.
PLAIN = BATTERY + EXTRA_TEXT + [
    "don't", "DON'T", "we'll I'm you've she'd it's", "'s 's 'S", "ABC'S", "x'y", "hello world", "  ", "\n",
    " \n ", "a\n\n\nb", "\t\t", "1", "12", "123", "1234", "12345678901", "3.141592653", "¿Qué tal?",
    "İstanbul ǅ ß ẞ", "e\u0301", "ﬁ", "👨‍👩‍👧‍👦", "🇫🇷", "\u200b", "a\u00a0b", "\u3000x", "Ｆｕｌｌｗｉｄｔｈ",
    "!!!???...", "$$ %% ^^", "x = [1, 2, 3];", "http://example.com/a?b=c&d=e", "tab\tend", "\r", "\r\n\r\n",
    "   \n   x", "x   ", "ÿþ", "\x00\x01", "z" * 50, f"{USER_WORD}s and {USER_WORD}!", f" {USER_WORD}",
]
# Text with the Llama 3 checkpoint's special and added tokens in it.
WITH_SPECIALS = [
    f"{LLAMA3_SPECIALS[0]}hi", "hi<|eot_id|>", "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>",
    "<image>\nWhat?", "<pad><pad>", "<|eot", "USER: <image>\nWhat color? ASSISTANT:",
]
LOGIT_TEXT = (
    "A chat between a curious human and an artificial intelligence assistant. USER: <image>\n"
    "What color is the circle at the top left? Don't guess: 3.14159 or 1234! ASSISTANT: It is a red circle.\n"
) * 2


# -- checkpoints and their exports ------------------------------------------------------

@pytest.fixture(scope="module")
def llama3_like(tmp_path_factory):
    return write_llama3_like(tmp_path_factory.mktemp("llama3") / "model", seed=0)


@pytest.fixture(scope="module")
def mistral_like(tmp_path_factory):
    return write_mistral_like(tmp_path_factory.mktemp("mistral") / "model", seed=0)


@pytest.fixture(scope="module")
def checkpoints(toy_model, llama3_like, mistral_like, tmp_path_factory):
    linear = _copy(mistral_like, tmp_path_factory.mktemp("linear") / "model")  # same weights, positions / 4
    _edit_json(linear / "config.json", lambda d: d["text_config"].update(
        rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 1000000.0}))
    return {"toy": toy_model, "llama3": llama3_like, "mistral": mistral_like, "mistral_linear_rope": linear}


@pytest.fixture(scope="module")
def exported(checkpoints, tmp_path_factory):
    """(checkpoint, outtype) -> GGUF path, exported on first use."""
    out = tmp_path_factory.mktemp("gguf")
    cache: dict[tuple[str, str], Path] = {}

    def get(name: str, outtype: str = "f32") -> Path:
        if (name, outtype) not in cache:
            path = out / f"{name}.{outtype}.gguf"
            export_llm_gguf(open_checkpoint(checkpoints[name]), path, outtype)
            cache[name, outtype] = path
        return cache[name, outtype]

    return get


@pytest.fixture(scope="module")
def hf_reference(checkpoints):
    """name -> (token ids of LOGIT_TEXT, Hugging Face f32 logits for them)."""
    import torch
    from transformers import AutoTokenizer

    cache = {}

    def get(name: str):
        if name not in cache:
            ids = AutoTokenizer.from_pretrained(checkpoints[name]).encode(LOGIT_TEXT)
            model = load_hf_model(open_checkpoint(checkpoints[name]))
            with torch.no_grad():
                cache[name] = ids, model(input_ids=torch.tensor([ids])).logits[0].numpy()
        return cache[name]

    return get


def llama_cpp_logits(gguf_path: Path, ids: list[int]) -> np.ndarray:
    """Teacher-forced logits at every position, llama.cpp in exact mode."""
    from llava_edge.runtimes.llm import LlamaOptions, LlamaText

    llm = LlamaText(gguf_path, LlamaOptions(n_ctx=512, kv_cache="f32"))
    try:
        return llm.feed_tokens(ids, logits="all")
    finally:
        llm.close()


def vocab_only(gguf_path: Path):
    import llama_cpp

    return llama_cpp.Llama(str(gguf_path), vocab_only=True, verbose=False)


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


def field(reader, key: str):
    return reader.fields[key].contents()


# -- parity -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["toy", "llama3", "mistral", "mistral_linear_rope"])
def test_logits_equal_hf(name, exported, hf_reference):
    ids, ref = hf_reference(name)
    got = llama_cpp_logits(exported(name), ids)
    assert len(ids) > 100 and got.shape == ref.shape
    assert np.abs(got - ref).max() <= PARITY
    if name == "mistral_linear_rope":  # the scaling is not a no-op on these positions
        assert np.abs(ref - hf_reference("mistral")[1]).max() > 100 * PARITY


@pytest.mark.parametrize("mistake", ["rotary rows not permuted", "llama3 rope scaling dropped"])
def test_parity_check_sees_export_mistakes(mistake, checkpoints, hf_reference, tmp_path, monkeypatch):
    """The parity gate is meaningful on the Llama 3 checkpoint: each mistake moves logits far past it."""
    if mistake.startswith("rotary"):
        monkeypatch.setattr(llm_gguf, "permute_rotary", lambda w, n_head: w)
    else:
        real = llm_gguf.rope_settings
        monkeypatch.setattr(llm_gguf, "rope_settings", lambda tc, hd: llm_gguf.Rope(real(tc, hd).theta))
    export_llm_gguf(open_checkpoint(checkpoints["llama3"]), tmp_path / "wrong.gguf")
    ids, ref = hf_reference("llama3")
    assert np.abs(llama_cpp_logits(tmp_path / "wrong.gguf", ids) - ref).max() > 100 * PARITY


def test_outtypes_load_and_stay_close(exported, hf_reference):
    """f16, bf16 and q8_0 load in llama.cpp and stay close to Hugging Face's f32 logits.

    Gates on the relative L2 error of all logits, about 3x what was measured (1.4e-3,
    1.1e-2, 3.4e-2). Per weight, rounding to f16 errs by up to 2^-11 relative, bf16 by
    2^-8, q8_0 by half a step of absmax/127 per 32-value block (~0.5% of a typical weight);
    llama.cpp's CPU matmuls also round activations to the weight's type, and these random,
    wide-initialized networks amplify per-weight error about tenfold. A layout or type
    mistake gives an error of order 1. f16 keeps 3 more mantissa bits than bf16, so it must
    also be clearly closer.
    """
    gates = {"f16": 5e-3, "bf16": 4e-2, "q8_0": 1e-1}
    ids, ref = hf_reference("llama3")
    errs = {t: rel_err(llama_cpp_logits(exported("llama3", t), ids), ref) for t in gates}
    for t, gate in gates.items():
        assert errs[t] <= gate, (t, errs)
    assert errs["f16"] < errs["bf16"] / 2, errs


@pytest.mark.parametrize("outtype", ["f16", "bf16", "q8_0"])
def test_tensor_types_follow_llama_cpp_converter(outtype, exported):
    """1-D tensors stay f32; q8_0 falls back to f16 where rows are not whole 32-value blocks (the toy's 344)."""
    import gguf

    r = gguf.GGUFReader(str(exported("toy", outtype)))
    types = {t.name: t.tensor_type.name for t in r.tensors}
    shapes = {t.name: [int(d) for d in t.shape] for t in r.tensors}
    main = outtype.upper()
    assert all(types[n] == "F32" for n in types if len(shapes[n]) == 1)
    assert types["blk.0.attn_q.weight"] == types["token_embd.weight"] == types["output.weight"] == main
    assert shapes["blk.0.ffn_down.weight"][0] == 344
    assert types["blk.0.ffn_down.weight"] == ("F16" if outtype == "q8_0" else main)


# -- vocabulary and metadata --------------------------------------------------------------

def test_bpe_tokenizes_like_hf(exported, checkpoints):
    """llama.cpp's own tokenizer on the GGUF equals the checkpoint's Hugging Face tokenizer, BOS and specials included."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(checkpoints["llama3"])
    llm = vocab_only(exported("llama3"))
    for s in PLAIN + WITH_SPECIALS:
        assert llm.tokenize(s.encode(), add_bos=True, special=True) == hf.encode(s), repr(s)
    # without parsing specials (Hugging Face always does), where no special token is in the text
    specials = [t.content for t in hf.added_tokens_decoder.values() if t.special]
    plain = [s for s in PLAIN if not any(t in s for t in specials)]
    assert len(plain) > 50
    for s in plain:
        assert llm.tokenize(s.encode(), add_bos=False, special=False) == hf.encode(s, add_special_tokens=False), repr(s)


@pytest.mark.parametrize("name", ["toy", "mistral"])
def test_sentencepiece_vocab_tokenizes_like_sentencepiece(name, exported, checkpoints):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(checkpoints[name] / "tokenizer.model"))
    llm = vocab_only(exported(name))
    for s in PLAIN:
        assert llm.tokenize(s.encode(), add_bos=False, special=False) == sp.encode(s), repr(s)


def test_bpe_vocabulary_metadata(exported, checkpoints):
    import gguf

    folder = checkpoints["llama3"]
    tj = json.loads((folder / "tokenizer.json").read_text())
    tcfg = json.loads((folder / "tokenizer_config.json").read_text())
    config = json.loads((folder / "config.json").read_text())["text_config"]
    r = gguf.GGUFReader(str(exported("llama3")))
    assert field(r, "tokenizer.ggml.model") == "gpt2" and field(r, "tokenizer.ggml.pre") == "llama-bpe"
    tokens, types = field(r, "tokenizer.ggml.tokens"), field(r, "tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == config["vocab_size"]
    T = gguf.TokenType
    for tok, i in tj["model"]["vocab"].items():
        assert tokens[i] == tok and types[i] == T.NORMAL
    added = {t["id"]: t for t in tj["added_tokens"]}
    for i, t in added.items():
        assert tokens[i] == t["content"] and types[i] == (T.CONTROL if t["special"] else T.USER_DEFINED)
    assert types[next(i for i, t in added.items() if t["content"] == USER_WORD)] == T.USER_DEFINED
    last = len(tokens) - 1
    assert last > max(added) and tokens[last] == f"[PAD{last}]" and types[last] == T.UNUSED
    assert len(field(r, "tokenizer.ggml.merges")) == len(tj["model"]["merges"])
    assert field(r, "tokenizer.chat_template") == tcfg["chat_template"]
    assert field(r, "tokenizer.ggml.add_bos_token") is True and field(r, "tokenizer.ggml.add_eos_token") is False
    assert field(r, "tokenizer.ggml.padding_token_id") == config["pad_token_id"]
    # llama.cpp reads the same ids and template
    llm = vocab_only(exported("llama3"))
    assert (llm.token_bos(), llm.token_eos()) == (config["bos_token_id"], config["eos_token_id"])
    assert llm.metadata["tokenizer.chat_template"] == tcfg["chat_template"]


def test_model_metadata(exported, checkpoints):
    import gguf

    l3 = gguf.GGUFReader(str(exported("llama3")))
    assert field(l3, "llama.attention.head_count") == 4 and field(l3, "llama.attention.head_count_kv") == 2
    assert field(l3, "llama.rope.freq_base") == 500000.0
    names = {t.name for t in l3.tensors}
    assert "rope_freqs.weight" in names and "output.weight" not in names  # llama3 scaling; tied embeddings
    mi = gguf.GGUFReader(str(exported("mistral")))
    assert field(mi, "general.architecture") == "llama" and field(mi, "tokenizer.ggml.model") == "llama"
    assert field(mi, "llama.attention.key_length") == field(mi, "llama.rope.dimension_count") == 48
    assert field(mi, "llama.rope.freq_base") == 1e6
    assert field(mi, "tokenizer.chat_template") == (checkpoints["mistral"] / "chat_template.jinja").read_text()
    toy = gguf.GGUFReader(str(exported("toy")))
    assert field(toy, "tokenizer.ggml.pre") == "default" and "tokenizer.chat_template" not in toy.fields
    assert field(toy, "tokenizer.ggml.add_space_prefix") is True and field(toy, "tokenizer.ggml.add_bos_token") is True
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(checkpoints["toy"] / "tokenizer.model"))
    pad = json.loads((checkpoints["toy"] / "config.json").read_text())["text_config"]["pad_token_id"]
    ids = {k: field(toy, f"tokenizer.ggml.{k}_token_id") for k in ("unknown", "bos", "eos", "padding")}
    assert ids == {"unknown": sp.unk_id(), "bos": sp.bos_id(), "eos": sp.eos_id(), "padding": pad}
    lin = gguf.GGUFReader(str(exported("mistral_linear_rope")))
    assert field(lin, "llama.rope.scaling.type") == "linear" and field(lin, "llama.rope.scaling.factor") == 4.0


# -- bad input --------------------------------------------------------------------------

def _copy(folder: Path, dest: Path) -> Path:
    """A copy of a checkpoint whose json files can be edited (weights linked, not copied)."""
    dest.mkdir()
    for p in folder.iterdir():
        (dest / p.name).symlink_to(p) if p.suffix == ".safetensors" else shutil.copy(p, dest / p.name)
    return dest


def _edit_json(path: Path, edit) -> None:
    d = json.loads(path.read_text())
    edit(d)
    path.write_text(json.dumps(d))


def _add_token_past_embedding(d: dict) -> None:
    d["added_tokens"].append({"id": 4096, "content": "<extra>", "special": True, "single_word": False,
                              "lstrip": False, "rstrip": False, "normalized": False})


@pytest.mark.parametrize("name,edit,file,message", [
    ("toy", _add_token_past_embedding, "tokenizer.json", "4097 tokens but the embedding matrix only 1024 rows"),
    ("llama3", _add_token_past_embedding, "tokenizer.json", "4097 tokens but the embedding matrix only 896 rows"),
    ("llama3", lambda d: d.update(pre_tokenizer={"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}),
     "tokenizer.json", "unsupported BPE pre-tokenizer"),
    ("llama3", lambda d: d["text_config"]["rope_parameters"].update(rope_type="yarn"), "config.json",
     "rope scaling 'yarn' is not supported"),
])
def test_bad_input_is_a_one_line_user_error(name, edit, file, message, checkpoints, tmp_path):
    folder = _copy(checkpoints[name], tmp_path / "model")
    _edit_json(folder / file, edit)
    with pytest.raises(UserError) as e:
        export_llm_gguf(open_checkpoint(folder), tmp_path / "out.gguf")
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*partial"))


def test_tiktoken_tokenizer_model_falls_back_to_tokenizer_json(checkpoints, tmp_path):
    """Meta's Llama 3 tokenizer.model is a tiktoken file, not SentencePiece: tokenizer.json is used instead."""
    import gguf

    folder = _copy(checkpoints["llama3"], tmp_path / "model")
    (folder / "tokenizer.model").write_text("IQ== 0\nIg== 1\n")  # tiktoken's format: base64 token, rank
    export_llm_gguf(open_checkpoint(folder), tmp_path / "out.gguf")
    assert field(gguf.GGUFReader(str(tmp_path / "out.gguf")), "tokenizer.ggml.model") == "gpt2"


def test_unknown_outtype_is_a_user_error(checkpoints, tmp_path):
    with pytest.raises(UserError, match="--llm-outtype"):
        export_llm_gguf(open_checkpoint(checkpoints["toy"]), tmp_path / "x.gguf", "q4_k")


# -- memory -----------------------------------------------------------------------------

BIG = dict(hidden=1024, layers=12, heads=16, kv_heads=4, ffn=4096, rows=8192)


def _write_bf16_shard(path: Path, tensors: dict[str, tuple[int, ...]], rng) -> None:
    """A safetensors file of random bf16 tensors, written tensor by tensor (numpy has no bfloat16)."""
    header, offset = {}, 0
    for key, shape in tensors.items():
        n = math.prod(shape) * 2
        header[key] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for shape in tensors.values():
            a = rng.standard_normal(math.prod(shape), dtype=np.float32) * 0.02
            (a.view(np.uint32) >> 16).astype("<u2").tofile(f)


def write_big_checkpoint(folder: Path, toy_model: Path) -> int:
    """A LLaVA checkpoint with a 199M-parameter Llama (398 MB of bf16 in two shards); returns its weight bytes."""
    folder.mkdir()
    h, ffn, kv = BIG["hidden"], BIG["ffn"], BIG["hidden"] // BIG["heads"] * BIG["kv_heads"]
    config = json.loads((toy_model / "config.json").read_text())
    config["text_config"].update(hidden_size=h, intermediate_size=ffn, num_hidden_layers=BIG["layers"],
                                 num_attention_heads=BIG["heads"], num_key_value_heads=BIG["kv_heads"],
                                 head_dim=h // BIG["heads"], vocab_size=BIG["rows"])
    (folder / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(toy_model / name, folder / name)
    shards: list[dict[str, tuple[int, ...]]] = [{}, {}]
    p = "language_model.model."
    shards[0][p + "embed_tokens.weight"] = (BIG["rows"], h)
    for i in range(BIG["layers"]):
        d = shards[i * 2 // BIG["layers"]]
        for k, shape in {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
                         "self_attn.o_proj": (h, h), "mlp.gate_proj": (ffn, h), "mlp.up_proj": (ffn, h),
                         "mlp.down_proj": (h, ffn), "input_layernorm": (h,), "post_attention_layernorm": (h,)}.items():
            d[f"{p}layers.{i}.{k}.weight"] = shape
    shards[1][p + "norm.weight"] = (h,)
    shards[1]["language_model.lm_head.weight"] = (BIG["rows"], h)
    rng = np.random.default_rng(0)
    weight_map = {}
    for j, tensors in enumerate(shards):
        name = f"model-0000{j + 1}-of-00002.safetensors"
        _write_bf16_shard(folder / name, tensors, rng)
        weight_map.update(dict.fromkeys(tensors, name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return sum(math.prod(s) * 2 for d in shards for s in d.values())


MEASURE = textwrap.dedent("""
    import json, sys

    def status_kib(key):
        return int(next(line for line in open("/proc/self/status") if line.startswith(key)).split()[1])

    import gguf, gguf.vocab, numpy, sentencepiece  # what the export imports, in the baseline
    from llava_edge.checkpoint import open_checkpoint
    from llava_edge.export.llm_gguf import export_llm_gguf
    try:  # reset the peak to the current resident size (Linux >= 4.0), so import-time peaks do not hide growth
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = status_kib("VmRSS")
    except OSError:
        base = status_kib("VmHWM")
    export_llm_gguf(open_checkpoint(sys.argv[1]), sys.argv[2], sys.argv[3])
    print(json.dumps({"base_kib": base, "peak_kib": status_kib("VmHWM")}))
""")


def test_export_memory_stays_well_under_model_size(toy_model, tmp_path):
    """Exporting a ~400 MB model raises peak resident memory by well under a quarter of its size.

    The largest tensors are the 8192 x 1024 embedding and output (16 MB of bf16, 32 MB as
    float32); measured growth ~60 MB. Holding the model (``GGUFWriter.add_tensor``) measured
    ~470 MB, reading through ``safetensors.safe_open`` (mapped pages stay resident) ~730 MB.
    Measured in a fresh process, after the export's own imports, from the kernel's peak
    resident size of that process image (VmHWM). Not ``ru_maxrss``: a child started from a
    large process (pytest with torch models loaded) inherits the parent's ``ru_maxrss``.
    """
    import gguf

    if not Path("/proc/self/status").is_file():
        pytest.skip("peak resident memory is read from Linux's /proc")

    model_bytes = write_big_checkpoint(tmp_path / "big", toy_model)
    out = tmp_path / "big.f16.gguf"
    run = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path / "big"), str(out), "f16"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    m = json.loads(run.stdout.strip().splitlines()[-1])
    grown = (m["peak_kib"] - m["base_kib"]) * 1024
    assert grown < model_bytes / 4, f"export grew resident memory by {grown / 1e6:.0f} MB for a {model_bytes / 1e6:.0f} MB model"
    # and what it wrote is the model: every tensor, the bf16 values exactly as the safetensors library reads them
    import torch
    from safetensors import safe_open

    r = gguf.GGUFReader(str(out))
    assert len(r.tensors) == 3 + 9 * BIG["layers"]
    written = {t.name: np.asarray(t.data) for t in r.tensors if t.name in ("output_norm.weight", "token_embd.weight")}
    with safe_open(str(tmp_path / "big" / "model-00002-of-00002.safetensors"), framework="pt") as f:
        assert np.array_equal(written["output_norm.weight"], f.get_tensor("language_model.model.norm.weight").float().numpy())
    with safe_open(str(tmp_path / "big" / "model-00001-of-00002.safetensors"), framework="pt") as f:
        emb = f.get_tensor("language_model.model.embed_tokens.weight").to(torch.float16).numpy()
    assert written["token_embd.weight"].dtype == np.float16 and np.array_equal(written["token_embd.weight"], emb)
