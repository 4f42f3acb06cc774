"""OpenAI's chat completions API: ``POST /v1/chat/completions`` (streamed or not) and ``GET /v1/models``.

What the official ``openai`` client sends and reads: messages whose content is a
string or parts (``text``, ``image_url``), ``stream`` with server-sent events
ending in ``[DONE]`` (``stream_options.include_usage`` adds a usage chunk),
``max_tokens`` / ``max_completion_tokens``, ``temperature``, ``top_p``, ``seed``,
``stop``, ``n`` (1 only), ``ignore_eos`` (llama.cpp server's extension), ``logprobs`` / ``top_logprobs``
(``logprobs.py``) and ``usage`` (prompt tokens count the image's positions;
``prompt_tokens_details.cached_tokens`` those not decoded again).
Errors are OpenAI's error object with its status codes.
"""

from __future__ import annotations

import json

from starlette.requests import Request as HttpRequest

from . import logprobs
from .body import read_json
from .conversation import (ApiError, Conversation, SamplingRequest, flag, from_messages, image_from_url, json_type,
                           number, stop_strings, text_of)

ROLES = ("system", "developer", "user", "assistant")


def read_message(msg: dict, where: str) -> tuple[str, list]:
    """An OpenAI message's text (its text parts joined by newlines) and images (``image_url`` parts)."""
    content = msg.get("content")
    texts, found = [], []
    if isinstance(content, str):
        texts.append(text_of(content, f"{where}.content"))
    elif isinstance(content, list):
        for j, part in enumerate(content):
            pw = f"{where}.content[{j}]"
            if not isinstance(part, dict):
                raise ApiError(f"'{pw}' must be an object, not {json_type(part)}", param=pw)
            kind = part.get("type")
            if kind == "text":
                texts.append(text_of(part.get("text"), f"{pw}.text"))
            elif kind in ("image_url", "video_url"):
                ref = part.get(kind)
                url = ref.get("url") if isinstance(ref, dict) else ref
                found.append(image_from_url(url, f"{pw}.{kind}.url", video=kind == "video_url"))
            else:
                raise ApiError(f"'{pw}.type' must be 'text', 'image_url' or 'video_url', not {kind!r}",
                               param=f"{pw}.type")
    elif not (content is None and msg.get("role") == "assistant"):
        raise ApiError(f"'{where}.content' must be a string or an array of parts", param=f"{where}.content")
    return "\n".join(texts), found


def parse_chat(body: dict) -> tuple[Conversation, SamplingRequest]:
    conv = from_messages(body.get("messages"), ROLES, read_message)
    if body.get("n") not in (None, 1) or isinstance(body.get("n"), bool):
        raise ApiError("'n' must be 1: this server gives one choice per request", param="n")
    max_tokens = number(body, "max_completion_tokens", "", 1, 1_000_000, integer=True)
    if max_tokens is None:
        max_tokens = number(body, "max_tokens", "", 1, 1_000_000, integer=True)
    sampling = SamplingRequest(
        temperature=number(body, "temperature", "", 0, 100), top_p=number(body, "top_p", "", 1e-9, 1),
        max_tokens=max_tokens, seed=number(body, "seed", "", -1, 2**63 - 1, integer=True),
        stop=stop_strings(body.get("stop"), "stop"), ignore_eos=flag(body, "ignore_eos"),
        logprobs=logprobs.openai_request(body))
    return conv, sampling


def register(app, server) -> None:
    from fastapi.responses import JSONResponse, StreamingResponse

    def check_stream(body: dict) -> tuple[bool, bool]:
        stream = body.get("stream", False)
        if stream is not None and not isinstance(stream, bool):
            raise ApiError("'stream' must be a boolean", param="stream")
        opts = body.get("stream_options") or {}
        if not isinstance(opts, dict):
            raise ApiError("'stream_options' must be an object", param="stream_options")
        return bool(stream), bool(opts.get("include_usage"))

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.options.model_name, "object": "model",
                                            "created": int(server.started), "owned_by": "llava-edge"}]}

    @app.get("/v1/models/{name}")
    async def model(name: str):
        server.check_model(name)
        return {"id": server.options.model_name, "object": "model", "created": int(server.started),
                "owned_by": "llava-edge"}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HttpRequest):
        body = await read_json(request)
        server.check_model(body.get("model"))
        stream, include_usage = check_stream(body)
        conv, sampling = parse_chat(body)
        answer = await server.answer(conv, sampling, "openai")
        name = server.options.model_name
        asked = sampling.logprobs is not None

        def choice_logprobs(found: list[dict] | None):
            return {"content": found, "refusal": None} if asked and found is not None else None

        if not stream:
            text = await answer.full(request)
            return JSONResponse({
                "id": f"chatcmpl-{answer.id}", "object": "chat.completion", "created": answer.created, "model": name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": answer.finish_reason, "logprobs": choice_logprobs(answer.logprobs)}],
                "usage": usage(answer.req)})

        def chunk(delta: dict, finish=None, found: list[dict] | None = None) -> str:
            return "data: " + json.dumps({
                "id": f"chatcmpl-{answer.id}", "object": "chat.completion.chunk", "created": answer.created,
                "model": name, "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                                            "logprobs": choice_logprobs(found)}],
            }) + "\n\n"

        async def events():
            yield chunk({"role": "assistant", "content": ""})
            try:
                async for piece, found in answer.pieces():
                    yield chunk({"content": piece}, found=found)
            except ApiError as e:  # the response has begun: the error goes in the stream, as OpenAI does
                yield "data: " + json.dumps({"error": {"message": e.message, "type": e.type, "code": e.code}}) + "\n\n"
                return
            yield chunk({}, answer.finish_reason)
            if include_usage:
                yield "data: " + json.dumps({
                    "id": f"chatcmpl-{answer.id}", "object": "chat.completion.chunk", "created": answer.created,
                    "model": name, "choices": [], "usage": usage(answer.req)}) + "\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def usage(req) -> dict:
    completion = len(req.completion_ids)
    return {"prompt_tokens": req.prompt_positions, "completion_tokens": completion,
            "total_tokens": req.prompt_positions + completion,
            "prompt_tokens_details": {"cached_tokens": req.reused_positions,
                                      "image_tokens": req.image_positions}}
