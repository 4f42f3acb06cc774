"""Request bodies: JSON of bounded depth and number of values, read so that any failure is a 400.

``json.loads`` recurses once per level of nesting, and its Python objects take
several times the bytes of the text they come from (a body of ``[{},{},...]``
under a 32 MB limit makes about 10 million dicts). So the body's structure is
measured before it is parsed: with the strings taken out, its brackets give the
depth and its commas and brackets the number of values. The measure is a few
passes of ``bytes`` methods and one regular expression (C loops, about 0.1 s for
32 MB); the standard library's parser has no such limits, hence this.
"""

from __future__ import annotations

import json
import re

import numpy as np

from .conversation import ApiError, json_type

MAX_DEPTH = 64  # a chat request nests 6 deep; JSON schemas a client may send along, a few more
MAX_VALUES = 100_000  # strings, numbers, arrays and objects: a conversation of some 20,000 messages

_STRING = re.compile(rb'"[^"]*"')  # after escaped backslashes and quotes are taken out
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")
_STEP = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")  # open +1, close -1 (as int8)


class ClientGone(ApiError):
    """The client closed its connection before its answer: nobody reads the response (logged as 499)."""

    def __init__(self, what: str):
        super().__init__(f"the client closed the connection {what}", status=499, code="client_closed_request")


def check_structure(raw: bytes) -> None:
    """Refuse a body nested deeper than ``MAX_DEPTH`` or holding more than ``MAX_VALUES`` values, before parsing.

    Invalid JSON may pass or be refused here; what passes is parsed by ``json.loads``, which says whether it is
    JSON. Valid JSON is measured exactly (up to the count of values, which may count a trailing comma once)."""
    plain = raw.replace(b"\\\\", b"").replace(b'\\"', b"")  # no quote left inside a string
    if plain.count(b'"') > 2 * MAX_VALUES:
        raise _too_many()
    skeleton = _STRING.sub(b"", plain)
    if skeleton.count(b",") + skeleton.count(b"[") + skeleton.count(b"{") > MAX_VALUES:
        raise _too_many()
    brackets = skeleton.translate(None, _NOT_BRACKET)
    if len(brackets) > 2 * MAX_VALUES:  # more closing brackets than opening ones: not JSON
        raise ApiError("the request body is not valid JSON (unbalanced brackets)")
    if brackets:
        depth = int(np.frombuffer(brackets.translate(_STEP), np.int8).cumsum(dtype=np.int32).max())
        if depth > MAX_DEPTH:
            raise ApiError(f"the request body nests arrays and objects {depth} deep; at most {MAX_DEPTH} levels "
                           "are accepted")


def _too_many() -> ApiError:
    return ApiError(f"the request body holds more than {MAX_VALUES:,} JSON values")


def parse_json(raw: bytes) -> dict:
    """The body as a JSON object, or ``ApiError`` (400) naming what is wrong with it."""
    check_structure(raw)
    try:
        body = json.loads(raw)
    except RecursionError:  # cannot happen after check_structure, unless the recursion limit is very low
        raise ApiError("the request body is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:
        # ValueError holds JSONDecodeError and the standard library's limit on the digits of an integer
        why = f"{e.msg} at line {e.lineno} column {e.colno}" if isinstance(e, json.JSONDecodeError) else \
            "a number has too many digits" if "digits" in str(e) else "not UTF-8"
        raise ApiError(f"the request body is not valid JSON ({why})") from None
    if not isinstance(body, dict):
        raise ApiError(f"the request body must be a JSON object, not {json_type(body)}")
    return body


def check_json_type(content_type: str | None) -> None:
    """Only ``application/json`` (with any parameters) is taken, 415 otherwise.

    A web page may send ``text/plain``, a form's types or no type at all to any address without asking
    first (a CORS "simple" request); ``application/json`` it may not. So a body of another type is refused
    even when it is JSON: a page on another site cannot make the server answer that way (the Origin check
    refuses such pages too; this holds where a browser sends no Origin)."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media != "application/json":
        got = f"'{content_type}'" if content_type else "none"
        raise ApiError(f"the request body must be sent as 'Content-Type: application/json' (got {got})",
                       status=415, code="unsupported_media_type")


async def read_json(request) -> dict:
    """The request's JSON object. The body is read first (its size limit is said before its type); a client
    that leaves while sending it raises :class:`ClientGone`."""
    from starlette.requests import ClientDisconnect

    try:
        raw = await request.body()
    except ClientDisconnect:
        raise ClientGone("while sending its request") from None
    check_json_type(request.headers.get("content-type"))
    return parse_json(raw)
