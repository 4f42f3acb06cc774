"""`llava-edge quantize`: each variant made, registered, loaded by its runtime; re-runs, bad input, full disk, kills."""

from __future__ import annotations

import json
import random
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import gguf
import numpy as np
import onnx
import pytest

from llava_edge import manifest
from llava_edge.errors import UserError
from llava_edge.preprocess import ImageSpec, preprocess
from llava_edge.quantize import vision as vq
from llava_edge.quantize.command import CHECK_IMAGES, quantize_bundle
from llava_edge.quantize.llm import LLM_TYPES

LLM = ["q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0"]
VISION = ["fp16", "int8", "int8-static", "int4"]
K_TYPES = {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}
QK_K = 256  # values per K-quant block


def copy_bundle(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def snapshot(bundle: Path) -> dict[str, tuple[int, int]]:
    """Every entry of the bundle directory (hidden ones included) -> (size, mtime_ns)."""
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(bundle.iterdir())}


@pytest.fixture(scope="module")
def quantized(bundle, tmp_path_factory):
    """A copy of the session's toy bundle with every listed variant (the session bundle stays as export made it)."""
    qb = copy_bundle(bundle, tmp_path_factory.mktemp("quantized") / "b")
    lines: list[str] = []
    outcomes = quantize_bundle(qb, ",".join(LLM), ",".join(VISION), threads=1, log=lines.append)
    return qb, outcomes, lines


@pytest.fixture(scope="module")
def pixels(bundle):
    from llava_edge.scenes import random_scene, render

    spec = ImageSpec.from_dict(manifest.read(bundle).image)
    rng = random.Random(11)  # not the calibration seed (0) nor the command's check seed (1)
    return np.stack([preprocess(render(random_scene(rng), rng=rng), spec) for _ in range(6)])


def per_token_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


# ---- produced and registered ---------------------------------------------------------------------------------


def test_every_variant_is_made_and_registered(quantized):
    qb, outcomes, _ = quantized
    assert [(o.kind, o.name, o.made) for o in outcomes] == (
        [("llm", t, True) for t in LLM] + [("vision", t, True) for t in VISION])
    m = manifest.read(qb)
    f32 = m.variant("llm", "f32")
    fp32 = m.variant("vision", "fp32")
    for kind, names in (("llm", LLM), ("vision", VISION)):
        for name in names:
            v = m.variant(kind, name)
            p = qb / v.file
            assert p.is_file() and p.stat().st_size == v.size and manifest.sha256_file(p) == v.sha256
            assert v.extra["options"]["base_sha256"] == (f32 if kind == "llm" else fp32).sha256
            assert v.size < (f32 if kind == "llm" else fp32).size
    assert m.variant("llm").name == "f32" and m.variant("vision").name == "fp32"  # the defaults did not move
    assert [v.precision for v in map(lambda n: m.variant("vision", n), VISION)] == ["fp16", "int8", "int8", "int4"]
    assert not [p.name for p in qb.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_gguf_types_are_llama_cpps_choice_and_k_quants_fall_back_on_the_toys_rows(quantized):
    """Each file holds what llama.cpp wrote; the recorded tensor types are read back from it.

    The toy's rows are 128 (and 344 for ffn_down) wide, not multiples of 256, so no K-quant block fits:
    llama.cpp must fall back for every such tensor, which the record reports.
    """
    qb, _, _ = quantized
    m = manifest.read(qb)
    sizes = {}
    for name in LLM:
        v = m.variant("llm", name)
        reader = gguf.GGUFReader(str(qb / v.file))
        types = {t.name: t.tensor_type.name for t in reader.tensors}
        counts: dict[str, int] = {}
        for t in types.values():
            counts[t] = counts.get(t, 0) + 1
        assert v.extra["tensor_types"] == counts and v.extra["tensors"] == len(types)
        assert int(reader.fields["general.file_type"].parts[-1][0]) == LLM_TYPES[name]
        rows = {t.name: int(t.shape[0]) for t in reader.tensors}  # gguf lists ne[0], the row length, first
        assert all(r % QK_K for r in rows.values())  # the premise: no toy row takes a K-quant block
        assert not K_TYPES & set(counts), name
        if "_k" in name:
            assert v.extra["fallback_tensors"] > 0
        sizes[name] = v.size
        print(f"{name}: {v.size} bytes ({v.size / m.variant('llm', 'f32').size:.3f}x of f32), {counts}, "
              f"{v.extra['fallback_tensors']} tensors fell back")
    assert m.variant("llm", "q8_0").extra["tensor_types"].get("Q8_0", 0) > 0
    assert m.variant("llm", "q4_0").extra["tensor_types"].get("Q4_0", 0) > 0
    assert sizes["q8_0"] >= sizes["q6_k"] >= sizes["q5_k_m"] >= sizes["q4_k_m"] >= sizes["q4_0"]


# ---- each loads in its runtime -------------------------------------------------------------------------------


def test_every_llm_variant_loads_in_llama_cpp_and_answers(quantized):
    """llama.cpp loads each GGUF; its logits on an image prompt stay close to f32's; the chat answers."""
    from llava_edge import EdgeLLaVA
    from llava_edge.scenes import random_scene, render

    qb, _, _ = quantized
    rng = random.Random(3)
    image = render(random_scene(rng), rng=rng)
    ref = EdgeLLaVA.load(qb, llm_variant="f32", kv_cache="f32", threads=1)
    text = ref.template.prompt("What is in the image?", image=True, history=[])
    base = ref.prompt_logits(image, text)
    ref.close()
    for name in LLM:
        m = EdgeLLaVA.load(qb, llm_variant=name, kv_cache="f32", threads=1)
        assert m.llm_variant.name == name
        logits = m.prompt_logits(image, text)
        cos = per_token_cosine(logits, base)
        answer = m.chat(image, "What is in the image?", max_tokens=6)
        m.close()
        print(f"{name}: logits cosine vs f32 min {cos.min():.4f} mean {cos.mean():.4f}; answer {answer!r}")
        assert np.isfinite(logits).all() and cos.min() > 0.9  # a broken file would not correlate at all
        assert answer  # a random-weight toy answers gibberish, but it answers


def test_every_vision_variant_runs_in_onnxruntime_close_to_fp32(quantized, pixels, record_property):
    from llava_edge import EdgeLLaVA
    from llava_edge.runtimes.vision import VisionEncoder

    qb, _, _ = quantized
    m = manifest.read(qb)
    ref = VisionEncoder(qb / "vision.fp32.onnx").encode(pixels)
    measured = {}
    for name in VISION:
        got = VisionEncoder(qb / m.variant("vision", name).file).encode(pixels)
        assert got.dtype == np.float32 and got.shape == ref.shape
        cos = per_token_cosine(got, ref)
        measured[name] = {"min": float(cos.min()), "mean": float(cos.mean()),
                          "rel_l2": float(np.linalg.norm(got - ref) / np.linalg.norm(ref))}
        recorded = m.variant("vision", name).extra["quality"]
        assert recorded["images"] == CHECK_IMAGES and 0 < recorded["min_cosine"] <= recorded["mean_cosine"] <= 1
        print(f"vision {name}: cosine vs fp32 min {cos.min():.5f} mean {cos.mean():.5f}, "
              f"rel L2 {measured[name]['rel_l2']:.4f} (recorded by quantize: {recorded})")
    record_property("vision_cosine_vs_fp32", measured)
    # Sanity gates (the drift issue gates quality): fp16 rounds, int8 is close, int4 is coarser but not collapsed.
    assert measured["fp16"]["min"] > 0.9999
    assert measured["int8"]["min"] > 0.99 and measured["int8-static"]["min"] > 0.99
    assert measured["int4"]["mean"] > 0.95
    assert measured["int4"]["rel_l2"] > measured["int8"]["rel_l2"] > measured["fp16"]["rel_l2"]
    # and the whole pipeline answers with a quantized vision graph and a quantized language model
    rt = EdgeLLaVA.load(qb, vision_variant="int8-static", llm_variant="q4_k_m", threads=1)
    assert rt.vision_variant.name == "int8-static" and rt.chat(pixels_to_image(pixels[0], rt.spec), "What is it?",
                                                                max_tokens=4)
    rt.close()


def pixels_to_image(px: np.ndarray, spec: ImageSpec):
    """Undo the normalisation (enough for a picture the pipeline preprocesses again)."""
    from PIL import Image

    a = px.transpose(1, 2, 0) * np.asarray(spec.std, np.float32) + np.asarray(spec.mean, np.float32)
    return Image.fromarray(np.clip(a * 255 + 0.5, 0, 255).astype(np.uint8))


def test_quantized_graphs_keep_the_fragile_ops_in_float(quantized):
    qb, _, _ = quantized
    fp32 = onnx.load(str(qb / "vision.fp32.onnx"))
    keep = vq.keep_float(fp32)
    assert len(keep.patch_embedding) == 1 and len(keep.projector_out) == 1
    assert len(keep.attention_matmuls) == 2 * 3  # Q.K^T and attn.V in each of the 3 kept encoder layers

    dyn = onnx.load(str(qb / "vision.int8.onnx"))  # fused by default: attention is one float op a layer
    ops = [n.op_type for n in dyn.graph.node]
    assert "ConvInteger" not in ops and "Conv" in ops and ops.count("MultiHeadAttention") == 3
    assert sum(op in ("MatMulInteger", "DynamicQuantizeMatMul") for op in ops) == 6 * 3 + 1
    assert {n.name for n in dyn.graph.node if n.op_type == "MatMul"} == set(keep.projector_out)

    qdq = onnx.load(str(qb / "vision.int8-static.onnx"))
    produced_by = {o: n for n in qdq.graph.node for o in n.output}
    for n in qdq.graph.node:
        if n.op_type in ("LayerNormalization", "Softmax", "Conv") or n.name in keep.nodes():
            sources = [produced_by[i].op_type for i in n.input if i in produced_by]
            assert "DequantizeLinear" not in sources, n.name
    quantized_matmuls = [n for n in qdq.graph.node if n.op_type == "MatMul"
                         and any(produced_by.get(i) is not None and produced_by[i].op_type == "DequantizeLinear"
                                 for i in n.input)]
    assert len(quantized_matmuls) == 6 * 3 + 1  # q, k, v, out, fc1, fc2 per layer + the projector's first layer
    zero_points = [t for t in qdq.graph.initializer if t.name.endswith("_zero_point")]
    assert zero_points and all(not onnx.numpy_helper.to_array(t).any() for t in zero_points)  # symmetric

    int4 = onnx.load(str(qb / "vision.int4.onnx"))
    nbits = [n for n in int4.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 6 * 3 + 1 and sum(n.op_type == "MultiHeadAttention" for n in int4.graph.node) == 3
    assert {onnx.helper.get_attribute_value(a) for n in nbits for a in n.attribute if a.name == "block_size"} == {
        vq.DEFAULT_BLOCK_SIZE}
    assert {n.name for n in int4.graph.node if n.op_type == "MatMul"} >= set(keep.projector_out)


def test_keeping_ops_in_float_helps_static_int8(bundle, pixels, tmp_path):
    """The measured case for the exclusions: QDQ int8 of every op onnxruntime can take vs the protected graph."""
    spec = ImageSpec.from_dict(manifest.read(bundle).image)
    calib, _ = vq.calibration_pixels(spec, count=16, seed=0)
    src = bundle / "vision.fp32.onnx"
    got = {}
    for protect in (True, False):
        out = tmp_path / f"static-{protect}.onnx"
        vq.quantize_int8_static(onnx.load(str(src)), out, calib, protect=protect)
        got[protect] = vq.compare_to_reference(src, out, pixels)
    print(f"int8-static vs fp32, LayerNorm/patch conv/attention matmuls/projector out kept float: {got[True]}")
    print(f"int8-static vs fp32, everything onnxruntime quantizes:                           {got[False]}")
    assert got[True]["mean_cosine"] > got[False]["mean_cosine"]
    assert got[True]["rel_l2"] < got[False]["rel_l2"]


# ---- re-runs ----------------------------------------------------------------------------------------------------


def test_rerun_redoes_nothing_and_a_changed_parameter_redoes_only_its_variant(quantized, tmp_path):
    qb = copy_bundle(quantized[0], tmp_path / "b")
    before = snapshot(qb)
    outcomes = quantize_bundle(qb, LLM, VISION, log=lambda _: None)
    assert not any(o.made for o in outcomes) and len(outcomes) == len(LLM) + len(VISION)
    assert snapshot(qb) == before  # not even the manifest was rewritten

    old = manifest.read(qb)
    outcomes = quantize_bundle(qb, "q4_0", "int4,int8", block_size=64, log=lambda _: None)
    assert [(o.name, o.made) for o in outcomes] == [("q4_0", False), ("int4", True), ("int8", False)]
    new = manifest.read(qb)
    assert new.variant("vision", "int4").extra["options"]["block_size"] == 64
    assert new.variant("vision", "int4").sha256 != old.variant("vision", "int4").sha256
    after = snapshot(qb)
    assert {k for k in before if before[k] != after.get(k)} == {"vision.int4.onnx", manifest.MANIFEST}

    # a registered file changed behind the manifest's back is made again
    (qb / "llm.q4_0.gguf").write_bytes(b"not a gguf")
    (outcome,) = quantize_bundle(qb, "q4_0", log=lambda _: None)
    assert outcome.made and manifest.sha256_file(qb / "llm.q4_0.gguf") == old.variant("llm", "q4_0").sha256


def test_calibration_images_from_a_folder(bundle, tmp_path):
    from llava_edge.scenes import random_scene, render

    qb = copy_bundle(bundle, tmp_path / "b")
    images = tmp_path / "calib"
    images.mkdir()
    rng = random.Random(5)
    for i in range(5):
        render(random_scene(rng), rng=rng).save(images / f"{i}.png")
    (images / "notes.txt").write_text("not an image")
    (o,) = quantize_bundle(qb, vision="int8-static", calib_images=images, log=lambda _: None)
    v = manifest.read(qb).variant("vision", "int8-static")
    assert o.made and v.extra["calibration_images"] == 5 and str(images) in v.extra["calibrated_on"]
    assert not quantize_bundle(qb, vision="int8-static", calib_images=images, log=lambda _: None)[0].made
    render(random_scene(rng), rng=rng).save(images / "5.png")  # other images, other calibration
    assert quantize_bundle(qb, vision="int8-static", calib_images=images, log=lambda _: None)[0].made
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="holds no image files"):
        quantize_bundle(qb, vision="int8-static", calib_images=empty, log=lambda _: None)
    with pytest.raises(UserError, match="is not a directory"):
        quantize_bundle(qb, "q4_0", "int8-static", calib_images=tmp_path / "missing", log=lambda _: None)
    assert not (qb / "llm.q4_0.gguf").exists()  # refused before any work


def test_int8_and_int4_are_fused_by_default_and_optimize_decides_otherwise(bundle, tmp_path, pixels):
    qb = copy_bundle(bundle, tmp_path / "b")
    quantize_bundle(qb, vision="int8,int8-static", log=lambda _: None)
    m = manifest.read(qb)
    v, static = m.variant("vision", "int8"), m.variant("vision", "int8-static")
    assert v.extra["options"]["optimize"] == vq.FUSION and v.extra["fused"]["MultiHeadAttention"] == 3
    assert static.extra["options"]["optimize"] is None and "fused" not in static.extra  # TensorRT's form
    g = onnx.load(str(qb / v.file))
    assert any(n.domain == "com.microsoft" for n in g.graph.node)
    assert vq.compare_to_reference(bundle / "vision.fp32.onnx", qb / v.file, pixels)["min_cosine"] > 0.99
    assert not quantize_bundle(qb, vision="int8", optimize=True, log=lambda _: None)[0].made  # the same graph
    assert quantize_bundle(qb, vision="int8", optimize=False, log=lambda _: None)[0].made  # another graph
    plain = manifest.read(qb).variant("vision", "int8")
    assert plain.extra["options"]["optimize"] is None
    assert not any(n.domain == "com.microsoft" for n in onnx.load(str(qb / plain.file)).graph.node)
    assert quantize_bundle(qb, vision="int8-static", optimize=True, log=lambda _: None)[0].made
    assert manifest.read(qb).variant("vision", "int8-static").extra["fused"]["MultiHeadAttention"] == 3


# ---- bad input --------------------------------------------------------------------------------------------------


def test_unknown_types_list_the_valid_ones(bundle):
    with pytest.raises(UserError, match=r"unknown --llm type 'q3'; valid: q8_0, q6_k, .*q4_k_m.*q4_0"):
        quantize_bundle(bundle, "q4_0,q3")
    with pytest.raises(UserError, match=r"unknown --vision type 'int3'; valid: fp16, int8, int8-static, int4"):
        quantize_bundle(bundle, vision="int8,int3")
    with pytest.raises(UserError, match=r"--block-size 48 is not supported; valid: 16, 32, 64, 128, 256"):
        quantize_bundle(bundle, vision="int4", block_size=48)
    with pytest.raises(UserError, match="nothing to quantize"):
        quantize_bundle(bundle)
    assert manifest.read(bundle).variants and {v.name for v in manifest.read(bundle).variants} == {"fp32", "f32"}


def test_a_bundle_without_base_files_says_what_to_export(bundle, tmp_path):
    qb = copy_bundle(bundle, tmp_path / "b")
    m = manifest.read(qb)
    for v in m.variants:
        (qb / v.file).unlink()
    m.variants = []
    manifest.write(qb, m)
    with pytest.raises(UserError, match=r"no f32/bf16/f16 GGUF .* export one first: .*--target gguf"):
        quantize_bundle(qb, "q4_k_m")
    with pytest.raises(UserError, match=r"no fp32 vision ONNX .* export one first: .*--target onnx"):
        quantize_bundle(qb, vision="int8")
    with pytest.raises(UserError, match="not a bundle"):
        quantize_bundle(tmp_path, "q4_0")


def test_tensorrt_calibration_cache_needs_tensorrt(bundle, tmp_path, monkeypatch):
    qb = copy_bundle(bundle, tmp_path / "b")
    before = snapshot(qb)
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(UserError, match="--trt-calib-cache needs TensorRT .*pip install tensorrt"):
        quantize_bundle(qb, vision="int8", trt_calib_cache=True)
    assert snapshot(qb) == before  # refused before any work


def test_tensorrt_calibration_cache_is_written_once(bundle, tmp_path, monkeypatch):
    """The orchestration around TensorRT (build_engine itself is tested with TensorRT's stand-in elsewhere)."""
    from llava_edge.export import tensorrt_engine
    from llava_edge.runtimes import tensorrt_vision

    calls = []

    def fake_build_engine(onnx_path, engine_path, *, precision, calibration_images, calibration_cache, log):
        calls.append(len(calibration_images))
        assert precision == "int8" and not Path(calibration_cache).exists()
        Path(calibration_cache).write_bytes(b"TRT-1001-EntropyCalibration2\n")
        Path(engine_path).write_bytes(b"engine")
        return {}

    monkeypatch.setattr(tensorrt_vision, "import_tensorrt", lambda: object())
    monkeypatch.setattr(tensorrt_engine, "build_engine", fake_build_engine)
    qb = copy_bundle(bundle, tmp_path / "b")
    (o,) = quantize_bundle(qb, trt_calib_cache=True, calib_count=12, log=lambda _: None)
    assert o.made and calls == [12]
    assert (qb / tensorrt_engine.CALIBRATION_CACHE).read_bytes().startswith(b"TRT-")
    (o,) = quantize_bundle(qb, trt_calib_cache=True, calib_count=12, log=lambda _: None)
    assert not o.made and calls == [12]
    assert not [p.name for p in qb.iterdir() if p.name.startswith(".")]


# ---- full disk and kills ----------------------------------------------------------------------------------------

CLI = [sys.executable, "-c", "import sys; from llava_edge.cli import main; sys.exit(main(sys.argv[1:]))"]


def _limit_file_size(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail (EFBIG) instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.parametrize("args", [["--llm", "q8_0"], ["--vision", "int8"]])
def test_a_full_disk_leaves_the_bundle_as_it_was(bundle, tmp_path, args):
    """Writes fail past 400 kB (a file size limit stands in for the disk): one-line error, bundle untouched."""
    qb = copy_bundle(bundle, tmp_path / "b")
    before, manifest_bytes = snapshot(qb), (qb / manifest.MANIFEST).read_bytes()
    r = subprocess.run([*CLI, "quantize", str(qb), *args], capture_output=True, text=True,
                       preexec_fn=_limit_file_size(400_000), timeout=120)
    assert r.returncode == 2, r.stderr
    err = r.stderr.strip().splitlines()[-1]
    print(err)
    assert err.startswith("error: ") and ("file too large" in err or "no space left" in err or "could not quantize" in err)
    assert snapshot(qb) == before and (qb / manifest.MANIFEST).read_bytes() == manifest_bytes


KILLER = textwrap.dedent("""
    import os, signal, sys
    import onnx
    from llava_edge.cli import main

    where = sys.argv[1]
    if where == "before-rename":  # the variant is complete under its temporary name
        real_replace = os.replace
        def replace(src, dst, *a, **k):
            name = os.path.basename(str(dst))
            if not name.startswith(".") and name.endswith((".gguf", ".onnx")):
                os.kill(os.getpid(), signal.SIGKILL)
            return real_replace(src, dst, *a, **k)
        os.replace = replace
    else:  # half of the ONNX file is on disk
        def save_model(model, path, *a, **k):
            data = model.SerializeToString()
            with open(path, "wb") as f:
                f.write(data[: len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        onnx.save_model = onnx.save = save_model
    sys.exit(main(["quantize", *sys.argv[2:]]))
""")


@pytest.mark.parametrize("where,args", [("before-rename", ["--llm", "q4_k_m"]),
                                        ("before-rename", ["--vision", "int8"]),
                                        ("mid-write", ["--vision", "int4"])])
def test_a_kill_mid_write_registers_nothing_and_the_next_run_cleans_up(bundle, tmp_path, where, args):
    qb = copy_bundle(bundle, tmp_path / "b")
    before, manifest_bytes = snapshot(qb), (qb / manifest.MANIFEST).read_bytes()
    r = subprocess.run([sys.executable, "-c", KILLER, where, str(qb), *args], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert (qb / manifest.MANIFEST).read_bytes() == manifest_bytes
    left = set(snapshot(qb)) - set(before)
    assert left and all(name.startswith(".") and name.endswith(".partial") for name in left)  # hidden temporaries
    assert {k: v for k, v in snapshot(qb).items() if k in before} == before
    (o,) = quantize_bundle(qb, *(("q4_k_m", None) if args[0] == "--llm" else (None, args[1])), log=lambda _: None)
    assert o.made and not [p for p in qb.iterdir() if p.name.startswith(".")]
    manifest.check_files(qb, manifest.read(qb), [o.file], verify_hash=True)


# ---- the command line -------------------------------------------------------------------------------------------


def test_cli_quantize_and_info(quantized, capsys):
    from llava_edge.cli import main

    qb = quantized[0]
    assert main(["quantize", str(qb), "--llm", "q4_k_m", "--vision", "int8"]) == 0
    err = capsys.readouterr().err
    assert "q4_k_m" in err and "up to date" in err
    assert main(["quantize", str(qb), "--vision", "int8", "--optimize"]) == 0  # the default for int8: no change
    assert "up to date" in capsys.readouterr().err
    assert main(["quantize", str(qb), "--llm", "q4_k_m,iq9"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: unknown --llm type 'iq9'; valid: q8_0")
    assert main(["info", str(qb)]) == 0
    out = capsys.readouterr().out
    for name in LLM + VISION:
        assert name in out
    assert json.loads((qb / manifest.MANIFEST).read_text())["variants"]  # still a valid manifest


# ---- real widths (slow: a 1.1B-shaped checkpoint cut to 2 layers, ~0.6 GB of random weights) ----------------


@pytest.mark.slow
def test_k_quants_on_real_llama_widths_need_no_fallback(tmp_path):
    """TinyLlama's rows (2048, 5632) are multiples of 256: Q4_K_M is made of K blocks, no fallback.

    Q4_K stores 4.5 bits per weight (0.28x of f16) and Q6_K 6.5625 (0.41x); Q4_K_M puts attn_v and
    half of ffn_down at Q6_K, so the decoder layers land between, near 0.30x.
    """
    from llava_edge.checkpoint import open_checkpoint
    from llava_edge.export.llm_gguf import export_llm_gguf
    from llava_edge.quantize.llm import quantize_gguf
    from llava_edge.runtimes.llm import LlamaOptions, LlamaText
    from llava_edge.toy.model import write_toy_model

    model = write_toy_model(tmp_path / "m", "tinyllava-1.1b", 0, layers=2, dtype="float16")
    f16 = tmp_path / "llm.f16.gguf"
    export_llm_gguf(open_checkpoint(model), f16, "f16")
    q = tmp_path / "llm.q4_k_m.gguf"
    rec = quantize_gguf(f16, q, "q4_k_m")
    assert rec["fallback_tensors"] == 0 and {"Q4_K", "Q6_K"} <= set(rec["tensor_types"])

    def layer_bytes(path: Path) -> int:
        return sum(int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors if t.name.startswith("blk."))

    ratio = layer_bytes(q) / layer_bytes(f16)
    print(f"Q4_K_M decoder layers: {ratio:.3f}x of f16; whole file {q.stat().st_size / f16.stat().st_size:.3f}x")
    assert 4.5 / 16 < ratio < 6.5625 / 16 and abs(ratio - 0.30) < 0.02
    llm = LlamaText(q, LlamaOptions(n_ctx=64, n_threads=1))
    assert np.isfinite(llm.feed_tokens([1, 2, 3])).all()
    llm.close()


def test_a_real_model_is_not_calibrated_on_synthetic_scenes(bundle, tmp_path):
    from llava_edge import manifest

    b = shutil.copytree(bundle, tmp_path / "b")
    assert manifest.read(b).source.get("toy") is True  # the toy's bundle says so
    d = json.loads((b / "manifest.json").read_text())
    d["source"].pop("toy")  # as a bundle of a real model
    (b / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(UserError, match="--calib-images"):
        quantize_bundle(b, vision="int8-static", log=lambda _: None)
    assert quantize_bundle(b, vision="int8", log=lambda _: None)[0].made  # dynamic int8 needs no calibration
