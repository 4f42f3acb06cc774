"""The KV cache of the prompt's fixed beginning, decoded once and loaded by every later process.

Every first question about an image starts with the same positions: BOS, the
system prompt and ``USER:`` up to the image (33 positions with LLaVA-1.5's
template). A running process keeps them in its KV cache from one conversation to
the next (``LlamaText.keep_prefix``); a new process (``llava-edge chat --image
... "question"``) would decode them again: on a CPU about 5% of the time to the
first token, 2 s for a 7B model in f16. So the first time they are decoded their
KV cells are saved (llama.cpp's ``llama_state_seq_get_data``) and later processes
load them into their empty context (``llama_state_seq_set_data``).

Written by hand because llama-cpp-python's caches (``LlamaRAMCache``,
``LlamaDiskCache``) work on ``Llama`` objects and whole prompts, and this runtime
drives a bare llama.cpp context with image embeddings in the prompt. Not
llama.cpp's own state files (``llama_state_seq_save_file``): they carry no
checksum, and llama.cpp aborts the process on a truncated one (measured with
llama-cpp-python 0.3.36), so a file here is ``MAGIC``, the sha256 of the rest,
the token ids and the cells, and only an intact file reaches llama.cpp.

A file's name hashes what makes it valid: the GGUF (its sha256 in the manifest,
and its size and modification time, in case it was replaced behind the
manifest's back), the llama.cpp build (llama-cpp-python's version), the KV cache
type, whether the language model is offloaded, and the token ids. A file that is
damaged or that llama.cpp refuses is decoded over and rewritten; a cache
directory that cannot be written means only that nothing is saved.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from llava_edge import atomic
from llava_edge.cache_dir import default_cache_dir

from .llm import LlamaText

MIN_POSITIONS = 8  # a shorter beginning is not worth a file
SUBDIR = "prefix-kv"
MAGIC = b"llava-edge prefix KV 1\n"
_HASH = 32  # sha256 bytes


class PrefixCache:
    """Saved beginnings of prompts for one language model (one GGUF, KV cache type and placement)."""

    def __init__(self, gguf: Path, model_sha256: str, kv_cache: str, offloaded: bool = False,
                 directory: Path | None = None):
        import llama_cpp

        self.directory = Path(directory) if directory else default_cache_dir() / SUBDIR
        st = Path(gguf).stat()  # a file replaced behind the manifest's back gets new keys too
        self._identity = {"gguf_sha256": model_sha256, "gguf_size": st.st_size, "gguf_mtime_ns": st.st_mtime_ns,
                          "llama_cpp_python": llama_cpp.__version__, "kv_cache": kv_cache, "offloaded": offloaded}

    def path_for(self, ids: list[int]) -> Path:
        key = json.dumps({**self._identity, "tokens": [int(t) for t in ids]}, sort_keys=True)
        return self.directory / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.kv"

    def restore(self, llm: LlamaText, ids: list[int]) -> bool:
        """Load the saved ``ids`` into ``llm``'s (emptied) context; False when there is no usable file."""
        if len(ids) < MIN_POSITIONS:
            return False
        try:
            data = self.path_for(ids).read_bytes()
        except OSError:
            return False
        head, body = data[: len(MAGIC) + _HASH], data[len(MAGIC) + _HASH :]
        if head != MAGIC + hashlib.sha256(body).digest() or len(body) < 4:
            return False
        n = int.from_bytes(body[:4], "little")
        if len(body) < 4 + 4 * n or np.frombuffer(body, "<i4", n, 4).tolist() != [int(t) for t in ids]:
            return False
        return llm.load_state_bytes(body[4 + 4 * n :], ids)

    def save(self, llm: LlamaText) -> bool:
        """Save what ``llm`` holds (token positions only), unless it is short; never raises for the disk."""
        ids = llm.slots
        if len(ids) < MIN_POSITIONS or not all(isinstance(t, int) for t in ids):
            return False
        body = len(ids).to_bytes(4, "little") + np.asarray(ids, dtype="<i4").tobytes() + llm.state_bytes()
        try:
            atomic.write_bytes(self.path_for(ids), MAGIC + hashlib.sha256(body).digest() + body)
        except OSError:  # a read-only or full disk: the next process decodes the beginning again
            return False
        return True


def fixed_beginning(slots: list) -> list[int]:
    """The token ids before the prompt's first image slot; empty when there is no image."""
    for i, s in enumerate(slots):
        if isinstance(s, tuple):
            return list(slots[:i])
    return []
