"""``EdgeLLaVA``: load a bundle, look at an image, answer. The CLI is a thin layer over it.

    from llava_edge import EdgeLLaVA
    m = EdgeLLaVA.load("bundle")
    print(m.chat("photo.png", "What is in the image?"))

The image goes through the bundle's vision graph (onnxruntime); the prompt is
tokenized with the checkpoint's tokenizer and rendered with the bundle's
conversation template (the same module training used); the language model runs
in llama.cpp with the image embeddings injected where ``<image>`` stands.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from llava_edge import manifest as bundle_manifest
from llava_edge.errors import UserError
from llava_edge.preprocess import ImageInput, ImageSpec, preprocess
from llava_edge.templates import IMAGE_PLACEHOLDER, Turn, expand_image, get_template

from .llm import LlamaOptions, LlamaText
from .tokenizer import TextTokenizer
from .vision import VisionEncoder

BUNDLE_ENV = "LLAVA_EDGE_BUNDLE"


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
    seed: int | None = None


def sample(logits: np.ndarray, s: Sampling, rng: np.random.Generator) -> int:
    if s.temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / s.temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    if s.top_p < 1.0:
        order = np.argsort(-p)
        keep = order[: int(np.searchsorted(np.cumsum(p[order]), s.top_p)) + 1]
        q = np.zeros_like(p)
        q[keep] = p[keep]
        p = q / q.sum()
    return int(rng.choice(len(p), p=p))


class EdgeLLaVA:
    def __init__(self, bundle: Path, vision_variant: str | None = None, llm_variant: str | None = None,
                 n_ctx: int | None = None, threads: int = 0, n_gpu_layers: int = 0,
                 vision_providers: list[str] | None = None, kv_cache: str = "f16"):
        self.bundle = Path(bundle)
        self.manifest = m = bundle_manifest.read(self.bundle)
        self.vision_variant = m.variant("vision", vision_variant)
        self.llm_variant = m.variant("llm", llm_variant)
        bundle_manifest.check_files(
            self.bundle, m, [self.vision_variant.file, self.llm_variant.file, m.tokenizer["file"]]
        )
        self.spec = ImageSpec.from_dict(m.image)
        self.template = get_template(m.template)
        self.tokenizer = TextTokenizer(self.bundle / m.tokenizer["file"])
        self.image_token_id = int(m.llm["image_token_id"])
        self.eos_id = int(m.llm["eos_id"])
        self.vision = VisionEncoder(self.bundle / self.vision_variant.file, vision_providers, threads)
        opts = LlamaOptions(n_ctx=n_ctx or min(int(m.llm["n_ctx_train"]), 4096), n_threads=threads,
                            n_gpu_layers=n_gpu_layers, kv_cache=kv_cache)
        self.llm = LlamaText(self.bundle / self.llm_variant.file, opts)
        self._image_cache: dict[str, np.ndarray] = {}
        self.stats = {"vision_encodes": 0, "prefill_tokens": 0}

    @classmethod
    def load(cls, bundle: str | Path | None = None, device: str = "auto", **kw) -> "EdgeLLaVA":
        if device not in ("auto", "cpu"):
            raise UserError(f"device {device!r} is not available in this build (available: auto, cpu)")
        return cls(resolve_bundle(bundle), **kw)

    # -- image ---------------------------------------------------------------
    def image_embeddings(self, image: ImageInput) -> tuple[str, np.ndarray]:
        """(key, embeddings (image tokens, hidden)) for ``image``; cached by pixel content."""
        pixels = preprocess(image, self.spec)
        key = hashlib.sha256(pixels.tobytes()).hexdigest()[:16]
        if key not in self._image_cache:
            self._image_cache.clear()  # one image at a time: a chat is about one picture
            self._image_cache[key] = self.vision.encode(pixels[None])[0]
            self.stats["vision_encodes"] += 1
        return key, self._image_cache[key]

    # -- prompt ----------------------------------------------------------------
    def slots_for(self, text: str, image_key: str | None, n_image: int) -> list:
        """Token ids of ``text`` with the one ``<image>`` token replaced by image slots."""
        ids = self.tokenizer.encode(text)
        try:
            return expand_image(ids, self.image_token_id, [(image_key, j) for j in range(n_image)])
        except ValueError:
            raise UserError(f"the prompt must contain {IMAGE_PLACEHOLDER} exactly once") from None

    def prefill(self, slots: list, embeds: np.ndarray | None, logits: str = "last") -> np.ndarray | None:
        """Bring the KV cache to ``slots``, decoding only what is not cached yet."""
        kept = self.llm.keep_prefix(slots)
        if kept == len(slots):  # all cached: recompute the last position's logits
            self.llm.keep_prefix(slots[:-1])
            kept -= 1
        todo = slots[kept:]
        self.stats["prefill_tokens"] += len(todo)
        out, i = [], 0
        while i < len(todo):
            j = i
            if isinstance(todo[i], tuple):
                while j < len(todo) and isinstance(todo[j], tuple):
                    j += 1
                key = todo[i][0]
                idx = [s[1] for s in todo[i:j]]
                r = self.llm.feed_embeddings(embeds[idx[0] : idx[-1] + 1], key, logits if logits == "all" else "last")
            else:
                while j < len(todo) and not isinstance(todo[j], tuple):
                    j += 1
                r = self.llm.feed_tokens(todo[i:j], logits if logits == "all" else "last")
            out.append(r)
            i = j
        if logits == "all":
            return np.concatenate([o if o.ndim == 2 else o[None] for o in out])
        return out[-1]

    def prompt_logits(self, image: ImageInput | None, text: str) -> np.ndarray:
        """Logits at every position after the cached prefix, for a fully rendered ``text`` (tests, drift)."""
        key, emb = self.image_embeddings(image) if image is not None else (None, None)
        slots = self.slots_for(text, key, 0 if emb is None else len(emb))
        self.llm.reset()
        return self.prefill(slots, emb, logits="all")

    # -- generation --------------------------------------------------------------
    def generate(self, slots: list, embeds: np.ndarray | None, sampling: Sampling) -> Iterator[str]:
        logits = self.prefill(slots, embeds)
        rng = np.random.default_rng(sampling.seed)
        out: list[int] = []
        shown = ""
        for _ in range(sampling.max_tokens):
            tok = sample(logits, sampling, rng)
            if tok == self.eos_id or self.llm.is_eog(tok):
                break
            out.append(tok)
            text = self.tokenizer.decode(out)
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                yield text[len(shown):]
                shown = text
            logits = self.llm.feed_tokens([tok])
        text = self.tokenizer.decode(out)
        if len(text) > len(shown):
            yield text[len(shown):]

    def session(self, image: ImageInput | None = None) -> "ChatSession":
        return ChatSession(self, image)

    def chat(self, image: ImageInput | None, prompt: str, **sampling) -> str:
        return self.session(image).ask(prompt, **sampling)

    def stream(self, image: ImageInput | None, prompt: str, **sampling) -> Iterator[str]:
        return self.session(image).stream(prompt, **sampling)

    def close(self) -> None:
        self.llm.close()


@dataclass
class ChatSession:
    """A multi-turn conversation about one image; follow-ups reuse the KV cache."""

    model: EdgeLLaVA
    image: ImageInput | None = None
    history: list[Turn] = field(default_factory=list)
    _embedded: tuple | None = None  # (key, embeddings) of ``image``, computed on the first question

    def set_image(self, image: ImageInput | None) -> None:
        self.image = image
        self.history = []
        self._embedded = None

    def reset(self) -> None:
        self.history = []

    def stream(self, prompt: str, **sampling) -> Iterator[str]:
        m = self.model
        if self.image is not None and self._embedded is None:
            self._embedded = m.image_embeddings(self.image)  # decode + preprocess once per image
        key, emb = self._embedded if self.image is not None else (None, None)
        text = m.template.prompt(prompt, image=self.image is not None, history=self.history)
        slots = m.slots_for(text, key, 0 if emb is None else len(emb))
        answer = ""
        for piece in m.generate(slots, emb, Sampling(**sampling)):
            answer += piece
            yield piece
        user = prompt if self.history or self.image is None else f"{IMAGE_PLACEHOLDER}\n{prompt}"
        self.history += [Turn("user", user), Turn("assistant", answer)]

    def ask(self, prompt: str, **sampling) -> str:
        return "".join(self.stream(prompt, **sampling))
