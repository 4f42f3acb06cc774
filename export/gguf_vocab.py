"""A checkpoint's tokenizer as GGUF vocabulary metadata, the way llama.cpp reads it.

Two vocabularies, chosen as llama.cpp's converter does (SentencePiece first when
``tokenizer.model`` is there, else ``tokenizer.json``):

- SentencePiece (Llama 1/2, Vicuna, Mistral, llava-hf 1.5; Phi-3): ``tokenizer.ggml.model
  = "llama"``; every piece with its score and type read from ``tokenizer.model`` by the
  ``sentencepiece`` library, and the model's own ``add_dummy_prefix`` setting. For
  ``phi3`` as llama.cpp's Phi-3 converter writes it: every added token (``added_tokens.json``
  too) scored -1000, also where it replaces a base piece (Phi-3 retypes ``</s>``), and
  fillers scored -10000.
- Byte-level BPE (Llama 3, Qwen2): ``"gpt2"``; tokens in their byte-level spelling
  (``Ġthe``), merges, and the pre-tokenizer name llama.cpp selects its split rule by
  (``llama-bpe``, ``qwen2``).

In both, the checkpoint's added tokens sit at their own ids (special ones typed CONTROL,
the others USER_DEFINED, which llama.cpp always matches as whole tokens) and ids with no
token up to the embedding's row count become ``[PAD<i>]`` (llava-hf pads 32002 tokens to
32064 rows). Special token ids, add-BOS/EOS flags, merges and the chat template come from
``gguf.SpecialVocab``: the reader llama.cpp's own converter uses, which knows
``tokenizer_config.json``, ``chat_template.jinja``/``.json`` and ``config.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from llava_edge.errors import UserError

# Llama 3's split rule as its tokenizer.json spells it. llama.cpp implements this exact
# rule natively as pre-tokenizer type LLAMA3 (names "llama-bpe", "llama3", "llama-v3").
LLAMA3_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA_BPE_PRE = "llama-bpe"
# Qwen2's (Qwen1.5 to 2.5) as its tokenizer.json and transformers' Qwen2Tokenizer spell it: digits one by one.
# llama.cpp implements it natively as pre-tokenizer type QWEN2 (name "qwen2").
QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_PRE = "qwen2"
# per split rule: whether llama.cpp ranks a pre-token that is itself in the vocabulary as that one token
# (its ``ignore_merges``), which the tokenizer.json's BPE model must say too, and the normalizers allowed
BPE_RULES = {
    LLAMA3_SPLIT_REGEX: (LLAMA_BPE_PRE, True, ()),
    # Qwen2 NFC-normalizes; llama.cpp does not, so text not already in NFC (a decomposed "é") can tokenize
    # differently in llama.cpp alone. llava-edge's runtime feeds llama.cpp the ids of the checkpoint's own
    # tokenizer (llava_edge.tokenizer), so its prompts are unaffected; llama.cpp's own converter accepts it too.
    QWEN2_SPLIT_REGEX: (QWEN2_PRE, False, ("NFC",)),
}


@dataclass
class GgufVocab:
    """What goes under ``tokenizer.ggml.*`` (tokens padded to the embedding's rows)."""

    model: str  # "llama" (SentencePiece) or "gpt2" (byte-level BPE)
    pre: str  # pre-tokenizer name; "default" for SentencePiece, which has none
    tokens: list[bytes]
    types: list[int]
    scores: list[float] | None  # SentencePiece only: llama.cpp's BPE ranks tokens by merges
    special: object  # gguf.SpecialVocab: merges, special ids, add flags, chat template
    add_space_prefix: bool | None  # SentencePiece's add_dummy_prefix

    @property
    def special_ids(self) -> dict[str, int]:
        return dict(self.special.special_token_ids)

    def write(self, w, add_bos: bool | None = None, chat_template: str | None = None) -> None:
        """Add the vocabulary keys to a ``gguf.GGUFWriter``; ``add_bos``/``chat_template`` override the files."""
        w.add_tokenizer_model(self.model)
        w.add_tokenizer_pre(self.pre)
        w.add_token_list(self.tokens)
        if self.scores is not None:
            w.add_token_scores(self.scores)
        w.add_token_types(self.types)
        if self.add_space_prefix is not None:
            w.add_add_space_prefix(self.add_space_prefix)
        sv = self.special
        if add_bos is not None:
            sv.add_special_token["bos"] = add_bos
        sv.add_special_token.setdefault("bos", self.model == "llama")  # llama.cpp's own defaults, made explicit
        sv.add_special_token.setdefault("eos", False)
        if chat_template is not None:
            sv.chat_template = chat_template
        sv.add_to_gguf(w, quiet=True)


def read_vocab(folder: str | Path, n_rows: int, arch: str = "llama") -> GgufVocab:
    """The vocabulary of the checkpoint in ``folder``, padded to ``n_rows`` (the embedding's row count), for
    llama.cpp architecture ``arch``."""
    folder = Path(folder)
    sp = _load_sentencepiece(folder / "tokenizer.model")
    if sp is not None:
        return _sentencepiece_vocab(folder, sp, n_rows, phi3=arch == "phi3")
    if (folder / "tokenizer.json").is_file():
        return _bpe_vocab(folder, n_rows)
    if (folder / "tokenizer.model").is_file():
        raise UserError(f"{folder}/tokenizer.model is not a SentencePiece model and there is no tokenizer.json")
    raise UserError(f"{folder} has neither tokenizer.model (SentencePiece) nor tokenizer.json (BPE)")


def _load_sentencepiece(path: Path):
    """The SentencePiece processor for ``path``, or None when absent or not SentencePiece.

    Some Llama 3 repositories ship Meta's tiktoken file under the same name; like
    llama.cpp's converter, fall back to ``tokenizer.json`` then.
    """
    import sentencepiece as spm

    if not path.is_file():
        return None
    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(str(path))
    except (OSError, RuntimeError):
        return None
    return sp


def added_tokens(folder: Path) -> dict[int, tuple[str, bool]]:
    """id -> (text, special) for the tokens added on top of the base vocabulary.

    From ``tokenizer.json``'s ``added_tokens``, and ``tokenizer_config.json``'s
    ``added_tokens_decoder`` for checkpoints that only ship a slow tokenizer.
    """
    out: dict[int, tuple[str, bool]] = {}
    cfg = folder / "tokenizer_config.json"
    if cfg.is_file():
        for i, t in (json.loads(cfg.read_text()).get("added_tokens_decoder") or {}).items():
            out[int(i)] = (t["content"], bool(t.get("special", False)))
    tj = folder / "tokenizer.json"
    if tj.is_file():
        for t in json.loads(tj.read_text()).get("added_tokens") or []:
            out[int(t["id"])] = (t["content"], bool(t.get("special", False)))
    return out


def _pad_to_rows(tokens: list[bytes], types: list[int], scores: list[float] | None,
                 added: dict[int, tuple[str, bool]], n_rows: int, folder: Path,
                 phi3_scores: bool = False) -> None:
    """Place added tokens at their ids and fill the gaps up to ``n_rows`` with ``[PAD<i>]`` (in place).

    Scores: -1000 for an added token past the base vocabulary and for a filler, a replaced base piece keeps
    its own; ``phi3_scores``: -1000 for every added token and -10000 for a filler (llama.cpp's Phi-3 converter).
    """
    import gguf

    T = gguf.TokenType
    n_vocab = max([len(tokens) - 1, *added]) + 1
    if n_vocab > n_rows:
        raise UserError(
            f"the tokenizer of {folder} has {n_vocab} tokens but the embedding matrix only {n_rows} rows"
        )
    for i in range(n_rows):
        if i in added:
            text, special = added[i]
            kind = T.CONTROL if special else T.USER_DEFINED
            if i < len(tokens):
                tokens[i], types[i] = text.encode("utf-8"), kind
                if scores is not None and phi3_scores:
                    scores[i] = -1000.0
                continue
            tokens.append(text.encode("utf-8"))
            types.append(kind)
            score = -1000.0
        elif i >= len(tokens):
            tokens.append(f"[PAD{i}]".encode())
            types.append(T.UNUSED)
            score = -10000.0 if phi3_scores else -1000.0
        else:
            continue
        if scores is not None:
            scores.append(score)


def _special_vocab(folder: Path, n_rows: int, load_merges: bool):
    import logging

    import gguf

    logging.getLogger("gguf.vocab").setLevel(logging.ERROR)  # its notes on unusual templates are not ours
    try:
        return gguf.SpecialVocab(folder, load_merges=load_merges, n_vocab=n_rows)
    except ValueError as e:
        raise UserError(f"unreadable tokenizer files in {folder}: {e}") from None


def _added_tokens_json(folder: Path) -> dict[int, tuple[str, bool]]:
    """``added_tokens.json`` (text -> id, no special flag: llama.cpp's Phi-3 converter types them USER_DEFINED)."""
    f = folder / "added_tokens.json"
    if not f.is_file():
        return {}
    try:
        return {int(i): (t, False) for t, i in json.loads(f.read_text(encoding="utf-8")).items()}
    except (ValueError, AttributeError, TypeError):
        raise UserError(f"unreadable {f}") from None


def _sentencepiece_vocab(folder: Path, sp, n_rows: int, phi3: bool = False) -> GgufVocab:
    import gguf

    sp_file = folder / "tokenizer.model"
    T = gguf.TokenType
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i).encode("utf-8"))
        scores.append(sp.get_score(i))
        types.append(
            T.UNKNOWN if sp.is_unknown(i) else T.CONTROL if sp.is_control(i) else T.UNUSED if sp.is_unused(i)
            else T.BYTE if sp.is_byte(i) else T.NORMAL
        )
    added = {**_added_tokens_json(folder), **added_tokens(folder)} if phi3 else added_tokens(folder)
    _pad_to_rows(tokens, types, scores, added, n_rows, folder, phi3_scores=phi3)
    add_space_prefix = True
    try:  # the model's own normalizer setting, as llama.cpp's converter reads it
        from sentencepiece import sentencepiece_model_pb2 as pb

        proto = pb.ModelProto()
        proto.ParseFromString(sp_file.read_bytes())
        add_space_prefix = proto.normalizer_spec.add_dummy_prefix
    except Exception:  # noqa: BLE001 - protobuf runtime missing or too old: Llama's default stands
        pass
    special = _special_vocab(folder, n_rows, load_merges=False)
    # gguf's reader resolves the names tokenizer_config.json gives (eos_token: "<|endoftext|>") through
    # tokenizer.json only; a checkpoint with a slow tokenizer alone has them in added_tokens_decoder
    by_text = {t.decode("utf-8", "replace"): i for i, t in enumerate(tokens)}
    cfg = folder / "tokenizer_config.json"
    try:
        cfg_json = json.loads(cfg.read_text(encoding="utf-8")) if cfg.is_file() else {}
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"unreadable {cfg}") from None
    for typ in ("bos", "eos", "unk", "pad"):
        name = cfg_json.get(f"{typ}_token") if isinstance(cfg_json, dict) else None
        name = name.get("content") if isinstance(name, dict) else name
        if typ not in special.special_token_ids and isinstance(name, str) and name in by_text:
            special.special_token_ids[typ] = by_text[name]
    for typ, i in (("bos", sp.bos_id()), ("eos", sp.eos_id()), ("unk", sp.unk_id())):
        if 0 <= i < n_rows:
            special.special_token_ids.setdefault(typ, i)
    return GgufVocab("llama", "default", tokens, types, scores, special, add_space_prefix)


def bpe_pre_tokenizer(tokenizer_json: dict, where: Path) -> str:
    """llama.cpp's name for the split rule of a byte-level BPE ``tokenizer.json``.

    llama.cpp's converter decides this by tokenizing a fixed text and looking the hash of
    the ids up in a table of published checkpoints (``get_vocab_base_pre``), so it knows a
    vocabulary only once someone has registered it; a retrained or extended vocabulary has a
    new hash even when its split rule is a known one. The rule itself is in tokenizer.json, so
    it is read from there: a regex split (Llama 3's or Qwen2's, :data:`BPE_RULES`) followed by
    a byte-level mapping without a regex of its own, the BPE model's ``ignore_merges`` as
    llama.cpp applies it for that rule, and no normalizer beyond the rule's own. Anything
    else is refused rather than tokenized differently by llama.cpp.
    """
    model = tokenizer_json.get("model") or {}
    decoder = tokenizer_json.get("decoder") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or decoder.get("type") != "ByteLevel":
        raise UserError(
            f"{where}: tokenizer.json is not a byte-level BPE (model {model.get('type')!r}, decoder "
            f"{decoder.get('type')!r}) and there is no tokenizer.model; supported: SentencePiece, byte-level BPE "
            "split as Llama 3 or Qwen2 split"
        )
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    rule = None
    if (
        len(steps) == 2
        and steps[0].get("type") == "Split"
        and steps[0].get("behavior") == "Isolated"
        and not steps[0].get("invert")
        and steps[1].get("type") == "ByteLevel"
        and not steps[1].get("use_regex", True)
        and not steps[1].get("add_prefix_space", False)
    ):
        rule = BPE_RULES.get((steps[0].get("pattern") or {}).get("Regex"))
    if rule is None:
        kinds = [s.get("type") for s in steps]
        raise UserError(f"{where}: unsupported BPE pre-tokenizer {kinds} (supported: Llama 3's or Qwen2's split "
                        "regex + ByteLevel)")
    name, ignore_merges, normalizers = rule
    norm = tokenizer_json.get("normalizer")
    if norm and norm.get("type") not in normalizers:
        raise UserError(f"{where}: byte-level BPE with a normalizer ({norm.get('type')}) is not supported for "
                        f"llama.cpp's {name!r} split (llama.cpp would not apply it)")
    if bool(model.get("ignore_merges", False)) != ignore_merges:
        raise UserError(f"{where}: tokenizer.json's BPE has ignore_merges={bool(model.get('ignore_merges'))}, but "
                        f"llama.cpp's {name!r} split uses {ignore_merges} (it would tokenize differently)")
    return name


def _bpe_vocab(folder: Path, n_rows: int) -> GgufVocab:
    import gguf

    tj = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    pre = bpe_pre_tokenizer(tj, folder)
    by_id = {int(i): t for t, i in tj["model"]["vocab"].items()}
    n_base = max(by_id) + 1 if by_id else 0
    tokens: list[bytes] = []
    types: list[int] = []
    for i in range(n_base):  # a hole in the base ids is a filler, like a hole after it
        tokens.append(by_id[i].encode("utf-8") if i in by_id else f"[PAD{i}]".encode())
        types.append(gguf.TokenType.NORMAL if i in by_id else gguf.TokenType.UNUSED)
    _pad_to_rows(tokens, types, None, added_tokens(folder), n_rows, folder)
    special = _special_vocab(folder, n_rows, load_merges=True)
    if not special.merges:
        raise UserError(f"{folder}/tokenizer.json has a BPE model without merges")
    return GgufVocab("gpt2", pre, tokens, types, None, special, None)
