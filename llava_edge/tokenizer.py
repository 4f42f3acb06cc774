"""The checkpoint's tokenizer, giving the token ids LLaVA's own code gives. No torch, no transformers.

LLaVA tokenizes with transformers' *slow* Llama tokenizer (``use_fast=False``):
SentencePiece itself, plus transformers' rules around it. Those rules are what
this module reproduces (read from transformers 4.36's ``LlamaTokenizer``, the
version LLaVA 1.2.2 runs with, and tested against it):

- the text is split at the tokenizer's added and special tokens (``</s>``...),
  each piece encoded by SentencePiece on its own;
- ``legacy=False`` (the checkpoint's ``tokenizer_config.json``; transformers
  takes ``True`` when it says nothing): only the start of the text gets
  SentencePiece's word-start ``▁``, not the text after a special token;
  ``legacy=True``: every piece gets it;
- BOS in front (``add_bos_token``), EOS after only with ``add_eos_token``.

LLaVA's ``tokenizer_image_token`` then tokenizes the text between ``<image>``
markers chunk by chunk and drops the BOS of every chunk but the first, so the
text after an image starts with ``▁``: :meth:`Tokenizer.encode_prompt`.

Why not the ``tokenizer.json`` (fast tokenizer) a checkpoint also carries: the
one transformers 5 writes for a SentencePiece model merges runs of spaces into
``▁▁``, a piece SentencePiece scores -1e9 and never produces, and it applies
one word-start rule to all pieces. A model without ``tokenizer.model`` (byte-level
BPE, Llama-3 style) is tokenized with its ``tokenizer.json``, by the same rules
of splitting and chunking.

Only text the template wrote is split at special tokens: ``</s>`` typed by a
user stays text (see ``templates.Text.fixed``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError
from .templates import Break, Image, Parts, Text, normalize

SPIECE_UNDERLINE = "\u2581"
SENTENCEPIECE, TOKENIZER_JSON = "sentencepiece", "tokenizer.json"
SENTENCEPIECE_FILE = "tokenizer.model"
CONFIG_FILE = "tokenizer_config.json"
FILES = (TOKENIZER_JSON, SENTENCEPIECE_FILE, CONFIG_FILE, "special_tokens_map.json")


@dataclass(frozen=True)
class AddedToken:
    content: str
    id: int
    lstrip: bool = False
    rstrip: bool = False


@dataclass
class Settings:
    """How a checkpoint tokenizes: what the bundle manifest records (``to_dict``)."""

    kind: str  # SENTENCEPIECE or TOKENIZER_JSON
    file: str  # the vocabulary file
    legacy: bool = True
    add_bos: bool = True
    add_eos: bool = False
    bos: str | None = "<s>"
    eos: str | None = "</s>"
    unk: str | None = "<unk>"
    pad: str | None = None
    special: tuple[str, ...] = ()  # transformers' all_special_tokens
    added: tuple[AddedToken, ...] = field(default_factory=tuple)  # split out of template text

    def special_tokens_map(self) -> dict[str, str]:
        """transformers' ``special_tokens_map`` (what it passes to a chat template): the tokens that are set."""
        named = {"bos_token": self.bos, "eos_token": self.eos, "unk_token": self.unk, "pad_token": self.pad}
        return {k: v for k, v in named.items() if v is not None}

    def to_dict(self) -> dict:
        return {"kind": self.kind, "file": self.file, "legacy": self.legacy, "add_bos": self.add_bos,
                "add_eos": self.add_eos, "bos": self.bos, "eos": self.eos, "unk": self.unk, "pad": self.pad,
                "special": list(self.special),
                "added": [{"content": a.content, "id": a.id, "lstrip": a.lstrip, "rstrip": a.rstrip}
                          for a in self.added]}

    @classmethod
    def from_dict(cls, d: dict) -> "Settings":
        """From a manifest's ``tokenizer`` section, every field's type checked (a one-line error otherwise)."""
        def text(x, optional=True):
            if (x is None and optional) or isinstance(x, str):
                return x
            raise TypeError(f"{x!r} is not text")

        def flag(x):
            if not isinstance(x, bool):
                raise TypeError(f"{x!r} is not true or false")
            return x

        def token(a) -> AddedToken:
            if not (isinstance(a, dict) and isinstance(a.get("id"), int) and not isinstance(a["id"], bool)
                    and 0 <= a["id"] < 2**31):
                raise TypeError(f"added token {a!r} has no valid id")
            return AddedToken(text(a["content"], False), a["id"], bool(a.get("lstrip")), bool(a.get("rstrip")))

        try:
            special, added = d.get("special", []), d.get("added", [])
            if not isinstance(special, list) or not isinstance(added, list):
                raise TypeError("special and added must be lists")
            return cls(kind=text(d["kind"], False), file=text(d["file"], False), legacy=flag(d["legacy"]),
                       add_bos=flag(d["add_bos"]), add_eos=flag(d["add_eos"]), bos=text(d.get("bos")),
                       eos=text(d.get("eos")), unk=text(d.get("unk")), pad=text(d.get("pad")),
                       special=tuple(text(x, False) for x in special), added=tuple(token(a) for a in added))
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"the bundle's tokenizer record is incomplete or malformed ({type(e).__name__}: {e}): "
                            "export the bundle again") from None


def _content(x) -> str | None:
    if isinstance(x, dict):
        return x.get("content")
    return x if isinstance(x, str) else None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"unreadable tokenizer file {path}") from None
    if not isinstance(d, dict):
        raise UserError(f"unreadable tokenizer file {path} (not a JSON object)")
    return d


def read_settings(folder: str | Path) -> Settings:
    """What a checkpoint folder's tokenizer files say, resolved the way LLaVA's transformers resolves them."""
    folder = Path(folder)
    cfg = _read_json(folder / CONFIG_FILE)
    smap = _read_json(folder / "special_tokens_map.json")
    fast = _read_json(folder / TOKENIZER_JSON)
    has_sp = (folder / SENTENCEPIECE_FILE).is_file()
    if not has_sp and not fast:
        raise UserError(f"no tokenizer in {folder} ({SENTENCEPIECE_FILE} or {TOKENIZER_JSON})")

    def token(name: str) -> str | None:
        return _content(cfg.get(name)) or _content(smap.get(name))

    added: dict[str, AddedToken] = {}
    for a in fast.get("added_tokens", []) or []:
        added[a["content"]] = AddedToken(a["content"], int(a["id"]), bool(a.get("lstrip")), bool(a.get("rstrip")))
    for i, a in (cfg.get("added_tokens_decoder") or {}).items():
        c = _content(a)
        if c and c not in added:
            added[c] = AddedToken(c, int(i), bool(a.get("lstrip")), bool(a.get("rstrip")))
    extra = [_content(x) for x in (cfg.get("additional_special_tokens") or smap.get("additional_special_tokens") or [])]
    bos, eos, unk, pad = token("bos_token"), token("eos_token"), token("unk_token"), token("pad_token")
    special = tuple(dict.fromkeys(t for t in (bos, eos, unk, pad, *extra) if t))
    if "legacy" in cfg:
        legacy = bool(cfg["legacy"])
    else:  # transformers' default when the config says nothing; a tokenizer.json written without it tells
        scheme = ((fast.get("pre_tokenizer") or {}).get("prepend_scheme")
                  or _metaspace_scheme(fast.get("pre_tokenizer")))
        legacy = scheme != "first"
    if "add_bos_token" in cfg:
        add_bos = bool(cfg["add_bos_token"])
    elif fast:
        add_bos = _post_processor_adds_bos(fast)
    else:
        add_bos = True  # LlamaTokenizer's default
    add_eos = bool(cfg.get("add_eos_token", False))
    if has_sp:
        bos, eos, unk = bos or "<s>", eos or "</s>", unk or "<unk>"
        # transformers registers the special tokens as added tokens even when no file lists them (an original
        # LLaVA checkpoint has only tokenizer.model and a config): they are split out of text like the others
        missing = [t for t in (bos, eos, unk, pad, *extra) if t and t not in added]
        if missing:
            import sentencepiece as spm

            sp = spm.SentencePieceProcessor(model_file=str(folder / SENTENCEPIECE_FILE))
            for t in missing:
                i = sp.piece_to_id(t)
                if sp.id_to_piece(i) == t:
                    added[t] = AddedToken(t, i)
        return Settings(SENTENCEPIECE, SENTENCEPIECE_FILE, legacy, add_bos, add_eos, bos, eos, unk, pad,
                        tuple(dict.fromkeys((bos, eos, unk, *special))), tuple(added.values()))
    return Settings(TOKENIZER_JSON, TOKENIZER_JSON, legacy, add_bos, add_eos, bos, eos, unk, pad, special,
                    tuple(added.values()))


def pin_tokenizer_config(folder: str | Path, legacy: bool, add_bos: bool = True, add_eos: bool = False) -> None:
    """Write ``legacy``, ``add_bos_token`` and ``add_eos_token`` into a folder's ``tokenizer_config.json``.

    transformers 5 saves none of them; a reader that goes by the config alone (transformers 4,
    LLaVA's code, :func:`read_settings`) would take ``legacy=True`` for a tokenizer built otherwise.
    """
    f = Path(folder) / CONFIG_FILE
    cfg = _read_json(f)
    cfg.update({"legacy": legacy, "add_bos_token": add_bos, "add_eos_token": add_eos})
    f.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _metaspace_scheme(pre: dict | None) -> str | None:
    for p in (pre or {}).get("pretokenizers", []) or []:
        if p.get("type") == "Metaspace":
            return p.get("prepend_scheme")
    return None


def _post_processor_adds_bos(fast: dict) -> bool:
    post = fast.get("post_processor") or {}
    if post.get("type") == "Sequence":
        return any(_post_processor_adds_bos({"post_processor": p}) for p in post.get("processors", []))
    single = post.get("single", [])
    return bool(single) and "SpecialToken" in single[0]


class Tokenizer:
    """Token ids as LLaVA's code makes them, for a checkpoint folder or a bundle (its files and ``Settings``)."""

    def __init__(self, folder: str | Path, settings: Settings | None = None):
        folder = Path(folder)
        self.settings = s = settings or read_settings(folder)
        path = folder / s.file
        if not path.is_file():
            raise UserError(f"tokenizer file not found: {path}")
        self._added = {a.content: a for a in s.added}
        self._by_length = sorted(self._added, key=len, reverse=True)
        if s.kind == SENTENCEPIECE:
            self._engine = _SentencePiece(path.read_bytes(), s)
        elif s.kind == TOKENIZER_JSON:
            self._engine = _TokenizersJson(path)
        else:
            raise UserError(f"unknown tokenizer kind {s.kind!r} in the bundle: export it again")
        e = self._engine
        self.bos_id = self._id_of(s.bos)
        self.eos_id = self._id_of(s.eos)
        # padding (right, masked out): the checkpoint's pad token, else LLaVA's choice for Vicuna, <unk>
        self.pad_id = self._id_of(s.pad) if s.pad else self._id_of(s.unk)
        self.byte_token_ids = e.byte_token_ids

    def _id_of(self, token: str | None) -> int | None:
        if token is None:
            return None
        if token in self._added:
            return self._added[token].id
        return self._engine.piece_id(token)

    def token_id(self, token: str) -> int | None:
        return self._id_of(token)

    @property
    def adds_bos(self) -> bool:
        return self.settings.add_bos

    # -- encoding -------------------------------------------------------------------------------------
    def encode(self, parts: Parts | str, add_special_tokens: bool = True, fast: bool = False) -> list[int]:
        """``tokenizer(text).input_ids`` of transformers' slow tokenizer; a ``str`` is user text. ``fast``: of its
        fast tokenizer (``tokenizers``), for code that tokenizes with it (xtuner, transformers' processors): a
        SentencePiece text that starts with an added token gets no word-start ``▁`` before it, where the slow one
        drops it only before its ``all_special_tokens``."""
        if isinstance(parts, str):
            parts = (Text(parts, False),)
        if any(isinstance(p, (Image, Break)) for p in parts):
            raise ValueError("encode takes text only; encode_prompt places images and tokenizes pieces apart")
        ids = self._tokenize(normalize(parts), fast)
        if add_special_tokens:
            s = self.settings
            ids = ([self.bos_id] if s.add_bos and self.bos_id is not None else []) + ids + (
                [self.eos_id] if s.add_eos and self.eos_id is not None else [])
        return ids

    def encode_prompt(self, parts: Parts, image_token_id: int, fast: bool = False,
                      bos_written: bool = False) -> list[int]:
        """LLaVA's ``tokenizer_image_token``: each chunk between images tokenized alone, the BOS of all chunks but
        the first dropped, ``image_token_id`` where each image goes. A chat template's prompt (its images
        ``joined``) is tokenized as transformers' processor does: one string, the image token an added token in it,
        by the fast tokenizer. ``fast``: see :meth:`encode`.

        ``bos_written``: a prompt whose template wrote the BOS token first gets no second one (transformers' processor
        tokenizes a prompt that starts with ``bos_token`` with add_special_tokens=False; LLaVA-NeXT's Llama 3 mode
        trains so). LLaVA's own code adds one anyway (``tokenizer_image_token``), and its label arithmetic counts it.
        """
        first = next(iter(parts), None)
        own_bos = (bos_written and self.settings.bos is not None and isinstance(first, Text) and first.fixed
                   and first.text.startswith(self.settings.bos))
        marker = next((a.content for a in self.settings.added if a.id == image_token_id), None)
        if marker is not None and any(isinstance(p, Image) and p.joined for p in parts):
            text = tuple(Text(marker, True) if isinstance(p, Image) else p for p in parts)
            return self.encode(text, add_special_tokens=not own_bos, fast=True)
        chunks: list[list] = [[]]
        before: list[Image | Break] = []  # what starts each chunk after the first
        for p in parts:
            if isinstance(p, (Image, Break)):
                chunks.append([])
                before.append(p)
            else:
                chunks[-1].append(p)
        encoded = [self.encode(tuple(c), add_special_tokens=not own_bos, fast=fast) for c in chunks]
        offset = 1 if not own_bos and encoded[0] and self.bos_id is not None and encoded[0][0] == self.bos_id else 0
        ids = encoded[0][:offset]
        for i, x in enumerate(encoded):
            if i and isinstance(before[i - 1], Image):
                ids.append(image_token_id)
            ids += x[offset:]
        return ids

    def _tokenize(self, parts: Parts, fast: bool = False) -> list[int]:
        """transformers' ``tokenize`` + ``convert_tokens_to_ids``: [(id, special content or None)]."""
        s = self.settings
        if not parts:
            return []
        legacy = s.legacy or s.kind != SENTENCEPIECE
        if not legacy:  # LlamaTokenizer.tokenize: one word start for the whole text, "▁" typed is a space
            parts = normalize((Text(SPIECE_UNDERLINE, True),
                               *(Text(p.text.replace(SPIECE_UNDERLINE, " "), p.fixed) for p in parts)))
        fragments = self._split(parts)
        out: list[tuple[int, str | None]] = []
        for f in fragments:
            if not f:
                continue
            if isinstance(f, AddedToken):
                out.append((f.id, f.content))
            else:
                out += [(i, None) for i in self._engine.encode(f, legacy)]
        if (not legacy and len(out) > 1 and out[0][0] == self._engine.underline_id
                and out[1][1] is not None and (fast or out[1][1] in s.special)):
            out = out[1:]
        return [i for i, _ in out]

    def _split(self, parts: Parts) -> list:
        """The text split at added tokens, looked for only in template text: strings and ``AddedToken``s, with
        their lstrip/rstrip applied to the neighbouring text."""
        items: list = [""]
        for p in parts:
            if not p.fixed or not self._added:
                items[-1] += p.text
                continue
            text, i, start = p.text, 0, 0
            while i < len(text):
                hit = next((t for t in self._by_length if text.startswith(t, i)), None)
                if hit is None:
                    i += 1
                    continue
                items[-1] += text[start:i]
                items += [self._added[hit], ""]
                i = start = i + len(hit)
            items[-1] += text[start:]
        for k, it in enumerate(items):
            if isinstance(it, AddedToken):
                if it.rstrip and k + 1 < len(items) and isinstance(items[k + 1], str):
                    items[k + 1] = items[k + 1].lstrip()
                if it.lstrip and k > 0 and isinstance(items[k - 1], str):
                    items[k - 1] = items[k - 1].rstrip()
        return items

    # -- decoding -------------------------------------------------------------------------------------
    def decode(self, ids: list[int]) -> str:
        """The text of generated ids, special tokens left out (``skip_special_tokens=True``)."""
        added = {a.id for a in self.settings.added}
        return self._engine.decode([i for i in ids if i not in added])


class _SentencePiece:
    def __init__(self, model: bytes, s: Settings):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(model)
        except RuntimeError:  # sentencepiece's parser says only "INTERNAL"
            raise UserError(f"the tokenizer file {s.file} is not a SentencePiece model (damaged?)") from None
        self.n = self.sp.get_piece_size()
        if s.legacy:
            self.word = self.sp
        else:
            # transformers' non-legacy LlamaTokenizer turns SentencePiece's own word start off. It does so by
            # merging ``normalizer_spec { add_dummy_prefix: false }`` into the model with protobuf; the same
            # merge is appending that field to the serialized model (protobuf: the last value of a field
            # wins, messages merge), which needs no protobuf package on the device.
            self.word = spm.SentencePieceProcessor()
            self.word.LoadFromSerializedProto(model + b"\x1a\x02\x18\x00")
        self.unk = s.unk or "<unk>"
        self.unk_length = len(self.word.encode(self.unk))
        self.underline_id = self.sp.piece_to_id(SPIECE_UNDERLINE)
        byte_piece = re.compile(r"<0x[0-9A-Fa-f]{2}>")
        self.byte_token_ids = frozenset(i for i in range(self.n) if self.sp.is_byte(i)
                                        or byte_piece.fullmatch(self.sp.id_to_piece(i)))

    def piece_id(self, piece: str) -> int | None:
        i = self.sp.piece_to_id(piece)
        return i if self.sp.id_to_piece(i) == piece else None

    def encode(self, text: str, legacy: bool) -> list[int]:
        if legacy:
            return self.sp.encode(text)
        if not text.startswith((SPIECE_UNDERLINE, " ")):
            return self.word.encode(text)
        # LlamaTokenizer._tokenize: without the word start SentencePiece drops a leading "▁", so the text is
        # encoded after "<unk>" and the pieces of "<unk>" are dropped
        ids = self.word.encode(self.unk + text)
        return ids[self.unk_length:] if len(ids) >= self.unk_length else ids

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode([i for i in ids if 0 <= i < self.n and not self.sp.is_control(i)])


class _TokenizersJson:
    def __init__(self, path: Path):
        from tokenizers import Tokenizer as Fast

        try:
            self.tok = Fast.from_file(str(path))
        except Exception as e:  # the tokenizers library raises its own exception types for a damaged file
            raise UserError(f"unreadable tokenizer file {path} ({str(e).splitlines()[0][:100]})") from None
        self.tok.encode_special_tokens = True  # user text with "</s>" in it stays text
        self.underline_id = None
        byte_piece = re.compile(r"<0x[0-9A-Fa-f]{2}>")
        self.byte_token_ids = frozenset(i for t, i in self.tok.get_vocab(with_added_tokens=False).items()
                                        if byte_piece.fullmatch(t))

    def piece_id(self, piece: str) -> int | None:
        return self.tok.token_to_id(piece)

    def encode(self, text: str, legacy: bool) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)
