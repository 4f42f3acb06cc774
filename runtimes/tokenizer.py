"""The checkpoint's tokenizer at run time, without torch or transformers.

The runtime tokenizes exactly as the model was trained: with the bundled
``tokenizer.json`` (the same file transformers' fast tokenizer is built from),
not with llama.cpp's re-implementation, which differs from the non-legacy
Hugging Face Llama tokenizer on leading spaces and on text after special tokens.
Ids are then passed to llama.cpp.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from llava_edge.errors import UserError


class TextTokenizer:
    def __init__(self, tokenizer_json: str | Path):
        from tokenizers import Tokenizer

        path = Path(tokenizer_json)
        if not path.is_file():
            raise UserError(f"tokenizer file not found: {path}")
        self._tok = Tokenizer.from_file(str(path))
        self._spec = json.loads(path.read_text())
        # SentencePiece byte-fallback pieces "<0xE6>": consecutive ones decode together, so text ending in
        # them can still change (a valid "r" becomes U+FFFD when an invalid byte follows it)
        byte_piece = re.compile(r"<0x[0-9A-Fa-f]{2}>")
        self.byte_token_ids = frozenset(i for t, i in self._tok.get_vocab(with_added_tokens=False).items()
                                        if byte_piece.fullmatch(t))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    @property
    def adds_bos(self) -> bool:
        """Whether encoding prepends a special token (BOS), read from the post-processor."""
        post = self._spec.get("post_processor") or {}
        single = post.get("single", [])
        return bool(single) and "SpecialToken" in single[0]
