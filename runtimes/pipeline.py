"""``EdgeLLaVA``: load a bundle, look at an image, answer. The CLI is a thin layer over it.

    from llava_edge import EdgeLLaVA
    m = EdgeLLaVA.load("bundle")
    print(m.chat("photo.png", "What is in the image?"))

The image goes through the bundle's vision graph (onnxruntime, or a TensorRT
engine); the prompt is rendered with the bundle's conversation mode and
tokenized as LLaVA's own code does (``llava_edge.templates`` and
``llava_edge.tokenizer``, the modules training uses); the language model runs in
llama.cpp with the image embeddings injected where the image stands.

``device`` names a profile (``auto``, ``cpu``, ``laptop-gpu``, ``jetson``; see
``devices.py``) that picks providers, GPU offload, threads, batch sizes and
the variants; ``m.explain()`` says what was chosen and why.

Context policy: a conversation that no longer fits the context is refused
before anything is decoded (:class:`ContextOverflowError`, a one-line
``UserError``), or, with ``on_overflow="drop-oldest"``, its oldest exchanges
are forgotten until it fits (the image stays at the start, so its KV cache is
kept). An answer that fills the context stops there; ``last_stop`` says so.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from llava_edge import families
from llava_edge import manifest as bundle_manifest
from llava_edge.errors import UserError
from llava_edge.families import PreparedImage
from llava_edge.preprocess import ImageInput, ImageSpec
from llava_edge.templates import Image, Parts, Template, Turn, expand_images, get_template
from llava_edge.tokenizer import Settings, Tokenizer
from llava_edge.video import Video, read_frames

from .answer import AnswerText, seeded_rng
from .answer import sample as sample_token
from .devices import Hardware, RuntimePlan, plan_runtime
from .llm import ImageSlot, LlamaOptions, LlamaText, check_kv_cache
from .prefix_cache import PrefixCache, Reuse, reuse
from .vision import VisionEncoder

BUNDLE_ENV = "LLAVA_EDGE_BUNDLE"
OVERFLOW_POLICIES = ("error", "drop-oldest")


class ContextOverflowError(UserError):
    """The conversation does not fit the context (and the policy is not to drop turns, or no turn is left)."""


def default_bundle_file() -> Path:
    base = Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config"))
    return base / "llava-edge" / "default_bundle"


def resolve_bundle(bundle: str | Path | None) -> Path:
    """``bundle``, else ``$LLAVA_EDGE_BUNDLE``, else the registered default bundle."""
    if bundle:
        return Path(bundle)
    if os.environ.get(BUNDLE_ENV):
        return Path(os.environ[BUNDLE_ENV])
    f = default_bundle_file()
    if f.is_file():
        return Path(f.read_text().strip())
    raise UserError(f"no bundle given: pass --bundle, set ${BUNDLE_ENV}, or run `make demo` to register one")


@dataclass
class Sampling:
    temperature: float = 0.0  # 0: greedy, deterministic
    top_p: float = 1.0
    max_tokens: int = 256
    seed: int | None = None  # None or -1: a random seed (as llama.cpp's -1)
    stop: tuple[str, ...] = ()  # text that ends the answer (left out of it), besides the template's own

    def __post_init__(self) -> None:
        """Every value checked: a one-line error for what would otherwise fail deep in numpy or llama.cpp."""
        t, p, n, seed = self.temperature, self.top_p, self.max_tokens, self.seed
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or not 0 <= t <= 100:
            raise UserError(f"temperature must be a number from 0 (greedy) to 100, not {t!r}")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or not 0 < p <= 1:
            raise UserError(f"top_p must be a number above 0 and at most 1, not {p!r}")
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 1_000_000:
            raise UserError(f"max_tokens must be a whole number from 1 to 1000000, not {n!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not -1 <= seed < 2**63):
            raise UserError(f"seed must be -1 (random) or a whole number from 0 to 2**63-1, not {seed!r}")
        if isinstance(self.stop, str) or not all(isinstance(x, str) for x in self.stop):
            raise UserError("stop must be a list of strings")
        self.stop = tuple(self.stop)


IMAGES_KEPT = 8  # pictures whose embeddings a model keeps in memory (a conversation may have several)
# a prompt's picture embeddings: an array or a function giving it (one picture), or either by picture key
Embeds = np.ndarray | Callable[[], np.ndarray] | Mapping[str, np.ndarray | Callable[[], np.ndarray]] | None


def only_image(pictures: list) -> bool:
    """Whether a conversation's pictures hold one image: videos do not count (transformers' OneVision tiles a
    picture that is the only image beside videos)."""
    return sum(not isinstance(p, Video) for p in pictures) == 1


def _manifest_int(section: dict, key: str, name: str) -> int:
    try:
        return int(section[key])
    except (KeyError, TypeError, ValueError):
        hint = "`llava-edge export --target gguf`" if name == "llm" else "`llava-edge export --target onnx`"
        raise UserError(f"the bundle's manifest lacks a valid {name}.{key} (was that half exported? {hint})") from None


def sample(logits: np.ndarray, s: Sampling, rng: np.random.Generator) -> int:
    return sample_token(logits, s.temperature, s.top_p, rng)


class EdgeLLaVA:
    """One loaded bundle: vision encoder + llama.cpp context + tokenizer, chosen by a device profile."""

    def __init__(self, bundle: Path, vision_variant: str | None = None, llm_variant: str | None = None,
                 n_ctx: int | None = None, threads: int = 0, n_gpu_layers: int | None = None,
                 vision_providers: list | None = None, kv_cache: str = "f16", device: str = "auto",
                 n_batch: int | None = None, on_overflow: str = "error", hardware: Hardware | None = None,
                 prefix_cache: bool = True, cache_images: bool | None = None, conv_mode: str | None = None,
                 verify: bool = True, parallel: int = 1, image_tokens: int | None = None,
                 token_method: str | None = None, max_tiles: int | None = None):
        if on_overflow not in OVERFLOW_POLICIES:
            raise UserError(f"unknown context policy {on_overflow!r}; choose one of: {', '.join(OVERFLOW_POLICIES)}")
        check_kv_cache(kv_cache)
        self.bundle = Path(bundle)
        self.manifest = m = bundle_manifest.read(self.bundle)
        self.plan: RuntimePlan = plan_runtime(
            m, device, vision_variant=vision_variant, llm_variant=llm_variant, hardware=hardware, threads=threads,
            n_gpu_layers=n_gpu_layers, n_ctx=n_ctx, n_batch=n_batch, vision_providers=vision_providers,
            kv_cache=kv_cache, image_tokens=image_tokens, token_method=token_method,
        )
        self.vision_variant = self.plan.vision
        self.llm_variant = self.plan.llm
        self.on_overflow = on_overflow
        settings = Settings.from_dict(m.tokenizer)
        loaded = [self.vision_variant.file, self.llm_variant.file, settings.file]
        arrays = [a["file"] for a in m.arrays.values()]
        bundle_manifest.check_files(self.bundle, m, loaded + arrays)
        if verify:
            self._verify(loaded + arrays)
        self.family = families.by_name(m.family)
        self.spec = ImageSpec.from_dict(m.image)
        self.conv_mode = conv_mode or m.conv_mode
        self.template = get_template(self.conv_mode, m.chat_template, settings.special_tokens_map())
        self.tokenizer = Tokenizer(self.bundle, settings)
        self.image_token_id = _manifest_int(m.llm, "image_token_id", "llm")
        self.eos_id = _manifest_int(m.llm, "eos_id", "llm")
        vision_file = bundle_manifest.bundle_file(self.bundle, self.vision_variant.file)
        if self.plan.vision_backend == "tensorrt":
            from .tensorrt_vision import TensorRTVisionEncoder

            self.vision = TensorRTVisionEncoder(vision_file, self.vision_variant.extra)
        else:
            self.vision = VisionEncoder(vision_file, self.plan.providers, self.plan.threads)
        p = self.plan
        opts = LlamaOptions(n_ctx=p.n_ctx, n_batch=p.n_batch, n_ubatch=p.n_ubatch, n_threads=p.threads,
                            n_gpu_layers=p.n_gpu_layers, kv_cache=kv_cache, n_seq=parallel,
                            extra_buffers=p.extra_buffers)
        llm_file = bundle_manifest.bundle_file(self.bundle, self.llm_variant.file)
        self.llm = LlamaText(llm_file, opts)
        vision_identity = {"sha256": self.vision_variant.sha256, "backend": p.vision_backend,
                           "providers": list(getattr(self.vision, "providers", None) or [])}
        self.prefix_cache = (PrefixCache(llm_file, self.llm_variant.sha256, kv_cache,
                                         offloaded=p.n_gpu_layers != 0, vision=vision_identity, images=cache_images)
                             if prefix_cache else None)
        # the last prompt's saved-cache bookkeeping; cells through its image are written after the answer
        self._reuse: Reuse | None = None
        _manifest_int(m.vision, "num_image_tokens", "vision")
        self.n_image_tokens = m.image_tokens(self.vision_variant)  # per tile; fewer for a reduced-token variant
        # the family's way from a picture to positions: one tile, or LLaVA-NeXT's tiles, unpad and newlines
        self.images = self.family.image_path(m.image, m.vision, self.n_image_tokens, {
            name: families.read_array(bundle_manifest.bundle_file(self.bundle, a["file"], "array file"), name)
            for name, a in m.arrays.items()}, max_tiles=max_tiles, cap=self.plan.position_cap)
        self._image_cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self.stats = {"vision_encodes": 0, "prefill_tokens": 0, "image_prefix_loads": 0}
        self.last_stop: str | None = None  # "eos", "max_tokens" or "context" (the context filled up)
        self.last_ids: list[int] = []  # token ids of the last answer

    def _verify(self, files: list[str]) -> None:
        """Each file against the manifest's sha256 (``integrity.py``: hashed once per file version)."""
        from llava_edge import integrity

        recorded = {v.file: v.sha256 for v in self.manifest.variants}
        recorded.update(self.manifest.tokenizer.get("sha256") or {})
        recorded.update({a["file"]: a["sha256"] for a in self.manifest.arrays.values()})
        for name in files:
            if name not in recorded:
                raise UserError(f"the manifest of {self.bundle} records no sha256 for {name}: export the bundle again "
                                "(or load it with verify=False / chat --no-verify)")
            integrity.verify(bundle_manifest.bundle_file(self.bundle, name), recorded[name], name)

    @contextlib.contextmanager
    def using_prefix_cache(self, cache: PrefixCache | None) -> Iterator[None]:
        """Run with ``cache`` as the saved-KV-cache store (None: none), the model's own one afterwards."""
        own, self.prefix_cache = self.prefix_cache, cache
        try:
            yield
        finally:
            self.prefix_cache = own

    @classmethod
    def load(cls, bundle: str | Path | None = None, device: str = "auto", **kw) -> "EdgeLLaVA":
        """Load ``bundle`` (else ``$LLAVA_EDGE_BUNDLE``, else the default) for the device profile ``device``.

        Keywords: ``vision_variant``, ``llm_variant`` (names as ``quantize`` gives
        them), ``n_ctx``, ``threads``, ``n_gpu_layers``, ``n_batch``,
        ``vision_providers`` (override the profile), ``kv_cache`` (``f16`` or
        ``f32``), ``on_overflow`` (``error`` or ``drop-oldest``), ``prefix_cache``
        (False: never save or load KV caches of prompt beginnings, see ``prefix_cache.py``),
        ``cache_images`` (whether those include images; default: where the language model runs
        on the CPU), ``conv_mode`` (prompt with another of LLaVA's conversation modes than the
        bundle's), ``verify`` (False: do not check the loaded files against the manifest's sha256;
        see ``llava_edge/integrity.py``), ``parallel`` (sequences in the llama.cpp context, each with
        ``n_ctx`` positions: ``serve`` answers that many requests at once; ``chat`` uses the first),
        ``image_tokens`` / ``token_method`` (a reduced-token vision variant giving that many image
        positions, see ``llava_edge/image_tokens.py``; never chosen unless asked for; for a tiled family,
        ``image_tokens`` caps each picture's positions instead, see ``llava_edge/anyres.py``), ``max_tiles`` (a tiled
        family's bound on a picture's grid tiles, tighter than the bundle's; a picture needing more is refused).
        """
        return cls(resolve_bundle(bundle), device=device, **kw)

    def explain(self) -> str:
        """What was chosen for this load and why (``llava-edge chat --explain``)."""
        running = getattr(self.vision, "providers", None) if self.plan.vision_backend == "onnxruntime" else None
        c = self.prefix_cache
        if c is None:
            saved = "off (prefix_cache=False)"
        elif c.images:
            saved = (f"the prompt's beginning and each image's positions, in {c.directory} - the language model "
                     "runs on the CPU, where loading cells is faster than decoding them")
        else:
            why = "cache_images=False" if self.plan.n_gpu_layers == 0 else "offloaded layers prefill faster than a file loads"
            saved = f"the prompt's beginning, in {c.directory}; images not saved - {why}"
        mode = f"{self.conv_mode}" + (" (the bundle's)" if self.conv_mode == self.manifest.conv_mode
                                      else f" (chosen; the bundle's is {self.manifest.conv_mode})")
        tok = self.tokenizer.settings
        tokenizer = (f"{tok.kind} ({'legacy' if tok.legacy else 'non-legacy'} word starts, "
                     f"BOS {'added' if tok.add_bos else 'not added'})")
        most = self.family.max_positions(self.manifest.image, self.n_image_tokens, self.plan.position_cap)
        family = self.family.title + (f" (tiled: at most {most} positions a picture)" if self.family.tiled else "")
        return (self.plan.explain(running) + f"\nmodel family: {family}"
                + f"\nimage tokens: {self._explain_tokens()}\nconversation mode: {mode}"
                + f"\ntokenizer: {tokenizer}\nsaved KV caches: {saved}")

    def _explain_tokens(self) -> str:
        """How many positions an image takes, and for a reduced-token variant what drift measured it costs."""
        v, m = self.vision_variant, self.manifest
        r = v.token_reduction
        cap = self.plan.position_cap
        if cap is not None:
            return (f"{self.n_image_tokens} per tile, at most {cap} a picture (--image-tokens): a picture that would "
                    "take more has its base tile and grid scaled bilinearly by one factor until it fits; drift "
                    f"measures what that costs: llava-edge drift {self.bundle} --reference MODEL --image-tokens {cap}")
        if r is None:
            return f"{self.n_image_tokens}{' per tile' if self.family.tiled else ''} (every patch of the feature layer)"
        how = (f"{r.grid}x{r.grid} patches averaged to {r.pool[0]}x{r.pool[1]}" if r.method == "pool" else
               f"{r.dominant} patches the class token attends to most + {r.contextual} merged from the rest")
        how += ", projector tuned for it" if "projector" in v.extra else ", training-free"
        records = m.drift_records(v)
        if not records:
            return (f"{r.tokens} of {r.full} ({how}); accuracy cost not measured: llava-edge drift {self.bundle} "
                    f"--reference MODEL --variants {v.name}:{self.llm_variant.name} --record")
        other, rec = (self.llm_variant.name, records[self.llm_variant.name]) if self.llm_variant.name in records \
            else next(iter(records.items()))

        def pct(x):
            return "?" if not isinstance(x, (int, float)) else f"{100 * x:.1f}%"

        drop = rec.get("accuracy_drop_points")
        cost = (f"accuracy {rec.get('accuracy', 0) * 100:.1f}% ({0.0 - drop:+.1f} points against the full reference)"
                if isinstance(drop, (int, float)) else "no gold answers")
        return (f"{r.tokens} of {r.full} ({how}); measured with {other} on {rec.get('questions')} questions "
                f"({rec.get('eval')}, {rec.get('date')}): {cost}, answers as the reference's "
                f"{pct(rec.get('answer_agreement'))}, mean KL {rec.get('kl_mean', float('nan')):.3g}")

    # -- image ---------------------------------------------------------------
    def image_embeddings(self, image: ImageInput) -> tuple[str, np.ndarray]:
        """(key, embeddings (image positions, hidden)) for ``image``; cached by pixel content."""
        prepared, embeddings = self.lazy_image(image)
        return prepared.key, embeddings()

    def prepare_image(self, image: ImageInput, formats: tuple[str, ...] | None = None,
                      alone: bool = True) -> PreparedImage:
        """The picture read and preprocessed as the bundle's family does (its tiles, key and positions);
        ``alone``: the only picture of its conversation (LLaVA-OneVision takes one of several otherwise). A
        :class:`~llava_edge.video.Video` gives its sampled frames, prepared as the family takes a video."""
        if isinstance(image, Video):
            if not self.images.video:
                raise UserError(f"{self.family.title} checkpoints take no video: LLaVA-OneVision does")
            return self.images.prepare_video(read_frames(image), image.name)
        return self.images.prepare(image, formats=formats, alone=alone)

    def encode(self, prepared: list[PreparedImage]) -> list[np.ndarray]:
        """Each picture's positions' embeddings: all their tiles through the vision graph as one batch, then
        packed as the family packs them."""
        feats = self.vision.encode(np.concatenate([p.pixels for p in prepared]))
        out, at = [], 0
        for p in prepared:
            out.append(self.images.pack(feats[at : at + p.tiles], p))
            at += p.tiles
        self.stats["vision_encodes"] += len(prepared)
        return out

    def lazy_image(self, image: ImageInput, alone: bool = True) -> tuple[PreparedImage, Callable[[], np.ndarray]]:
        """(the prepared picture, a function that gives its embeddings): the vision graph runs only if the
        prompt's image positions must be decoded (not when a saved KV cache holds them)."""
        prepared = self.prepare_image(image, alone=alone)
        key = prepared.key

        def embeddings() -> np.ndarray:
            if key in self._image_cache:
                self._image_cache.move_to_end(key)
            else:
                while len(self._image_cache) >= IMAGES_KEPT:
                    self._image_cache.popitem(last=False)
                self._image_cache[key] = self.encode([prepared])[0]
            return self._image_cache[key]
        return prepared, embeddings

    # -- prompt ----------------------------------------------------------------
    def slots_for(self, parts: Parts, image_key: str | None, n_image: int) -> list:
        """Token ids of a rendered prompt, as LLaVA's ``tokenizer_image_token`` makes them, with the image's
        token replaced by its ``n_image`` slots (a text-only prompt, ``image_key`` None, has no image)."""
        return self.picture_slots(parts, [] if image_key is None else [(image_key, n_image)])

    def picture_slots(self, parts: Parts, pictures: list[tuple[str, int]]) -> list:
        """:meth:`slots_for` with any number of pictures: ``pictures`` (key, positions) in the prompt's order."""
        images = sum(isinstance(p, Image) for p in parts)
        if images and not pictures:
            raise UserError("the prompt has a place for an image but no image was given")
        if images != len(pictures):
            raise UserError(f"the prompt has {images} place(s) for pictures and {len(pictures)} picture(s) were "
                            "given")
        ids = self.tokenizer.encode_prompt(parts, self.image_token_id, **self.template.encoding)
        if not pictures:
            return ids
        return expand_images(ids, self.image_token_id, [[ImageSlot(k, j) for j in range(n)] for k, n in pictures])

    def conversation_slots(self, question: str, image: ImageInput | list | None = None,
                           history: list[Turn] | None = None, system: str | None = None,
                           formats: tuple[str, ...] | None = None) -> tuple[list, list[PreparedImage], Template]:
        """A conversation's generation prompt: (slots, its prepared pictures in order, template).

        ``image``: the conversation's picture, or a list of its pictures in order: ``history``'s turns hold as
        many as their ``image`` says, the question the rest.
        ``system`` replaces the conversation mode's system prompt (text with the tokenizer's control
        tokens, or a ``chat_template`` mode, is refused); ``formats``: the image file formats accepted.
        The images are read and preprocessed here, the vision graph is not run.
        """
        template = self.template
        if system is not None:
            if template.jinja is not None:
                raise UserError("this model's conversation mode (chat_template) takes no system message")
            special = [t for t in self.tokenizer.settings.special if t and t in system]
            if special:
                raise UserError(f"the system message contains the control token {special[0]!r}")
            template = dataclasses.replace(template, system=system)
        pictures = [] if image is None else list(image) if isinstance(image, list) else [image]
        self.check_pictures(len(pictures))
        prepared = [self.prepare_image(p, formats=formats, alone=only_image(pictures)) for p in pictures]
        history = list(history or [])
        new = max(0, len(prepared) - sum(int(t.image) for t in history))  # fewer: picture_slots says so
        videos = sum(isinstance(p, Video) for p in pictures[len(pictures) - new:]) if new else 0
        parts = template.prompt(question, image=new, history=history, videos=videos)
        slots = self.picture_slots(parts, [(p.key, p.positions) for p in prepared])
        return slots, prepared, template

    def check_pictures(self, n: int) -> None:
        """A one-line error for a conversation of ``n`` pictures where the model was trained with one."""
        if n > 1 and not self.images.several:
            raise UserError(f"{self.family.title} checkpoints like this one were trained with one picture a "
                            f"conversation; this one would have {n}: start a new conversation for another picture")

    def prefill(self, slots: list, embeds: Embeds, logits: str = "last") -> np.ndarray | None:
        """Bring the KV cache to ``slots``, decoding only what is not cached yet.

        ``embeds``: the image's embeddings, or a function giving them (called only if image
        positions must be decoded); for several pictures, either of those by picture key. What the context does not hold is first looked for in the
        KV caches earlier processes saved (``PrefixCache``): the prompt through its image, else
        its fixed beginning before the image; a beginning decoded here is saved (the one through
        the image after the answer, by ``generate``). Not for ``logits="all"``, which must compute
        every position.
        """
        cache = self.prefix_cache if logits != "all" else None
        r = reuse(cache, self.llm, slots)
        if r.loaded_image:
            self.stats["image_prefix_loads"] += 1
        todo = slots[r.kept:]
        self.stats["prefill_tokens"] += len(todo)
        out = []
        for i, j in runs(todo):
            if isinstance(todo[i], ImageSlot):
                rows = embeds.get(todo[i].key) if isinstance(embeds, Mapping) else embeds
                rows = rows() if callable(rows) else rows
                first, last = todo[i].index, todo[j - 1].index
                out.append(self.llm.feed_embeddings(rows[first : last + 1], todo[i].key,
                                                    logits if logits == "all" else "last", first=first))
            else:
                out.append(self.llm.feed_tokens(todo[i:j], logits if logits == "all" else "last"))
            r.decoded(cache, self.llm)
        if self._reuse is not None and self._reuse.unsaved and r.unsaved is None:
            r.unsaved = self._reuse.unsaved  # cells copied by an earlier prefill, not written yet: still due
        self._reuse = r
        if logits == "all":
            return np.concatenate([o if o.ndim == 2 else o[None] for o in out])
        return out[-1]

    def prompt_logits(self, image: ImageInput | None, parts: Parts) -> np.ndarray:
        """Logits at every position after the cached prefix, for a rendered prompt (tests, drift)."""
        key, emb = self.image_embeddings(image) if image is not None else (None, None)
        slots = self.slots_for(parts, key, 0 if emb is None else len(emb))
        self.llm.reset()
        return self.prefill(slots, emb, logits="all")

    # -- generation --------------------------------------------------------------
    def generate(self, slots: list, embeds: Embeds, sampling: Sampling) -> Iterator[str]:
        """Stream the answer to ``slots``; stops at EOS, a stop string (``sampling.stop`` and the conversation
        mode's), ``max_tokens`` or a full context (see ``last_stop``: "eos", "stop", "max_tokens", "context")."""
        logits = self.prefill(slots, embeds)
        rng = seeded_rng(sampling.seed)
        answer = AnswerText(self.tokenizer, (*sampling.stop, *self.template.stop))
        self.last_ids = answer.ids
        self.last_stop = "max_tokens"
        for _ in range(sampling.max_tokens):
            tok = sample(logits, sampling, rng)
            if tok == self.eos_id or self.llm.is_eog(tok):
                self.last_stop = "eos"
                break
            piece = answer.add(tok)
            if answer.stopped:
                self.last_stop = "stop"
                break
            if piece:
                yield piece
            if len(answer.ids) == sampling.max_tokens:
                break
            if len(self.llm.slots) >= self.llm.n_ctx:  # no room to decode this token: the answer ends here
                self.last_stop = "context"
                break
            logits = self.llm.feed_tokens([tok])
        rest = answer.finish()
        if rest:
            yield rest
        # after the answer, so that hashing and writing the file never delay a token
        done, self._reuse = self._reuse, None
        if done is not None:
            done.write_unsaved(self.prefix_cache)

    def session(self, image: ImageInput | list | None = None, on_overflow: str | None = None) -> "ChatSession":
        """A conversation about ``image``: a picture, a list of pictures (a model trained with several), or
        None; a follow-up may bring more (``ChatSession.ask(prompt, images=[...])``)."""
        policy = on_overflow or self.on_overflow
        if policy not in OVERFLOW_POLICIES:
            raise UserError(f"unknown context policy {policy!r}; choose one of: {', '.join(OVERFLOW_POLICIES)}")
        return ChatSession(self, image, on_overflow=policy)

    def chat(self, image: ImageInput | list | None, prompt: str, **sampling) -> str:
        return self.session(image).ask(prompt, **sampling)

    def stream(self, image: ImageInput | list | None, prompt: str, **sampling) -> Iterator[str]:
        return self.session(image).stream(prompt, **sampling)

    def close(self) -> None:
        self.llm.close()
        if hasattr(self.vision, "close"):
            self.vision.close()


def runs(slots: list) -> Iterator[tuple[int, int]]:
    """(start, end) of each run of token ids and of one picture's slots in ``slots``."""
    i = 0
    while i < len(slots):
        image = isinstance(slots[i], ImageSlot)
        j = i + 1
        while j < len(slots) and isinstance(slots[j], ImageSlot) == image and (
                not image or slots[j].key == slots[i].key):
            j += 1
        yield i, j
        i = j


def check_text(text: object, what: str) -> None:
    """``text`` is a string that can be encoded as UTF-8 (a command line with invalid bytes gives lone surrogates)."""
    if not isinstance(text, str):
        raise UserError(f"{what} must be text, not {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UserError(f"{what} is not valid UTF-8 text (byte {e.start}): check the terminal's encoding") from None


def drop_oldest_exchange(history: list[Turn]) -> list[Turn] | None:
    """``history`` without its first (user, assistant) exchange; its pictures move to the new first user turn.
    None where they cannot keep their order there (a turn renders its images before its videos).

    Keeping the pictures at the start keeps the system prompt and the pictures at the
    same positions, so their KV cache entries survive the drop.
    """
    first, rest = history[0], list(history[2:])
    if rest and first.image:
        if first.videos and int(rest[0].image) > rest[0].videos:
            return None
        rest[0] = Turn(rest[0].role, rest[0].text, image=int(first.image) + int(rest[0].image),
                       videos=first.videos + rest[0].videos)
    return rest


@dataclass
class ChatSession:
    """A multi-turn conversation about its pictures; follow-ups reuse the KV cache, and may bring new pictures
    where the model was trained with several."""

    model: EdgeLLaVA
    image: ImageInput | list | None = None  # the conversation's first picture (or pictures)
    history: list[Turn] = field(default_factory=list)
    on_overflow: str = "error"  # or "drop-oldest"
    dropped_turns: int = 0  # exchanges forgotten to fit the last question (drop-oldest)
    last_stop: str | None = None  # why the last answer ended: "eos", "max_tokens" or "context"
    pictures: list = field(default_factory=list)  # every picture of the conversation, in the prompt's order
    pending: list = field(default_factory=list)  # pictures added for the next question (add_image)
    _embedded: dict = field(default_factory=dict)  # (index, alone) -> (prepared picture, embeddings function)

    def __post_init__(self) -> None:
        self.set_image(self.image)

    def set_image(self, image: ImageInput | list | None) -> None:
        """Start a new conversation about ``image`` (a picture, a list of them, or None)."""
        self.image = image
        self.pictures = [] if image is None else list(image) if isinstance(image, (list, tuple)) else [image]
        self.history, self._embedded, self.pending = [], {}, []

    def add_image(self, image: ImageInput) -> None:
        """A picture for the next question: added to the conversation where the model was trained with several,
        else the start of a new conversation about it."""
        if self.model.images.several:
            self.pending.append(image)
        else:
            self.set_image(image)

    def reset(self) -> None:
        """Forget the exchanges; the conversation's pictures open the next question again."""
        self.history = []

    def _unplaced(self) -> int:
        """How many of the pictures no earlier turn holds: they open the next question."""
        return len(self.pictures) - sum(int(t.image) for t in self.history)

    def _prepared(self) -> list[tuple[PreparedImage, Callable[[], np.ndarray]]]:
        """Each picture prepared (decoded and preprocessed once; encoded when needed). A family that takes a picture
        among several otherwise than alone (LLaVA-OneVision) prepares them again when the count changes."""
        m = self.model
        m.check_pictures(len(self.pictures))
        alone = only_image(self.pictures)
        out = []
        for i, pic in enumerate(self.pictures):
            if (i, alone) not in self._embedded:
                self._embedded[i, alone] = m.lazy_image(pic, alone=alone)
            out.append(self._embedded[i, alone])
        return out

    def _fit(self, prompt: str, prepared: list[PreparedImage], max_tokens: int) -> list:
        """The slots of the next prompt, dropping old exchanges or refusing as the policy says."""
        m, n_ctx = self.model, self.model.llm.n_ctx
        # drop-oldest also keeps room for the answer (up to a quarter of the context)
        reserve = min(max_tokens, n_ctx // 4) if self.on_overflow == "drop-oldest" else 1
        self.dropped_turns = 0
        pictures = [(p.key, p.positions) for p in prepared]
        n_image = sum(n for _, n in pictures)
        videos = sum(isinstance(p, Video) for p in self.pictures[len(self.pictures) - self._unplaced():])
        while True:
            parts = m.template.prompt(prompt, image=self._unplaced(), history=self.history, videos=videos)
            slots = m.picture_slots(parts, pictures)
            if len(slots) + reserve <= n_ctx or (self.on_overflow == "drop-oldest" and not self.history
                                                 and len(slots) < n_ctx):
                return slots
            shorter = drop_oldest_exchange(self.history) if self.on_overflow == "drop-oldest" and self.history \
                else None
            if shorter is not None:
                self.history = shorter
                self.dropped_turns += 1
                continue
            raise ContextOverflowError(self._overflow_message(len(slots), n_image, n_ctx))

    def _overflow_message(self, need: int, n_image: int, n_ctx: int) -> str:
        many = len(self.pictures) > 1
        parts = [f"{n_image} for the {'pictures' if many else 'image'}"] if n_image else []
        if self.history:
            n = len(self.history) // 2
            parts.append(f"{n} earlier exchange{'s' if n != 1 else ''}")
        detail = f" ({', '.join(parts)})" if parts else ""
        fixes = ("start a new conversation (/reset), drop the oldest exchanges (--drop-oldest), or raise --ctx"
                 if self.history else "shorten the question or raise --ctx")
        trained = self.model.manifest.llm.get("n_ctx_train")
        return (f"the conversation needs {need} tokens{detail} but the context holds {n_ctx}: {fixes}"
                + (f" (the model was trained with {trained})" if trained else ""))

    def stream(self, prompt: str, images: list | None = None, **sampling) -> Iterator[str]:
        """The answer to ``prompt``; ``images``: new pictures that open this question (after the conversation's
        earlier ones)."""
        m = self.model
        s = Sampling(**sampling)
        check_text(prompt, "the question")
        if m.template.single_turn:  # LLaVA's `plain` (stage-1 captioner): one image, one caption, no history
            self.history = []
        added = self.pending + list(images or [])
        added.sort(key=lambda p: isinstance(p, Video))  # a turn's images come before its videos, as it renders them
        self.pictures += added
        try:
            embedded = self._prepared()
        except UserError:  # the pictures that could not be added are not kept
            del self.pictures[len(self.pictures) - len(added):]
            self.pending = []
            raise
        self.pending = []
        prepared = [p for p, _ in embedded]
        slots = self._fit(prompt, prepared, s.max_tokens)
        answer = ""
        for piece in m.generate(slots, {p.key: fn for p, fn in embedded}, s):
            answer += piece
            yield piece
        self.last_stop = m.last_stop
        # the answer as LLaVA's chat keeps it for the next turn (decoded, stripped)
        new = self.pictures[len(self.pictures) - self._unplaced():]
        self.history += [Turn("user", prompt, image=len(new), videos=sum(isinstance(p, Video) for p in new)),
                         Turn("assistant", answer.strip())]

    def ask(self, prompt: str, **sampling) -> str:
        return "".join(self.stream(prompt, **sampling))
