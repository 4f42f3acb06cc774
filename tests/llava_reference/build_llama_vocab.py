"""The LLaMA SentencePiece vocabulary, rebuilt offline, and LLaVA-1.5 tokenizer folders made from it.

Runs in the main venv (``gguf``, ``sentencepiece`` and its ``sentencepiece_model_pb2``, which needs
``protobuf``). The source is llama.cpp's tokenizer test vocabulary ``ggml-vocab-llama-spm.gguf``
(the 32000 LLaMA / Vicuna pieces with their scores and types) that ``make llava-ref`` extracts from
the llama-cpp-python 0.3.36 sdist into ``.cache/llama-spm/``, next to its ``.inp``/``.out`` test
vectors. GGUF token types are numbered like SentencePiece piece types (1 normal, 2 unknown,
3 control, 4 user defined, 5 unused, 6 byte), so they are copied as they are.

    python tests/llava_reference/build_llama_vocab.py [GGUF] [OUT/tokenizer.model]

builds the model and checks it against the test vectors.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache" / "llama-spm"
GGUF = CACHE / "ggml-vocab-llama-spm.gguf"
SEPARATOR = "\n__ggml_vocab_test__\n"


def _gguf_vocab(gguf_path) -> tuple[list[str], list[float], list[int]]:
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))

    def array(name):
        field = reader.fields[name]
        return [field.parts[i] for i in field.data]

    tokens = [bytes(p).decode("utf-8") for p in array("tokenizer.ggml.tokens")]
    scores = [float(p[0]) for p in array("tokenizer.ggml.scores")]
    types = [int(p[0]) for p in array("tokenizer.ggml.token_type")]
    model = bytes(reader.fields["tokenizer.ggml.model"].parts[reader.fields["tokenizer.ggml.model"].data[0]])
    if model != b"llama" or not len(tokens) == len(scores) == len(types):
        raise ValueError(f"{gguf_path}: not a SentencePiece (llama) vocabulary")
    return tokens, scores, types


def build(gguf_path=GGUF, out_model_path=None) -> Path:
    """Write the GGUF's vocabulary as a SentencePiece ``tokenizer.model`` (LLaMA's settings); return its path."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    tokens, scores, types = _gguf_vocab(gguf_path)
    out = Path(out_model_path) if out_model_path else Path(gguf_path).with_name("tokenizer.model")
    m = pb.ModelProto()
    t = m.trainer_spec
    t.model_type = pb.TrainerSpec.BPE
    t.vocab_size = len(tokens)
    t.byte_fallback = True
    t.unk_id, t.bos_id, t.eos_id, t.pad_id = 0, 1, 2, -1
    t.unk_piece, t.bos_piece, t.eos_piece, t.pad_piece = "<unk>", "<s>", "</s>", "<pad>"
    t.unk_surface = " \u2047 "
    # the rest as LLaMA's own tokenizer.model says (training-time fields, kept for fidelity)
    t.split_digits = True
    t.allow_whitespace_only_pieces = True
    t.max_sentencepiece_length = 16
    t.character_coverage = 0.99995
    n = m.normalizer_spec
    n.name = "identity"
    n.precompiled_charsmap = b""
    n.add_dummy_prefix = True
    n.remove_extra_whitespaces = False
    n.escape_whitespaces = True
    for piece, score, kind in zip(tokens, scores, types):
        p = m.pieces.add()
        p.piece, p.score, p.type = piece, score, kind
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(m.SerializeToString())
    return out


def test_vectors(gguf_path=GGUF) -> list[tuple[str, list[int]]]:
    """llama.cpp's (text, ids) pairs for the vocabulary: ids without BOS, as SentencePiece encodes them."""
    gguf_path = Path(gguf_path)
    texts = Path(str(gguf_path) + ".inp").read_text(encoding="utf-8").split(SEPARATOR)
    lines = Path(str(gguf_path) + ".out").read_text(encoding="utf-8").split("\n")
    if len(texts) != len(lines):
        raise ValueError(f"{gguf_path}: {len(texts)} test strings but {len(lines)} id lines")
    return [(t, [int(x) for x in line.split()]) for t, line in zip(texts, lines)]


def check(model_path, gguf_path=GGUF) -> list[tuple[str, list[int], list[int]]]:
    """Encode every test string with SentencePiece; return the (text, expected, got) that differ (empty: all agree)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    bad = []
    for text, ids in test_vectors(gguf_path):
        got = sp.encode(text)
        if got != ids:
            bad.append((text, ids, got))
    return bad


def _added(content: str, special: bool | None = None, typed: bool = True) -> dict:
    d = {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    if typed:
        d = {"__type": "AddedToken", **d}
    if special is not None:
        d["special"] = special
    return d


def write_llava_tokenizer_dir(out_dir, model_path, legacy: bool, extra_special=()) -> Path:
    """A tokenizer folder as liuhaotian/llava-v1.5-7b ships it (slow ``LlamaTokenizer``), with ``legacy`` as given.

    ``extra_special`` (e.g. ``<|im_start|>``, ``<|im_end|>``) become added special tokens with ids from
    the vocabulary size on (``added_tokens_decoder`` + ``additional_special_tokens``, the form
    transformers 4.36 writes and reads; ``added_tokens.json`` too, for older readers).
    """
    import sentencepiece as spm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_bytes = Path(model_path).read_bytes()
    (out / "tokenizer.model").write_bytes(model_bytes)
    n = spm.SentencePieceProcessor(model_proto=model_bytes).vocab_size()
    extra = list(extra_special)
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": _added("<s>"),
        "clean_up_tokenization_spaces": False,
        "eos_token": _added("</s>"),
        "legacy": bool(legacy),
        "model_max_length": 2048,
        "pad_token": None,
        "padding_side": "right",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": _added("<unk>"),
    }
    special_map = {"bos_token": _added("<s>", typed=False), "eos_token": _added("</s>", typed=False),
                   "pad_token": "<unk>", "unk_token": _added("<unk>", typed=False)}
    if extra:
        config["added_tokens_decoder"] = {
            str(i): _added(c, special=True, typed=False)
            for i, c in [(0, "<unk>"), (1, "<s>"), (2, "</s>")] + [(n + k, t) for k, t in enumerate(extra)]}
        config["additional_special_tokens"] = extra
        special_map["additional_special_tokens"] = [_added(t, typed=False) for t in extra]
        (out / "added_tokens.json").write_text(json.dumps({t: n + k for k, t in enumerate(extra)}, indent=2) + "\n")
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    gguf_path = Path(argv[0]) if argv else GGUF
    out = build(gguf_path, argv[1] if len(argv) > 1 else None)
    bad = check(out, gguf_path)
    n = len(test_vectors(gguf_path))
    for text, ids, got in bad:
        print(f"MISMATCH {text!r}: expected {ids}, got {got}", file=sys.stderr)
    print(f"{out}: {n - len(bad)}/{n} test vectors agree")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
