"""Tokenizers trained on the toy world's text, in the style of each preset's language model.

Llama (the default): a SentencePiece BPE with byte fallback, ``<unk>``/``<s>``/``</s>``
at ids 0/1/2, no text normalization and a dummy prefix: the settings of Llama's own
``tokenizer.model``. ``<image>`` and ``<pad>`` are then added on the Hugging Face side
the way llava-hf adds them (special tokens after the SentencePiece vocabulary).

Qwen2 (presets with ``text="qwen2"``): a byte-level BPE with Qwen2's pipeline (NFC, its
split regex, byte-level without a prefix space, byte-level decoding; transformers'
``Qwen2Tokenizer`` builds exactly that pipeline from the trained vocabulary and merges),
Qwen2's specials after the vocabulary in Qwen2's order (``<|endoftext|>`` the padding,
``<|im_start|>``, ``<|im_end|>`` the end of a turn, no BOS), then the placeholders the
family's llava-hf processor writes (``<image>``, and ``<video>`` for OneVision) as
special tokens, as llava-hf's Qwen checkpoints have them.
"""

from __future__ import annotations

import io
import random
from pathlib import Path

from ..templates import VIDEO_PLACEHOLDER, Turn, flat, get_template
from . import data
from ..scenes import random_scene

IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"
MODE = "vicuna_v1"  # the toy's conversation mode (stage 2; stage 1 is plain)
QWEN_MODE = "qwen_1_5"  # LLaVA-NeXT's mode for Qwen language models (OneVision's and Interleave's training)
QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # Qwen2's, in its order after the vocabulary
QWEN_PAD, QWEN_EOS = "<|endoftext|>", "<|im_end|>"
# llava-hf's OneVision chat template (transformers' convert_llava_onevision_weights_to_hf.py): pictures, then
# videos, then the text of each message; no system message
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n'}}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\\n' }}{% endfor %}"
    "{# Render all video then #}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>\\n' }}{% endfor %}"
    "{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] }}{% endgeneration %}{% endfor %}{% endif %}"
    "{{'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA_FIXED_TEXT = (get_template(MODE).system, "USER: ASSISTANT:")


def corpus(n_scenes: int = 3000, seed: int = 1234, fixed_text: tuple[str, ...] = LLAMA_FIXED_TEXT,
           several: bool = False) -> list[str]:
    """Every kind of sentence the toy world says, plus the templates' fixed text (``fixed_text``); ``several``:
    the two-picture question and its answers too."""
    rng = random.Random(seed)
    lines = [*fixed_text, data.SHORT, *data.CAPTION_PROMPTS, *data.DETAIL_PROMPTS]
    lines += [f"{q} {a}" for q, a in data.TEXT_ONLY]
    for _ in range(n_scenes):
        s = random_scene(rng)
        lines.append(data.caption(s))
        lines.append(data.detail(s))
        kind, q, a = data.short_qa(s, rng)
        lines += [q, a, data.long_answer(s, kind, q, a), *data.reasoning(s, rng)]
    if several:  # after the scenes: the random stream of the one-picture corpus stays as it was
        lines += [data.MORE_QUESTION, *data.MORE_ANSWERS]
    return lines


def train_sentencepiece(out_file: str | Path, vocab_size: int = 1000) -> Path:
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        split_digits=True,
        allow_whitespace_only_pieces=True,
        num_threads=2,
        minloglevel=2,
    )
    out_file = Path(out_file)
    out_file.write_bytes(buf.getvalue())
    return out_file


# transformers' legacy rule (a word start after special tokens too), not Vicuna-1.5's non-legacy one: LLaVA's
# label arithmetic for non-legacy tokenizers (``preprocess_v1``'s "- 1" for later rounds) assumes LLaMA's pieces,
# where "USER" after "</s>" is one piece shorter than "▁USER"; in the toy's vocabulary both are one piece, so
# LLaVA's code would zero every multi-turn record. With the legacy rule its arithmetic holds for any vocabulary.
LEGACY = True


def build_hf_tokenizer(folder: str | Path):
    """The Hugging Face tokenizer for ``folder/tokenizer.model``, with llava-hf's added tokens."""
    from transformers import LlamaTokenizer

    tok = LlamaTokenizer.from_pretrained(str(folder), legacy=LEGACY, add_bos_token=True, add_eos_token=False)
    tok.add_tokens([IMAGE_TOKEN], special_tokens=True)
    tok.add_special_tokens({"pad_token": PAD_TOKEN})
    return tok


# -- Qwen2 -------------------------------------------------------------------------------------------------------

def family_markers(family) -> tuple[str, ...]:
    """The placeholders the family's llava-hf processor writes into prompts: its ``image_token``, and its
    ``video_token`` where the processor takes videos (LLaVA-OneVision's)."""
    import inspect

    import transformers

    params = inspect.signature(getattr(transformers, family.hf_processor_class_name).__init__).parameters
    return tuple(params[k].default for k in ("image_token", "video_token") if k in params)


def qwen_fixed_text() -> tuple[str, ...]:
    """What the ``qwen_1_5`` template writes around messages, without its special tokens (those are split out
    before the BPE sees the text)."""
    text = flat(get_template(QWEN_MODE).conversation([Turn("user", ""), Turn("assistant", "")]))
    for t in QWEN_SPECIALS:
        text = text.replace(t, "\0")
    return tuple(x for x in text.split("\0") if x)


def qwen2_bpe(texts: list[str], vocab_size: int):
    """A ``tokenizers.Tokenizer``: byte-level BPE with Qwen2's pipeline, trained on ``texts``, no special tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    from ..export.gguf_vocab import QWEN2_SPLIT_REGEX

    tk = Tokenizer(models.BPE(byte_fallback=False))
    tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tk.decoder = decoders.ByteLevel()
    # every byte in the alphabet: any text tokenizes, as with Qwen2's own vocabulary
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tk.train_from_iterator(texts, trainer)
    return tk


def train_qwen2_bpe(texts: list[str], vocab_size: int):
    """:func:`qwen2_bpe`'s (vocab, merges)."""
    import json

    model = json.loads(qwen2_bpe(texts, vocab_size).to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return model["vocab"], merges


def build_qwen2_tokenizer(vocab_size: int, markers: tuple[str, ...] = (IMAGE_TOKEN,), max_length: int = 32768):
    """transformers' ``Qwen2Tokenizer`` (the fast one) over a BPE trained on the toy corpus, with Qwen2's specials
    and ``markers`` (the family's picture placeholders) added after the vocabulary, in that order."""
    from transformers import Qwen2Tokenizer

    vocab, merges = train_qwen2_bpe(corpus(fixed_text=qwen_fixed_text(), several=True), vocab_size)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, bos_token=None, eos_token=QWEN_PAD,
                         pad_token=QWEN_PAD, model_max_length=max_length)
    # added one by one in Qwen2's order (the constructor would put the EOS first); then the EOS named
    tok.add_special_tokens({"additional_special_tokens": [*QWEN_SPECIALS[1:], *markers]})
    tok.eos_token = QWEN_EOS
    tok.chat_template = QWEN_CHAT_TEMPLATE if VIDEO_PLACEHOLDER in markers else _without_video(QWEN_CHAT_TEMPLATE)
    return tok


def _without_video(template: str) -> str:
    """The chat template without its video loop, for a processor that takes no videos."""
    start = template.index("{# Render all video then #}")
    end = template.index("{# Render all text next #}")
    return template[:start] + template[end:]
