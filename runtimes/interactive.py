"""A conversation at a terminal: questions stream their answers; /image, /reset and /quit steer it.

What ``llava-edge chat`` runs without a question on its command line. Every problem with one line
(an unreadable image, a question that does not fit, a line that is not UTF-8, an unknown command)
is said and the session goes on.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from llava_edge.errors import UserError
from llava_edge.preprocess import load_image

from .pipeline import ChatSession

COMMANDS = ("/image PATH to add a picture to the next question (to change it, for a model trained with one "
            "picture a conversation), /reset to forget, /quit to leave")


def answer(session: ChatSession, question: str, sampling: dict, say: Callable[[str], None],
           out=sys.stdout) -> None:
    """Stream the answer to ``question`` on ``out``, then say what was dropped or cut, if anything."""
    for piece in session.stream(question, **sampling):
        print(piece, end="", flush=True, file=out)
    print(file=out)
    if session.dropped_turns:
        say(f"(forgot the {session.dropped_turns} oldest exchange(s) to fit the context)")
    if session.last_stop == "context":
        say(f"(answer cut: the context of {session.model.llm.n_ctx} tokens is full; /reset, --drop-oldest or a "
            "larger --ctx)")


def run(session: ChatSession, sampling: dict, say: Callable[[str], None],
        read_line: Callable[[str], str] = input) -> None:
    """Read lines until /quit or the end of input; answer each question."""
    say(f"llava-edge chat: {COMMANDS}")
    while True:
        try:
            line = read_line("> ").strip()
        except EOFError:
            break
        except UnicodeDecodeError:  # a line that is not UTF-8: said, and the session goes on
            say("error: that line is not valid UTF-8 text; check the terminal's encoding")
            continue
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            session.reset()
            continue
        if line == "/image" or line.startswith("/image "):
            path = line[len("/image"):].strip()
            try:
                load_image(path)
                session.add_image(path)
            except UserError as e:
                say(f"error: {e}")
            continue
        if line.startswith("/") and not line.startswith("//"):
            say(f"unknown command {line.split()[0]!r}: {COMMANDS} (start a question with // to ask one "
                "that begins with /)")
            continue
        if line.startswith("//"):
            line = line[1:]
        try:
            answer(session, line, sampling, say)
        except UserError as e:
            say(f"error: {e}")
