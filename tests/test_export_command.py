"""`llava-edge export` end to end on the toy: every target, the manifest, re-runs, kills, a full disk, bad input.

One `--target all --dtype fp16` export is shared by the module (read-only); tests that
change a bundle work on a copy of it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from importlib.util import find_spec
from pathlib import Path

import pytest

from llava_edge import manifest
from llava_edge.checkpoint import open_checkpoint
from llava_edge.errors import UserError
from llava_edge.export import bundle as bundle_mod
from llava_edge.export.bundle import ExportOptions, TensorRTOptions, check_out_dir, export_bundle

HAS_TENSORRT = find_spec("tensorrt") is not None
needs_no_tensorrt = pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file (hidden ones included) under ``folder`` -> (size, mtime_ns)."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def partials(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".partial")]


def copy_bundle(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)  # copy2: sizes and modification times kept
    return dst


def cli(*args) -> int:
    from llava_edge.cli import main

    return main([str(a) for a in args])


def one_line_error(capsys, *words) -> str:
    """The command ended with exactly one error line (progress lines may come before it), no traceback."""
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], lines
    assert not any("Traceback" in line for line in lines)
    for w in words:
        assert w in errors[0], (w, errors[0])
    return errors[0]


@pytest.fixture(scope="module")
def ckpt(toy_model):
    return open_checkpoint(toy_model)


@pytest.fixture(scope="module")
def exported(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "bundle"
    lines: list[str] = []
    m = export_bundle(ckpt, out, "all", dtype="fp16", log=lines.append)
    return out, m, lines


# -- what `all` writes -----------------------------------------------------------------------------


def test_all_registers_every_target_with_true_sizes_and_hashes(exported):
    out, m, _ = exported
    assert {(v.kind, v.name, v.file) for v in m.variants} == {
        ("vision", "fp32", "vision.fp32.onnx"), ("vision", "fp16", "vision.fp16.onnx"),
        ("llm", "f32", "llm.f32.gguf"), ("mmproj", "f16", "mmproj.f16.gguf"),
    }
    for v in m.variants:
        assert v.size == (out / v.file).stat().st_size and v.sha256 == sha256(out / v.file)
    assert json.loads((out / "manifest.json").read_text()) == json.loads(json.dumps(m.to_dict()))
    assert not manifest.is_incomplete(out) and not partials(out)
    manifest.check_files(out, m, [v.file for v in m.variants], verify_hash=True)


def test_manifest_fields_come_from_the_checkpoint(exported, ckpt, toy_model):
    out, _, _ = exported
    d = json.loads((out / "manifest.json").read_text())
    assert d["schema_version"] == manifest.SCHEMA_VERSION
    assert d["source"]["model"] == str(toy_model) and d["source"]["fingerprint"] == ckpt.fingerprint()
    assert "converted" not in d["source"]
    vc, cfg = ckpt.vision_config, ckpt.config
    if (toy_model / "processor_config.json").is_file():
        proc = json.loads((toy_model / "processor_config.json").read_text())["image_processor"]
    else:
        proc = json.loads((toy_model / "preprocessor_config.json").read_text())
    assert d["image"]["mean"] == pytest.approx(proc["image_mean"])
    assert d["image"]["std"] == pytest.approx(proc["image_std"])
    assert d["image"]["pad"] == ckpt.recipe["image_pad"] and d["conv_mode"] == ckpt.conv_mode
    assert d["vision"]["feature_layer"] == cfg["vision_feature_layer"]
    assert d["vision"]["image_size"] == vc["image_size"]
    assert d["vision"]["num_image_tokens"] == (vc["image_size"] // vc["patch_size"]) ** 2
    assert d["llm"]["n_embd"] == ckpt.text_config["hidden_size"] and d["llm"]["image_token_id"] == ckpt.image_token_id
    assert d["llm"]["n_vocab"] >= ckpt.text_config["vocab_size"] and "eos_id" in d["llm"]
    for name in ("tokenizer.json", "tokenizer.model"):
        assert sha256(out / name) == sha256(toy_model / name)


def test_parity_numbers_are_measured_on_the_files(exported, ckpt, hf_model):
    from llava_edge.export.vision_onnx import parity_vs_hf

    out, m, lines = exported
    parity = m.vision["parity"]
    assert parity["fp32"]["min_cosine"] >= 0.9999 and parity["fp16"]["min_cosine"] >= 0.999
    assert parity["fp16"]["max_abs"] > parity["fp32"]["max_abs"]  # two different graphs were measured
    again = parity_vs_hf(hf_model, out / "vision.fp16.onnx", bundle_mod.parity_pixels(ckpt))
    assert again["min_cosine"] == pytest.approx(parity["fp16"]["min_cosine"], abs=1e-7)
    assert any("fp16 vs Hugging Face" in line and "min cosine" in line for line in lines)


def test_fp16_variant_and_gguf_files_are_what_they_claim(exported):
    import gguf
    import onnx

    out, m, _ = exported
    fp16 = m.variant("vision", "fp16")
    assert "LayerNormalization" in fp16.extra["fp32_kept"]["fp32_ops"]
    g = onnx.load(str(out / "vision.fp16.onnx"))
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in g.graph.initializer)
    for file, arch in (("llm.f32.gguf", "llama"), ("mmproj.f16.gguf", "clip")):
        f = gguf.GGUFReader(str(out / file)).fields["general.architecture"]
        assert bytes(f.parts[f.data[0]]).decode() == arch


def test_the_bundle_answers_with_its_default_variants(exported):
    from llava_edge import EdgeLLaVA
    from llava_edge.scenes import random_scene, render
    import random

    out, _, _ = exported
    edge = EdgeLLaVA.load(out)
    try:
        assert edge.vision_variant.name == "fp32" and edge.llm_variant.name == "f32"
        image = render(random_scene(random.Random(1)), size=128)
        assert isinstance(edge.chat(image, "What shape is at the top left?", max_tokens=3), str)
    finally:
        edge.close()


# -- TensorRT --------------------------------------------------------------------------------------


@needs_no_tensorrt
def test_all_skips_tensorrt_with_the_reason(exported):
    _, _, lines = exported
    skipped = [line for line in lines if line.startswith("tensorrt: skipped")]
    assert len(skipped) == 1 and "TensorRT is not installed" in skipped[0] and "pip install" in skipped[0]


@needs_no_tensorrt
def test_explicit_tensorrt_without_tensorrt_is_one_line_with_install_hint(toy_model, tmp_path, capsys):
    out = tmp_path / "b"
    assert cli("export", "--model", toy_model, "--out", out, "--target", "tensorrt") == 2
    one_line_error(capsys, "TensorRT is not installed", "pip install tensorrt")
    assert not out.exists()


def test_tensorrt_engine_is_registered_from_the_fp32_onnx(exported, ckpt, tmp_path, monkeypatch):
    """The wiring only: TensorRT's builder is replaced by a stand-in (tests/test_vision_variants.py tests it)."""
    from llava_edge.runtimes import tensorrt_vision

    out = copy_bundle(exported[0], tmp_path / "b")
    platform = {"tensorrt_version": "10.3.0", "gpu": "Orin", "compute_capability": "8.7"}
    calls = []

    def fake_build(onnx_path, engine_path, **kw):
        calls.append((Path(onnx_path), kw))
        Path(engine_path).write_bytes(b"engine for " + Path(onnx_path).name.encode())
        return {**platform, "precision": kw["precision"], "min_batch": 1, "opt_batch": kw["opt_batch"],
                "max_batch": kw["max_batch"], "image_size": 112, "input": "pixel_values", "output": "image_embeds"}

    monkeypatch.setattr(bundle_mod, "tensorrt_unavailable", lambda: None)
    monkeypatch.setattr(tensorrt_vision, "running_platform", lambda device=0: dict(platform))
    monkeypatch.setattr(bundle_mod, "build_engine", fake_build)
    before = snapshot(out)
    trt = TensorRTOptions(max_batch=4, opt_batch=2)
    m = export_bundle(ckpt, out, "tensorrt", dtype="fp16", tensorrt=trt, log=lambda _: None)
    assert calls[0][0] == out / "vision.fp32.onnx" and calls[0][1]["precision"] == "fp16"
    assert calls[0][1]["timing_cache"] == out / bundle_mod.TIMING_CACHE
    assert snapshot(out)["vision.fp32.onnx"] == before["vision.fp32.onnx"]  # reused, not exported again
    v = m.variant("vision", "trt-fp16")
    assert v.file == "vision.trt-fp16.engine" and v.extra["format"] == "tensorrt" and v.device_specific
    assert v.extra["gpu"] == "Orin" and v.extra["max_batch"] == 4 and v.extra["opt_batch"] == 2
    assert m.variant("vision").name == "fp32"  # an engine is never the default vision variant
    assert {x.name for x in m.variants} >= {"fp32", "fp16", "f32", "trt-fp16"}  # the rest kept

    export_bundle(ckpt, out, "tensorrt", dtype="fp16", tensorrt=trt, log=lambda _: None)
    assert len(calls) == 1  # up to date
    platform["gpu"] = "NVIDIA H100"  # another device: the engine must be rebuilt
    export_bundle(ckpt, out, "tensorrt", dtype="fp16", tensorrt=trt, log=lambda _: None)
    assert len(calls) == 2 and manifest.read(out).variant("vision", "trt-fp16").extra["gpu"] == "NVIDIA H100"


def test_int8_without_a_calibration_cache_is_refused_before_writing(ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr(bundle_mod, "tensorrt_unavailable", lambda: None)
    with pytest.raises(UserError, match="calibration cache"):
        export_bundle(ckpt, tmp_path / "b", "tensorrt", tensorrt=TensorRTOptions(int8=True), log=lambda _: None)
    assert not (tmp_path / "b").exists()


# -- each target alone -----------------------------------------------------------------------------


def test_each_target_alone_adds_to_the_bundle(ckpt, tmp_path):
    out = tmp_path / "b"
    m = export_bundle(ckpt, out, "mmproj", log=lambda _: None)
    assert {(v.kind, v.name) for v in m.variants} == {("llm", "f32"), ("mmproj", "f32")}  # mtmd needs the text GGUF
    m = export_bundle(ckpt, out, "gguf", llm_outtype="q8_0", log=lambda _: None)
    assert m.variant("llm").name == "f32" and m.variant("llm", "q8_0").file == "llm.q8_0.gguf"
    m = export_bundle(ckpt, out, "onnx", log=lambda _: None)
    assert {(v.kind, v.name) for v in m.variants} == {("llm", "f32"), ("mmproj", "f32"), ("llm", "q8_0"),
                                                        ("vision", "fp32")}
    assert "fp16" not in m.vision["parity"]  # --dtype fp32: no fp16 graph
    m = export_bundle(ckpt, out, "mmproj", mmproj_outtype="bf16", log=lambda _: None)
    assert m.variant("mmproj", "bf16").file == "mmproj.bf16.gguf" and m.variant("mmproj", "f32")  # added beside
    manifest.check_files(out, manifest.read(out), [v.file for v in m.variants], verify_hash=True)


# -- re-runs -----------------------------------------------------------------------------------------


def test_rerun_is_a_noop(exported, ckpt, monkeypatch):
    out, m, _ = exported
    before = snapshot(out)

    def no_model(*_a, **_k):
        raise AssertionError("an up-to-date bundle must not load the model")

    monkeypatch.setattr(bundle_mod, "load_hf_vision_half", no_model)
    lines: list[str] = []
    again = export_bundle(ckpt, out, "all", dtype="fp16", log=lines.append)
    assert snapshot(out) == before  # manifest.json included: nothing was rewritten
    for v in m.variants:
        assert f"{v.file}: up to date" in lines
    assert again.to_dict() == m.to_dict()


def _retrained_copy(toy_model: Path, dest: Path) -> Path:
    """The toy with one weight changed, tensors, dtypes and shapes the same (what further training gives)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    shutil.copytree(toy_model, dest)
    f = dest / "model.safetensors"
    with safe_open(str(f), "pt") as h:
        meta = h.metadata()
    tensors = load_file(str(f))
    key = next(k for k in sorted(tensors) if "embed_tokens" in k)
    tensors[key] = tensors[key] * 0.5
    time.sleep(0.01)  # a later modification time on coarse-clock filesystems
    save_file(tensors, str(f), metadata=meta)
    return dest


def test_a_changed_source_starts_clean(exported, toy_model, tmp_path):
    out = copy_bundle(exported[0], tmp_path / "b")
    (out / "llm.q4_0.gguf").write_bytes(b"a quantized file made from the old weights")
    m = manifest.read(out)
    m.add_variant(out, "q4_0", "llm", "q4_0", "llm.q4_0.gguf")
    manifest.write(out, m)
    old_llm = sha256(out / "llm.f32.gguf")

    new = open_checkpoint(_retrained_copy(toy_model, tmp_path / "retrained"))
    lines: list[str] = []
    m = export_bundle(new, out, "gguf", log=lines.append)
    assert any("starting clean" in line for line in lines)
    assert [(v.kind, v.name) for v in m.variants] == [("llm", "f32")]
    for gone in ("vision.fp32.onnx", "vision.fp16.onnx", "mmproj.f16.gguf", "llm.q4_0.gguf"):
        assert not (out / gone).exists(), gone
    assert sha256(out / "llm.f32.gguf") != old_llm
    assert m.source["model"] == str(new.path) and m.source["stamp"] != exported[1].source["stamp"]
    assert "parity" not in m.vision or not m.vision["parity"]


# -- interruptions ---------------------------------------------------------------------------------

KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import llava_edge.export.bundle as b
    real = b.export_llm_gguf
    marker = Path(sys.argv[1])

    def slow(*args, progress=None, **kw):
        def stall(done, total):
            marker.write_text(f"{done}/{total}")
            time.sleep(600)  # killed here, with the GGUF half written
        return real(*args, progress=stall, **kw)

    b.export_llm_gguf = slow
    from llava_edge.cli import main
    sys.exit(main(sys.argv[2:]))
""")


def test_kill_mid_export_leaves_no_complete_looking_bundle_and_a_rerun_continues(toy_model, ckpt, tmp_path):
    out, marker = tmp_path / "b", tmp_path / "gguf-started"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(marker), "export", "--model", str(toy_model),
                             "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not marker.exists():
        if proc.poll() is not None:
            pytest.fail(f"export ended before the GGUF step: {proc.stderr.read()}")
        assert time.monotonic() < deadline, "the GGUF step never started"
        time.sleep(0.1)
    proc.kill()  # SIGKILL: no cleanup runs
    proc.wait()

    assert partials(out), "the GGUF was being written when the process died"
    assert not manifest.is_bundle(out) and manifest.is_incomplete(out)
    with pytest.raises(UserError, match="incomplete"):
        manifest.read(out)
    state = manifest.read_incomplete(out)
    assert [v.file for v in state.variants] == ["vision.fp32.onnx"]
    manifest.check_files(out, state, [v.file for v in state.variants], verify_hash=True)
    onnx_written = snapshot(out)["vision.fp32.onnx"]

    check_out_dir(out)  # still accepted as a bundle being written
    lines: list[str] = []
    m = export_bundle(ckpt, out, "all", log=lines.append)
    assert "vision.fp32.onnx: up to date" in lines and snapshot(out)["vision.fp32.onnx"] == onnx_written
    assert {v.file for v in m.variants} == {"vision.fp32.onnx", "llm.f32.gguf", "mmproj.f32.gguf"}
    manifest.check_files(out, manifest.read(out), [v.file for v in m.variants], verify_hash=True)
    assert not partials(out) and not manifest.is_incomplete(out)


def test_full_disk_is_one_line_and_leaves_the_bundle_as_it_was(exported, ckpt, tmp_path, monkeypatch, capsys):
    import gguf

    out = copy_bundle(exported[0], tmp_path / "b")
    before = snapshot(out)
    real = gguf.GGUFWriter.write_tensor_data
    written = []

    def fills_the_disk(self, *a, **kw):
        if written:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written.append(1)
        return real(self, *a, **kw)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", fills_the_disk)
    assert cli("export", "--model", ckpt.path, "--out", out, "--target", "gguf", "--llm-outtype", "f16") == 2
    one_line_error(capsys, "llm.f16.gguf", "no space left on device")
    assert snapshot(out) == before and not partials(out)
    m = manifest.read(out)
    manifest.check_files(out, m, [v.file for v in m.variants], verify_hash=True)


# -- bad input -------------------------------------------------------------------------------------


def test_unrelated_output_directory_is_refused_untouched(toy_model, tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "holiday.jpg").write_bytes(b"mine")
    before = snapshot(photos)
    assert cli("export", "--model", toy_model, "--out", photos) == 2
    one_line_error(capsys, "not a bundle", str(photos))
    assert snapshot(photos) == before and [p.name for p in photos.iterdir()] == ["holiday.jpg"]
    (tmp_path / "file").write_text("x")
    assert cli("export", "--model", toy_model, "--out", tmp_path / "file") == 2
    one_line_error(capsys, "not a directory")
    check_out_dir(tmp_path / "new" / "bundle")
    assert not (tmp_path / "new").exists()


def test_vocabulary_larger_than_the_embedding_writes_nothing(toy_model, tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    for p in toy_model.iterdir():
        (model / p.name).symlink_to(p) if p.suffix == ".safetensors" else shutil.copy(p, model / p.name)
    tok = json.loads((model / "tokenizer.json").read_text())
    tok["added_tokens"].append({"id": 4096, "content": "<extra>", "special": True, "single_word": False,
                                "lstrip": False, "rstrip": False, "normalized": False})
    (model / "tokenizer.json").write_text(json.dumps(tok))
    assert cli("export", "--model", model, "--out", tmp_path / "b") == 2
    one_line_error(capsys, "embedding matrix only")
    assert not (tmp_path / "b").exists()


def test_truncated_weights_write_nothing(toy_model, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(toy_model, model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])  # an interrupted download
    assert cli("export", "--model", model, "--out", tmp_path / "b") == 2
    one_line_error(capsys, "corrupt safetensors", "truncated")
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("opts,words", [
    (ExportOptions(target="tflite"), ["tflite", "onnx, tensorrt, gguf, mmproj, all"]),
    (ExportOptions(dtype="int4"), ["--dtype", "fp32, fp16"]),
    (ExportOptions(llm_outtype="q4_k_m"), ["--llm-outtype", "q8_0"]),
    (ExportOptions(tensorrt=TensorRTOptions(max_batch=2, opt_batch=4)), ["--trt-opt-batch"]),
    (ExportOptions(target="gguf", tensorrt=TensorRTOptions(int8=True)), ["--int8"]),
    (ExportOptions(mmproj="q4_0"), ["--mmproj-outtype", "f32, f16, bf16"]),
    (ExportOptions(target="onnx", mmproj="bf16"), ["--mmproj-outtype", "--target mmproj or all"]),
])
def test_bad_options_name_the_valid_values(opts, words):
    with pytest.raises(UserError) as e:
        opts.validate()
    assert all(w in str(e.value) for w in words) and "\n" not in str(e.value)


# -- the command line ------------------------------------------------------------------------------


def test_export_help_lists_every_target_and_option(capsys):
    assert cli("export", "--help") == 0
    text = " ".join(capsys.readouterr().out.split())
    for word in ("onnx | tensorrt | gguf | mmproj | all", "--dtype", "--llm-outtype", "--mmproj-outtype", "--vision",
                 "--trt-max-batch", "--trt-opt-batch", "--int8", "--calibration-cache"):
        assert word in text, word


def test_info_prints_the_manifest_and_the_variants(exported, capsys):
    out, m, _ = exported
    assert cli("info", out) == 0
    text = capsys.readouterr().out
    for word in (m.conv_mode, m.source["fingerprint"][:12], "pad mode pad", "64 image tokens", "parity fp16",
                 "mmproj.f16.gguf", "vision.fp16.onnx", "llm.f32.gguf", "0.4815"):
        assert word in text, word


def test_manifest_defaults_skip_engines_and_refuse_newer_schemas(tmp_path):
    (tmp_path / "a.engine").write_bytes(b"e")
    (tmp_path / "a.onnx").write_bytes(b"o")
    m = manifest.Manifest(source={}, conv_mode="plain", image={}, vision={}, llm={}, tokenizer={})
    m.add_variant(tmp_path, "trt-fp16", "vision", "fp16", "a.engine", format="tensorrt")
    m.add_variant(tmp_path, "fp32", "vision", "fp32", "a.onnx", format="onnx")
    assert m.variant("vision").name == "fp32" and m.variant("vision", "trt-fp16").file == "a.engine"
    m.add_variant(tmp_path, "trt-fp16", "vision", "fp16", "a.engine", format="tensorrt")  # replaced in place
    assert [v.name for v in m.variants] == ["trt-fp16", "fp32"]
    d = m.to_dict()
    d["schema_version"] = manifest.SCHEMA_VERSION + 1
    (tmp_path / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(UserError, match="newer llava-edge"):
        manifest.read(tmp_path)
