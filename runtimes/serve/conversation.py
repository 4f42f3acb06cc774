"""What a request asks, in one form for both APIs: the conversation, its image and how to sample.

The OpenAI and Ollama routes turn their JSON into a :class:`Conversation` and
:class:`SamplingRequest`; every type and value is checked here with a message that
names the field (``ApiError``: the routes give it in their API's error JSON).
Images arrive as ``data:`` URIs or base64 (PNG, JPEG or WebP only), as file paths
only inside ``--image-dir``, and from ``http(s)`` URLs only with
``--allow-remote-images``, limited in size and time.
"""

from __future__ import annotations

import base64
import binascii
import math
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

from llava_edge.templates import Turn

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
_DATA_URI = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*?);base64,", re.I)
_MIMES = {"image/png", "image/jpeg", "image/jpg", "image/webp"}
_VIDEO_MIMES = {"video/mp4", "video/webm", "video/quicktime", "video/x-matroska", "video/x-msvideo",
                "application/octet-stream"}


class ApiError(Exception):
    """A request the server refuses: HTTP ``status``, OpenAI's error ``type`` and ``code``, the field (``param``)."""

    def __init__(self, message: str, status: int = 400, type: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.message, self.status, self.type, self.code, self.param = message, status, type, code, param
        self.headers = headers or {}


@dataclass
class ImageSource:
    """Where the conversation's image comes from: bytes already decoded from base64, a path or a URL."""

    data: bytes | None = None
    path: str | None = None
    url: str | None = None
    where: str = "image"  # the field, for messages
    video: bool = False  # a video (OpenAI-style ``video_url`` part, as vLLM takes it)


@dataclass
class Conversation:
    system: str | None
    history: list[Turn]  # earlier turns (user, assistant, ...); a turn's ``image``: how many pictures open it
    question: str  # the last user turn, the one answered
    images: list[ImageSource] = field(default_factory=list)  # every picture, in the conversation's order


@dataclass
class SamplingRequest:
    temperature: float | None = None  # None: the server's default
    top_p: float | None = None
    max_tokens: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False  # llama.cpp server's extension: answer until max_tokens (for benchmarks)
    logprobs: int | None = None  # None: none asked; else each token's log-probability and this many alternatives


# -- checking JSON values ----------------------------------------------------------------------------------------
def number(body: dict, key: str, where: str, lo: float, hi: float, integer: bool = False):
    """``body[key]`` when present and not null: a number in [lo, hi] (a whole one when ``integer``)."""
    v = body.get(key)
    if v is None:
        return None
    name = f"{where}{key}"
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok or (isinstance(v, float) and not math.isfinite(v)):
        kind = "an integer" if integer else "a finite number" if isinstance(v, float) else "a number"
        raise ApiError(f"'{name}' must be {kind}, not {json_type(v)}", param=name)
    if not lo <= v <= hi:
        raise ApiError(f"'{name}' must be from {lo:g} to {hi:g}, not {v}", param=name)
    return v


def flag(body: dict, key: str, where: str = "") -> bool:
    v = body.get(key, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise ApiError(f"'{where}{key}' must be a boolean, not {json_type(v)}", param=f"{where}{key}")
    return v


def stop_strings(v, name: str) -> tuple[str, ...]:
    if v is None:
        return ()
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ApiError(f"'{name}' must be a string or a list of strings", param=name)
    if len(v) > 16:
        raise ApiError(f"'{name}' takes at most 16 strings", param=name)
    return tuple(x for x in v if x)


def json_type(v) -> str:
    """What a JSON value is, for messages; non-finite numbers by name (``NaN``, ``Infinity`` and numbers too
    large for a double, such as ``1e309``, which Python's parser reads as infinity)."""
    if isinstance(v, float) and not math.isfinite(v):
        return "NaN" if math.isnan(v) else ("-" if v < 0 else "") + "Infinity (or a number too large for a double)"
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(v), type(v).__name__)


def text_of(v, name: str) -> str:
    if not isinstance(v, str):
        raise ApiError(f"'{name}' must be a string, not {json_type(v)}", param=name)
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(f"'{name}' is not valid UTF-8 text", param=name) from None
    return v


def decode_base64(text: str, where: str) -> bytes:
    """Base64 (standard alphabet, padding optional) -> bytes; anything else is refused."""
    compact = re.sub(r"\s+", "", text)
    try:
        return base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(f"'{where}' is not valid base64", param=where) from None


def image_from_url(url, where: str, video: bool = False) -> ImageSource:
    """An OpenAI ``image_url`` (``video_url``): a ``data:`` URI, an http(s) URL, or a path (``file://`` or plain)."""
    if not isinstance(url, str) or not url:
        raise ApiError(f"'{where}' must be a non-empty string", param=where)
    m = _DATA_URI.match(url)
    if m:
        mime = (m.group("mime") or "").lower()
        if mime and mime not in (_VIDEO_MIMES if video else _MIMES):
            what = "videos must be video/* (MP4, WebM, QuickTime, Matroska, AVI)" if video else \
                "images must be PNG, JPEG or WebP"
            raise ApiError(f"'{where}': {what}, not {mime}", param=where)
        return ImageSource(data=decode_base64(url[m.end():], where), where=where, video=video)
    if url.lower().startswith("data:"):
        raise ApiError(f"'{where}': a data URI must be base64 (data:image/png;base64,...)", param=where)
    if re.match(r"https?://", url, re.I):
        return ImageSource(url=url, where=where, video=video)
    if re.match(r"[a-z][a-z0-9+.-]*://", url, re.I) and not url.lower().startswith("file://"):
        raise ApiError(f"'{where}': unsupported URL scheme (data:, http(s):// or a file under --image-dir)",
                       param=where)
    return ImageSource(path=url[len("file://"):] if url.lower().startswith("file://") else url, where=where,
                       video=video)


def from_messages(messages, roles: tuple[str, ...], read) -> Conversation:
    """A chat API's ``messages`` -> a Conversation. ``read(message, where)`` gives a message's (text, images);
    system messages (``system``, OpenAI's ``developer``) are joined into the system prompt."""
    if not isinstance(messages, list) or not messages:
        raise ApiError("'messages' must be a non-empty array", param="messages")
    system, turns, images = [], [], []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise ApiError(f"'{where}' must be an object, not {json_type(msg)}", param=where)
        role = msg.get("role")
        if role not in roles:
            raise ApiError(f"'{where}.role' must be one of {', '.join(roles)}, not {role!r}", param=f"{where}.role")
        text, found = read(msg, where)
        if found and role != "user":
            raise ApiError(f"'{where}': only user messages can hold an image", param=where)
        if role in ("system", "developer"):
            system.append(text)
            continue
        turns.append((role, text, found))
    return turns_to_conversation(turns, "\n".join(system) if system else None)


def turns_to_conversation(turns: list[tuple[str, str, list]], system: str | None) -> Conversation:
    """(role, text, pictures) in order -> a Conversation; consecutive messages of one role are joined. A turn's
    pictures open it, its images before its videos (as the runtime renders a turn), and ``images`` lists them
    all in that order."""
    merged: list[list] = []
    for role, text, found in turns:
        if merged and merged[-1][0] == role:
            merged[-1][1] = merged[-1][1] + "\n" + text if merged[-1][1] and text else merged[-1][1] + text
            merged[-1][2] = merged[-1][2] + list(found)
        else:
            merged.append([role, text, list(found)])
    for m in merged:
        m[2].sort(key=lambda src: src.video)
    if not merged or merged[0][0] != "user":
        raise ApiError("the conversation must start with a user message (after any system message)",
                       param="messages")
    if merged[-1][0] != "user":
        raise ApiError("the last message must be the user's: it is what the model answers", param="messages")
    # the answers as the runtime keeps them in a conversation (``ChatSession``: stripped)
    history = [Turn(r, t.strip() if r == "assistant" else t, image=len(f), videos=sum(s.video for s in f))
               for r, t, f in merged[:-1]]
    return Conversation(system, history, merged[-1][1], [s for m in merged for s in m[2]])


# -- fetching the image's bytes ------------------------------------------------------------------------------------
@dataclass
class ImagePolicy:
    image_dir: Path | None = None  # file paths are accepted only inside it
    allow_remote: bool = False
    max_image_bytes: int = 20 << 20  # a file or a download
    max_video_bytes: int = 256 << 20
    frames: int = 8  # frames sampled from each video (LLaVA-OneVision)

    def limit(self, src: "ImageSource") -> int:
        return self.max_video_bytes if src.video else self.max_image_bytes
    remote_timeout_s: float = 10.0


def image_bytes(src: ImageSource, policy: ImagePolicy) -> bytes:
    """The encoded image (runs on a worker thread: a file read or a download)."""
    if src.data is not None:
        return src.data
    if src.url is not None:
        return _download(src, policy)
    return _read_under(src, policy)


def _read_under(src: ImageSource, policy: ImagePolicy) -> bytes:
    if policy.image_dir is None:
        raise ApiError(f"'{src.where}': file paths are not accepted (send the image as a data: URI, or start the "
                       "server with --image-dir DIR)", param=src.where)
    root = policy.image_dir.resolve()
    p = Path(src.path)
    # resolved with symlinks: a link inside the directory that points out of it is refused too
    target = (p if p.is_absolute() else root / p).resolve()
    if target != root and root not in target.parents:
        raise ApiError(f"'{src.where}': the path is outside --image-dir", status=403, type="permission_error",
                       param=src.where)
    try:
        fd = os.open(target, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        raise ApiError(f"'{src.where}': no such image in --image-dir", status=404, param=src.where) from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ApiError(f"'{src.where}': not a file", param=src.where)
        if st.st_size > policy.limit(src):
            raise ApiError(f"'{src.where}': the file is over {policy.limit(src) >> 20} MB", status=413,
                           param=src.where)
        return f.read()


def _download(src: ImageSource, policy: ImagePolicy) -> bytes:
    if not policy.allow_remote:
        raise ApiError(f"'{src.where}': remote image URLs are refused (send the image as a data: URI, or start the "
                       "server with --allow-remote-images)", param=src.where)
    import httpx

    limit = policy.limit(src)
    try:
        with httpx.stream("GET", src.url, timeout=policy.remote_timeout_s, follow_redirects=True,
                          headers={"Accept": "image/png, image/jpeg, image/webp"}) as r:
            if r.status_code != 200:
                raise ApiError(f"'{src.where}': the image URL answered HTTP {r.status_code}", param=src.where)
            if int(r.headers.get("content-length") or 0) > limit:
                raise ApiError(f"'{src.where}': the image is over {limit >> 20} MB", status=413, param=src.where)
            data = bytearray()
            for chunk in r.iter_bytes():
                data += chunk
                if len(data) > limit:
                    raise ApiError(f"'{src.where}': the image is over {limit >> 20} MB", status=413, param=src.where)
            return bytes(data)
    except httpx.TimeoutException:
        raise ApiError(f"'{src.where}': the image URL took longer than {policy.remote_timeout_s:g} s",
                       param=src.where) from None
    except httpx.HTTPError as e:
        raise ApiError(f"'{src.where}': the image could not be fetched ({type(e).__name__})", param=src.where) from None
