"""Ollama's API, so Ollama clients and UIs work unchanged: ``POST /api/chat``, ``POST /api/generate`` (base64
``images``, NDJSON streaming by default, ``options``, ``logprobs`` / ``top_logprobs``), ``GET /api/tags``,
``POST /api/show``, ``GET /api/ps`` and ``GET /api/version``. Errors are ``{"error": "..."}`` with the status code,
as Ollama answers them."""

from __future__ import annotations

import json
import time

from starlette.requests import Request as HttpRequest

from .body import read_json
from .conversation import (ApiError, Conversation, ImageSource, SamplingRequest, decode_base64, flag, from_messages,
                           json_type, number, stop_strings, text_of)
from .logprobs import ollama_entries, ollama_request

# the Ollama release whose API this follows (the `ollama` Python client is tested against it)
OLLAMA_API_VERSION = "0.6.3"
ROLES = ("system", "user", "assistant")


def images_of(v, where: str) -> list[ImageSource]:
    if v is None:
        return []
    if not isinstance(v, list):
        raise ApiError(f"'{where}' must be an array of base64 strings", param=where)
    out = []
    for i, x in enumerate(v):
        if not isinstance(x, str):
            raise ApiError(f"'{where}[{i}]' must be a base64 string, not {json_type(x)}", param=f"{where}[{i}]")
        out.append(ImageSource(data=decode_base64(x, f"{where}[{i}]"), where=f"{where}[{i}]"))
    return out


def sampling_of(body: dict) -> SamplingRequest:
    opts = body.get("options") or {}
    if not isinstance(opts, dict):
        raise ApiError("'options' must be an object", param="options")
    predict = number(opts, "num_predict", "options.", -2, 1_000_000, integer=True)
    return SamplingRequest(
        temperature=number(opts, "temperature", "options.", 0, 100), top_p=number(opts, "top_p", "options.", 1e-9, 1),
        max_tokens=predict if predict and predict > 0 else None,  # -1 / -2: until the end (Ollama's meaning)
        seed=number(opts, "seed", "options.", -1, 2**63 - 1, integer=True),
        stop=stop_strings(opts.get("stop"), "options.stop"), ignore_eos=flag(opts, "ignore_eos", "options."),
        logprobs=ollama_request(body))


def unsupported(body: dict, keys: tuple[str, ...]) -> None:
    for k in keys:
        if body.get(k):
            raise ApiError(f"'{k}' is not supported by this server", param=k)


def parse_chat(body: dict) -> Conversation:
    unsupported(body, ("tools", "format"))

    def read(msg: dict, where: str) -> tuple[str, list]:
        return text_of(msg.get("content") or "", f"{where}.content"), images_of(msg.get("images"), f"{where}.images")

    return from_messages(body.get("messages"), ROLES, read)


def parse_generate(body: dict) -> Conversation:
    unsupported(body, ("raw", "suffix", "format", "context", "template"))
    prompt = text_of(body.get("prompt") or "", "prompt")
    system = body.get("system")
    conv = Conversation(None if system in (None, "") else text_of(system, "system"), [], prompt)
    conv.images = images_of(body.get("images"), "images")
    return conv


def register(app, server) -> None:
    from fastapi.responses import JSONResponse, StreamingResponse

    def created_at() -> str:
        t = time.time()
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e6):06d}Z"

    def model_entry() -> dict:
        m = server.model
        name = f"{server.options.model_name}:latest"
        llm = m.llm_variant if m else None
        details = {"format": "gguf", "family": "llava", "families": ["llava", "clip"],
                   "parameter_size": "", "quantization_level": llm.name.upper() if llm else "",
                   "parent_model": ""}
        return {"name": name, "model": name, "modified_at": created_at(),
                "size": sum(v.size or 0 for v in (m.llm_variant, m.vision_variant)) if m else 0,
                "digest": llm.sha256 if llm else "", "details": details}

    def stream_flag(body: dict) -> bool:
        s = body.get("stream", True)  # Ollama streams unless told not to
        if s is not None and not isinstance(s, bool):
            raise ApiError("'stream' must be a boolean", param="stream")
        return s is not False

    def final(answer, started: float) -> dict:
        req = answer.req
        ns = lambda a, b: int(max(0.0, (b or a) - a) * 1e9)  # noqa: E731
        first = req.t_first_token or req.t_done
        return {"done": True, "done_reason": "length" if answer.finish_reason == "length" else "stop",
                "total_duration": int((time.monotonic() - started) * 1e9), "load_duration": 0,
                "prompt_eval_count": req.prompt_positions, "prompt_eval_duration": ns(req.t_admit, first),
                "eval_count": len(req.completion_ids), "eval_duration": ns(first, req.t_done)}

    async def respond(request: HttpRequest, body: dict, conv: Conversation, chat: bool):
        started = time.monotonic()
        server.check_model(body.get("model"))
        stream = stream_flag(body)
        answer = await server.answer(conv, sampling_of(body), "ollama")
        name = f"{server.options.model_name}:latest"

        def piece_obj(text: str, found: list[dict] | None = None) -> dict:
            body = {"message": {"role": "assistant", "content": text}} if chat else {"response": text}
            if found:  # only when asked, and left out when empty, as Ollama answers
                body["logprobs"] = ollama_entries(found)
            return {"model": name, "created_at": created_at(), **body, "done": False}

        if not stream:
            text = await answer.full(request)
            return JSONResponse({**piece_obj(text, answer.logprobs), **final(answer, started)})

        async def lines():
            try:
                async for piece, found in answer.pieces():
                    yield json.dumps(piece_obj(piece, found)) + "\n"
            except ApiError as e:  # begun already: the error is the last line, as Ollama streams it
                yield json.dumps({"error": e.message}) + "\n"
                return
            yield json.dumps({**piece_obj(""), **final(answer, started)}) + "\n"

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    @app.post("/api/chat")
    async def chat(request: HttpRequest):
        body = await read_json(request)
        server.check_model(body.get("model"))
        if body.get("messages") == []:  # Ollama's way of loading a model: answered at once
            return {"model": f"{server.options.model_name}:latest", "created_at": created_at(),
                    "message": {"role": "assistant", "content": ""}, "done": True, "done_reason": "load"}
        return await respond(request, body, parse_chat(body), chat=True)

    @app.post("/api/generate")
    async def generate(request: HttpRequest):
        body = await read_json(request)
        server.check_model(body.get("model"))
        if not body.get("prompt") and not body.get("images"):  # loading the model, as Ollama answers it
            return {"model": f"{server.options.model_name}:latest", "created_at": created_at(), "response": "",
                    "done": True, "done_reason": "load"}
        return await respond(request, body, parse_generate(body), chat=False)

    @app.get("/api/tags")
    async def tags():
        return {"models": [model_entry()] if server.model else []}

    @app.get("/api/ps")
    async def ps():
        return {"models": [{**model_entry(), "expires_at": "2999-01-01T00:00:00Z", "size_vram": 0}]
                if server.model else []}

    @app.post("/api/show")
    async def show(request: HttpRequest):
        body = await read_json(request)
        server.check_model(body.get("model") or body.get("name"))
        m = server.model
        if m is None:
            server.ready()
        return {"modelfile": "", "parameters": "", "template": m.conv_mode, "details": model_entry()["details"],
                "model_info": {"general.architecture": "llava", "llava-edge.conv_mode": m.conv_mode,
                               "llava-edge.context_length": m.llm.n_ctx},
                "capabilities": ["completion", "vision"], "modified_at": created_at()}

    @app.get("/api/version")
    async def version():
        return {"version": OLLAMA_API_VERSION}
