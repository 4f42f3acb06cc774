"""From sampled token ids to an answer's text, as it streams: one rule for ``chat`` and for ``serve``.

Text is held back while it can still change: an unfinished multi-byte character
(U+FFFD at the end), trailing byte-fallback pieces (which the next byte may turn
into other characters) or the beginning of a stop string. What is given out is
then always a prefix of the final answer, so the pieces add up to it, and a stop
string never shows.
"""

from __future__ import annotations

import numpy as np

from llava_edge.errors import UserError


def sample(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator,
           banned: np.ndarray | None = None) -> int:
    """The next token: greedy at temperature 0, else nucleus sampling (``top_p``) at ``temperature``; never one
    of ``banned`` (ids)."""
    if not np.isfinite(logits).all():
        raise UserError("the language model gave non-finite logits (NaN or infinity): its weights or the "
                        "image embeddings are broken; check the bundle with `llava-edge info --verify`")
    if banned is not None and len(banned):
        logits = logits.copy()
        logits[banned] = -np.inf
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p)
        keep = order[: int(np.searchsorted(np.cumsum(p[order]), top_p)) + 1]
        q = np.zeros_like(p)
        q[keep] = p[keep]
        p = q / q.sum()
    return int(rng.choice(len(p), p=p))


def seeded_rng(seed: int | None) -> np.random.Generator:
    """A generator for ``seed`` (None or -1: a random one, as llama.cpp's -1)."""
    return np.random.default_rng(None if seed in (None, -1) else seed)


class AnswerText:
    """The text of one answer, token by token (``add``), with what is safe to show so far."""

    def __init__(self, tokenizer, stops: tuple[str, ...]):
        self._tok = tokenizer
        self.stops = tuple(x for x in stops if x)
        self.ids: list[int] = []
        self.text = ""
        self.shown = ""
        self.stopped = False  # a stop string ended the answer (it is cut off ``text``)

    def add(self, token: int) -> str:
        """Take one generated token; returns the text that can be shown now ('' while it may change)."""
        self.ids.append(token)
        if token in self._tok.byte_token_ids:
            return ""
        self.text = self._tok.decode(self.ids)
        cut = stop_at(self.text, self.stops)
        if cut is not None:
            self.text = self.text[:cut]
            self.stopped = True
            return ""
        ready = self.text[: len(self.text) - held_for_stops(self.text, self.stops)]
        if not ready.endswith("\ufffd") and ready.startswith(self.shown) and len(ready) > len(self.shown):
            piece, self.shown = ready[len(self.shown):], ready
            return piece
        return ""

    def finish(self) -> str:
        """The rest of the answer, once no more tokens come."""
        if not self.stopped:
            self.text = self._tok.decode(self.ids)
        if len(self.text) > len(self.shown) and self.text.startswith(self.shown):
            piece, self.shown = self.text[len(self.shown):], self.text
            return piece
        return ""


def stop_at(text: str, stops: tuple[str, ...]) -> int | None:
    """Where the first stop string begins in ``text``, if one is there."""
    found = [i for i in (text.find(x) for x in stops) if i >= 0]
    return min(found) if found else None


def held_for_stops(text: str, stops: tuple[str, ...]) -> int:
    """How many characters at the end of ``text`` may be the start of a stop string (not shown yet)."""
    held = 0
    for x in stops:
        for n in range(min(len(x) - 1, len(text)), held, -1):
            if text.endswith(x[:n]):
                held = n
                break
    return held
