"""Log-probabilities of an answer's tokens, for evaluation harnesses: OpenAI's ``logprobs`` / ``top_logprobs``
and Ollama's, which has the same entries.

Each entry is ``{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}``: the
log-softmax, in float64 over the whole vocabulary, of the float32 logits of the position that produced the
token, as the engine sampled from them (``Event.tokens``). That is the model's own distribution, before
temperature, ``top_p`` or ``ignore_eos`` change it, as OpenAI's logprobs (the same at any temperature) and
llama.cpp's server (without ``post_sampling_probs``) give them. A token's text is its piece of the vocabulary
(control tokens by name, such as ``</s>``); ``bytes`` are the piece's bytes, and where they are not whole
UTF-8 characters (a byte-fallback token) the text shows U+FFFD for them.

The work happens on the thread that answers HTTP, not the engine's, and only for requests that ask: about
0.5 ms a token for a vocabulary of 32,000, 2-3 ms for 150,000 (docs/SERVE.md).
"""

from __future__ import annotations

import ctypes

import numpy as np

from .conversation import ApiError, flag, number

MAX_TOP = 20  # OpenAI's bound, and Ollama's


def openai_request(body: dict) -> int | None:
    """``logprobs`` / ``top_logprobs`` of a chat completion: None when not asked, else how many alternatives
    each token lists. ``top_logprobs`` without ``logprobs: true`` is refused, as OpenAI documents it."""
    want = flag(body, "logprobs")
    top = number(body, "top_logprobs", "", 0, MAX_TOP, integer=True)
    if top is not None and not want:
        raise ApiError("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    return (top or 0) if want else None


def ollama_request(body: dict) -> int | None:
    """Ollama's top-level ``logprobs`` / ``top_logprobs`` (0 to 20; without ``logprobs`` it is ignored, as
    Ollama does)."""
    want = flag(body, "logprobs")
    top = number(body, "top_logprobs", "", 0, MAX_TOP, integer=True)
    return (top or 0) if want else None


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """float64 log-softmax of a position's logits over the whole vocabulary."""
    z = logits.astype(np.float64)
    top = z.max()
    return z - (top + np.log(np.exp(z - top).sum()))


def most_likely(lp: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` most likely token ids, most likely first; ties in id order (the first is the greedy token)."""
    n = len(lp)
    if k <= 0:
        return np.zeros(0, np.int64)
    if k < n:
        idx = np.flatnonzero(lp >= np.partition(lp, n - k)[n - k])  # every id tied at the k-th value too
    else:
        idx = np.arange(n)
    return idx[np.lexsort((idx, -lp[idx]))][:k]


class Pieces:
    """Each token's piece of the vocabulary, as llama.cpp renders it (looked up once a token)."""

    def __init__(self, llm):
        self.llm = llm
        self._known: dict[int, bytes] = {}
        self._buf = ctypes.create_string_buffer(256)

    def __call__(self, token: int) -> bytes:
        piece = self._known.get(token)
        if piece is None:
            import llama_cpp

            n = llama_cpp.llama_token_to_piece(self.llm.vocab, token, self._buf, len(self._buf), 0, True)
            if n < 0:  # longer than the buffer: llama.cpp says how long
                buf = ctypes.create_string_buffer(-n)
                n = llama_cpp.llama_token_to_piece(self.llm.vocab, token, buf, len(buf), 0, True)
                piece = buf.raw[:n]
            else:
                piece = self._buf.raw[:n]
            self._known[token] = piece
        return piece

    def entry(self, token: int, logprob: float) -> dict:
        piece = self(token)
        return {"token": piece.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(piece)}


def entries(tokens, top: int, pieces: Pieces) -> list[dict]:
    """The entries of ``tokens`` ((token, logits) each, from ``Event.tokens``) with ``top`` alternatives."""
    out = []
    for token, logits in tokens:
        lp = log_softmax(logits)
        e = pieces.entry(int(token), float(lp[token]))
        e["top_logprobs"] = [pieces.entry(int(t), float(lp[t])) for t in most_likely(lp, top)]
        out.append(e)
    return out


def ollama_entries(found: list[dict]) -> list[dict]:
    """Ollama's form of the entries: its ``bytes`` and ``top_logprobs`` are left out when empty."""
    out = []
    for e in found:
        o = {k: v for k, v in e.items() if v or k not in ("bytes", "top_logprobs")}
        if "top_logprobs" in o:
            o["top_logprobs"] = [{k: v for k, v in t.items() if v or k != "bytes"} for t in o["top_logprobs"]]
        out.append(o)
    return out
