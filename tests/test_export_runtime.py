"""The first end-to-end slice: export the toy checkpoint, run it on CPU, compare with Hugging Face."""

import json

import numpy as np
import pytest
import torch

from llava_edge import manifest
from llava_edge.preprocess import preprocess
from llava_edge.templates import get_template

VICUNA_V1 = get_template("vicuna_v1")

BATTERY = [
    "hello", " hello", "  two leading spaces", "trailing  ", "multiple   spaces   here", "new\nline",
    "\n\nleading newlines", "ünïcödé ✓ 日本語 🙂", "tab\tseparated", " ", "x\r\ny", "<image>", "USER: <image>\nWhat?",
    "What color is the circle at the top left?", "ASSISTANT: It is a red circle.</s>USER: And the square?",
    "<image>\nDescribe the image.", "numbers 0123456789 and 3.14", "",
]


def hf_logits(hf_model, runtime, image, parts):
    px = torch.from_numpy(preprocess(image, runtime.spec))[None]
    ids = runtime.tokenizer.encode_prompt(parts, runtime.image_token_id)
    i = ids.index(runtime.image_token_id)
    n = runtime.manifest.vision["num_image_tokens"]
    ids = ids[:i] + [runtime.image_token_id] * n + ids[i + 1 :]
    with torch.no_grad():
        return hf_model(input_ids=torch.tensor([ids]), pixel_values=px).logits[0].numpy()


def test_manifest_describes_the_bundle(bundle, toy_model):
    m = manifest.read(bundle)
    assert m.conv_mode == "vicuna_v1"
    assert m.vision["num_image_tokens"] == 64 and m.vision["feature_layer"] == -2
    assert m.image["crop"] == 112 and m.image["pad"] == "pad"
    assert m.llm["image_token_id"] == json.loads((toy_model / "config.json").read_text())["image_token_index"]
    assert {(v.kind, v.name) for v in m.variants} == {("vision", "fp32"), ("llm", "f32"), ("mmproj", "f32")}
    for v in m.variants:
        assert (bundle / v.file).stat().st_size == v.size
        assert manifest.sha256_file(bundle / v.file) == v.sha256
    assert not [p.name for p in bundle.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_onnx_matches_hf_vision_and_drops_the_last_layer(bundle, hf_model, toy_data):
    import onnx
    import onnxruntime as ort

    from llava_edge.preprocess import ImageSpec

    m = manifest.read(bundle)
    spec = ImageSpec.from_dict(m.image)
    images = sorted((toy_data / "images").glob("eval_*.png"))[:4]
    px = np.stack([preprocess(p, spec) for p in images])
    sess = ort.InferenceSession(str(bundle / "vision.fp32.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"pixel_values": px})[0]  # dynamic batch: 4 images at once
    with torch.no_grad():
        feats = hf_model.model.get_image_features(
            pixel_values=torch.from_numpy(px), vision_feature_layer=-2,
            vision_feature_select_strategy="default", output_hidden_states=True,
        ).pooler_output
    ref = torch.stack(list(feats)).numpy()
    assert got.shape == ref.shape == (4, 64, 128)
    cos = (got * ref).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(ref, axis=-1))
    assert cos.min() >= 0.9999
    assert np.abs(got - ref).max() < 1e-4
    graph = onnx.load(str(bundle / "vision.fp32.onnx"))
    assert graph.opset_import[0].version >= 17
    n_weights = sum(int(np.prod(t.dims)) for t in graph.graph.initializer)
    tower = hf_model.model.vision_tower
    last = sum(p.numel() for p in tower.encoder.layers[-1].parameters())
    total = sum(p.numel() for p in tower.parameters()) + sum(
        p.numel() for p in hf_model.model.multi_modal_projector.parameters()
    )
    assert n_weights <= total - last  # the unused last encoder layer is not in the graph


def test_gguf_layout(bundle, toy_model):
    import gguf

    r = gguf.GGUFReader(str(bundle / "llm.f32.gguf"))
    names = {t.name for t in r.tensors}
    assert {"token_embd.weight", "output.weight", "output_norm.weight", "blk.3.attn_q.weight", "blk.0.ffn_down.weight"} <= names
    assert len(names) == 3 + 4 * 9
    tokens = r.fields["tokenizer.ggml.tokens"]
    vocab = [bytes(tokens.parts[i]).decode() for i in tokens.data]
    assert len(vocab) == 1024 and vocab[1000] == "<image>" and vocab[1001] == "<pad>" and vocab[1023] == "[PAD1023]"
    arch = bytes(r.fields["general.architecture"].parts[-1]).decode()
    assert arch == "llama"


def test_runtime_logits_equal_hf(runtime, hf_model, toy_data):
    image = sorted((toy_data / "images").glob("eval_*.png"))[0]
    text = VICUNA_V1.prompt("What shape is at the top left?")
    got = runtime.prompt_logits(image, text)
    ref = hf_logits(hf_model, runtime, image, text)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= 1e-3


def test_greedy_answer_equals_hf_generate(runtime, hf_model, toy_data):
    image = sorted((toy_data / "images").glob("eval_*.png"))[1]
    question = "How many shapes are there?"
    text = VICUNA_V1.prompt(question)
    px = torch.from_numpy(preprocess(image, runtime.spec))[None]
    ids = runtime.tokenizer.encode_prompt(text, runtime.image_token_id)
    i = ids.index(runtime.image_token_id)
    ids = ids[:i] + [runtime.image_token_id] * 64 + ids[i + 1 :]
    with torch.no_grad():
        out = hf_model.generate(input_ids=torch.tensor([ids]), pixel_values=px, max_new_tokens=12, do_sample=False,
                                eos_token_id=runtime.eos_id, pad_token_id=runtime.eos_id)
    hf_new = out[0, len(ids):].tolist()
    hf_new = hf_new[: hf_new.index(runtime.eos_id)] if runtime.eos_id in hf_new else hf_new
    assert hf_new  # the comparison covers generated tokens
    assert runtime.chat(image, question, max_tokens=12) == runtime.tokenizer.decode(hf_new)


def test_text_only_chat_equals_hf_generate(runtime, hf_model):
    from llava_edge.errors import UserError

    question = "Which colors do the shapes have?"
    ids = runtime.tokenizer.encode(VICUNA_V1.prompt(question, image=False))
    assert runtime.image_token_id not in ids
    with torch.no_grad():
        out = hf_model.generate(input_ids=torch.tensor([ids]), max_new_tokens=8, do_sample=False,
                                eos_token_id=runtime.eos_id, pad_token_id=runtime.eos_id)
    hf_new = out[0, len(ids):].tolist()
    hf_new = hf_new[: hf_new.index(runtime.eos_id)] if runtime.eos_id in hf_new else hf_new
    assert hf_new
    assert runtime.chat(None, question, max_tokens=8) == runtime.tokenizer.decode(hf_new)
    with pytest.raises(UserError, match="no image was given"):
        runtime.slots_for(VICUNA_V1.prompt(question), None, 0)


def test_runtime_tokenizes_typed_text_like_sentencepiece(runtime, toy_model):
    # text a user types is SentencePiece's pieces after BOS, whatever it holds: "</s>" and "<image>" stay text
    # (LLaVA's own ids, template text included, are compared in test_llava_fidelity.py)
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(toy_model / "tokenizer.model"))
    for s in BATTERY:
        assert runtime.tokenizer.encode(s) == [runtime.tokenizer.bos_id] + sp.encode(s), repr(s)
    assert runtime.image_token_id not in runtime.tokenizer.encode("<image>")


def test_gguf_vocabulary_tokenizes_like_sentencepiece(runtime, toy_model):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(toy_model / "tokenizer.model"))
    for s in BATTERY:
        assert runtime.llm.tokenize(s) == sp.encode(s), repr(s)


def test_follow_up_reuses_image_and_cache(runtime, toy_data):
    image = sorted((toy_data / "images").glob("eval_*.png"))[2]
    runtime.llm.reset()
    s = runtime.session(image)
    encodes = runtime.stats["vision_encodes"]
    s.ask("What shape is at the top left?", max_tokens=4)
    before = runtime.stats["prefill_tokens"]
    s.ask("And its color?", max_tokens=4)
    second = runtime.stats["prefill_tokens"] - before
    assert runtime.stats["vision_encodes"] - encodes <= 1  # encoded once for both turns
    assert second < 30  # only the new turn's tokens, not the 64 image slots and the system prompt again


def test_context_overflow_is_a_clear_error(bundle, toy_data):
    from llava_edge import EdgeLLaVA
    from llava_edge.errors import UserError

    m = EdgeLLaVA.load(bundle, n_ctx=64)
    with pytest.raises(UserError, match="context"):
        m.chat(sorted((toy_data / "images").glob("eval_*.png"))[0], "Describe the image.")
    m.close()


def test_llama_cpp_parses_special_tokens_all_or_nothing(runtime):
    """llama.cpp's tokenizer equals SentencePiece on typed text (the test above) and, for the toy's legacy
    tokenizer, equals the runtime on template text with special tokens; but its special-token parsing is all or
    nothing, where typed "</s>" must stay text: the runtime tokenizes itself (llava_edge/tokenizer.py) and passes
    ids. (It also follows the legacy rule only: the non-legacy one is compared in test_llava_fidelity.py.)"""
    from llava_edge.templates import Text

    template_text = runtime.tokenizer.encode((Text("A.</s>USER: hi", True),), add_special_tokens=False)
    assert runtime.eos_id in template_text
    assert runtime.llm.tokenize("A.</s>USER: hi", parse_special=True) == template_text
    typed = runtime.tokenizer.encode("A.</s>USER: hi", add_special_tokens=False)
    assert runtime.eos_id not in typed and runtime.llm.tokenize("A.</s>USER: hi") == typed
    assert runtime.llm.tokenize("A.</s>USER: hi", parse_special=True) != typed


def test_vision_half_equals_the_full_model_without_the_language_model(toy_model, hf_model):
    """Export loads only the vision tower + projector (a 7B's language model would be 28 GB in fp32)."""
    import torch

    from llava_edge.checkpoint import load_hf_vision_half, open_checkpoint

    half = load_hf_vision_half(open_checkpoint(toy_model))
    assert len(half.model.language_model.layers) == 0
    assert sum(p.numel() for p in half.parameters()) < 0.5 * sum(p.numel() for p in hf_model.parameters())
    cfg = hf_model.config
    px = torch.randn(2, 3, cfg.vision_config.image_size, cfg.vision_config.image_size, generator=torch.Generator().manual_seed(0))
    kw = dict(vision_feature_layer=cfg.vision_feature_layer, output_hidden_states=True,
              vision_feature_select_strategy=cfg.vision_feature_select_strategy)
    with torch.no_grad():
        a = torch.stack(list(half.model.get_image_features(pixel_values=px, **kw).pooler_output))
        b = torch.stack(list(hf_model.model.get_image_features(pixel_values=px, **kw).pooler_output))
    assert torch.equal(a, b)
