"""The command line: the runtime path is torch-free; bad input is one line and a non-zero exit."""

import json
import shutil
import subprocess
import sys

import pytest

from cli_run import assert_one_line_error, le  # tests/ is on sys.path under pytest


def test_chat_runs_without_torch(bundle, toy_data):
    image = sorted((toy_data / "images").glob("eval_*.png"))[0]
    r = le("chat", "--bundle", bundle, "--image", image, "What shape is at the top left?", "--max-tokens", "5",
           block_torch=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()


def test_chat_saves_prompt_beginnings_once_and_answers_the_same(bundle, toy_data, tmp_path, monkeypatch):
    monkeypatch.setenv("LLAVA_EDGE_CACHE", str(tmp_path / "cache"))
    image = sorted((toy_data / "images").glob("eval_*.png"))[1]
    ask = ("chat", "--bundle", bundle, "--image", image, "What shape is at the top left?", "--max-tokens", "6")
    off = le(*ask, "--no-prefix-cache", block_torch=True)
    assert off.returncode == 0 and not (tmp_path / "cache" / "prefix-kv").exists(), off.stderr
    first, second = le(*ask, block_torch=True), le(*ask, block_torch=True)  # saves; then loads
    # the beginning before the image, and the prompt through the image (with the answer)
    assert [p.suffix for p in (tmp_path / "cache" / "prefix-kv").iterdir()] == [".kv", ".kv"]
    assert off.stdout == first.stdout == second.stdout and first.stdout.strip()


def test_chat_takes_the_kv_cache_type_and_refuses_others_in_one_line(bundle, toy_data):
    image = sorted((toy_data / "images").glob("eval_*.png"))[0]
    ask = ("chat", "--bundle", bundle, "--image", image, "What shape is at the top left?", "--max-tokens", "5")
    r = le(*ask, "--kv-cache", "f32", "--explain", block_torch=True)
    assert r.returncode == 0, r.stderr
    assert "KV cache f32" in r.stderr and r.stdout.strip()
    assert_one_line_error(le(*ask, "--kv-cache", "q4_0"), "unknown KV cache type 'q4_0' (f16 or f32)")


def test_a_bad_prefix_cache_limit_is_a_one_line_error(bundle, toy_data, tmp_path, monkeypatch):
    monkeypatch.setenv("LLAVA_EDGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LLAVA_EDGE_PREFIX_CACHE_MB", "2GB")
    image = sorted((toy_data / "images").glob("eval_*.png"))[1]
    assert_one_line_error(le("chat", "--bundle", bundle, "--image", image, "Hi", "--max-tokens", "2"),
                          "LLAVA_EDGE_PREFIX_CACHE_MB")


def test_bundle_from_environment(bundle, toy_data, monkeypatch):
    monkeypatch.setenv("LLAVA_EDGE_BUNDLE", str(bundle))
    image = sorted((toy_data / "images").glob("eval_*.png"))[0]
    r = le("chat", "--image", image, "Hi", "--max-tokens", "3", block_torch=True)
    assert r.returncode == 0, r.stderr


def test_missing_model_directory(tmp_path):
    assert_one_line_error(le("export", "--model", tmp_path / "nope", "--out", tmp_path / "b"), "not found")


def test_non_llava_model_directory(tmp_path):
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert_one_line_error(le("export", "--model", tmp_path / "bert", "--out", tmp_path / "b"), "bert", "llava")
    assert not (tmp_path / "b").exists()


def test_unrelated_output_directory_is_left_alone(toy_model, tmp_path):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"mine")
    assert_one_line_error(le("export", "--model", toy_model, "--out", out), "not a bundle")
    assert [p.name for p in out.iterdir()] == ["holiday.jpg"]


@pytest.mark.parametrize("content", [b"", b"plain text, not pixels", b"\x89PNG\r\n\x1a\n broken"])
def test_non_image(bundle, tmp_path, content):
    bad = tmp_path / "x.png"
    bad.write_bytes(content)
    assert_one_line_error(le("chat", "--bundle", bundle, "--image", bad, "Hi", block_torch=True), "x.png")


def test_missing_image(bundle, tmp_path):
    assert_one_line_error(le("chat", "--bundle", bundle, "--image", tmp_path / "no.png", "Hi"), "no.png")


def test_bundle_missing_a_file(bundle, toy_data, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    (broken / "llm.f32.gguf").unlink()
    image = sorted((toy_data / "images").glob("eval_*.png"))[0]
    assert_one_line_error(le("chat", "--bundle", broken, "--image", image, "Hi"), "llm.f32.gguf")


def test_not_a_bundle(tmp_path, toy_data):
    image = sorted((toy_data / "images").glob("eval_*.png"))[0]
    assert_one_line_error(le("chat", "--bundle", tmp_path, "--image", image, "Hi"), "manifest.json")


def test_info_lists_variants(bundle):
    r = le("info", bundle, block_torch=True)
    assert r.returncode == 0, r.stderr
    assert "vision.fp32.onnx" in r.stdout and "llm.f32.gguf" in r.stdout


def test_export_then_chat_with_the_default_bundle(toy_model, toy_data, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv("LLAVA_EDGE_BUNDLE", raising=False)
    r = le("export", "--model", toy_model, "--out", tmp_path / "bundle", "--set-default")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "bundle" / "manifest.json").is_file()
    image = sorted((toy_data / "images").glob("eval_*.png"))[0]
    r = le("chat", "--image", image, "What shape is at the top left?", "--max-tokens", "3", block_torch=True)
    assert r.returncode == 0, r.stderr


def test_interactive_session(bundle, toy_data, tmp_path):
    images = sorted((toy_data / "images").glob("eval_*.png"))
    script = f"What shape is at the top left?\n/image {tmp_path / 'nope.png'}\n/image {images[1]}\nHow many shapes?\n/reset\n/quit\n"
    code = "import sys; from llava_edge.cli import main; sys.exit(main(sys.argv[1:]))"
    r = subprocess.run([sys.executable, "-c", code, "chat", "--bundle", str(bundle), "--image", str(images[0]),
                        "--max-tokens", "3"], input=script, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "error: image not found" in r.stderr  # a bad /image keeps the session going
    assert r.stdout.count("> ") >= 5


def test_conversation_mode_options_and_their_errors(bundle, toy_data, toy_model, tmp_path):
    image = sorted((toy_data / "images").glob("eval_*.png"))[0]
    r = le("chat", "--bundle", bundle, "--image", image, "--conv-mode", "llava_v1", "--explain", "Hi",
           "--max-tokens", "2", block_torch=True)
    assert r.returncode == 0, r.stderr
    assert "conversation mode: llava_v1 (chosen; the bundle's is vicuna_v1)" in r.stderr
    assert "tokenizer: sentencepiece" in r.stderr
    assert_one_line_error(le("chat", "--bundle", bundle, "--conv-mode", "vicuna-v1", "Hi", block_torch=True),
                          "unknown conversation mode 'vicuna-v1'", "vicuna_v1")
    assert_one_line_error(le("export", "--model", toy_model, "--out", tmp_path / "b", "--conv-mode", "nope"),
                          "unknown --conv-mode 'nope'")
    assert not (tmp_path / "b").exists()
    assert_one_line_error(le("export", "--model", toy_model, "--out", tmp_path / "b", "--conv-mode", "chat_template"),
                          "chat template")  # the toy has none
    for stage in ("stage1", "stage2"):
        assert_one_line_error(le("train", stage, "--model", toy_model, "--data", toy_data / "eval.json",
                                 "--image-folder", toy_data, "--output", tmp_path / stage, "--conv-mode",
                                 "chat_template"), "train with one of LLaVA's modes")


def test_the_checkpoints_chat_template_as_a_mode(toy_model, toy_data, tmp_path):
    from llava_edge import EdgeLLaVA, manifest
    from llava_edge.templates import flat

    model = tmp_path / "model"
    shutil.copytree(toy_model, model)
    (model / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ m['role'].upper() + ': ' }}{% for c in m['content'] %}{% if c['type'] == 'image' %}"
        "{{ '<image>\\n' }}{% else %}{{ c['text'] + ' ' }}{% endif %}{% endfor %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
    r = le("export", "--model", model, "--out", tmp_path / "b", "--target", "gguf", "--conv-mode", "chat_template")
    assert r.returncode == 0, r.stderr
    r = le("export", "--model", model, "--out", tmp_path / "b", "--target", "onnx")  # same source: the mode stays
    assert r.returncode == 0, r.stderr
    m = manifest.read(tmp_path / "b")
    assert m.conv_mode == "chat_template" and "ASSISTANT:" in m.chat_template
    rt = EdgeLLaVA.load(tmp_path / "b", device="cpu", prefix_cache=False)
    try:
        parts = rt.template.prompt("Which </s> shape?")
        assert flat(parts) == "USER: <image>\nWhich </s> shape? ASSISTANT:"
        assert rt.eos_id not in rt.tokenizer.encode_prompt(parts, rt.image_token_id)
        image = sorted((toy_data / "images").glob("eval_*.png"))[0]
        assert isinstance(rt.chat(image, "Which shape?", max_tokens=3), str)
    finally:
        rt.close()


def test_a_bundle_of_the_older_schema_is_refused_then_exported_again(bundle, toy_model, toy_data, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(bundle, old)
    d = json.loads((old / "manifest.json").read_text())
    d["schema_version"] = 1
    (old / "manifest.json").write_text(json.dumps(d))
    (old / "mine.txt").write_text("a user's file")
    image = sorted((toy_data / "images").glob("eval_*.png"))[0]
    assert_one_line_error(le("chat", "--bundle", old, "--image", image, "Hi", block_torch=True),
                          "older llava-edge", "export the bundle again")
    r = le("export", "--model", toy_model, "--out", old, "--target", "gguf")
    assert r.returncode == 0, r.stderr
    assert "older llava-edge" in r.stderr
    assert json.loads((old / "manifest.json").read_text())["schema_version"] == 2
    assert (old / "mine.txt").read_text() == "a user's file"  # only what the old manifest listed was removed
    assert not (old / "vision.fp32.onnx").exists()
