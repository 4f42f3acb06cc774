"""Continuous batching: many conversations answered at once by one llama.cpp context (``llava-edge serve``).

One thread owns the model. Requests wait in a bounded queue; each one admitted gets
a sequence of the context (``LlamaText`` with ``n_seq`` sequences, each with its
own KV cells). Every step is one ``llama_decode`` that carries the next token of
each sequence that is answering together with prompt tokens of sequences that are
reading their prompt (continuous batching: a new prompt joins between steps, an
answer that ends frees its sequence at once), then at most one chunk of image
embeddings (llama.cpp takes a batch of tokens or of embeddings, not both).
Images of requests admitted together go through the vision graph as one batch.

A sequence keeps its KV cells after its answer. A new request goes to the free
sequence whose cells share the longest beginning with its prompt, so a client that
sends the conversation so far plus a new turn (the OpenAI and Ollama APIs are
stateless) decodes only the new turn, as ``chat`` does; what no sequence holds is
looked for in the KV caches saved on disk (``prefix_cache.py``), and the
beginnings decoded here are saved for later processes as ``chat`` saves them.

Written here, not taken from llama-cpp-python: its ``Llama`` class and server
decode one sequence per context and take no image embeddings.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from llava_edge.errors import UserError
from llava_edge.families import PreparedImage

from .answer import AnswerText, sample, seeded_rng
from .llm import ImageSlot, common_prefix
from .prefix_cache import Reuse, reuse


class QueueFull(UserError):
    """More requests wait than the queue holds."""


class Draining(UserError):
    """The engine is shutting down and takes no new requests."""


@dataclass
class Event:
    kind: str  # "text" (a piece of the answer), "done" or "error"
    text: str = ""
    # for a request with ``logits``: the answer's tokens whose text this piece gives out, each with the logits
    # (float32, the whole vocabulary) of the position that produced it; a token whose text is held back comes
    # with the piece that shows it, and one whose text is all in a stop string (cut off the answer) never comes
    tokens: tuple[tuple[int, np.ndarray], ...] = ()


@dataclass
class Request:
    """One answer to compute: the prompt's positions, its image and how to sample."""

    slots: list  # token ids and ImageSlots, as ``EdgeLLaVA.slots_for`` makes them
    # the prompt's pictures in its order, read and preprocessed (``EdgeLLaVA.prepare_image``)
    pictures: list[PreparedImage]
    temperature: float
    top_p: float
    max_tokens: int
    seed: int | None
    stops: tuple[str, ...]
    on_event: Callable[[Event], None]  # called on the engine's thread
    timeout_s: float | None = None
    ignore_eos: bool = False  # answer until max_tokens or the context's end (benchmarks; llama.cpp's option)
    logits: bool = False  # hand each answer token's logits with its text (``Event.tokens``: serve's logprobs)
    # what happened, filled in by the engine
    cancelled: bool = False
    finish_reason: str | None = None  # "eos", "stop", "max_tokens", "context", "cancelled", "timeout", "error"
    reused_positions: int = 0  # positions not decoded: held by the sequence or loaded from a saved file
    image_from_file: bool = False
    completion_ids: list[int] = field(default_factory=list)
    t_submit: float = 0.0
    t_admit: float = 0.0
    t_first_token: float | None = None
    t_done: float | None = None

    @property
    def prompt_positions(self) -> int:
        return len(self.slots)

    @property
    def image_positions(self) -> int:
        return sum(isinstance(s, ImageSlot) for s in self.slots)


@dataclass
class _Running:
    req: Request
    seq: int
    reuse: Reuse
    cursor: int  # next prompt position to decode
    answer: AnswerText
    rng: np.random.Generator
    next_token: int | None = None  # sampled, to be decoded in the next step
    deadline: float | None = None
    held: list = field(default_factory=list)  # (token, logits) whose text is not shown yet (req.logits)

    def reading(self) -> bool:
        return self.cursor < len(self.req.slots)


class BatchEngine:
    """Answers requests on ``model`` (an ``EdgeLLaVA`` loaded with ``parallel`` sequences) on its own thread."""

    def __init__(self, model, queue_limit: int = 64):
        self.model = model
        self.llm = model.llm
        self.queue_limit = queue_limit
        self._cv = threading.Condition()
        self._waiting: collections.deque[Request] = collections.deque()
        self._running: dict[int, _Running] = {}
        self._last_used = [0.0] * self.llm.n_seq
        self._embeddings: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
        self._keep_images = max(4, 2 * self.llm.n_seq)
        self._draining = False
        self._stopped = False
        self._eog: np.ndarray | None = None
        self.stats = collections.Counter()  # decode_steps, vision_batches, vision_images, ...
        self._thread = threading.Thread(target=self._loop, name="llava-edge-batch", daemon=True)
        self._thread.start()

    # -- the requests' side ------------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def active(self) -> int:
        return len(self._running)

    def submit(self, req: Request) -> None:
        if len(req.slots) >= self.llm.n_ctx:
            raise UserError(f"the prompt needs {len(req.slots)} positions but a conversation's context holds "
                            f"{self.llm.n_ctx} (with room for the answer)")
        with self._cv:
            if self._draining:
                raise Draining("the server is shutting down")
            free = self.llm.n_seq - len(self._running)
            if len(self._waiting) >= self.queue_limit + free:  # a free sequence takes a request at once
                raise QueueFull(f"all {self.llm.n_seq} sequences are busy and {len(self._waiting)} requests wait "
                                f"(the queue holds {self.queue_limit})")
            req.t_submit = time.monotonic()
            self._waiting.append(req)
            self._cv.notify()

    def cancel(self, req: Request) -> None:
        """Stop ``req`` (its client went away): its sequence is freed at the next step."""
        with self._cv:
            req.cancelled = True
            self._cv.notify()

    def drain(self, timeout: float | None = None) -> bool:
        """Take no new requests; wait until the admitted and waiting ones are answered. True if all were."""
        with self._cv:
            self._draining = True
            self._cv.notify()
            end = None if timeout is None else time.monotonic() + timeout
            while self._waiting or self._running:
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cv.wait(left)
        return True

    def close(self) -> None:
        with self._cv:
            self._draining = self._stopped = True
            self._cv.notify()
        self._thread.join()

    # -- the engine's thread -----------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stopped and not self._waiting and not self._running:
                    self._cv.wait()
                if self._stopped:
                    for r in list(self._running.values()):
                        self._finish(r, "cancelled")
                    for req in self._waiting:
                        self._end(req, "cancelled")
                    self._waiting.clear()
                    self._cv.notify_all()
                    return
                admitted = self._pop_admissible()
            for req, seq in admitted:
                try:
                    self._admit(req, seq)
                except Exception as e:  # noqa: BLE001 - this request fails, the others go on
                    del self._running[seq]
                    self.llm.reset(seq)
                    self._end(req, "error", _message(e))
            try:
                self._step()
            except Exception as e:  # noqa: BLE001 - a failed decode must not stop the server: every running
                self._fail_all(e)  # request gets the error, the context is emptied, the next ones start clean
            with self._cv:
                self._cv.notify_all()  # drain() waits on this

    def _pop_admissible(self) -> list[tuple[Request, int]]:
        """Waiting requests that get a free sequence now: each the one sharing most of its prompt."""
        now = time.monotonic()
        for req in [r for r in self._waiting if r.cancelled or (r.timeout_s is not None
                                                                and now > r.t_submit + r.timeout_s)]:
            self._waiting.remove(req)  # gone or too late before a sequence was free
            self._end(req, "cancelled" if req.cancelled else "timeout")
        free = [s for s in range(self.llm.n_seq) if s not in self._running]
        out = []
        while self._waiting and free:
            req = self._waiting.popleft()
            if req.cancelled:
                self._end(req, "cancelled")
                continue
            seq = max(free, key=lambda s: (common_prefix(self.llm.seqs[s], req.slots), -self._last_used[s]))
            free.remove(seq)
            self._running[seq] = None  # taken; filled in by _admit
            out.append((req, seq))
        return out

    def _admit(self, req: Request, seq: int) -> None:
        m = self.model
        req.t_admit = time.monotonic()
        r = reuse(m.prefix_cache, self.llm, req.slots, seq)
        req.reused_positions = r.kept
        req.image_from_file = r.loaded_image
        deadline = None if req.timeout_s is None else req.t_submit + req.timeout_s
        self._running[seq] = _Running(req, seq, r, r.kept, AnswerText(m.tokenizer, req.stops),
                                      seeded_rng(req.seed), deadline=deadline)

    def _step(self) -> None:
        now = time.monotonic()
        for r in list(self._running.values()):
            if r.req.cancelled:
                self._finish(r, "cancelled")
            elif r.deadline is not None and now > r.deadline:
                self._finish(r, "timeout")
        if not self._running:
            return
        self._encode_images()
        self.stats["decode_steps"] += 1
        # tokens: the next one of each answering sequence, then prompt tokens within the batch size
        work, who = [], []
        budget = self.llm.n_batch
        for r in self._running.values():
            if r.next_token is not None:
                work.append((r.seq, [r.next_token]))
                who.append(r)
                budget -= 1
        image_turn = None
        for r in sorted(self._running.values(), key=lambda r: r.req.t_admit):
            if not r.reading():
                continue
            slots = r.req.slots
            if isinstance(slots[r.cursor], ImageSlot):
                image_turn = image_turn or r
                continue
            if budget <= 0:
                continue
            end = r.cursor
            while end < len(slots) and end - r.cursor < budget and not isinstance(slots[end], ImageSlot):
                end += 1
            work.append((r.seq, list(slots[r.cursor:end])))
            who.append(r)
            budget -= end - r.cursor
        if work:
            logits = self.llm.decode_tokens(work)
            for r, (_, ids), lg in zip(who, work, logits):
                if r.reading():
                    r.cursor += len(ids)
                    r.reuse.decoded(self.model.prefix_cache, self.llm, r.seq)
                    if not r.reading():
                        self._next_token(r, lg)
                else:
                    self._next_token(r, lg)
        if image_turn is not None and image_turn.seq in self._running:
            self._feed_image(image_turn)

    def _feed_image(self, r: _Running) -> None:
        slots = r.req.slots
        start = end = r.cursor
        key = slots[start].key
        while end < len(slots) and end - start < self.llm.n_batch and isinstance(slots[end], ImageSlot) \
                and slots[end].key == key:
            end += 1
        first, last = slots[start].index, slots[end - 1].index
        emb = self._embeddings[key][first : last + 1]
        done = end == len(slots)
        lg = self.llm.feed_embeddings(emb, key, "last" if done else "none", seq=r.seq, first=first)
        r.cursor = end
        r.reuse.decoded(self.model.prefix_cache, self.llm, r.seq)
        if done:
            self._next_token(r, lg)

    def _encode_images(self) -> None:
        """One vision batch (every tile of every picture) for the images that running prompts still have to
        decode."""
        todo = {}
        for r in self._running.values():
            if not r.reading() or not r.req.pictures:
                continue
            ahead = {s.key for s in r.req.slots[r.cursor:] if isinstance(s, ImageSlot)}
            for img in r.req.pictures:
                if img.key in ahead and img.key not in self._embeddings:
                    todo[img.key] = img
        if todo:
            emb = self.model.encode(list(todo.values()))
            self.stats["vision_batches"] += 1
            self.stats["vision_images"] += len(todo)
            for key, e in zip(todo, emb):
                self._embeddings[key] = e
        for r in self._running.values():  # the images of running prompts are the last to be dropped
            for img in r.req.pictures:
                if img.key in self._embeddings:
                    self._embeddings.move_to_end(img.key)
        while len(self._embeddings) > self._keep_images:
            self._embeddings.popitem(last=False)

    def _next_token(self, r: _Running, logits: np.ndarray) -> None:
        """Sample after ``logits``: the token is shown and decoded next step, or the answer ends."""
        req = r.req
        try:
            tok = sample(logits, req.temperature, req.top_p, r.rng,
                         banned=self._end_of_generation() if req.ignore_eos else None)
        except UserError as e:
            self._finish(r, "error", str(e))
            return
        if req.t_first_token is None:
            req.t_first_token = time.monotonic()
        r.next_token = None
        if tok == self.model.eos_id or self.llm.is_eog(tok):
            self._finish(r, "eos")
            return
        piece = r.answer.add(tok)
        if req.logits:  # the array is this step's own copy: handing it on costs nothing here
            r.held.append((tok, logits))
        if r.answer.stopped:
            self._finish(r, "stop")
            return
        shown = ()
        if piece and r.held:
            shown, r.held = tuple(r.held), []
        # one event per token, its text empty while held back (a multi-byte character or a stop string
        # being completed): a streaming client sees each token come, as from llama.cpp's servers
        _emit(req, Event("text", piece, shown))
        if len(r.answer.ids) >= req.max_tokens:
            self._finish(r, "max_tokens")
        elif len(self.llm.seqs[r.seq]) >= self.llm.n_ctx:
            self._finish(r, "context")
        else:
            r.next_token = tok

    def _end_of_generation(self) -> np.ndarray:
        """The ids that end an answer (EOS and the vocabulary's other end-of-generation tokens)."""
        if self._eog is None:
            self._eog = np.array(sorted({self.model.eos_id} | {t for t in range(self.llm.n_vocab)
                                                                if self.llm.is_eog(t)}), dtype=np.int64)
        return self._eog

    def _finish(self, r: _Running, reason: str, message: str = "") -> None:
        req = r.req
        if reason in ("eos", "stop", "max_tokens", "context"):
            rest = r.answer.finish()
            shown = tuple(self._in_answer(r) if reason == "stop" else r.held)
            if rest or shown:
                _emit(req, Event("text", rest, shown))
            r.reuse.write_unsaved(self.model.prefix_cache)
        elif reason == "error":
            self.llm.reset(r.seq)
        req.completion_ids = r.answer.ids
        del self._running[r.seq]
        self._last_used[r.seq] = time.monotonic()
        self._end(req, reason, message)

    def _in_answer(self, r: _Running) -> list:
        """The held tokens with text in the answer after a stop string cut it (the stop string's own are not)."""
        ids, first = r.answer.ids, len(r.answer.ids) - len(r.held)
        decode = self.model.tokenizer.decode
        return [h for j, h in enumerate(r.held) if len(decode(ids[: first + j])) < len(r.answer.text)]

    def _end(self, req: Request, reason: str, message: str = "") -> None:
        req.finish_reason = reason
        req.t_done = time.monotonic()
        self.stats[f"finished_{reason}"] += 1
        _emit(req, Event("error", message) if reason == "error" else Event("done"))

    def _fail_all(self, e: Exception) -> None:
        for r in list(self._running.values()):
            self._finish(r, "error", _message(e))
        self.llm.reset()


def _emit(req: Request, event: Event) -> None:
    """Hand ``event`` to the request's listener; one that fails (its client is gone) cancels the request."""
    try:
        req.on_event(event)
    except Exception:  # noqa: BLE001 - a listener's failure must not stop the engine
        req.cancelled = True


def _message(e: Exception) -> str:
    return str(e) if isinstance(e, UserError) else f"the model failed: {type(e).__name__}: {e}"
