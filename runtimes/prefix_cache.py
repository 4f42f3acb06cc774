"""KV caches of prompt beginnings, decoded once and loaded by every later process.

Two kinds of beginnings are saved, both as llama.cpp's serialized KV cells
(``llama_state_seq_get_data``), loaded into a new process's context with
``llama_state_seq_set_data``:

- **The fixed beginning**: BOS, the system prompt and ``USER:`` up to the image
  (33 positions with LLaVA-1.5's template), the same in every first question. A
  new process (``llava-edge chat --image ... "question"``) would decode them
  again: on a CPU about 5% of the time to the first token, 2 s for a 7B in f16.
  Saved the first time they are decoded (0.7 MB for TinyLLaVA, ~17 MB for a 7B).
- **Through an image**: the beginning plus the image's positions (576 for
  LLaVA-1.5), so a new process asked about a picture it saw before skips the
  vision graph and the image's prefill and decodes only the new question. Saved
  after the first answer about the picture (not before: writing the file must
  not delay the first token), only while the language model runs on the CPU,
  where reading the cells (0.5 MB a position for a 7B in f16, ~300 MB an image)
  is far faster than decoding them; with layers on a GPU the prefill beats the
  disk. Only the cells up to the image are written, never the question or the
  answer: they are copied out of llama.cpp when the image's last position is
  decoded (a copy: 2.5 ms for TinyLLaVA's 13.7 MB) and written after the answer.
  Files are readable by their owner only.

(A second llama.cpp sequence over a unified KV cache could serialize a beginning
of the cache later without the copy, but such a context prefilled 3-6% slower
here, measured with llama-cpp-python 0.3.36.)

Written by hand because llama-cpp-python's caches (``LlamaRAMCache``,
``LlamaDiskCache``) work on ``Llama`` objects and whole prompts, and this runtime
drives a bare llama.cpp context with image embeddings in the prompt. Not
llama.cpp's own state files (``llama_state_seq_save_file``): they carry no
checksum, and llama.cpp aborts the process on a truncated one (measured with
llama-cpp-python 0.3.36), so a file here is ``MAGIC``, the sha256 of the rest,
the positions it holds (token ids and image slots, as JSON) and the cells, and
only an intact file reaches llama.cpp.

A file's name hashes what makes it valid: the GGUF (its sha256 in the manifest,
and its size and modification time, in case it was replaced behind the
manifest's back), the llama.cpp build (llama-cpp-python's version), the KV cache
type, whether the language model is offloaded, the token ids, and for image
positions the image's pixels and the vision graph that embedded them (variant
sha256, backend, providers). A file that is damaged or that llama.cpp refuses is
decoded over and rewritten; a cache directory that cannot be written means only
that nothing is saved. The directory is kept under ``$LLAVA_EDGE_PREFIX_CACHE_MB``
(default ``DEFAULT_LIMIT_MB``) by deleting the files least recently used.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from llava_edge import atomic
from llava_edge.cache_dir import default_cache_dir
from llava_edge.errors import UserError

from .llm import ImageSlot, LlamaText, Slot

MIN_POSITIONS = 8  # a shorter beginning is not worth a file
SUBDIR = "prefix-kv"
MAGIC = b"llava-edge prefix KV 2\n"
LIMIT_ENV = "LLAVA_EDGE_PREFIX_CACHE_MB"
DEFAULT_LIMIT_MB = 4096  # a dozen 7B f16 images, or thousands of TinyLLaVA ones
MAX_LIMIT_MB = 1 << 30  # a petabyte: any larger "limit" is a typo
_HASH = 32  # sha256 bytes
_LEN = 4  # bytes of the length of the positions' JSON


def limit_bytes() -> int:
    """The cache directory's size limit, from ``$LLAVA_EDGE_PREFIX_CACHE_MB`` (0: save nothing)."""
    raw = os.environ.get(LIMIT_ENV, "").strip()
    if not raw:
        return DEFAULT_LIMIT_MB << 20
    try:
        mb = float(raw)
    except ValueError:
        mb = -1.0
    if not 0 <= mb <= MAX_LIMIT_MB:  # NaN and infinity included
        raise UserError(f"{LIMIT_ENV}={raw!r} is not a size in MB (a number from 0 to {MAX_LIMIT_MB}; "
                        "0 saves nothing)")
    return int(mb * (1 << 20))


def encode_slots(slots: list[Slot]) -> list:
    """JSON for ``slots``: token ids as they are, each run of one image's slots as ``["image", key, first, count]``."""
    out: list = []
    for s in slots:
        if isinstance(s, ImageSlot):
            key, j = s
            last = out[-1] if out else None
            if isinstance(last, list) and last[1] == key and last[2] + last[3] == j:
                last[3] += 1
            else:
                out.append(["image", key, j, 1])
        else:
            out.append(int(s))
    return out


def decode_slots(items: list) -> list[Slot]:
    slots: list[Slot] = []
    for it in items:
        if isinstance(it, list):
            _, key, first, count = it
            slots += [ImageSlot(key, j) for j in range(first, first + count)]
        else:
            slots.append(int(it))
    return slots


class PrefixCache:
    """Saved prompt beginnings for one language model (one GGUF, KV cache type and placement)."""

    def __init__(self, gguf: Path, model_sha256: str, kv_cache: str, offloaded: bool = False,
                 directory: Path | None = None, vision: dict | None = None, images: bool | None = None):
        import llama_cpp

        self.directory = Path(directory) if directory else default_cache_dir() / SUBDIR
        st = Path(gguf).stat()  # a file replaced behind the manifest's back gets new keys too
        self._identity = {"gguf_sha256": model_sha256, "gguf_size": st.st_size, "gguf_mtime_ns": st.st_mtime_ns,
                          "llama_cpp_python": llama_cpp.__version__, "kv_cache": kv_cache, "offloaded": offloaded}
        self._vision = vision
        # beginnings through an image: only where reading cells beats decoding them (see the module's text)
        self.images = (not offloaded if images is None else images) and vision is not None
        self.limit = limit_bytes()

    def with_settings(self, images: bool | None = None, directory: Path | None = None) -> "PrefixCache":
        """A copy saving images or not (``images``) in ``directory``; the same model identity and size limit."""
        other = copy.copy(self)
        if images is not None:
            other.images = images and self._vision is not None
        if directory is not None:
            other.directory = Path(directory)
        return other

    def path_for(self, slots: list[Slot]) -> Path:
        key = {**self._identity, "slots": encode_slots(slots)}
        if any(isinstance(s, ImageSlot) for s in slots):
            key["vision"] = self._vision
        text = json.dumps(key, sort_keys=True)
        return self.directory / f"{hashlib.sha256(text.encode()).hexdigest()[:32]}.kv"

    def restore(self, llm: LlamaText, slots: list[Slot], seq: int = 0) -> bool:
        """Replace what sequence ``seq`` of ``llm`` holds with the cells saved for ``slots``; False when there
        is no usable file.

        Only a file that is intact reaches llama.cpp, and a refused one leaves the cache empty.
        """
        if len(slots) < MIN_POSITIONS:
            return False
        path = self.path_for(slots)
        try:
            with open(path, "rb") as f:
                data = bytearray(os.fstat(f.fileno()).st_size)
                if f.readinto(data) != len(data):
                    return False
        except OSError:
            return False
        view = memoryview(data)
        body = view[len(MAGIC) + _HASH :]
        if bytes(view[: len(MAGIC)]) != MAGIC or bytes(view[len(MAGIC) : len(MAGIC) + _HASH]) != \
                hashlib.sha256(body).digest() or len(body) < _LEN:
            return False
        n = int.from_bytes(body[:_LEN], "little")
        try:
            saved = decode_slots(json.loads(bytes(body[_LEN : _LEN + n])))
        except (ValueError, TypeError):
            return False
        if saved != list(slots):
            return False
        if not llm.load_state_bytes(body[_LEN + n :], saved, seq):
            return False
        try:
            os.utime(path)  # recently used: the last to be deleted when the directory is over its limit
        except OSError:
            pass
        return True

    def save(self, llm: LlamaText, seq: int = 0) -> bool:
        """Save everything sequence ``seq`` of ``llm`` holds (never raises for the disk: a read-only or full
        disk means the next process decodes again)."""
        held = llm.seqs[seq]
        return self.wanted(held) and self.write(held, llm.state_bytes(seq))

    def wanted(self, slots: list[Slot]) -> bool:
        """Whether cells of ``slots`` are saved at all (those of an image only where ``images``)."""
        return len(slots) >= MIN_POSITIONS and self.limit > 0 and (
            self.images or not any(isinstance(s, ImageSlot) for s in slots))

    def write(self, slots: list[Slot], state: bytes | bytearray) -> bool:
        """Write the cells ``state`` (from ``LlamaText.state_bytes``) of the positions ``slots``."""
        if not self.wanted(slots):
            return False
        positions = json.dumps(encode_slots(slots), separators=(",", ":")).encode()
        head = len(positions).to_bytes(_LEN, "little") + positions
        size = len(MAGIC) + _HASH + len(head) + len(state)
        if size > self.limit:
            return False
        digest = hashlib.sha256(head)
        digest.update(state)
        path = self.path_for(slots)
        try:  # no fsync: a file cut short by a power loss fails its checksum and is decoded over
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            with atomic.atomic_path(path) as tmp:
                # the owner's only: the cells hold what the picture and the system prompt became
                with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
                    for part in (MAGIC, digest.digest(), head, state):
                        f.write(part)
        except OSError:
            return False
        self.prune(keep=path)
        return True

    def prune(self, keep: Path) -> None:
        """Delete the least recently used files until the directory is under the limit (``keep`` stays)."""
        files = []
        for p in self.directory.glob("*.kv"):
            try:
                st = p.stat()
            except OSError:  # deleted meanwhile by another process
                continue
            files.append((st.st_mtime_ns, st.st_size, p))
        total = sum(size for _, size, _ in files)
        for _, size, p in sorted(files):
            if total <= self.limit:
                break
            if p != keep:
                try:
                    p.unlink(missing_ok=True)
                except OSError:
                    continue
                total -= size


def fixed_beginning(slots: list[Slot]) -> list[int]:
    """The token ids before the prompt's first image slot; empty when there is no image."""
    for i, s in enumerate(slots):
        if isinstance(s, ImageSlot):
            return list(slots[:i])
    return []


def through_last_image(slots: list[Slot]) -> list[Slot]:
    """``slots`` up to and including the last image slot; empty when there is no image."""
    for i in range(len(slots) - 1, -1, -1):
        if isinstance(slots[i], ImageSlot):
            return list(slots[: i + 1])
    return []


@dataclass
class Reuse:
    """How a prompt starts on a sequence: the positions it keeps or loaded from saved cells (``kept``), and
    the beginnings to save as they get decoded (``head``: the fixed beginning; ``through``: through the
    image, copied when decoded and written by ``write_unsaved`` after the answer)."""

    kept: int
    head: list[Slot] = field(default_factory=list)
    through: list[Slot] = field(default_factory=list)
    loaded_image: bool = False  # the image's cells came from a file: no vision graph, no image prefill
    unsaved: tuple | None = None

    def decoded(self, cache: "PrefixCache | None", llm: LlamaText, seq: int = 0) -> None:
        """Call after each decode of the prompt: saves or copies a beginning when the sequence holds it."""
        held = llm.seqs[seq]
        if self.head and len(held) == len(self.head) and held == self.head:
            cache.save(llm, seq)
            self.head = []
        if self.through and len(held) == len(self.through) and held == self.through:
            self.unsaved = (self.through, llm.state_bytes(seq))
            self.through = []

    def write_unsaved(self, cache: "PrefixCache | None") -> None:
        """Write the cells through the image (after the answer: hashing and writing never delay a token)."""
        unsaved, self.unsaved = self.unsaved, None
        if unsaved and cache is not None:
            cache.write(*unsaved)


def reuse(cache: PrefixCache | None, llm: LlamaText, slots: list[Slot], seq: int = 0) -> Reuse:
    """Bring sequence ``seq`` to the longest beginning of ``slots`` it holds or a saved file has.

    What the sequence does not hold is looked for in the files earlier processes saved: the
    prompt through its image, else its fixed beginning before the image. At least the last
    position is left to decode, for its logits.
    """
    kept = llm.keep_prefix(slots, seq)
    r = Reuse(kept)
    if cache is not None:
        head = fixed_beginning(slots)
        through = through_last_image(slots) if cache.images else []
        if kept < len(through):
            if cache.restore(llm, through, seq):  # replaces what the sequence held
                r.loaded_image = True
            elif cache.wanted(through):
                r.through = through
            kept = llm.keep_prefix(slots, seq)
        if kept == 0 and head:
            if cache.restore(llm, head, seq):
                kept = llm.keep_prefix(slots, seq)
            else:
                r.head = head
    if kept == len(slots):  # all held: decode the last position again for its logits
        llm.keep_prefix(slots[:-1], seq)
        kept -= 1
    r.kept = kept
    return r
