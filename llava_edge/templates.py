"""Conversation modes: the one source of truth for prompt text.

The modes are LLaVA's own (``llava/conversation.py`` of the LLaVA repository,
release 1.2.2), under LLaVA's names, with LLaVA's system prompts, roles and
separators, and ``get_prompt``'s rendering rules for each separator style.
Training renders whole conversations (``train/labels.py`` then reproduces
LLaVA's label masking for the mode's style), export records the mode in the
bundle, the runtime and drift render the generation prompt as LLaVA's
evaluation scripts do: ``<image>\\n`` before the first question, then
``get_prompt`` of the messages with an open assistant turn.

A rendered prompt is a tuple of parts, not a string: :class:`Text` that the
template wrote (``fixed``: it may hold the tokenizer's special tokens, such as
``</s>``), :class:`Text` that a user or a data file wrote (never turned into
special tokens, whatever it contains) and :data:`IMAGE`, where the image's
embeddings go. ``flat`` joins them into the string LLaVA builds, with
``<image>`` for the image.

One more mode, ``chat_template``, renders the checkpoint's own Jinja chat
template (what transformers users get with ``apply_chat_template``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"  # where transformers' chat templates put a video part (LLaVA-OneVision)
CHAT_TEMPLATE = "chat_template"  # the mode that renders the checkpoint's own Jinja template


@dataclass(frozen=True)
class Turn:
    role: str  # "user" or "assistant"
    text: str
    # how many pictures open the turn (True: one), as LLaVA places them: "<image>\n" each, then the text
    image: bool | int = False
    videos: int = 0  # how many of those are videos (after the images; LLaVA-NeXT's code gives them "<image>" too)
    # the pictures stand where ``<image>`` stands in ``text`` instead of opening the turn: a data file's turn as
    # LLaVA-NeXT's ``preprocess_multimodal`` leaves it (several pictures; or one already first); ``image`` counts them
    inline: bool = False


@dataclass(frozen=True)
class Text:
    text: str
    fixed: bool  # written by the template (may name special tokens), not by a user or a data file


@dataclass(frozen=True)
class Image:
    """Where the image goes (LLaVA: where ``<image>`` stands in the prompt string)."""

    # True: tokenized as transformers' processor tokenizes a chat template's prompt, the image token inside one
    # string; False: as LLaVA's ``tokenizer_image_token``, each chunk between pictures tokenized alone (with a
    # SentencePiece tokenizer the two differ: the chunk after a picture starts a word)
    joined: bool = False


IMAGE = Image()
JOINED_IMAGE = Image(joined=True)


@dataclass(frozen=True)
class Break:
    """Where the code that trains with the mode tokenizes apart: the texts on either side are tokenized alone, as
    the pieces between pictures are (xtuner tokenizes each question, answer and separator on its own)."""


BREAK = Break()
Part = Text | Image | Break
Parts = tuple[Part, ...]


def flat(parts: Parts) -> str:
    """The string LLaVA's code builds for ``parts``."""
    return "".join(IMAGE_PLACEHOLDER if isinstance(p, Image) else "" if isinstance(p, Break) else p.text
                   for p in parts)


def normalize(parts) -> Parts:
    """Adjacent texts of the same kind merged, empty texts dropped."""
    out: list[Part] = []
    for p in parts:
        if isinstance(p, Text):
            if not p.text:
                continue
            if out and isinstance(out[-1], Text) and out[-1].fixed == p.fixed:
                out[-1] = Text(out[-1].text + p.text, p.fixed)
                continue
        out.append(p)
    return tuple(out)


def fixed(s: str) -> Text:
    return Text(s, True)


def message_parts(turn: Turn) -> Parts:
    """A turn's message: its pictures first (``<image>\n`` + text, or ``<image>`` alone, as LLaVA's
    ``preprocess_multimodal`` writes it; several: ``<image>\n`` each), then its text, which is never parsed for
    special tokens or images."""
    n = int(turn.image)
    if turn.inline:
        pieces = turn.text.split(IMAGE_PLACEHOLDER)
        if len(pieces) != n + 1:
            raise ValueError(f"a turn with {n} inline picture(s) holds {len(pieces) - 1} {IMAGE_PLACEHOLDER}")
        out: list[Part] = [Text(pieces[0], False)]
        for piece in pieces[1:]:
            out += [IMAGE, Text(piece, False)]
        return normalize(out)
    if not n:
        return normalize((Text(turn.text, False),))
    return normalize((*(IMAGE, Text("\n", False)) * (n - 1), IMAGE,
                      Text("\n" + turn.text if turn.text else "", False)))


def split_fixed(parts: Parts, sep: str) -> list[Parts]:
    """``str.split(sep)`` on the flat string, splitting only where the template wrote ``sep``.

    LLaVA's label masking splits the conversation string on its separators; user
    text that happens to contain a separator must not split it (LLaVA's split
    would, and then masks the whole sample).
    """
    pieces: list[list[Part]] = [[]]
    for p in normalize(parts):
        if isinstance(p, Text) and p.fixed and sep in p.text:
            chunks = p.text.split(sep)
            pieces[-1].append(Text(chunks[0], True))
            for c in chunks[1:]:
                pieces.append([Text(c, True)])
        else:
            pieces[-1].append(p)
    return [normalize(x) for x in pieces]


# LLaVA's SeparatorStyle (CHATML, LLAMA_3: LLaVA-NeXT's, for its Qwen and Llama 3 modes; XTUNER: xtuner's
# prompt templates, which trained llava-phi-3-mini and llava-llama-3-8b)
SINGLE, TWO, MPT, PLAIN, LLAMA_2, CHATML = "single", "two", "mpt", "plain", "llama_2", "chatml"
LLAMA_3, XTUNER = "llama_3", "xtuner"
LLAMA_3_BOS, LLAMA_3_EOT = "<|begin_of_text|>", "<|eot_id|>"
LLAMA_3_BOS_PART = Text(LLAMA_3_BOS, True)
Message = tuple[str, Parts | None]  # (role, content); None: the open turn the model answers


@dataclass(frozen=True)
class Template:
    """One of LLaVA's ``Conversation`` objects, and how LLaVA's code prompts and trains with it."""

    name: str
    system: str
    roles: tuple[str, str]
    style: str
    sep: str
    sep2: str | None = None
    version: str = "Unknown"  # LLaVA's ``version``: picks the training preprocessor ("v1...", "mpt", ...)
    examples: tuple[tuple[str, str], ...] = ()  # few-shot messages of the conversation object (v0)
    jinja: str | None = field(default=None, compare=False)  # chat_template mode only
    # chat_template mode: the tokenizer's special tokens, as transformers passes them to the template
    # (``bos_token``, ``eos_token``...: its ``special_tokens_map``)
    special_tokens: tuple[tuple[str, str], ...] = field(default=(), compare=False)
    # whose code trains with the mode: LLaVA's (1.2.2), LLaVA-NeXT's (its Qwen and Llama 3 modes) or xtuner's; a
    # data file's ``<image>`` is placed by LLaVA-NeXT's ``preprocess_multimodal`` for LLaVA-NeXT's modes, by LLaVA's
    # for the others (xtuner's ``llava_map_fn`` places it as LLaVA does; ``train/data.py``)
    origin: str = "llava"

    # -- what the runtime needs -------------------------------------------------------------
    @property
    def stop(self) -> tuple[str, ...]:
        """Text that ends an answer (besides the end-of-sequence token): LLaVA's stop string for the style.

        LLaVA's ``KeywordsStoppingCriteria`` keyword is ``sep2`` for the ``two`` style and ``sep``
        for the others; ``plain`` (a stage-1 captioner) learns a caption ended by ``sep``.
        """
        if self.jinja is not None:
            return ()
        s = self.sep2 if self.style in (TWO, LLAMA_2) else self.sep
        return (s,) if s else ()

    @property
    def encoding(self) -> dict:
        """How the code that prompts and trains with the mode tokenizes its prompts (``Tokenizer.encode_prompt``'s
        options): ``fast``, with transformers' fast tokenizer (xtuner; a chat template through transformers'
        processor), not LLaVA's slow one; ``bos_written``, no BOS added before one the template wrote (a chat
        template through transformers' processor; LLaVA-NeXT's Llama 3 mode)."""
        return {"fast": self.jinja is not None or self.style == XTUNER,
                "bos_written": self.jinja is not None or self.style == LLAMA_3}

    @property
    def single_turn(self) -> bool:
        """``plain``: one image and one caption; the question is kept but nothing earlier."""
        return self.style == PLAIN

    def prompt(self, question: str, *, image: bool | int = True, history: list[Turn] | None = None,
               videos: int = 0) -> Parts:
        """The generation prompt, as LLaVA's evaluation scripts build it.

        ``image=True``: the conversation's picture goes first in the first user turn that has one (``<image>\\n``
        + question, as ``run_llava.py`` and ``model_vqa.py`` do), so here unless ``history`` holds it; a number:
        that many new pictures open this turn. Earlier turns come from ``history`` (those that hold pictures
        keep them there).
        """
        turns = list(history or [])
        n = int(image and not any(t.image for t in turns)) if isinstance(image, bool) else int(image)
        turns.append(Turn("user", question, image=n, videos=videos))
        _check_alternation(turns)
        if self.jinja is not None:
            return render_jinja(self.jinja, turns, add_generation_prompt=True, special_tokens=dict(self.special_tokens))
        messages = [(self.roles[i % 2], message_parts(t)) for i, t in enumerate(turns)]
        return self.get_prompt(messages + [(self.roles[1], None)], with_examples=True)

    def conversation(self, turns: list[Turn]) -> Parts:
        """A whole conversation as LLaVA's training renders it (``get_prompt`` of every message)."""
        _check_alternation(turns)
        messages = [(self.roles[i % 2], message_parts(t)) for i, t in enumerate(turns)]
        return self.get_prompt(messages, with_examples=False)

    # -- LLaVA's Conversation.get_prompt ---------------------------------------------------
    def get_prompt(self, messages: list[Message], with_examples: bool = False) -> Parts:
        """``Conversation.get_prompt`` for ``messages`` (after the mode's few-shot examples, if asked)."""
        if with_examples:
            messages = [(r, (Text(t, True),)) for r, t in self.examples] + list(messages)
        out: list[Part] = []
        add = out.append
        if self.style == SINGLE:
            add(fixed(self.system + self.sep))
            for role, msg in messages:
                if msg:
                    out += [fixed(role + ": "), *msg, fixed(self.sep)]
                else:
                    add(fixed(role + ":"))
        elif self.style == TWO:
            seps = (self.sep, self.sep2)
            add(fixed(self.system + seps[0]))
            for i, (role, msg) in enumerate(messages):
                if msg:
                    out += [fixed(role + ": "), *msg, fixed(seps[i % 2])]
                else:
                    add(fixed(role + ":"))
        elif self.style == MPT:
            add(fixed(self.system + self.sep))
            for role, msg in messages:
                if msg:
                    out += [fixed(role), *msg, fixed(self.sep)]
                else:
                    add(fixed(role))
        elif self.style == LLAMA_2:
            for i, (role, msg) in enumerate(messages):
                if i == 0 and (not msg or role != self.roles[0]):
                    raise ValueError("the first message must be the user's")
                if not msg:
                    continue
                if i == 0 and self.system:
                    msg = (fixed(f"<<SYS>>\n{self.system}\n<</SYS>>\n\n"), *msg)
                if i % 2 == 0:
                    out += [fixed(self.sep + "[INST] "), *msg, fixed(" [/INST]")]
                else:
                    out += [fixed(" "), *msg, fixed(" " + self.sep2)]
            out = _lstrip_chars(normalize(out), self.sep)
        elif self.style == CHATML:  # LLaVA-NeXT's conversation.py: a newline after each role and each separator
            if self.system:
                add(fixed(self.system + self.sep + "\n"))
            for role, msg in messages:
                if msg:
                    out += [fixed(role + "\n"), *msg, fixed(self.sep + "\n")]
                else:
                    add(fixed(role + "\n"))
        elif self.style == LLAMA_3:
            # LLaVA-NeXT renders its Llama 3 mode with Llama 3 Instruct's chat template: BOS, the system message,
            # each message between its role header and <|eot_id|> (``| trim``), an open assistant header. Its
            # training (preprocess_llama3) starts with one BOS; its evaluation tokenizes this text with
            # tokenizer_image_token, which adds a second: the prompt here has the one the model learned.
            out += [LLAMA_3_BOS_PART, *llama3_message("system", (fixed(self.system),), self.sep)]
            for role, msg in messages:
                out += llama3_message(role, msg, self.sep) if msg else [fixed(_llama3_header(role))]
        elif self.style == XTUNER:
            # xtuner's template_map_fn: INSTRUCTION (roles[0] + input + roles[1]) around each question, SUFFIX
            # (``sep``) after each answer, then SEP (``sep2``); no system message (xtuner's LLaVA configs set none)
            # (encode_fn tokenizes each of those pieces alone: BREAK between them)
            for i, (role, msg) in enumerate(messages):
                if i % 2 == 0:
                    out += [fixed(self.roles[0]), *(msg or ()), fixed(self.roles[1]), BREAK]
                elif msg:
                    out += [*msg, fixed(self.sep), BREAK]
                    out += [fixed(self.sep2), BREAK] if self.sep2 else []
        elif self.style == PLAIN:
            seps = (self.sep, self.sep2)
            add(fixed(self.system))
            for i, (role, msg) in enumerate(messages):
                if msg:
                    sep = seps[i % 2]
                    if sep is None:  # LLaVA would fail concatenating None: one caption only
                        raise ValueError(f"the {self.name!r} mode takes one image and one caption")
                    out += [*msg, fixed(sep)]
        else:
            raise ValueError(f"unknown separator style {self.style!r}")
        return normalize(out)


def _lstrip_chars(parts: Parts, chars: str) -> Parts:
    """``str.lstrip(chars)`` of the flat string (LLaVA strips the llama_2 separator's characters so)."""
    if not chars or not parts or not isinstance(parts[0], Text):
        return parts
    first = parts[0]
    stripped = first.text.lstrip(chars)
    if stripped or len(parts) == 1:
        return normalize((Text(stripped, first.fixed), *parts[1:]))
    return _lstrip_chars(parts[1:], chars)


def strip_parts(parts: Parts) -> Parts:
    """``str.strip()`` of the flat string (Jinja's ``trim``), pictures left where they are."""
    parts = list(normalize(parts))
    if parts and isinstance(parts[0], Text):
        parts[0] = Text(parts[0].text.lstrip(), parts[0].fixed)
    if parts and isinstance(parts[-1], Text):
        parts[-1] = Text(parts[-1].text.rstrip(), parts[-1].fixed)
    return normalize(parts)


def _llama3_header(role: str) -> str:
    return f"<|start_header_id|>{role}<|end_header_id|>\n\n"


def llama3_message(role: str, msg: Parts, sep: str = LLAMA_3_EOT) -> Parts:
    """One message as Llama 3 Instruct's chat template writes it (no BOS): header, trimmed text, ``sep``."""
    return (fixed(_llama3_header(role)), *strip_parts(msg), fixed(sep))


def _check_alternation(turns: list[Turn]) -> None:
    if not turns or turns[0].role != "user":
        raise ValueError("a conversation starts with a user turn")
    for i, t in enumerate(turns):
        want = "user" if i % 2 == 0 else "assistant"
        if t.role != want:
            raise ValueError(f"turn {i} is from {t.role!r}, expected {want!r}")


# -- LLaVA's conversation objects ----------------------------------------------------------------
_HUMAN_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the human's questions.")
_USER_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                "The assistant gives helpful, detailed, and polite answers to the user's questions.")
_V0_EXAMPLES = (
    ("Human", "What are the key differences between renewable and non-renewable energy sources?"),
    ("Assistant",
     "Renewable energy sources are those that can be replenished naturally in a relatively "
     "short amount of time, such as solar, wind, hydro, geothermal, and biomass. "
     "Non-renewable energy sources, on the other hand, are finite and will eventually be "
     "depleted, such as coal, oil, and natural gas. Here are some key differences between "
     "renewable and non-renewable energy sources:\n"
     "1. Availability: Renewable energy sources are virtually inexhaustible, while non-renewable "
     "energy sources are finite and will eventually run out.\n"
     "2. Environmental impact: Renewable energy sources have a much lower environmental impact "
     "than non-renewable sources, which can lead to air and water pollution, greenhouse gas emissions, "
     "and other negative effects.\n"
     "3. Cost: Renewable energy sources can be more expensive to initially set up, but they typically "
     "have lower operational costs than non-renewable sources.\n"
     "4. Reliability: Renewable energy sources are often more reliable and can be used in more remote "
     "locations than non-renewable sources.\n"
     "5. Flexibility: Renewable energy sources are often more flexible and can be adapted to different "
     "situations and needs, while non-renewable sources are more rigid and inflexible.\n"
     "6. Sustainability: Renewable energy sources are more sustainable over the long term, while "
     "non-renewable sources are not, and their depletion can lead to economic and social instability.\n"),
)
_LLAMA_2_SYSTEM = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being "
    "safe.  Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal "
    "content. Please ensure that your responses are socially unbiased and positive in nature.\n\n"
    "If a question does not make any sense, or is not factually coherent, explain why instead of answering "
    "something not correct. If you don't know the answer to a question, please don't share false information."
)
_LLAVA_LLAMA_2_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the visual "
                         "content that the user provides, and assist the user with a variety of tasks using natural "
                         "language.")

vicuna_v0 = Template("vicuna_v0", _HUMAN_SYSTEM, ("Human", "Assistant"), SINGLE, "###", examples=_V0_EXAMPLES)
vicuna_v1 = Template("vicuna_v1", _USER_SYSTEM, ("USER", "ASSISTANT"), TWO, " ", "</s>", version="v1")
llama_2 = Template("llama_2", _LLAMA_2_SYSTEM, ("USER", "ASSISTANT"), LLAMA_2, "<s>", "</s>", version="llama_v2")
llava_llama_2 = Template("llava_llama_2", _LLAVA_LLAMA_2_SYSTEM, ("USER", "ASSISTANT"), LLAMA_2, "<s>", "</s>",
                         version="llama_v2")
mistral_instruct = Template("mistral_instruct", "", ("USER", "ASSISTANT"), LLAMA_2, "", "</s>", version="llama_v2")
chatml_direct = Template("chatml_direct", "<|im_start|>system\nAnswer the questions.",
                         ("<|im_start|>user\n", "<|im_start|>assistant\n"), MPT, "<|im_end|>", version="mpt")
mpt = Template("mpt", "<|im_start|>system\nA conversation between a user and an LLM-based AI assistant. The assistant "
               "gives helpful and honest answers.", ("<|im_start|>user\n", "<|im_start|>assistant\n"), MPT,
               "<|im_end|>", version="mpt")
llava_plain = Template("plain", "", ("", ""), PLAIN, "\n")
# LLaVA-NeXT's conv_qwen (its "qwen_1_5" and "qwen_2" modes: LLaVA-OneVision and LLaVA-Interleave's training)
qwen_1_5 = Template("qwen_1_5", "<|im_start|>system\nYou are a helpful assistant.",
                    ("<|im_start|>user", "<|im_start|>assistant"), CHATML, "<|im_end|>", version="qwen",
                    origin="llava-next")
# LLaVA-NeXT's conv_llava_llama_3 (llama3-llava-next-8b; trained by its preprocess_llama3)
llava_llama_3 = Template("llava_llama_3", _LLAVA_LLAMA_2_SYSTEM, ("user", "assistant"), LLAMA_3, LLAMA_3_EOT,
                         version="llama_v3", origin="llava-next")
# xtuner's phi3_chat and llama3_chat (xtuner/utils/templates.py): xtuner's llava-phi-3-mini and llava-llama-3-8b;
# xtuner places a data file's <image> as LLaVA does (llava_map_fn)
phi3_chat = Template("phi3_chat", "", ("<|user|>\n", "<|end|>\n<|assistant|>\n"), XTUNER, "<|end|>", "\n",
                     version="xtuner", origin="xtuner")
llama3_chat = Template("llama3_chat", "", (_llama3_header("user"), LLAMA_3_EOT + _llama3_header("assistant")),
                       XTUNER, LLAMA_3_EOT, "", version="xtuner", origin="xtuner")
llava_v0 = Template("llava_v0", _HUMAN_SYSTEM, ("Human", "Assistant"), SINGLE, "###")
llava_v1 = Template("llava_v1", _HUMAN_SYSTEM, ("USER", "ASSISTANT"), TWO, " ", "</s>", version="v1")

# LLaVA's conv_templates, by LLaVA's names (the mmtag modes, which change the image markup, are left out)
TEMPLATES: dict[str, Template] = {
    "default": vicuna_v0,
    "v0": vicuna_v0,
    "v1": vicuna_v1,
    "vicuna_v1": vicuna_v1,
    "llama_2": llama_2,
    "mistral_instruct": mistral_instruct,
    "chatml_direct": chatml_direct,
    "mistral_direct": chatml_direct,
    "plain": llava_plain,
    "v0_plain": llava_plain,
    "llava_v0": llava_v0,
    "llava_v1": llava_v1,
    "llava_llama_2": llava_llama_2,
    "mpt": mpt,
    "qwen_1_5": qwen_1_5,
    "qwen_2": qwen_1_5,
    "llava_llama_3": llava_llama_3,
    "phi3_chat": phi3_chat,
    "llama3_chat": llama3_chat,
}
MODES = (*TEMPLATES, CHAT_TEMPLATE)


def get_template(name: str, chat_template: str | None = None, special_tokens: dict | None = None) -> Template:
    """The conversation mode ``name``; for the ``chat_template`` mode, the checkpoint's Jinja text and its
    tokenizer's special tokens (``Settings.special_tokens_map``)."""
    from .errors import UserError

    if name == CHAT_TEMPLATE:
        if not chat_template:
            raise UserError("conversation mode 'chat_template' needs the checkpoint's chat template, and it has none")
        return Template(CHAT_TEMPLATE, "", ("user", "assistant"), TWO, "", jinja=chat_template,
                        special_tokens=tuple(sorted((special_tokens or {}).items())))
    try:
        return TEMPLATES[name]
    except KeyError:
        raise UserError(f"unknown conversation mode {name!r}; known: {', '.join(MODES)}") from None


def mode_for_model_name(name: str) -> str:
    """The mode LLaVA's own scripts pick from a model's name (``run_llava.py``, ``serve/cli.py``)."""
    n = name.lower()
    if "llama-2" in n:
        return "llava_llama_2"
    if "mistral" in n:
        return "mistral_instruct"
    if "v1.6-34b" in n:
        return "chatml_direct"
    if "v1" in n:
        return "llava_v1"
    if "mpt" in n:
        return "mpt"
    return "llava_v0"


def expand_image(ids: list, image_token_id: int, slots: list) -> list:
    """``ids`` with its one image token replaced by ``slots`` (image token copies, labels, KV slots...)."""
    where = [i for i, t in enumerate(ids) if t == image_token_id]
    if len(where) != 1:
        raise ValueError(f"expected one {IMAGE_PLACEHOLDER} token, found {len(where)}")
    i = where[0]
    return ids[:i] + list(slots) + ids[i + 1 :]


def expand_images(ids: list, image_token_id: int, slots: list[list]) -> list:
    """``ids`` with each of its image tokens replaced, in order, by that picture's ``slots``."""
    where = [i for i, t in enumerate(ids) if t == image_token_id]
    if len(where) != len(slots):
        raise ValueError(f"expected {len(slots)} {IMAGE_PLACEHOLDER} tokens, found {len(where)}")
    out, at = [], 0
    for i, s in zip(where, slots):
        out += ids[at:i] + list(s)
        at = i + 1
    return out + ids[at:]


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


# -- the checkpoint's own chat template -------------------------------------------------------------
_SENTINEL = "\u3000\ue000{}\ue001\u3000"  # private-use characters around a message number: no template writes them
# the ideographic spaces around it show whether the template trims a message (``| trim``: Python's ``strip``)
_SENTINEL_RE = re.compile("(\u3000?)\ue000(\\d+)\ue001(\u3000?)")


def render_jinja(template: str, turns: list[Turn], add_generation_prompt: bool,
                 special_tokens: dict | None = None) -> Parts:
    """The checkpoint's Jinja chat template, as transformers renders it, into parts.

    Each message's text is rendered as a sentinel first and put back afterwards, so the
    template's own text is ``fixed`` and the messages' text never becomes special tokens.
    A turn with pictures gets an image part for each first; the ``<image>`` the template writes
    for it is where the image goes. ``special_tokens`` (``bos_token``...) are passed to the template
    as transformers passes the tokenizer's.

    A template written for text-only messages (a language model's own: Llama 3's, Phi-3's, Mistral's)
    reads ``message['content']`` as a string; given transformers' list of parts it fails or writes the
    list's repr. Such a template gets each message as a string instead, its pictures written first as
    LLaVA writes them (``<image>\n`` each, ``<video>\n`` for a video), which is what a transformers user
    of such a checkpoint types.
    """
    from .errors import UserError

    try:
        compiled = _jinja_env().from_string(template)
    except Exception as e:  # a template error is the checkpoint's problem, said in one line
        raise UserError(f"the checkpoint's chat template failed to render: {type(e).__name__}: {e}") from None

    def render(as_string: bool) -> str:
        messages = []
        for i, t in enumerate(turns):
            n_images = int(t.image) - t.videos
            if as_string:
                content = (f"{IMAGE_PLACEHOLDER}\n" * n_images + f"{VIDEO_PLACEHOLDER}\n" * t.videos
                           + _SENTINEL.format(i))
            else:
                content = [{"type": "image"} for _ in range(n_images)]
                content += [{"type": "video"} for _ in range(t.videos)]
                content.append({"type": "text", "text": _SENTINEL.format(i)})
            messages.append({"role": t.role, "content": content})
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               **(special_tokens or {}))

    def complete(text: str) -> bool:
        return sorted(int(m.group(2)) for m in _SENTINEL_RE.finditer(text)) == list(range(len(turns)))

    def attempt(as_string: bool) -> str | Exception:
        try:
            return render(as_string)
        except Exception as e:  # noqa: BLE001 - reported below, in one line
            return e

    text, as_string = attempt(as_string=False), False
    if isinstance(text, Exception) or not complete(text):  # the text-only reading, when it writes every message
        alt = attempt(as_string=True)
        if isinstance(text, Exception) or (not isinstance(alt, Exception) and complete(alt)):
            text, as_string = alt, True
    if isinstance(text, Exception):  # a template error is the checkpoint's problem, said in one line
        raise UserError(f"the checkpoint's chat template failed to render: {type(text).__name__}: {text}")
    out: list[Part] = []
    pos = 0
    for m in _SENTINEL_RE.finditer(text):
        before = text[pos:m.start()]
        turn = turns[int(m.group(2))]
        message = turn.text if m.group(1) else turn.text.lstrip()
        message = message if m.group(3) else message.rstrip()
        if as_string and turn.image and not m.group(3) and not message and before.endswith("\n"):
            # a trimmed string "<image>\n" + nothing ends at the picture: the newline after it goes too
            before = before[:-1]
        out += _template_text(before)
        out.append(Text(message, False))
        pos = m.end()
    out += _template_text(text[pos:])
    return normalize(out)


def _jinja_env():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    env.add_extension(_generation_tag())
    return env


def _template_text(s: str) -> list[Part]:
    """Text the chat template wrote, with the ``<image>`` (``<video>``) it writes for an image (video) part as the
    place of that picture."""
    out: list[Part] = []
    for j, chunk in enumerate(re.split(f"{re.escape(IMAGE_PLACEHOLDER)}|{re.escape(VIDEO_PLACEHOLDER)}", s)):
        if j:
            out.append(JOINED_IMAGE)
        out.append(Text(chunk, True))
    return out


def _raise(message: str):
    raise ValueError(message)


def _generation_tag():
    """transformers' ``{% generation %}`` block (marks assistant text for its masks): rendered as its body."""
    from jinja2 import nodes
    from jinja2.ext import Extension

    class GenerationTag(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body, lineno=lineno)

    return GenerationTag
