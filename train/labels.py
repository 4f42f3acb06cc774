"""Token ids and training labels as LLaVA's own ``preprocess`` makes them, mode by mode.

LLaVA (``llava/train/train.py``) renders a record with its conversation mode,
tokenizes it with ``tokenizer_image_token`` and then masks the labels by
*length arithmetic*: it splits the conversation string at the mode's
separators, tokenizes each round and each instruction on its own, and learns
the positions between ``instruction_len`` and ``round_len``, with corrections
(``- 2``, the ``legacy`` adjustments) that depend on the tokenizer. Which
positions a model learns, a leading ``▁`` before a digit, a stop token, is
decided there; a reimplementation by character spans learns slightly different
positions. So this module follows LLaVA's functions step by step
(``preprocess_plain``, ``preprocess_v1``, ``preprocess_llama_2``,
``preprocess_mpt`` and the generic ``_add_speaker_and_signal`` path; LLaVA-NeXT's
``preprocess_qwen`` and ``preprocess_llama3`` for its Qwen and Llama 3 modes, which mask by message
instead; and xtuner's ``encode_fn`` for its templates, which trained llava-phi-3-mini and
llava-llama-3-8b), on
structured prompts (``templates.Parts``) with one difference: the separators
are looked for only where the template wrote them, so a question that contains
`` ASSISTANT: `` does not split a round (LLaVA's string split would, and then
zero the sample).

LLaVA zeroes every label of a record whose rounds do not add up to its length
("tokenization mismatch"); so does this module, and it says so
(``Encoded.mismatch``), for the caller to count. The tokenizer-version
corrections are those of LLaVA with ``tokenizers >= 0.14`` (LLaVA 1.2.2's
requirement).
"""

from __future__ import annotations

from dataclasses import dataclass

from llava_edge.templates import (IMAGE, LLAMA_2, LLAMA_3_BOS, LLAMA_3_BOS_PART, PLAIN, XTUNER, Image, Parts, Template,
                                  Text, Turn, fixed, flat, llama3_message, message_parts, normalize, split_fixed)
from llava_edge.tokenizer import Tokenizer

IGNORE_INDEX = -100


@dataclass
class Labeled:
    input_ids: list[int]  # one ``image_token_id`` where the image goes
    labels: list[int]
    mismatch: bool  # LLaVA's "tokenization mismatch": every label ignored


def label(turns: list[Turn], template: Template, tok: Tokenizer, image_token_id: int, has_image: bool,
          max_length: int) -> Labeled:
    """LLaVA's ``preprocess`` for one record (after ``preprocess_multimodal``), by the mode's separator style."""
    if template.jinja is not None:
        raise ValueError("the chat_template mode is for chat; train with one of LLaVA's modes")
    if template.style == PLAIN:
        return _plain(turns, template, tok, image_token_id)
    if template.style == LLAMA_2:
        return _rounds(turns, template, tok, image_token_id, has_image, max_length, sep="[/INST] ")
    if template.version.startswith("v1"):
        return _rounds(turns, template, tok, image_token_id, has_image, max_length,
                       sep=template.sep + template.roles[1] + ": ")
    if template.version == "mpt":
        return _mpt(turns, template, tok, image_token_id, has_image, max_length)
    if template.version == "qwen":
        return _qwen(turns, template, tok, image_token_id, max_length)
    if template.version == "llama_v3":
        return _llama3(turns, template, tok, image_token_id, max_length)
    if template.style == XTUNER:
        return _xtuner(turns, template, tok, image_token_id)
    return _speaker_signal(turns, template, tok, image_token_id, has_image)


def _ids(tok: Tokenizer, parts: Parts, image_token_id: int, has_image: bool) -> list[int]:
    """``tokenizer_image_token(prompt)`` for a record with an image, ``tokenizer(prompt).input_ids`` without."""
    return tok.encode_prompt(parts, image_token_id) if has_image else tok.encode(parts)


def _plain(turns, template, tok, image_token_id) -> Labeled:
    # preprocess_plain: the human turn is replaced by the image alone, the caption follows with sep
    if len(turns) != 2:
        raise ValueError(f"the {template.name!r} mode takes one image and one caption per record")
    conversation = normalize((IMAGE, Text(turns[1].text, False), fixed(template.sep)))
    ids = tok.encode_prompt(conversation, image_token_id)
    labels = list(ids)
    masked = len(tok.encode_prompt((IMAGE,), image_token_id))
    labels[:masked] = [IGNORE_INDEX] * min(masked, len(labels))
    return Labeled(ids, labels, False)


def _rounds(turns, template, tok, image_token_id, has_image, max_length, sep: str) -> Labeled:
    # preprocess_v1 and preprocess_llama_2: rounds end with sep2, the answer follows `sep`
    conversation = template.conversation(turns)
    ids = _ids(tok, conversation, image_token_id, has_image)
    labels = list(ids)
    _ignore(labels, 0, 1)
    # later rounds: "USER" after "</s>" has no word start in a non-legacy tokenizer, one piece fewer (LLaMA's)
    adjust = -1 if template.style != LLAMA_2 and not tok.settings.legacy else 0
    cur = _mask_rounds(labels, split_fixed(conversation, template.sep2), sep, tok, image_token_id, has_image,
                       start=1, drop=2, adjust=adjust)
    return _finish(ids, labels, cur, max_length)


def _mask_rounds(labels: list[int], rounds: list[Parts], sep: str, tok: Tokenizer, image_token_id: int,
                 has_image: bool, *, start: int, drop: int, adjust: int) -> int:
    """LLaVA's loop over rounds: ignore each round's instruction (its tokens alone, less ``drop``), learn the rest;
    rounds after the first are ``adjust``-ed; returns where the rounds end (``cur_len``)."""
    cur = start
    for i, rou in enumerate(rounds):
        if flat(rou) == "":
            break
        parts = split_fixed(rou, sep)
        if len(parts) != 2:
            break
        instruction = normalize((*parts[0], fixed(sep)))
        round_len = len(_ids(tok, rou, image_token_id, has_image))
        instruction_len = len(_ids(tok, instruction, image_token_id, has_image)) - drop
        if i != 0:
            round_len += adjust
            instruction_len += adjust
        _ignore(labels, cur, cur + instruction_len)
        cur += round_len
    return cur


def _mpt(turns, template, tok, image_token_id, has_image, max_length) -> Labeled:
    # preprocess_mpt: split at sep, regroup (system + user + assistant), then (user + assistant) pairs
    conversation = template.conversation(turns)
    ids = _ids(tok, conversation, image_token_id, has_image)
    labels = list(ids)
    sep = template.sep + template.roles[1]
    rounds = split_fixed(conversation, template.sep)

    def join(group: list[Parts]) -> Parts:
        out: list = []
        for k, g in enumerate(group):
            if k:
                out.append(fixed(template.sep))
            out += g
        return normalize(out)

    regrouped = [join(rounds[:3])] + [join(rounds[k:k + 2]) for k in range(3, len(rounds), 2)]
    cur = _mask_rounds(labels, regrouped, sep, tok, image_token_id, has_image, start=0, drop=1,
                       adjust=1 if tok.settings.legacy else 0)
    return _finish(ids, labels, cur, max_length)


def _speaker_signal(turns, template, tok, image_token_id, has_image) -> Labeled:
    # the generic path (v0): "### ROLE: text\n" per sentence after a header, human sentences masked from
    # their third token on, by lengths of each piece tokenized alone (each with its own BOS)
    header: Parts = (fixed(f"{template.system}\n\n"),)
    sentences = [normalize((fixed(f"### {template.roles[0 if t.role == 'user' else 1]}: "), *message_parts(t),
                            fixed("\n"))) for t in turns]
    conversation = normalize((*header, *(p for s in sentences for p in s), fixed("### ")))
    ids = _ids(tok, conversation, image_token_id, has_image)
    labels = list(ids)
    lens = [len(_ids(tok, p, image_token_id, has_image)) for p in (header, *sentences)]
    cur = lens[0]
    _ignore(labels, 0, cur)
    for n, t in zip(lens[1:], turns):
        if t.role == "user":
            _ignore(labels, cur + 2, cur + n)
        cur += n
    return Labeled(ids, labels, False)


def _alone(tok: Tokenizer, parts: Parts, image_token_id: int, fast: bool = False) -> list[int]:
    """Text tokenized as one string with no special tokens added, the image token where each picture goes (as
    ``apply_chat_template`` with ``<image>`` added as a special token, and as xtuner's chunks between pictures)."""
    out: list[int] = []
    chunk: list[Text] = []
    for p in (*normalize(parts), None):
        if isinstance(p, Text):
            chunk.append(p)
            continue
        out += tok.encode(tuple(chunk), add_special_tokens=False, fast=fast) if chunk else []
        chunk = []
        if isinstance(p, Image):
            out.append(image_token_id)
    return out


def _by_message(turns, tok, image_token_id, head: Parts, message, keep: set, max_length: int) -> Labeled:
    """LLaVA-NeXT's preprocess_qwen and preprocess_llama3: ``head`` (the system message) ignored, then each message
    rendered (``message(role, turn)``) and tokenized alone, a user's ignored and an assistant's learned whole, then
    every id in ``keep`` learned wherever it stands, the user's included. A record that opens with an assistant turn
    loses it."""
    if turns and turns[0].role != "user":
        turns = turns[1:]
    ids = _alone(tok, head, image_token_id)
    labels = [IGNORE_INDEX] * len(ids)
    for t in turns:
        role = "user" if t.role == "user" else "assistant"
        x = _alone(tok, message(role, t), image_token_id)
        ids += x
        labels += [IGNORE_INDEX] * len(x) if role == "user" else x
    labels = [i if i in keep else lab for i, lab in zip(ids, labels)]
    return _finish(ids, labels, len(ids), max_length)


def _qwen(turns, template, tok, image_token_id, max_length) -> Labeled:
    # LLaVA-NeXT's preprocess_qwen: each message "<|im_start|>ROLE\n" + text + "<|im_end|>\n" (apply_chat_template:
    # no BOS, "<image>" a special token); "\n", "<|im_start|>" and "<|im_end|>" learned everywhere. The original
    # unmasks the id 198, which is "\n" in Qwen's vocabulary; here it is the id this tokenizer gives "\n", the same
    # for Qwen's.
    start, end = template.roles[0].split("user")[0], template.sep  # "<|im_start|>", "<|im_end|>"
    newline = tok.encode((fixed("\n"),), add_special_tokens=False)
    keep = {i for i in (tok.token_id(start), tok.token_id(end)) if i is not None}
    keep |= set(newline) if len(newline) == 1 else set()
    return _by_message(turns, tok, image_token_id, (fixed(template.system + end + "\n"),),
                       lambda role, t: (fixed(f"{start}{role}\n"), *message_parts(t), fixed(f"{end}\n")),
                       keep, max_length)


def _llama3(turns, template, tok, image_token_id, max_length) -> Labeled:
    # LLaVA-NeXT's preprocess_llama3: the system message with Llama 3 Instruct's chat template (BOS first), then
    # each message with it, its BOS dropped ("| trim" on the text); <|begin_of_text|>, <|start_header_id|>,
    # <|end_header_id|> and <|eot_id|> learned everywhere. The original also names "\n\n" to learn, by
    # convert_tokens_to_ids("\n\n"): a byte-level vocabulary spells that token "ĊĊ", so the lookup finds nothing
    # (Llama 3's tokenizer has no unknown token) and no newline is learned outside the assistant's messages.
    keep = {tok.token_id(t) for t in (LLAMA_3_BOS, "<|start_header_id|>", "<|end_header_id|>", template.sep)}
    head = (LLAMA_3_BOS_PART, *llama3_message("system", (fixed(template.system),), template.sep))
    return _by_message(turns, tok, image_token_id, head,
                       lambda role, t: llama3_message(role, message_parts(t), template.sep), keep - {None}, max_length)


def _xtuner(turns, template, tok, image_token_id) -> Labeled:
    # xtuner's llava_map_fn + template_map_fn + encode_fn: the tokenizer's BOS (added by id, whatever the tokenizer
    # says), then per round the INSTRUCTION around the question (ignored; the text between pictures tokenized chunk
    # by chunk, no special tokens added), the answer + SUFFIX tokenized as one (learned; SUFFIX_AS_EOS: no EOS
    # after it), then SEP (ignored). xtuner cuts the text at max length before the pictures are expanded; here the
    # dataset cuts after, counting them (``expand``). Leading assistant turns are dropped.
    while turns and turns[0].role != "user":
        turns = turns[1:]
    ids = [tok.bos_id] if tok.bos_id is not None else []
    labels = [IGNORE_INDEX] * len(ids)
    for k in range(0, len(turns), 2):
        question = _alone(tok, (fixed(template.roles[0]), *message_parts(turns[k]), fixed(template.roles[1])),
                          image_token_id, fast=True)
        ids += question
        labels += [IGNORE_INDEX] * len(question)
        if k + 1 < len(turns):
            answer = tok.encode((*message_parts(turns[k + 1]), fixed(template.sep)), add_special_tokens=False,
                                fast=True)
            ids += answer
            labels += answer
            if template.sep2:
                sep = tok.encode((fixed(template.sep2),), add_special_tokens=False, fast=True)
                ids += sep
                labels += [IGNORE_INDEX] * len(sep)
    return Labeled(ids, labels, False)


def _ignore(labels: list[int], a: int, b: int) -> None:
    """``target[a:b] = IGNORE_INDEX`` with Python's slice rules."""
    a, b, _ = slice(a, b).indices(len(labels))
    for k in range(a, b):
        labels[k] = IGNORE_INDEX


def _finish(ids: list[int], labels: list[int], cur: int, max_length: int) -> Labeled:
    _ignore(labels, cur, len(labels))
    mismatch = cur < max_length and cur != len(ids)
    if mismatch:
        labels = [IGNORE_INDEX] * len(labels)
    return Labeled(ids, labels, mismatch)

