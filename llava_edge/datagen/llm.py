"""The text-only LLM that writes the data and judges the answers: any OpenAI-compatible endpoint, or a bundle's
language model in this process.

``Endpoint`` speaks OpenAI's chat completions over HTTP (``llava-edge serve``, llama.cpp's
server, ``llama_cpp.server``, vLLM, a hosted API with ``$OPENAI_API_KEY``) and retries
what is worth retrying: 429 and 5xx answers (after their ``Retry-After`` when given),
timeouts and dropped connections, with exponential backoff and jitter. Written on httpx
rather than the ``openai`` package so that the retries and their counts are ours to
report, and the package is not needed at run time.

``InProcess`` runs a bundle's language model through ``runtimes/batching.py``: requests
made in parallel are decoded side by side in one llama.cpp context.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass

from ..errors import UserError

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


@dataclass
class Completion:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retries: int = 0


class LLMError(Exception):
    """A request that failed for good (after its retries, or at once for a 4xx that retrying cannot fix)."""


class Endpoint:
    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout_s: float = 120.0,
                 max_retries: int = 5, backoff_s: float = 1.0):
        import httpx

        base = base_url.rstrip("/")
        if not base.startswith(("http://", "https://")):
            raise UserError(f"--llm must be an http(s) URL of an OpenAI-compatible API, not {base_url!r}")
        self.url = base + ("/chat/completions" if base.endswith("/v1") else "/v1/chat/completions")
        self.model, self.max_retries, self.backoff_s = model, max_retries, backoff_s
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(timeout=timeout_s, headers=headers)
        self._httpx = httpx

    def complete(self, messages: list[dict], max_tokens: int = 1024, temperature: float = 0.7,
                 seed: int | None = None) -> Completion:
        body = {"model": self.model, "messages": messages, "max_tokens": max_tokens, "temperature": temperature}
        if seed is not None:
            body["seed"] = seed
        retries = 0
        while True:
            wait = None
            try:
                r = self.http.post(self.url, json=body)
                if r.status_code == 200:
                    d = r.json()
                    u = d.get("usage") or {}
                    text = d["choices"][0]["message"].get("content") or ""
                    return Completion(text, int(u.get("prompt_tokens") or 0), int(u.get("completion_tokens") or 0),
                                      retries)
                if r.status_code not in RETRY_STATUS:
                    raise LLMError(f"HTTP {r.status_code}: {_error_text(r)}")
                wait = _retry_after(r.headers.get("retry-after"))
                why = f"HTTP {r.status_code}"
            except (self._httpx.TimeoutException, self._httpx.TransportError) as e:
                why = type(e).__name__
            except (ValueError, KeyError, IndexError, TypeError) as e:
                raise LLMError(f"not a chat completion: {e}") from None
            if retries >= self.max_retries:
                raise LLMError(f"{why}, {retries} retries")
            retries += 1
            time.sleep(wait if wait is not None else self.backoff_s * 2 ** (retries - 1) * (0.5 + random.random()))

    def close(self) -> None:
        self.http.close()


def _retry_after(value: str | None) -> float | None:
    try:
        return min(max(float(value), 0.0), 60.0) if value is not None else None
    except ValueError:
        return None


def _error_text(r) -> str:
    try:
        e = r.json().get("error")
        return (e.get("message") if isinstance(e, dict) else str(e))[:300]
    except Exception:  # noqa: BLE001 - any body
        return r.text[:300]


class InProcess:
    """A bundle's language model, text only, with ``parallel`` sequences decoded side by side."""

    def __init__(self, bundle, parallel: int = 4, device: str = "auto", threads: int = 0):
        from ..runtimes.batching import BatchEngine
        from ..runtimes.pipeline import EdgeLLaVA

        self.model = EdgeLLaVA.load(bundle, device=device, parallel=parallel, threads=threads)
        self.engine = BatchEngine(self.model, queue_limit=1 << 20)

    def complete(self, messages: list[dict], max_tokens: int = 1024, temperature: float = 0.7,
                 seed: int | None = None) -> Completion:
        from ..templates import Turn

        m = self.model
        system = "\n".join(x["content"] for x in messages if x["role"] == "system") or None
        turns = [Turn(x["role"], x["content"]) for x in messages if x["role"] != "system"]
        try:
            slots, _, template = m.conversation_slots(turns[-1].text, None, turns[:-1], system)
        except UserError as e:
            raise LLMError(str(e)) from None
        return self._answer(slots, [], template, max_tokens, temperature, seed)

    def ask(self, question: str, image=None, max_tokens: int = 512) -> str:
        """The bundle's greedy answer to ``question`` about ``image`` (a path), as ``chat`` gives it."""
        try:
            slots, pictures, template = self.model.conversation_slots(question, image)
        except UserError as e:
            raise LLMError(str(e)) from None
        return self._answer(slots, pictures, template, max_tokens, 0.0, None).text

    def _answer(self, slots, pictures, template, max_tokens, temperature, seed) -> Completion:
        from ..runtimes.batching import Request

        m = self.model
        room = m.llm.n_ctx - len(slots)
        if room < 2:
            raise LLMError(f"the prompt needs {len(slots)} positions, the context holds {m.llm.n_ctx}")
        done, out = threading.Event(), []

        def on_event(ev):
            if ev.kind == "text":
                out.append(ev.text)
            else:
                if ev.kind == "error":
                    out.append(LLMError(ev.text))
                done.set()

        req = Request(slots, pictures, temperature, 1.0, min(max_tokens, room - 1), seed, template.stop, on_event)
        self.engine.submit(req)
        done.wait()
        if out and isinstance(out[-1], LLMError):
            raise out[-1]
        return Completion("".join(out), len(slots), len(req.completion_ids))

    def close(self) -> None:
        self.engine.close()
        self.model.close()
