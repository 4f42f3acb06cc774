"""The language model in llama.cpp, fed token ids and image embeddings directly.

llama-cpp-python's high-level ``Llama`` class takes only tokens, and its
multimodal path needs llama.cpp's own CLIP (an mmproj). Here image embeddings
from the bundle's vision graph go straight into the context through a
``llama_batch`` that carries embeddings instead of token ids, so the image is
encoded by ONNX Runtime / TensorRT and the text by llama.cpp.

The context keeps a list of what each position holds (a token id, or one slot
of an image identified by its hash), so a follow-up turn only decodes what
differs from what is already in the KV cache.

A context may hold several sequences (``n_seq``; ``llava-edge serve --parallel``):
each has its own positions and its own part of the KV cache (llama.cpp's
per-sequence streams, ``n_ctx`` cells each), and one ``llama_decode`` can carry
tokens of all of them (``decode_tokens``). Sequence 0 is what ``chat`` uses.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Union

import numpy as np

from llava_edge.errors import UserError


def _silence_llama_logs() -> None:
    import llama_cpp

    @llama_cpp.llama_log_callback
    def _quiet(level, text, user_data):  # noqa: ARG001 - llama.cpp's signature
        return None

    _silence_llama_logs.callback = _quiet  # keep a reference: llama.cpp holds the pointer
    llama_cpp.llama_log_set(_quiet, ctypes.c_void_p(0))


class captured_llama_log:
    """Collect llama.cpp's log lines for the duration of a block, then restore the previous logger.

    llama.cpp reports some things only through its log callback: the quantizer's per-tensor fallbacks and
    write errors, the buffer types the loader put the weights in.
    """

    def __enter__(self) -> list[str]:
        import llama_cpp

        self._c = llama_cpp
        self.lines: list[str] = []
        self._prev_cb = llama_cpp.llama_log_callback()
        self._prev_data = ctypes.c_void_p()
        llama_cpp.llama_log_get(ctypes.byref(self._prev_cb), ctypes.byref(self._prev_data))

        @llama_cpp.llama_log_callback
        def collect(level, text, user_data):  # noqa: ARG001 - llama.cpp's signature
            self.lines.append(text.decode("utf-8", "replace") if text else "")

        self._cb = collect  # keep a reference while llama.cpp holds the pointer
        llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
        return self.lines

    def __exit__(self, *exc) -> None:
        self._c.llama_log_set(self._prev_cb, self._prev_data)


KV_CACHE_TYPES = ("f16", "f32")


def check_kv_cache(kv_cache: str) -> None:
    """A one-line error for a KV cache type llava-edge does not run."""
    if kv_cache not in KV_CACHE_TYPES:
        raise UserError(f"unknown KV cache type {kv_cache!r} ({' or '.join(KV_CACHE_TYPES)})")


@dataclass
class LlamaOptions:
    n_ctx: int = 2048
    n_batch: int = 512  # tokens per llama_decode call (and the size of the batches allocated here)
    n_ubatch: int = 0  # tokens per compute graph; 0: n_batch
    n_threads: int = 0  # 0: all CPUs this process may use
    n_gpu_layers: int = 0  # -1: all (llama.h: "a negative value means all layers")
    kv_cache: str = "f16"  # llama.cpp's default; "f32" for exact parity with an f32 reference
    n_seq: int = 1  # sequences decoded side by side, each with a context of n_ctx
    verbose: bool = False
    extra_buffers: bool | None = None  # llama.cpp's use_extra_bufts; None: devices.extra_buffers decides


class ImageSlot(NamedTuple):
    """A KV position holding an image's embedding row: which image (its pixels' hash) and which row."""

    key: str
    index: int


Slot = Union[int, ImageSlot]  # what one KV position holds: a token id or an image row


def common_prefix(a: list, b: list) -> int:
    """How many leading positions ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class LlamaText:
    def __init__(self, gguf_path: str | Path, options: LlamaOptions | None = None):
        import llama_cpp

        self._c = llama_cpp
        o = options or LlamaOptions()
        if not o.verbose:
            _silence_llama_logs()
        llama_cpp.llama_backend_init()
        mp = llama_cpp.llama_model_default_params()
        mp.n_gpu_layers = o.n_gpu_layers
        if o.extra_buffers is None:
            from .devices import extra_buffers, llama_cpu_features, llama_system_info

            mp.use_extra_bufts = extra_buffers(llama_cpu_features(llama_system_info()))[0]
        else:
            mp.use_extra_bufts = o.extra_buffers
        self.model = llama_cpp.llama_model_load_from_file(str(gguf_path).encode(), mp)
        if not self.model:
            raise UserError(f"llama.cpp could not load {gguf_path}")
        threads = o.n_threads or max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
        cp = llama_cpp.llama_context_default_params()
        if not 1 <= o.n_seq <= 256:
            raise UserError(f"the number of parallel sequences must be from 1 to 256, not {o.n_seq}")
        cp.n_ctx = o.n_ctx * o.n_seq
        cp.n_seq_max = o.n_seq
        # one KV stream per sequence: a sequence attends over its own cells only, not everyone's
        cp.kv_unified = False
        cp.n_batch = o.n_batch
        cp.n_ubatch = min(o.n_ubatch or o.n_batch, o.n_batch)
        cp.n_threads = threads
        cp.n_threads_batch = threads
        check_kv_cache(o.kv_cache)
        kv = llama_cpp.GGML_TYPE_F32 if o.kv_cache == "f32" else llama_cpp.GGML_TYPE_F16
        cp.type_k = cp.type_v = kv
        if o.kv_cache == "f32":  # llama.cpp's CPU flash attention rounds Q to f16
            cp.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.ctx = llama_cpp.llama_init_from_model(self.model, cp)
        if not self.ctx:
            llama_cpp.llama_model_free(self.model)
            raise UserError(f"llama.cpp could not create a context of {o.n_ctx} tokens")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.n_embd = llama_cpp.llama_model_n_embd(self.model)
        # llama.cpp pads its KV cache (to a multiple of 256 in this version); the context the runtime
        # enforces is the one asked for, so --ctx N means N tokens
        self.n_ctx = min(o.n_ctx, llama_cpp.llama_n_ctx_seq(self.ctx))  # per sequence
        self.n_seq = o.n_seq
        self.n_batch = o.n_batch
        self._tok_batch = llama_cpp.llama_batch_init(o.n_batch, 0, 1)
        self._emb_batch = llama_cpp.llama_batch_init(o.n_batch, self.n_embd, 1)
        self.seqs: list[list[Slot]] = [[] for _ in range(o.n_seq)]  # what each sequence holds, by position

    @property
    def slots(self) -> list[Slot]:
        """What sequence 0 holds."""
        return self.seqs[0]

    @slots.setter
    def slots(self, value: list[Slot]) -> None:
        self.seqs[0] = value

    # -- the KV cache -------------------------------------------------------
    def keep_prefix(self, slots: list[Slot], seq: int = 0) -> int:
        """Drop the positions of sequence ``seq`` that differ from ``slots``; returns how many are kept."""
        held = self.seqs[seq]
        n = common_prefix(held, slots)
        if n < len(held):
            mem = self._c.llama_get_memory(self.ctx)
            if not self._c.llama_memory_seq_rm(mem, seq, n, -1):
                self._c.llama_memory_seq_rm(mem, seq, -1, -1)
                n = 0
            self.seqs[seq] = held[:n]
        return n

    def reset(self, seq: int | None = None) -> None:
        """Forget sequence ``seq`` (None: all of them)."""
        mem = self._c.llama_get_memory(self.ctx)
        if seq is None:
            self._c.llama_memory_clear(mem, True)
            self.seqs = [[] for _ in range(self.n_seq)]
        else:
            self._c.llama_memory_seq_rm(mem, seq, -1, -1)
            self.seqs[seq] = []

    # -- decoding -----------------------------------------------------------
    def _fill(self, batch, i: int, pos: int, logits: bool, seq: int = 0) -> None:
        batch.pos[i] = pos
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = seq
        batch.logits[i] = logits

    def _decode(self, batch, n: int) -> None:
        batch.n_tokens = n
        rc = self._c.llama_decode(self.ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed ({rc})")

    def feed_tokens(self, ids: list[int], logits: str = "last", seq: int = 0) -> np.ndarray | None:
        """Decode ``ids`` after what sequence ``seq`` holds; ``logits`` is 'last', 'all' or 'none'."""
        out = []
        held = self.seqs[seq]
        for start in range(0, len(ids), self.n_batch):
            chunk = ids[start : start + self.n_batch]
            self._check_room(len(chunk), seq)
            last_chunk = start + self.n_batch >= len(ids)
            for i, t in enumerate(chunk):
                self._tok_batch.token[i] = t
                want = logits == "all" or (logits == "last" and last_chunk and i == len(chunk) - 1)
                self._fill(self._tok_batch, i, len(held) + i, want, seq)
            self._decode(self._tok_batch, len(chunk))
            if logits == "all":
                out += [self._logits(i) for i in range(len(chunk))]
            held += chunk
        if logits == "all":
            return np.stack(out) if out else np.zeros((0, self.n_vocab), np.float32)
        if logits == "last" and ids:
            return self._logits(-1)
        return None

    def decode_tokens(self, work: list[tuple[int, list[int]]]) -> list[np.ndarray]:
        """Decode, in as few ``llama_decode`` calls as ``n_batch`` allows, token ids of several sequences
        (``work``: (sequence, ids) each): the logits after each entry's last id, in order.

        This is the continuous batching step of ``serve``: one token of each sequence that is
        answering and the prompts of those that are reading, side by side.
        """
        for seq, ids in work:
            self._check_room(len(ids), seq)
        flat = [(k, seq, t) for k, (seq, ids) in enumerate(work) for t in ids]
        last = {k: len(ids) for k, (_, ids) in enumerate(work)}
        seen = [0] * len(work)
        out: list = [None] * len(work)
        for start in range(0, len(flat), self.n_batch):
            chunk = flat[start : start + self.n_batch]
            wanted = []
            for i, (k, seq, t) in enumerate(chunk):
                seen[k] += 1
                self._tok_batch.token[i] = t
                want = seen[k] == last[k]
                self._fill(self._tok_batch, i, len(self.seqs[seq]), want, seq)
                self.seqs[seq].append(t)
                if want:
                    wanted.append((k, i))
            self._decode(self._tok_batch, len(chunk))
            for k, i in wanted:
                out[k] = self._logits(i)
        return out

    def feed_embeddings(self, emb: np.ndarray, key: str, logits: str = "none", seq: int = 0,
                        first: int = 0) -> np.ndarray | None:
        """Decode image embeddings (n, n_embd) after what sequence ``seq`` holds, tagged ``key`` for reuse
        (``first``: the image row the first of them is, when an image is decoded in parts)."""
        emb = np.ascontiguousarray(emb, dtype=np.float32)
        if emb.ndim != 2 or emb.shape[1] != self.n_embd:
            raise UserError(f"image embeddings of shape {emb.shape} do not fit a model of width {self.n_embd}")
        out = []
        held = self.seqs[seq]
        for start in range(0, len(emb), self.n_batch):
            chunk = emb[start : start + self.n_batch]
            self._check_room(len(chunk), seq)
            ctypes.memmove(self._emb_batch.embd, chunk.ctypes.data, chunk.nbytes)
            last_chunk = start + self.n_batch >= len(emb)
            for i in range(len(chunk)):
                want = logits == "all" or (logits == "last" and last_chunk and i == len(chunk) - 1)
                self._fill(self._emb_batch, i, len(held) + i, want, seq)
            self._decode(self._emb_batch, len(chunk))
            if logits == "all":
                out += [self._logits(i) for i in range(len(chunk))]
            held += [ImageSlot(key, first + start + i) for i in range(len(chunk))]
        if logits == "all":
            return np.stack(out)
        return self._logits(-1) if logits == "last" else None

    def _check_room(self, n: int, seq: int = 0) -> None:
        if len(self.seqs[seq]) + n > self.n_ctx:
            raise UserError(
                f"the conversation needs more than the context's {self.n_ctx} tokens "
                f"({len(self.seqs[seq]) + n} so far); start a new one or raise --ctx"
            )

    def _logits(self, i: int) -> np.ndarray:
        ptr = self._c.llama_get_logits_ith(self.ctx, i)
        if not ptr:
            raise RuntimeError(f"llama.cpp has no logits for batch index {i}")
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    # -- the KV cache as bytes (a saved prompt beginning: prefix_cache.py) ------
    def state_bytes(self, seq: int = 0) -> bytearray:
        """llama.cpp's serialized KV cells of everything sequence ``seq`` holds (``llama_state_seq_get_data``)."""
        size = self._c.llama_state_seq_get_size(self.ctx, seq)
        data = bytearray(size)  # filled in place: hundreds of MB for a 7B through an image
        n = self._c.llama_state_seq_get_data(self.ctx, (ctypes.c_uint8 * size).from_buffer(data), size, seq)
        if n == 0:
            raise RuntimeError("llama.cpp could not serialize its KV cache")
        del data[n:]
        return data

    def load_state_bytes(self, state: bytes | bytearray | memoryview, slots: list[Slot], seq: int = 0) -> bool:
        """Replace what sequence ``seq`` holds with ``state`` (cells of the positions ``slots``, from
        :meth:`state_bytes`).

        False, with the sequence left empty, when llama.cpp refuses it. llama.cpp trusts the bytes'
        structure (a truncated state can abort the process), so callers check their integrity first.
        """
        self.reset(seq)
        if not state:
            return False
        try:  # a writable buffer (a bytearray read from a file) is passed as it is: no copy of 300 MB
            buf = (ctypes.c_uint8 * len(state)).from_buffer(state)
        except TypeError:
            buf = (ctypes.c_uint8 * len(state)).from_buffer_copy(state)
        if not self._c.llama_state_seq_set_data(self.ctx, buf, len(state), seq):
            self.reset(seq)
            return False
        self.seqs[seq] = list(slots)
        return True

    # -- llama.cpp's own tokenizer (for checking the GGUF's vocabulary) ------
    def tokenize(self, text: str, add_special: bool = False, parse_special: bool = False) -> list[int]:
        data = text.encode("utf-8")
        cap = len(data) + 8
        buf = (self._c.llama_token * cap)()
        n = self._c.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:
            raise RuntimeError("llama_tokenize buffer too small")
        return list(buf[:n])

    def is_eog(self, token: int) -> bool:
        return bool(self._c.llama_vocab_is_eog(self.vocab, token))

    def close(self) -> None:
        if getattr(self, "ctx", None):
            self._c.llama_batch_free(self._tok_batch)
            self._c.llama_batch_free(self._emb_batch)
            self._c.llama_free(self.ctx)
            self._c.llama_model_free(self.model)
            self.ctx = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
