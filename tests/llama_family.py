"""Tiny LLaVA checkpoints whose language models are the other members of the Llama family.

The toy (``llava_edge.toy``) is Llama 2 / Vicuna shaped: SentencePiece, multi-head
attention, rope theta 1e4. These two cover what it does not, for the GGUF export tests:

- :func:`write_llama3_like`: Llama 3.1 shaped. Grouped-query attention (2 KV heads for
  4 query heads), rope theta 5e5 with Llama 3.1's ``llama3`` rope scaling, tied input and
  output embeddings (as Llama 3.2), and a byte-level BPE ``tokenizer.json`` trained here
  with the ``tokenizers`` library the way Llama 3's is built (its split regex, byte-level
  alphabet, ``ignore_merges``), special tokens, ``<image>``/``<pad>``, one non-special added
  token, a chat template inside ``tokenizer_config.json`` and an embedding padded past the
  vocabulary to a multiple of 64.
- :func:`write_mistral_like`: Mistral shaped. ``model_type: mistral``, GQA, rope theta 1e6,
  a head width that is not ``hidden / heads`` (as Mistral Nemo), SentencePiece, and the chat
  template in ``chat_template.jinja`` (transformers 5's place for it).

Weights are random but initialized 5x wider than transformers' default (std 0.1), so
attention is far from uniform and logits are of order one: a wrong rotary layout or
rope frequency moves them by much more than the 1e-3 the parity tests allow.
Vision towers are minimal (one layer): the GGUF export does not read them.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

# Llama 3's pre-tokenizer split, as its tokenizer.json spells it.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% else %}{{ message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)
USER_WORD = "llava"  # a non-special added token: llama.cpp must type it USER_DEFINED, not CONTROL

# Text a byte-level BPE should have merges for beyond the toy world's English.
EXTRA_TEXT = [
    "Don't stop: it's what we'll do, they've said, I'm sure you'd agree. DON'T SHOUT, WE'LL HEAR.",
    "Numbers 1234567890, 3.14159 and 2,718; dates 2024-05-17 and 12:30.",
    "Ünïcödé façade naïve café résumé — “quotes” and ‘single’ … done.",
    "日本語のテキスト、中文文本，한국어 텍스트. Русский текст и ελληνικά γράμματα.",
    "Emoji 🙂🚀✓ and symbols ©®™ ±×÷ → ← ∑∞.",
    "def f(x):\n    return x ** 2  # code\n\tindented\twith\ttabs\r\nwindows line\n\n\nblank lines",
    "   leading spaces, trailing spaces   ", "a  b   c    d     e",
]


def _tiny_vision():
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                            image_size=28, patch_size=14, projection_dim=32, hidden_act="quick_gelu")


def _save_llava(tmp: Path, text_config, image_token_id: int, seed: int) -> None:
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(vision_config=_tiny_vision(), text_config=text_config, image_token_index=image_token_id,
                         image_seq_length=4, vision_feature_layer=-1, vision_feature_select_strategy="default",
                         tie_word_embeddings=text_config.tie_word_embeddings)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.save_pretrained(tmp, safe_serialization=True)


def _padded(n: int) -> int:
    return -(-n // 64) * 64  # llava-hf pads the embedding to a multiple of 64 (32064)


def train_llama3_tokenizer(vocab_size: int = 1000):
    """A byte-level BPE tokenizer built like Llama 3's, trained on the toy corpus plus :data:`EXTRA_TEXT`."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from llava_edge.toy.tokenizer import IMAGE_TOKEN, PAD_TOKEN, corpus

    tok = Tokenizer(models.BPE(ignore_merges=True, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus(n_scenes=600) + EXTRA_TEXT * 20, trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in LLAMA3_SPECIALS])
    tok.add_special_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False),
                            AddedToken(PAD_TOKEN, special=True, normalized=False)])
    tok.add_tokens([AddedToken(USER_WORD, special=False, normalized=False)])
    bos = LLAMA3_SPECIALS[0]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    return tok


def write_llama3_like(out: str | Path, seed: int = 0) -> Path:
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    from llava_edge import atomic
    from llava_edge.checkpoint import write_recipe
    from llava_edge.toy.tokenizer import IMAGE_TOKEN, PAD_TOKEN

    out = Path(out)
    with atomic.atomic_path(out) as tmp:
        tmp.mkdir()
        tok = PreTrainedTokenizerFast(tokenizer_object=train_llama3_tokenizer(), bos_token=LLAMA3_SPECIALS[0],
                                      eos_token="<|eot_id|>", pad_token=PAD_TOKEN)
        tok.save_pretrained(tmp)
        cfg_file = tmp / "tokenizer_config.json"
        cfg = json.loads(cfg_file.read_text())
        cfg["chat_template"] = LLAMA3_CHAT_TEMPLATE  # Llama 3 keeps it here, not in chat_template.jinja
        cfg_file.write_text(json.dumps(cfg, indent=2))
        (tmp / "chat_template.jinja").unlink(missing_ok=True)
        ids = {t: tok.convert_tokens_to_ids(t) for t in [*LLAMA3_SPECIALS, IMAGE_TOKEN, PAD_TOKEN]}
        text = LlamaConfig(
            vocab_size=_padded(len(tok)), hidden_size=128, intermediate_size=384, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=4096,
            rms_norm_eps=1e-5, initializer_range=0.1, tie_word_embeddings=True,
            rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 512},
            bos_token_id=ids[LLAMA3_SPECIALS[0]], eos_token_id=ids["<|eot_id|>"], pad_token_id=ids[PAD_TOKEN],
        )
        _save_llava(tmp, text, ids[IMAGE_TOKEN], seed)
        write_recipe(tmp, template="vicuna_v1", image_pad="pad")
    return out


def write_mistral_like(out: str | Path, seed: int = 0) -> Path:
    from transformers import MistralConfig

    from llava_edge import atomic
    from llava_edge.checkpoint import write_recipe
    from llava_edge.toy.tokenizer import IMAGE_TOKEN, build_hf_tokenizer, train_sentencepiece

    out = Path(out)
    with atomic.atomic_path(out) as tmp:
        tmp.mkdir()
        with tempfile.TemporaryDirectory() as sp_dir:
            train_sentencepiece(Path(sp_dir) / "tokenizer.model", 800)
            tok = build_hf_tokenizer(sp_dir)
            shutil.copy(Path(sp_dir) / "tokenizer.model", tmp / "tokenizer.model")
        tok.chat_template = MISTRAL_CHAT_TEMPLATE
        tok.save_pretrained(tmp)
        text = MistralConfig(
            vocab_size=_padded(len(tok)), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=48, max_position_embeddings=4096,
            rms_norm_eps=1e-5, initializer_range=0.1, sliding_window=None, tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            bos_token_id=1, eos_token_id=2, pad_token_id=tok.pad_token_id,
        )
        _save_llava(tmp, text, tok.convert_tokens_to_ids(IMAGE_TOKEN), seed)
        write_recipe(tmp, template="vicuna_v1", image_pad="pad")
    return out
