"""Conversation templates: the one source of truth for prompt text.

Training renders whole conversations and learns from the spans marked as
targets; export records the template name in the bundle; the runtime renders the
same template up to the open assistant turn. The formats follow LLaVA's
``conversation.py`` (``conv_llava_plain`` and ``conv_vicuna_v1``).
"""

from __future__ import annotations

from dataclasses import dataclass

IMAGE_PLACEHOLDER = "<image>"


@dataclass(frozen=True)
class Turn:
    role: str  # "user" or "assistant"
    text: str


@dataclass(frozen=True)
class Rendered:
    """A rendered conversation: the text and the character spans the model must learn."""

    text: str
    targets: tuple[tuple[int, int], ...]  # [start, end) character spans of assistant output

    def target_texts(self) -> list[str]:
        return [self.text[a:b] for a, b in self.targets]


@dataclass(frozen=True)
class Template:
    name: str
    system: str
    user_role: str
    assistant_role: str
    sep: str  # after a user turn
    sep2: str  # after an assistant turn; part of the target (the model learns to stop)
    drop_user_text: bool = False  # LLaVA's `plain`: keep only the image of the human turn

    def render(self, turns: list[Turn], *, open_assistant: bool = False) -> Rendered:
        """Render ``turns``; with ``open_assistant`` end with the assistant's cue for generation."""
        if not turns or turns[0].role != "user":
            raise ValueError("a conversation starts with a user turn")
        for i, t in enumerate(turns):
            want = "user" if i % 2 == 0 else "assistant"
            if t.role != want:
                raise ValueError(f"turn {i} is from {t.role!r}, expected {want!r}")
        if self.drop_user_text:
            return self._render_plain(turns, open_assistant)
        out = self.system + self.sep if self.system else ""
        targets: list[tuple[int, int]] = []
        for t in turns:
            if t.role == "user":
                out += f"{self.user_role}: {t.text}{self.sep}"
            else:
                out += f"{self.assistant_role}:"
                start = len(out)
                out += f" {t.text}{self.sep2}"
                # The target is everything the model must generate after "ASSISTANT:",
                # the space included: a tokenizer may emit that space as a token of its
                # own ('▁' before a digit), and generation must learn to produce it.
                targets.append((start, len(out)))
        if open_assistant:
            if turns[-1].role != "user":
                raise ValueError("open_assistant needs the last turn to be the user's")
            out += f"{self.assistant_role}:"
        return Rendered(out, tuple(targets))

    def _render_plain(self, turns: list[Turn], open_assistant: bool) -> Rendered:
        if len(turns) > 2:
            raise ValueError("the plain template takes one image and one caption")
        # LLaVA's tokenizer_image_token tokenizes the text after <image> as a chunk of its
        # own, so a SentencePiece tokenizer starts the caption with a word-start piece
        # ('▁two'). Tokenizing "<image>two" in one go gives 't', 'wo' instead: pieces a
        # pretrained language model has rarely seen at a word start, whose loss then
        # dominates stage 1 (measured on the toy: the first word and the final newline
        # were 60% of the stage-1 loss). A space after the image gives LLaVA's ids for a
        # SentencePiece vocabulary (Llama/Vicuna, tested); a byte-level BPE one (Llama 3)
        # gets the word-start form too ('Ġtwo'), where LLaVA's chunking would give 'two'.
        # (A prompt to caption from stays "<image>": the model then generates '▁two' itself.)
        out = IMAGE_PLACEHOLDER
        targets: list[tuple[int, int]] = []
        if len(turns) == 2:
            out += " "
            start = len(out)
            out += turns[1].text + self.sep
            targets.append((start, len(out)))
        return Rendered(out, tuple(targets))

    def prompt(self, question: str, *, image: bool = True, history: list[Turn] | None = None) -> str:
        """The text to generate from: history, then ``question`` (with the image first)."""
        turns = list(history or [])
        if image and not any(IMAGE_PLACEHOLDER in t.text for t in turns):
            question = f"{IMAGE_PLACEHOLDER}\n{question}"
        turns.append(Turn("user", question))
        return self.render(turns, open_assistant=True).text


PLAIN = Template(
    name="plain", system="", user_role="", assistant_role="", sep="\n", sep2="\n", drop_user_text=True
)
VICUNA_V1 = Template(
    name="vicuna_v1",
    system=(
        "A chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human's questions."
    ),
    user_role="USER",
    assistant_role="ASSISTANT",
    sep=" ",
    sep2="</s>",
)

TEMPLATES: dict[str, Template] = {t.name: t for t in (PLAIN, VICUNA_V1)}


def get_template(name: str) -> Template:
    try:
        return TEMPLATES[name]
    except KeyError:
        from .errors import UserError

        raise UserError(f"unknown template {name!r}; known: {', '.join(TEMPLATES)}") from None


def expand_image(ids: list, image_token_id: int, slots: list) -> list:
    """``ids`` with its one ``<image>`` token replaced by ``slots`` (image token copies, labels, KV slots...)."""
    where = [i for i, t in enumerate(ids) if t == image_token_id]
    if len(where) != 1:
        raise ValueError(f"expected one {IMAGE_PLACEHOLDER} token, found {len(where)}")
    i = where[0]
    return ids[:i] + list(slots) + ids[i + 1 :]


def turns_from_llava(conversations: list[dict]) -> list[Turn]:
    """LLaVA's JSON ``conversations`` (``from``: human/gpt) as turns."""
    roles = {"human": "user", "gpt": "assistant", "user": "user", "assistant": "assistant"}
    turns = []
    for c in conversations:
        role = roles.get(c.get("from", ""))
        if role is None:
            raise ValueError(f"unknown speaker {c.get('from')!r}")
        turns.append(Turn(role, c["value"]))
    return turns
