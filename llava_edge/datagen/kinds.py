"""The three kinds of instruction data, as in LLaVA: the prompt each is asked with, and how its answer is read.

- **conversation**: several questions and answers about the picture (``Q:`` / ``A:`` lines);
- **detail**: a detailed description, asked with one of ``DETAIL_QUESTIONS``;
- **reasoning**: one question that needs reasoning and its answer.

Each kind's prompt is a system message and a few-shot exchange (example context and
response), written for this project and kept as files (``prompts/KIND/system.txt`` and
``examples.json``); ``--prompts DIR`` reads them from DIR instead, ``--show-prompts``
prints them. An answer that breaks its kind's format is rejected with a reason, never
repaired.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..errors import UserError

KINDS = ("conversation", "detail", "reasoning")
# the questions a detailed description is asked with (one drawn per record)
DETAIL_QUESTIONS = (
    "Describe the image in detail.",
    "Give a detailed description of this picture.",
    "What is happening in this image? Describe it thoroughly.",
    "Explain the scene in the image in detail.",
    "Write a detailed account of what you see in the picture.",
    "Describe everything in this photo, and where it is.",
    "Can you describe this image thoroughly?",
    "Tell me about this picture in detail.",
)
MAX_TURNS = 10
LIMITS = {"question": 500, "answer": 3000}  # characters
MIN_ANSWER = {"detail": 60, "reasoning": 60}
# an answer that talks about what it was given, not about the picture
_MENTIONS_CONTEXT = re.compile(r"\b(captions?|bounding box(es)?|coordinates?|the (given|provided) "
                               r"(context|description|information)|x1|y2)\b", re.I)
_CHAT_MARKUP = re.compile(r"<\|im_(start|end)\|>|</?s>|\[/?INST\]|^(USER|ASSISTANT|Human|GPT)\s*:", re.M)
_TURN = re.compile(r"^\s*(?:\*\*)?(Q|A|Question|Answer)\s*(?:\d+)?\s*:(?:\*\*)?\s*", re.I | re.M)


class Rejected(Exception):
    """An answer that is not used; ``reason`` is one of the summary's counters."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class KindPrompt:
    kind: str
    system: str
    examples: list[tuple[str, str]]  # (context, response)

    def messages(self, context: str) -> list[dict]:
        """OpenAI chat messages: the system prompt, the few-shot exchange, then this picture's context."""
        out = [{"role": "system", "content": self.system}]
        for ctx, response in self.examples:
            out += [{"role": "user", "content": ctx}, {"role": "assistant", "content": response}]
        return out + [{"role": "user", "content": context}]


def load_prompts(kinds: list[str], directory: Path | None = None) -> dict[str, KindPrompt]:
    """The prompt of each kind, from ``directory`` (``KIND/system.txt``, ``KIND/examples.json``) or the package's."""
    out = {}
    for kind in kinds:
        if kind not in KINDS:
            raise UserError(f"unknown kind {kind!r}; choose from: {', '.join(KINDS)}")
        base = Path(directory) / kind if directory else resources.files(__package__).joinpath("prompts", kind)
        try:
            system = base.joinpath("system.txt").read_text(encoding="utf-8").strip()
            examples = json.loads(base.joinpath("examples.json").read_text(encoding="utf-8"))
            pairs = [(str(e["context"]), str(e["response"])) for e in examples]
        except FileNotFoundError as e:
            raise UserError(f"prompt file missing for kind {kind}: {e.filename}") from None
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{base}/examples.json must be a list of {{\"context\", \"response\"}} ({e})") from None
        if not system:
            raise UserError(f"{base}/system.txt is empty")
        out[kind] = KindPrompt(kind, system, pairs)
    return out


def parse(kind: str, text: str) -> list[tuple[str, str]]:
    """The (question, answer) turns in ``text`` for ``kind`` (a detail answer comes back as [("", text)]);
    raises :class:`Rejected` for an answer that breaks the format or its bounds."""
    text = (text or "").strip()
    if not text:
        raise Rejected("empty")
    if _CHAT_MARKUP.search(text):
        raise Rejected("format", "chat markup in the answer")
    if _MENTIONS_CONTEXT.search(text):
        raise Rejected("mentions_context", _MENTIONS_CONTEXT.search(text).group(0))
    if kind == "detail":
        if _TURN.search(text):
            raise Rejected("format", "question/answer lines in a description")
        turns = [("", text)]
    else:
        turns = _turns(text)
        if kind == "reasoning" and len(turns) != 1:
            raise Rejected("format", f"{len(turns)} question/answer pairs, one expected")
        if len(turns) > MAX_TURNS:
            raise Rejected("too_many_turns", str(len(turns)))
    for q, a in turns:
        if len(q) > LIMITS["question"] or len(a) > LIMITS["answer"]:
            raise Rejected("too_long")
        if len(a) < MIN_ANSWER.get(kind, 1):
            raise Rejected("too_short")
    return turns


def _turns(text: str) -> list[tuple[str, str]]:
    marks = list(_TURN.finditer(text))
    if not marks or text[: marks[0].start()].strip():
        raise Rejected("format", "no Q:/A: lines, or text before the first")
    parts = []
    for i, m in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        parts.append(("Q" if m.group(1).upper().startswith("Q") else "A", text[m.end():end].strip()))
    if len(parts) % 2 or any(role != ("Q" if i % 2 == 0 else "A") for i, (role, _) in enumerate(parts)):
        raise Rejected("format", "questions and answers do not alternate")
    turns = [(parts[i][1], parts[i + 1][1]) for i in range(0, len(parts), 2)]
    if any(not q or not a for q, a in turns):
        raise Rejected("format", "an empty question or answer")
    return turns
