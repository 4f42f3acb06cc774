"""Real vocabularies on llama.cpp's own tokenizer test vectors: Qwen2, Llama 3 and Phi-3.

``make llava-ref`` extracts llama.cpp's test vocabularies from the llama-cpp-python 0.3.36
sdist into ``.cache/llama-spm/``: ``ggml-vocab-{qwen2,llama-bpe,phi-3}.gguf`` (the real
vocabularies of Qwen2, Llama 3 and Phi-3 as llama.cpp's converter wrote them, no weights)
with ``.inp`` (47 texts) and ``.out`` (their ids, no BOS, as llama.cpp's
``convert_hf_to_gguf_update.py`` recorded them from each model's own Hugging Face tokenizer).
The tests skip when those files are missing.

What is compared against what:

(a) llama.cpp's tokenizer (``vocab_only``) on llama.cpp's GGUF gives the ``.out`` ids: the
    vectors and this llama.cpp agree (sanity).
(b) Each model's tokenizer is rebuilt from llama.cpp's GGUF (no download), then used as a
    checkpoint's tokenizer folder:
    - Qwen2: transformers' own ``Qwen2Tokenizer`` class (its normalizer, split regex and
      byte-level steps) given the GGUF's vocabulary and merges, ``<|endoftext|>``,
      ``<|im_start|>``, ``<|im_end|>`` at their GGUF ids; saved with ``save_pretrained``.
    - Llama 3: a ``tokenizers`` BPE with the GGUF's vocabulary and merges and the pipeline
      Meta's tokenizer.json spells (the split regex of :mod:`gguf_vocab`, byte-level,
      ``ignore_merges``), the 256 specials at their ids, BOS in the post-processor.
    - Phi-3: Phi-3's ``tokenizer.model`` is LLaMA's SentencePiece model; it is rebuilt from
      the GGUF's first 32000 pieces and scores (``<unk>``, ``<s>``, ``</s>`` with
      SentencePiece's own types and score 0: Phi-3's converter retyped them) plus a
      ``tokenizer_config.json`` with Phi-3's added tokens (special where the GGUF types them
      CONTROL) and ``legacy: false`` as Phi-3's config says.
    llava-edge's runtime tokenizer (:class:`llava_edge.tokenizer.Tokenizer`) on each folder
    gives the ``.out`` ids for the ``.inp`` texts; for Qwen2 and Llama 3 so does the rebuilt
    HF tokenizer itself. (transformers 5 re-converting Phi-3's ``tokenizer.model`` into a
    fast tokenizer would not: it merges runs of spaces differently, see docs/NOTES; the
    runtime reads ``tokenizer.model`` with SentencePiece.)
(c) :mod:`gguf_vocab` writes a GGUF vocabulary from each folder; llama.cpp's tokenizer on it
    gives the ``.out`` ids, and on text with the models' special tokens the same ids as on
    llama.cpp's GGUF. Its tokens, types, merges (and Phi-3's scores) equal llama.cpp's, except
    the filler rows past the vocabulary, which llama.cpp's converter now types UNUSED (these
    older files: USER_DEFINED for Qwen2, UNKNOWN for Phi-3) and so does :mod:`gguf_vocab`.
(d) ``<|im_start|>``, ``<|endoftext|>`` (and Phi-3's ``<|user|>``, Llama 3's headers) typed by
    a user stay text in the runtime tokenizer (HF's ``split_special_tokens=True`` ids), while the
    same text written by a chat template gives the control ids.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llava_edge.export.gguf_vocab import LLAMA3_SPLIT_REGEX, read_vocab

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "llama-spm"
SEPARATOR = "\n__ggml_vocab_test__\n"
VOCABS = {"qwen2": "qwen2", "llama-bpe": "llama", "phi-3": "phi3"}  # test vocabulary -> llama.cpp architecture
CHAT = {
    "qwen2": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi <|endoftext|>!<|im_end|>\n",
    "llama-bpe": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>",
    "phi-3": "<|user|>\nHi there<|end|>\n<|assistant|>\nHello<|end|><|endoftext|>",
}


def gguf_path(name: str) -> Path:
    path = CACHE / f"ggml-vocab-{name}.gguf"
    for p in (path, Path(f"{path}.inp"), Path(f"{path}.out")):
        if not p.is_file():
            pytest.skip(f"{p.relative_to(ROOT)} missing: run `make llava-ref`")
    return path


def vectors(name: str) -> list[tuple[str, list[int]]]:
    path = gguf_path(name)
    texts = Path(f"{path}.inp").read_text(encoding="utf-8").split(SEPARATOR)
    lines = Path(f"{path}.out").read_text(encoding="utf-8").split("\n")
    assert len(texts) == len(lines) == 47
    return [(t, [int(x) for x in line.split()]) for t, line in zip(texts, lines)]


def gguf_fields(path: Path) -> dict:
    import gguf

    return {k: v.contents() for k, v in gguf.GGUFReader(str(path)).fields.items()}


def vocab_only(path: Path):
    import llama_cpp

    return llama_cpp.Llama(str(path), vocab_only=True, verbose=False)


# -- rebuilding each model's tokenizer folder from llama.cpp's GGUF -----------------------

def _bpe_parts(f: dict):
    toks, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"]
    vocab = {t: i for i, (t, ty) in enumerate(zip(toks, types)) if ty == 1}  # NORMAL
    special = [(i, t) for i, (t, ty) in enumerate(zip(toks, types)) if ty == 3]  # CONTROL
    merges = [tuple(m.split(" ")) for m in f["tokenizer.ggml.merges"]]
    return vocab, merges, special


def _qwen2_folder(f: dict, out: Path) -> None:
    from transformers import Qwen2Tokenizer

    vocab, merges, special = _bpe_parts(f)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, bos_token=None, eos_token="<|endoftext|>",
                         pad_token="<|endoftext|>",
                         additional_special_tokens=[t for _, t in special if t != "<|endoftext|>"])
    assert [(tok.convert_tokens_to_ids(t), t) for _, t in special] == special
    tok.save_pretrained(out)


def _llama3_folder(f: dict, out: Path) -> None:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab, merges, special = _bpe_parts(f)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True, byte_fallback=False))
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for _, t in special])
    assert [(tk.token_to_id(t), t) for _, t in special] == special
    (bos_id, bos), (_, eos) = special[0], special[1]
    tk.post_processor = processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                                      special_tokens=[(bos, bos_id)])
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=bos, eos_token=eos).save_pretrained(out)


def _phi3_folder(f: dict, out: Path) -> None:
    from sentencepiece import sentencepiece_model_pb2 as pb

    toks, scores, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.scores"], f["tokenizer.ggml.token_type"]
    m = pb.ModelProto()
    t = m.trainer_spec
    t.model_type, t.vocab_size, t.byte_fallback = pb.TrainerSpec.BPE, 32000, True
    t.unk_id, t.bos_id, t.eos_id, t.pad_id = 0, 1, 2, -1
    t.split_digits, t.allow_whitespace_only_pieces, t.max_sentencepiece_length = True, True, 16
    n = m.normalizer_spec
    n.name, n.precompiled_charsmap, n.add_dummy_prefix = "identity", b"", True
    n.remove_extra_whitespaces, n.escape_whitespaces = False, True
    for i in range(32000):
        p = m.pieces.add()
        p.piece = toks[i]
        p.score = 0.0 if i < 3 else scores[i]
        p.type = {0: pb.ModelProto.SentencePiece.UNKNOWN, 1: pb.ModelProto.SentencePiece.CONTROL,
                  2: pb.ModelProto.SentencePiece.CONTROL}.get(i, types[i])
    out.mkdir(parents=True)
    (out / "tokenizer.model").write_bytes(m.SerializeToString())
    added = {str(i): {"content": toks[i], "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": types[i] == 3}
             for i in range(len(toks)) if types[i] in (3, 4) and (i < 3 or i >= 32000)}
    config = {"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "<|endoftext|>",
              "unk_token": "<unk>", "pad_token": "<|endoftext|>", "legacy": False, "added_tokens_decoder": added,
              "tokenizer_class": "LlamaTokenizer", "clean_up_tokenization_spaces": False}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


BUILDERS = {"qwen2": _qwen2_folder, "llama-bpe": _llama3_folder, "phi-3": _phi3_folder}


@pytest.fixture(scope="module")
def rebuilt(tmp_path_factory):
    """name -> (tokenizer folder rebuilt from llama.cpp's GGUF, path of the GGUF vocabulary gguf_vocab writes)."""
    import gguf

    cache: dict[str, tuple[Path, Path]] = {}

    def get(name: str) -> tuple[Path, Path]:
        if name not in cache:
            src = gguf_path(name)
            f = gguf_fields(src)
            base = tmp_path_factory.mktemp(name)
            folder = base / "tokenizer"
            BUILDERS[name](f, folder)
            n_rows = len(f["tokenizer.ggml.tokens"])
            arch = f["general.architecture"]
            assert arch == VOCABS[name]
            out = base / "vocab.gguf"
            w = gguf.GGUFWriter(out, arch)
            reader = gguf.GGUFReader(str(src))
            # the model's dimensions, which llama.cpp reads before the vocabulary, and its name: llama.cpp gives
            # Phi-3's special tokens Phi-3's rstrip by general.name ("phi3"/"phi-3" in it)
            for key, fld in reader.fields.items():
                if key.startswith(f"{arch}.") or key in ("general.file_type", "general.name"):
                    w.add_key_value(key, fld.contents(), fld.types[0])
            read_vocab(folder, n_rows, arch).write(w)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            w.close()
            cache[name] = folder, out
        return cache[name]

    return get


# -- (a) llama.cpp on its own vocabularies ------------------------------------------------

@pytest.mark.parametrize("name", list(VOCABS))
def test_llama_cpp_reproduces_its_vectors(name):
    llm = vocab_only(gguf_path(name))
    for text, ids in vectors(name):
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids, repr(text)


# -- (b) the runtime tokenizer on the rebuilt tokenizer -----------------------------------

@pytest.mark.parametrize("name", list(VOCABS))
def test_runtime_tokenizer_gives_the_vectors(name, rebuilt):
    from llava_edge.tokenizer import Tokenizer

    folder, _ = rebuilt(name)
    ours = Tokenizer(folder)
    for text, ids in vectors(name):
        assert ours.encode(text, add_special_tokens=False) == ids, repr(text)
    if name != "phi-3":
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(folder)
        for text, ids in vectors(name):
            assert hf.encode(text, add_special_tokens=False) == ids, repr(text)


def test_runtime_tokenizer_bos_rules(rebuilt):
    """BOS as each model's own tokenizer adds it: none for Qwen2, ``<|begin_of_text|>`` for Llama 3, ``<s>`` for Phi-3."""
    from transformers import AutoTokenizer

    from llava_edge.tokenizer import Tokenizer

    for name, bos in (("qwen2", None), ("llama-bpe", 128000), ("phi-3", 1)):
        ours = Tokenizer(rebuilt(name)[0])
        got = ours.encode("Hello world")
        assert got[0] == bos if bos is not None else got == ours.encode("Hello world", add_special_tokens=False)
        if name != "phi-3":
            assert got == AutoTokenizer.from_pretrained(rebuilt(name)[0]).encode("Hello world")


# -- (c) the GGUF vocabulary gguf_vocab writes --------------------------------------------

@pytest.mark.parametrize("name", list(VOCABS))
def test_written_vocab_tokenizes_like_llama_cpp(name, rebuilt):
    _, ours_path = rebuilt(name)
    ours, theirs = vocab_only(ours_path), vocab_only(gguf_path(name))
    for text, ids in vectors(name):
        assert ours.tokenize(text.encode(), add_bos=False, special=False) == ids, repr(text)
    for text in (CHAT[name], CHAT[name] + " and " + CHAT[name][::-1]):
        for special in (True, False):
            assert ours.tokenize(text.encode(), add_bos=False, special=special) == \
                theirs.tokenize(text.encode(), add_bos=False, special=special), (text, special)
    assert (ours.token_bos(), ours.token_eos()) == (theirs.token_bos(), theirs.token_eos()) or name == "qwen2"


@pytest.mark.parametrize("name", list(VOCABS))
def test_written_vocab_equals_llama_cpp_converter(name, rebuilt):
    import gguf

    T = gguf.TokenType
    ours, theirs = gguf_fields(rebuilt(name)[1]), gguf_fields(gguf_path(name))
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens"):
        assert ours[key] == theirs[key], key
    if "tokenizer.ggml.merges" in theirs:
        assert ours["tokenizer.ggml.merges"] == theirs["tokenizer.ggml.merges"]
    filler = [t.startswith("[PAD") for t in theirs["tokenizer.ggml.tokens"]]
    for i, (a, b) in enumerate(zip(ours["tokenizer.ggml.token_type"], theirs["tokenizer.ggml.token_type"])):
        assert a == (T.UNUSED if filler[i] else b), (i, theirs["tokenizer.ggml.tokens"][i], a, b)
    if name == "phi-3":  # as llama.cpp's Phi-3 converter scores: added tokens -1000, fillers -10000
        assert ours["tokenizer.ggml.scores"] == theirs["tokenizer.ggml.scores"]
        assert ours["tokenizer.ggml.add_bos_token"] is True


# -- (d) typed special tokens stay text ---------------------------------------------------

@pytest.mark.parametrize("name", list(VOCABS))
def test_typed_special_tokens_stay_text(name, rebuilt):
    from llava_edge.templates import Text
    from llava_edge.tokenizer import Tokenizer

    folder, _ = rebuilt(name)
    ours = Tokenizer(folder)
    text = CHAT[name]
    control = {i for i, t in _specials(folder).items()}
    assert control & set(ours.encode((Text(text, True),)))  # the chat template's own text: control tokens
    typed = ours.encode(text, add_special_tokens=False)  # a user's: plain text
    assert not control & set(typed)
    if name != "phi-3":
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(folder)
        assert typed == hf(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    else:  # SentencePiece on the text as it stands
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
        assert typed == sp.encode(text)


def _specials(folder: Path) -> dict[int, str]:
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    out = {int(i): t["content"] for i, t in (cfg.get("added_tokens_decoder") or {}).items() if t.get("special")}
    tj = folder / "tokenizer.json"
    if tj.is_file():
        out.update({t["id"]: t["content"] for t in json.loads(tj.read_text())["added_tokens"] if t["special"]})
    return out
