"""A Llama-style SentencePiece tokenizer trained on the toy world's text.

BPE with byte fallback, ``<unk>``/``<s>``/``</s>`` at ids 0/1/2, no text
normalization and a dummy prefix: the settings of Llama's own ``tokenizer.model``.
``<image>`` and ``<pad>`` are then added on the Hugging Face side the way
llava-hf adds them (special tokens after the SentencePiece vocabulary).
"""

from __future__ import annotations

import io
import random
from pathlib import Path

from ..templates import get_template
from . import data
from ..scenes import random_scene

IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"
MODE = "vicuna_v1"  # the toy's conversation mode (stage 2; stage 1 is plain)


def corpus(n_scenes: int = 3000, seed: int = 1234) -> list[str]:
    """Every kind of sentence the toy world says, plus the templates' fixed text."""
    rng = random.Random(seed)
    lines = [get_template(MODE).system, "USER: ASSISTANT:", data.SHORT, *data.CAPTION_PROMPTS, *data.DETAIL_PROMPTS]
    lines += [f"{q} {a}" for q, a in data.TEXT_ONLY]
    for _ in range(n_scenes):
        s = random_scene(rng)
        lines.append(data.caption(s))
        lines.append(data.detail(s))
        kind, q, a = data.short_qa(s, rng)
        lines += [q, a, data.long_answer(s, kind, q, a), *data.reasoning(s, rng)]
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
