"""The language-model GGUF export for Qwen2 and Phi-3: parity with Hugging Face in llama.cpp.

Tiny LLaVA checkpoints built here (no downloads) whose language models are a random
``Qwen2ForCausalLM`` or ``Phi3ForCausalLM`` inside ``LlavaForConditionalGeneration``, saved
in llava-hf's key layout, so the export reads them the way it reads any LLaVA checkpoint
(``llm_gguf.text_tensors`` on ``language_model.*``). The LLaVA family check
(``llava_edge.families``) accepts only Llama/Mistral language models today, so when
``open_checkpoint`` refuses one of these the test builds the ``Checkpoint`` record itself and
hands it to the same writer.

- ``qwen2``: grouped-query attention, q/k/v biases made random (transformers initializes them
  to zero, which would hide a dropped bias), rope theta 1e6, tied embeddings (no ``lm_head``,
  as Qwen2-0.5B and llava-interleave-qwen-0.5b), a byte-level BPE trained here with Qwen2's
  pipeline (NFC, its split regex, byte-level alphabet), ChatML specials and ``<image>``.
- ``qwen2_untied``: the same with multi-head attention and its own ``lm_head``.
- ``phi3``: fused ``qkv_proj`` and ``gate_up_proj``, GQA, a 2047-token sliding window (as
  Phi-3-mini; the prompts are shorter), SentencePiece with Phi-3's added tokens.
- ``phi3_partial_rotary``: half of each head rotated (``partial_rotary_factor`` 0.5).

Weights are initialized 5x wider than transformers' default (std 0.1): a wrong fused split,
rotary layout or dropped bias moves logits by far more than the 1e-3 allowed.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

from llava_edge.checkpoint import DEFAULT_RECIPE, RECIPE_FILE, Checkpoint, open_checkpoint, write_recipe
from llava_edge.errors import UserError
from llava_edge.export import llm_gguf
from llava_edge.export.llm_gguf import export_llm_gguf

from llama_family import EXTRA_TEXT, _padded, _tiny_vision
from test_llm_gguf import LOGIT_TEXT, PARITY, PLAIN, field, llama_cpp_logits, vocab_only

QWEN2_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
PHI3_ADDED = ["<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"]
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'"
          " + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


# -- checkpoints --------------------------------------------------------------------------

def train_qwen2_tokenizer(vocab_size: int = 1000):
    """A byte-level BPE built with Qwen2's pipeline (transformers' ``Qwen2Tokenizer`` spells the same), trained on
    the toy corpus plus :data:`EXTRA_TEXT`."""
    from tokenizers import AddedToken

    from llava_edge.toy.tokenizer import IMAGE_TOKEN, corpus, qwen2_bpe

    tok = qwen2_bpe(corpus(n_scenes=600) + EXTRA_TEXT * 20, vocab_size)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in [*QWEN2_SPECIALS, IMAGE_TOKEN]])
    return tok


def _save_llava(tmp: Path, text_config, image_token_id: int, seed: int) -> None:
    """A LLaVA checkpoint in llava-hf's key layout, every language-model bias made random."""
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(vision_config=_tiny_vision(), text_config=text_config, image_token_index=image_token_id,
                         image_seq_length=4, vision_feature_layer=-1, vision_feature_select_strategy="default",
                         tie_word_embeddings=text_config.tie_word_embeddings)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "language_model" in name and name.endswith(".bias"):
                p.normal_(0.0, 0.5)
    model.save_pretrained(tmp, safe_serialization=True)


def write_qwen2_like(out: Path, tied: bool = True, seed: int = 0) -> Path:
    from transformers import PreTrainedTokenizerFast, Qwen2Config

    from llava_edge.toy.tokenizer import IMAGE_TOKEN

    out.mkdir(parents=True)
    tok = PreTrainedTokenizerFast(tokenizer_object=train_qwen2_tokenizer(), eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>")
    tok.chat_template = CHATML
    tok.save_pretrained(out)
    ids = {t: tok.convert_tokens_to_ids(t) for t in [*QWEN2_SPECIALS, IMAGE_TOKEN]}
    text = Qwen2Config(
        vocab_size=_padded(len(tok)), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2 if tied else 4, max_position_embeddings=4096,
        rms_norm_eps=1e-6, initializer_range=0.1, tie_word_embeddings=tied, use_sliding_window=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
    )
    _save_llava(out, text, ids[IMAGE_TOKEN], seed)
    write_recipe(out, template="vicuna_v1", image_pad="pad")
    return out


def write_phi3_like(out: Path, partial_rotary: float = 1.0, seed: int = 0) -> Path:
    from transformers import Phi3Config

    from llava_edge.toy.tokenizer import IMAGE_TOKEN, build_hf_tokenizer, train_sentencepiece

    out.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as sp_dir:
        train_sentencepiece(Path(sp_dir) / "tokenizer.model", 800)
        tok = build_hf_tokenizer(sp_dir)
        shutil.copy(Path(sp_dir) / "tokenizer.model", out / "tokenizer.model")
    tok.add_tokens(PHI3_ADDED, special_tokens=True)
    tok.save_pretrained(out)
    text = Phi3Config(
        vocab_size=_padded(len(tok)), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        original_max_position_embeddings=4096, rms_norm_eps=1e-5, initializer_range=0.1, sliding_window=2047,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": partial_rotary},
        bos_token_id=1, eos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"), pad_token_id=tok.pad_token_id,
    )
    _save_llava(out, text, tok.convert_tokens_to_ids(IMAGE_TOKEN), seed)
    write_recipe(out, template="vicuna_v1", image_pad="pad")
    return out


def llava_checkpoint(folder: Path) -> Checkpoint:
    """The checkpoint as export reads it; built directly where the LLaVA family check refuses its language model."""
    try:
        return open_checkpoint(folder)
    except UserError as e:
        if "unsupported language model" not in str(e):
            raise
    config = json.loads((folder / "config.json").read_text())
    recipe = {**DEFAULT_RECIPE, **json.loads((folder / RECIPE_FILE).read_text())} \
        if (folder / RECIPE_FILE).is_file() else dict(DEFAULT_RECIPE)
    return Checkpoint(folder, config, recipe)


WRITERS = {
    "qwen2": lambda out: write_qwen2_like(out, tied=True),
    "qwen2_untied": lambda out: write_qwen2_like(out, tied=False, seed=1),
    "phi3": lambda out: write_phi3_like(out),
    "phi3_partial_rotary": lambda out: write_phi3_like(out, partial_rotary=0.5, seed=2),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            cache[name] = WRITERS[name](tmp_path_factory.mktemp(name) / "model")
        return cache[name]

    return get


@pytest.fixture(scope="module")
def exported(checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf")
    cache: dict[tuple[str, str], Path] = {}

    def get(name: str, outtype: str = "f32") -> Path:
        if (name, outtype) not in cache:
            path = out / f"{name}.{outtype}.gguf"
            export_llm_gguf(llava_checkpoint(checkpoints(name)), path, outtype)
            cache[name, outtype] = path
        return cache[name, outtype]

    return get


@pytest.fixture(scope="module")
def hf_reference(checkpoints):
    """name -> (the checkpoint's own tokenizer's ids of LOGIT_TEXT, transformers' f32 logits for them)."""
    import torch
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    cache = {}

    def get(name: str):
        if name not in cache:
            folder = checkpoints(name)
            ids = AutoTokenizer.from_pretrained(folder).encode(LOGIT_TEXT)
            model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32,
                                                                  attn_implementation="eager").eval()
            with torch.no_grad():
                cache[name] = ids, model(input_ids=torch.tensor([ids])).logits[0].numpy()
        return cache[name]

    return get


def _tensors(path: Path) -> dict[str, list[int]]:
    import gguf

    return {t.name: [int(d) for d in t.shape] for t in gguf.GGUFReader(str(path)).tensors}


# -- parity -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(WRITERS))
def test_logits_equal_hf(name, exported, hf_reference):
    """llama.cpp (f32 GGUF, f32 KV cache, no flash attention) gives transformers' logits at every position."""
    ids, ref = hf_reference(name)
    got = llama_cpp_logits(exported(name), ids)
    assert len(ids) > 80 and got.shape == ref.shape
    assert np.abs(got - ref).max() <= PARITY, np.abs(got - ref).max()


@pytest.mark.parametrize("name,mistake", [
    ("qwen2", "q/k/v biases dropped"),
    ("qwen2", "rotary rows permuted as for llama"),
    ("phi3", "gate and up halves swapped"),
    ("phi3_partial_rotary", "whole head rotated"),
])
def test_parity_check_sees_export_mistakes(name, mistake, checkpoints, hf_reference, tmp_path, monkeypatch):
    """Each mistake an architecture description could make moves logits far past the parity gate."""
    arch = llm_gguf.ARCHITECTURES[name.split("_")[0]]
    cls = type(arch)
    if mistake.startswith("q/k/v biases"):
        real_plan = cls.plan
        monkeypatch.setattr(cls, "plan", lambda self, src, *a: real_plan(
            self, {k: v for k, v in src.items() if not k.endswith("_proj.bias")}, *a))
    elif mistake.startswith("rotary rows"):
        monkeypatch.setattr(cls, "layout", llm_gguf.LlamaArch.layout)
    elif mistake.startswith("gate and up"):
        def swapped(self, name, a, dims):
            return np.concatenate([a[dims.n_ff:], a[:dims.n_ff]]) if "gate_up_proj" in name else a
        monkeypatch.setattr(cls, "layout", swapped)
    else:
        monkeypatch.setattr(cls, "rope_dims", lambda self, tc, dims: dims.head_dim)
        monkeypatch.setattr(cls, "check", llm_gguf.TextArch.check)  # its own check would refuse the mismatch
    export_llm_gguf(llava_checkpoint(checkpoints(name)), tmp_path / "wrong.gguf")
    ids, ref = hf_reference(name)
    assert np.abs(llama_cpp_logits(tmp_path / "wrong.gguf", ids) - ref).max() > 100 * PARITY


def test_outtypes_load_and_stay_close(exported, hf_reference):
    """f16 and q8_0 of both architectures load in llama.cpp and stay near transformers' f32 logits (relative L2
    error, gates as for Llama in test_llm_gguf: about 3x what was measured there)."""
    from test_llm_gguf import rel_err

    for name in ("qwen2", "phi3"):
        ids, ref = hf_reference(name)
        for outtype, gate in (("f16", 5e-3), ("q8_0", 1e-1)):
            err = rel_err(llama_cpp_logits(exported(name, outtype), ids), ref)
            assert err <= gate, (name, outtype, err)


# -- metadata -----------------------------------------------------------------------------

def test_qwen2_metadata(exported, checkpoints):
    import gguf

    r = gguf.GGUFReader(str(exported("qwen2")))
    assert field(r, "general.architecture") == "qwen2"
    assert field(r, "tokenizer.ggml.model") == "gpt2" and field(r, "tokenizer.ggml.pre") == "qwen2"
    assert field(r, "qwen2.attention.head_count_kv") == 2 and field(r, "qwen2.rope.freq_base") == 1e6
    assert field(r, "tokenizer.ggml.add_bos_token") is False  # Qwen2 has no BOS
    names = _tensors(exported("qwen2"))
    assert "output.weight" not in names  # tied: llama.cpp reads token_embd as the output
    assert {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias"} <= set(names)
    assert "output.weight" in _tensors(exported("qwen2_untied"))
    tj = json.loads((checkpoints("qwen2") / "tokenizer.json").read_text())
    assert len(field(r, "tokenizer.ggml.merges")) == len(tj["model"]["merges"])
    tokens, types = field(r, "tokenizer.ggml.tokens"), field(r, "tokenizer.ggml.token_type")
    for t in tj["added_tokens"]:
        assert tokens[t["id"]] == t["content"] and types[t["id"]] == gguf.TokenType.CONTROL
    assert field(r, "tokenizer.chat_template") == CHATML
    llm = vocab_only(exported("qwen2"))
    im_end = next(t["id"] for t in tj["added_tokens"] if t["content"] == "<|im_end|>")
    assert llm.token_eos() == im_end


def test_phi3_metadata(exported, checkpoints):
    import gguf

    r = gguf.GGUFReader(str(exported("phi3")))
    assert field(r, "general.architecture") == "phi3" and field(r, "tokenizer.ggml.model") == "llama"
    assert field(r, "phi3.rope.dimension_count") == 32 and field(r, "phi3.attention.sliding_window") == 2047
    assert field(r, "phi3.rope.scaling.original_context_length") == 4096
    assert field(gguf.GGUFReader(str(exported("phi3_partial_rotary"))), "phi3.rope.dimension_count") == 16
    names = _tensors(exported("phi3"))
    assert names["blk.0.attn_qkv.weight"] == [128, 128 + 2 * 64]  # q, k, v rows fused (GGUF lists ne: cols first)
    assert names["blk.0.ffn_up.weight"] == [128, 2 * 256]  # gate and up fused
    assert not any(n.startswith(("blk.0.attn_q.", "blk.0.ffn_gate.")) for n in names)
    # the vocabulary as llama.cpp's Phi-3 converter writes it: every added token scored -1000, fillers -10000
    tokens, scores = field(r, "tokenizer.ggml.tokens"), field(r, "tokenizer.ggml.scores")
    types = field(r, "tokenizer.ggml.token_type")
    for t in PHI3_ADDED:
        i = tokens.index(t)
        assert scores[i] == -1000.0 and types[i] == gguf.TokenType.CONTROL
    assert tokens[-1].startswith("[PAD") and scores[-1] == -10000.0 and types[-1] == gguf.TokenType.UNUSED


# -- tokenization on the written GGUF -----------------------------------------------------

def test_qwen2_gguf_tokenizes_like_hf(exported, checkpoints):
    """llama.cpp's own tokenizer on the written GGUF equals the checkpoint's tokenizer (HF ``tokenizers``): with
    specials parsed (as HF always does) and without (as HF's ``split_special_tokens``), on plain text and ChatML;
    llava-edge's runtime tokenizer gives the first for template text and the second for user text."""
    import unicodedata

    from transformers import AutoTokenizer

    from llava_edge.templates import Text
    from llava_edge.tokenizer import Tokenizer

    hf = AutoTokenizer.from_pretrained(checkpoints("qwen2"))
    ours = Tokenizer(checkpoints("qwen2"))
    llm = vocab_only(exported("qwen2"))
    # Qwen2 normalizes to NFC and llama.cpp does not: text already in NFC (all but one of PLAIN) is compared
    plain = [s for s in PLAIN if unicodedata.normalize("NFC", s) == s]
    assert len(plain) == len(PLAIN) - 1
    chat = "<|im_start|>user\n<image>\nWhat is it?<|im_end|>\n<|im_start|>assistant\n"
    for s in [*plain, chat, "<|endoftext|><|im_end|>x"]:
        parsed = hf.encode(s, add_special_tokens=False)
        as_text = hf(s, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        assert llm.tokenize(s.encode(), add_bos=False, special=True) == parsed, repr(s)
        assert llm.tokenize(s.encode(), add_bos=False, special=False) == as_text, repr(s)
        assert ours.encode((Text(s, True),), add_special_tokens=False) == parsed, repr(s)
        assert ours.encode(s, add_special_tokens=False) == as_text, repr(s)
    specials = {ours.token_id(t) for t in QWEN2_SPECIALS}
    assert specials <= set(ours.encode((Text(chat + "<|endoftext|>", True),)))
    assert not specials & set(ours.encode(chat + "<|endoftext|>"))  # typed by a user: text


def test_phi3_gguf_tokenizes_like_sentencepiece(exported, checkpoints):
    """llama.cpp's own tokenizer on the written GGUF equals SentencePiece on the checkpoint's tokenizer.model."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(checkpoints("phi3") / "tokenizer.model"))
    llm = vocab_only(exported("phi3"))
    for s in PLAIN:
        assert llm.tokenize(s.encode(), add_bos=False, special=False) == sp.encode(s), repr(s)


# -- refusals -----------------------------------------------------------------------------

def _copy(folder: Path, dest: Path) -> Path:
    dest.mkdir()
    for p in folder.iterdir():
        (dest / p.name).symlink_to(p) if p.suffix == ".safetensors" else shutil.copy(p, dest / p.name)
    return dest


def _edit_text_config(folder: Path, **update) -> None:
    f = folder / "config.json"
    d = json.loads(f.read_text())
    for k, v in update.items():
        if isinstance(v, dict):
            d["text_config"].setdefault(k, {}).update(v)
        else:
            d["text_config"][k] = v
    f.write_text(json.dumps(d))


@pytest.mark.parametrize("name,update,message", [
    ("phi3", {"rope_parameters": {"rope_type": "longrope", "long_factor": [1.0] * 16, "short_factor": [1.0] * 16,
                                  "original_max_position_embeddings": 4096}}, "Phi-3 LongRoPE scaling"),
    ("qwen2", {"use_sliding_window": True}, "Qwen2 with sliding-window attention is not supported"),
    ("qwen2", {"rope_parameters": {"rope_type": "llama3"}}, "rope scaling 'llama3' is not supported"),
    ("qwen2", {"head_dim": 48}, "head width 48 x 4 heads != hidden size 128"),
    ("qwen2", {"model_type": "gemma"}, "language model 'gemma' has no GGUF export"),
])
def test_unsupported_is_a_one_line_user_error(name, update, message, checkpoints, tmp_path):
    folder = _copy(checkpoints(name), tmp_path / "model")
    _edit_text_config(folder, **update)
    ckpt = Checkpoint(folder, json.loads((folder / "config.json").read_text()), dict(DEFAULT_RECIPE))
    with pytest.raises(UserError) as e:
        export_llm_gguf(ckpt, tmp_path / "out.gguf")
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not list(tmp_path.glob("*.gguf"))


@pytest.mark.parametrize("name", ["qwen2", "phi3"])
def test_llama_cpp_quantizes_both_architectures(name, exported, hf_reference, tmp_path):
    """quantize's q4_0 and q4_k_m (llama.cpp's own quantizer) of each architecture's f32 GGUF: the file holds the
    asked type, keeps its architecture and vocabulary, loads in llama.cpp and its logits still correlate with
    transformers' (per-position cosine: a broken file would not correlate; these random-weight toys lose more to
    4 bits than test_quantize's trained Llama toy, whose gate is min 0.9: measured here mean 0.92, min 0.76)."""
    import gguf

    from llava_edge.quantize.llm import quantize_gguf
    from test_quantize import per_token_cosine

    src = exported(name)
    ids, ref = hf_reference(name)
    before = gguf.GGUFReader(str(src))
    for type_name, ggml_type in (("q4_0", "Q4_0"), ("q4_k_m", "Q4_0")):  # K-quant blocks fall back on toy rows
        out = tmp_path / f"{name}.{type_name}.gguf"
        record = quantize_gguf(src, out, type_name, threads=1)
        after = gguf.GGUFReader(str(out))
        assert field(after, "general.architecture") == field(before, "general.architecture") == name
        assert field(after, "tokenizer.ggml.tokens") == field(before, "tokenizer.ggml.tokens")
        assert record["tensor_types"].get(ggml_type, 0) + record["tensor_types"].get("Q5_0", 0) > 0, record
        got = llama_cpp_logits(out, ids)
        cos = per_token_cosine(got, ref)
        assert np.isfinite(got).all() and cos.mean() > 0.85 and cos.min() > 0.5, (type_name, cos.mean(), cos.min())
