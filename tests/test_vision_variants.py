"""Vision graph variants: fp32 and fp16 ONNX against Hugging Face, TensorRT's op support, TensorRT engine guards."""

from __future__ import annotations

import random
import subprocess
import sys
import types

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from llava_edge import manifest
from llava_edge.errors import UserError
from llava_edge.export.tensorrt_ops import TABLES, check_tensorrt_ops
from llava_edge.export.vision_fp16 import FP32_OPS, convert_vision_fp16, to_fp16
from llava_edge.export.vision_onnx import parity_vs_hf
from llava_edge.preprocess import ImageSpec, preprocess
from llava_edge.runtimes import tensorrt_vision
from llava_edge.runtimes.tensorrt_vision import check_engine, engine_mismatch
from llava_edge.runtimes.vision import on_onnxruntime_thread

FP16_UNIT_ROUNDOFF = 2.0**-11  # relative rounding error of one float16 operation


@pytest.fixture(scope="module")
def pixels(bundle):
    """Three toy scenes, preprocessed as the runtime does: (3, 3, S, S) float32."""
    from llava_edge.scenes import random_scene, render

    spec = ImageSpec.from_dict(manifest.read(bundle).image)
    rng = random.Random(7)
    return np.stack([preprocess(render(random_scene(rng), rng=rng), spec) for _ in range(3)])


@pytest.fixture(scope="module")
def fp16_onnx(bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("fp16") / "vision.fp16.onnx"
    kept = convert_vision_fp16(bundle / "vision.fp32.onnx", out)
    assert set(kept["fp32_ops"]) >= set(FP32_OPS)
    return out


def run(path, px):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    # on onnxruntime's own thread, as the runtime runs it: its int8 kernels would leave this thread's AMX tile
    # configuration to a later llama.cpp decode in this process (runtimes/vision.py)
    return on_onnxruntime_thread(sess.run, None, {"pixel_values": px})[0]


def elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Every tensor name of the main graph -> its element type, after ONNX type inference."""
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in list(g.input) + list(g.output) + list(g.value_info)}
    types.update({t.name: t.data_type for t in g.initializer})
    return types


# ---- parity with Hugging Face -------------------------------------------------------------------------------


def test_fp32_onnx_matches_hf_per_image_token(bundle, hf_model, pixels, record_property):
    p = parity_vs_hf(hf_model, bundle / "vision.fp32.onnx", pixels)
    record_property("fp32_parity", p)
    print(f"fp32 ONNX vs HF: {p}")
    assert p["min_cosine"] >= 0.9999
    assert p["max_abs"] < 1e-4


def test_fp16_onnx_matches_hf_within_float16_rounding(bundle, hf_model, pixels, fp16_onnx, record_property):
    p16 = parity_vs_hf(hf_model, fp16_onnx, pixels)
    p32 = parity_vs_hf(hf_model, bundle / "vision.fp32.onnx", pixels)
    record_property("fp16_parity", p16)
    print(f"fp16 ONNX vs HF: {p16}")
    # Every weight and most activations are rounded to float16 (relative error u = 2^-11 each); through the
    # kept encoder layers and the projector that compounds to a few u of the output's scale. Gate: 8 u of
    # the largest reference value per element, and per-token cosine >= 0.9999 (an error of a few u on
    # every element moves the cosine by ~(few u)^2, far below 1e-4).
    assert p16["max_abs"] <= 8 * FP16_UNIT_ROUNDOFF * p16["max_ref"]
    assert p16["min_cosine"] >= 0.9999
    # and it really computes in reduced precision: an fp16 graph that matched like fp32 would be suspect
    assert p16["max_abs"] > 10 * p32["max_abs"]


def test_fp16_onnx_runs_batch_1_and_3_with_float32_io(fp16_onnx, pixels):
    one, three = run(fp16_onnx, pixels[:1]), run(fp16_onnx, pixels)
    assert one.dtype == three.dtype == np.float32
    assert one.shape[0] == 1 and three.shape[0] == 3 and one.shape[1:] == three.shape[1:]
    scale = np.abs(three).max()
    np.testing.assert_allclose(one[0], three[0], atol=4 * FP16_UNIT_ROUNDOFF * scale)
    assert not np.allclose(three[0], three[1])  # different images, different embeddings


# ---- what the fp16 graph keeps in fp32 ----------------------------------------------------------------------


def test_fp16_graph_keeps_layernorm_and_softmax_in_fp32(bundle, fp16_onnx):
    fp32 = onnx.load(str(bundle / "vision.fp32.onnx"))
    fp16 = onnx.load(str(fp16_onnx))
    types = elem_types(fp16)
    for op in FP32_OPS:
        nodes = [n for n in fp16.graph.node if n.op_type == op]
        assert len(nodes) == sum(n.op_type == op for n in fp32.graph.node) > 0
        for n in nodes:
            tensors = [t for t in list(n.input) + list(n.output) if t]
            assert {types[t] for t in tensors} == {TensorProto.FLOAT}, (op, n.name)
    matmul_weights = [i for n in fp16.graph.node if n.op_type == "MatMul" for i in n.input
                      if i in {t.name for t in fp16.graph.initializer}]
    assert matmul_weights and {types[w] for w in matmul_weights} == {TensorProto.FLOAT16}
    io = list(fp16.graph.input) + list(fp16.graph.output)
    assert {v.type.tensor_type.elem_type for v in io} == {TensorProto.FLOAT}
    assert fp16_onnx.stat().st_size < 0.6 * (bundle / "vision.fp32.onnx").stat().st_size
    onnx.checker.check_model(fp16, full_check=True)  # topologically sorted, types consistent


def decomposed_layernorm_model(opset: int = 13) -> onnx.ModelProto:
    """x @ W -> LayerNorm written out (opset < 17 style) -> Pow(h, 3) (a GELU-like cube, not a norm)."""
    rng = np.random.default_rng(0)
    w = helper.make_tensor("w", TensorProto.FLOAT, [8, 8], rng.standard_normal(64).astype(np.float32))
    scalars = {"two": 2.0, "eps": 1e-5, "three": 3.0}
    c = {k: helper.make_tensor(k, TensorProto.FLOAT, [], [v]) for k, v in scalars.items()}
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="proj"),
        helper.make_node("ReduceMean", ["h"], ["mean"], axes=[-1], name="mean"),
        helper.make_node("Sub", ["h", "mean"], ["centered"], name="center"),
        helper.make_node("Pow", ["centered", "two"], ["sq"], name="square"),
        helper.make_node("ReduceMean", ["sq"], ["var"], axes=[-1], name="variance"),
        helper.make_node("Add", ["var", "eps"], ["var_eps"], name="add_eps"),
        helper.make_node("Sqrt", ["var_eps"], ["std"], name="std"),
        helper.make_node("Div", ["centered", "std"], ["normed"], name="normalize"),
        helper.make_node("Pow", ["normed", "three"], ["y"], name="cube"),
    ]
    graph = helper.make_graph(
        nodes, "decomposed_ln", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 8])], [w, *c.values()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_decomposed_layernorm_variance_chain_stays_fp32():
    model = decomposed_layernorm_model()
    fp16, kept = to_fp16(model)
    types = elem_types(fp16)
    by_name = {n.name: n for n in fp16.graph.node}
    for name in ("square", "variance", "add_eps", "std", "normalize", "mean"):
        assert {types[t] for t in by_name[name].output} == {TensorProto.FLOAT}, name
    assert types[by_name["cube"].input[0]] == TensorProto.FLOAT16  # a Pow that is not a variance is converted
    assert types[by_name["proj"].output[0]] == TensorProto.FLOAT16
    assert "Pow" in kept["fp32_ops"] and "ReduceMean" in kept["fp32_ops"]
    # activations whose squares overflow float16 (300^2 > 65504) still normalize correctly
    x = (np.random.default_rng(1).standard_normal((4, 8)) * 300).astype(np.float32)
    h = x @ onnx.numpy_helper.to_array(model.graph.initializer[0])
    normed = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-5)
    got = ort.InferenceSession(fp16.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.abs(h).max() > 256 and np.isfinite(got).all()
    np.testing.assert_allclose(got, normed**3, rtol=0.02, atol=0.02)


def test_fp16_conversion_refuses_bad_input(tmp_path, fp16_onnx):
    with pytest.raises(UserError, match="not found"):
        convert_vision_fp16(tmp_path / "missing.onnx", tmp_path / "out.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf \xff\xfe")
    with pytest.raises(UserError, match="not a readable ONNX"):
        convert_vision_fp16(tmp_path / "junk.onnx", tmp_path / "out.onnx")
    with pytest.raises(UserError, match="already fp16"):
        to_fp16(_with_fp16_input(onnx.load(str(fp16_onnx))))
    assert not list(tmp_path.glob("out*")) and not list(tmp_path.glob(".*"))


def _with_fp16_input(model: onnx.ModelProto) -> onnx.ModelProto:
    model.graph.input[0].type.tensor_type.elem_type = TensorProto.FLOAT16
    return model


# ---- TensorRT's ONNX parser -----------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["fp32", "fp16"])
def test_every_op_of_the_exported_graphs_is_supported_by_tensorrt(variant, bundle, fp16_onnx):
    path = bundle / "vision.fp32.onnx" if variant == "fp32" else fp16_onnx
    r = check_tensorrt_ops(path)
    assert r.opset >= 17 and r.opset == onnx.load(str(path), load_external_data=False).opset_import[0].version
    assert {"LayerNormalization", "Softmax", "MatMul", "Conv"} <= set(r.ops)  # the walk saw the graph
    assert r.ok, r.message()


def test_jetpack5_tensorrt_85_has_no_layernormalization(bundle):
    """TensorRT 8.5 (JetPack 5.1) parses opset 17 but has no LayerNormalization importer: a known limit."""
    r = check_tensorrt_ops(bundle / "vision.fp32.onnx", "8.5")
    assert r.unsupported == ["LayerNormalization"] and not r.ok
    assert "LayerNormalization" in r.message()


def tiny_model(nodes, opset=17, inputs=("x",), initializers=(), functions=()):
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info(i, TensorProto.FLOAT, [2, 3]) for i in inputs],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], list(initializers),
    )
    opsets = [helper.make_opsetid("", opset), helper.make_opsetid("local", 1)]
    return helper.make_model(graph, opset_imports=opsets, functions=list(functions))


def test_checker_flags_ops_tensorrt_does_not_parse():
    assert "Unique" not in TABLES["10.1"].ops  # the table says N: the premise of this test
    unique = tiny_model([helper.make_node("Unique", ["x"], ["y"])])
    r = check_tensorrt_ops(unique)
    assert r.unsupported == ["Unique"] and not r.ok and "Unique" in r.message()

    # nested: the unsupported op hides in an If branch
    branch = lambda name, op: helper.make_graph(  # noqa: E731
        [helper.make_node(op, ["x"], [f"{name}_out"])], name, [],
        [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, None)],
    )
    cond = helper.make_tensor("cond", TensorProto.BOOL, [], [True])
    nested = tiny_model(
        [helper.make_node("If", ["cond"], ["y"], then_branch=branch("then", "Relu"),
                          else_branch=branch("else", "Compress"))],
        initializers=[cond],
    )
    r = check_tensorrt_ops(nested)
    assert r.unsupported == ["Compress"] and r.ops["Relu"] == 1 and r.ops["If"] == 1

    # another domain; an op ONNX defines only at a later opset; an opset the parser does not take
    ms = tiny_model([helper.make_node("FastGelu", ["x"], ["y"], domain="com.microsoft")])
    assert check_tensorrt_ops(ms).unsupported == ["com.microsoft::FastGelu"]
    gelu17 = tiny_model([helper.make_node("Gelu", ["x"], ["y"])], opset=17)
    assert check_tensorrt_ops(gelu17).undefined == ["Gelu"]
    assert check_tensorrt_ops(tiny_model([helper.make_node("Gelu", ["x"], ["y"])], opset=20)).ok
    r = check_tensorrt_ops(tiny_model([helper.make_node("Relu", ["x"], ["y"])], opset=21))
    assert not r.opset_in_range and "opset 21" in r.message()


def test_checker_applies_the_tables_restrictions_and_inlines_local_functions():
    starts = helper.make_tensor("starts", TensorProto.INT64, [1], [0])
    ends = helper.make_tensor("ends", TensorProto.INT64, [1], [1])
    fixed = tiny_model([helper.make_node("Slice", ["x", "starts", "ends", "axes"], ["y"])],
                       initializers=[starts, ends, helper.make_tensor("axes", TensorProto.INT64, [1], [1])])
    assert check_tensorrt_ops(fixed).ok
    runtime_axes = tiny_model([helper.make_node("Shape", ["x"], ["s"]),
                               helper.make_node("Slice", ["x", "starts", "ends", "s"], ["y"])],
                              initializers=[starts, ends])
    r = check_tensorrt_ops(runtime_axes)
    assert not r.ok and "axes input must be an initializer" in r.restrictions[0]

    body = [helper.make_node("Unique", ["a"], ["b"])]
    func = helper.make_function("local", "MyOp", ["a"], ["b"], body, [helper.make_opsetid("", 17)])
    r = check_tensorrt_ops(tiny_model([helper.make_node("MyOp", ["x"], ["y"], domain="local")], functions=[func]))
    assert r.unsupported == ["Unique"] and r.ops["local::MyOp"] == 1


# ---- TensorRT engines: the guards that run without TensorRT ---------------------------------------------------

BUILT = {"tensorrt_version": "10.3.0.30", "gpu": "Orin", "compute_capability": "8.7"}


def test_engine_mismatch_messages():
    assert engine_mismatch(BUILT, dict(BUILT)) is None
    assert engine_mismatch(BUILT, {**BUILT, "tensorrt_version": "10.3.0.26"}) is None  # build number only
    msg = engine_mismatch(BUILT, {**BUILT, "tensorrt_version": "10.7.0.23"})
    assert "TensorRT 10.3.0.30 (this machine has 10.7.0.23)" in msg and "rebuild" in msg
    msg = engine_mismatch(BUILT, {"tensorrt_version": "10.3.0.30", "gpu": "NVIDIA H100 80GB HBM3",
                                  "compute_capability": "9.0"})
    assert "compute capability 8.7 (this GPU has 9.0)" in msg and "GPU Orin" in msg
    assert "TensorRT 10" not in msg  # the versions agree: not listed as a problem
    msg = engine_mismatch(BUILT, {**BUILT, "gpu": "NVIDIA A10"})
    assert "GPU Orin (this machine has NVIDIA A10)" in msg and "compute capability" not in msg
    assert "does not record the gpu" in engine_mismatch({k: v for k, v in BUILT.items() if k != "gpu"}, BUILT)
    assert "\n" not in msg
    with pytest.raises(UserError, match="rebuild it on this device"):
        check_engine(BUILT, {**BUILT, "compute_capability": "8.6"})
    check_engine(BUILT, dict(BUILT))


@pytest.fixture
def no_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` now raises ImportError


def test_build_engine_without_tensorrt_says_how_to_install(no_tensorrt, bundle, tmp_path, monkeypatch):
    from llava_edge.export.tensorrt_engine import build_engine

    with pytest.raises(UserError, match="TensorRT is not installed") as e:
        build_engine(bundle / "vision.fp32.onnx", tmp_path / "vision.engine", log=lambda _: None)
    assert "pip install tensorrt" in str(e.value) and "JetPack" in str(e.value) and "\n" not in str(e.value)
    assert not list(tmp_path.iterdir())
    monkeypatch.setattr(tensorrt_vision, "on_jetson", lambda: True)
    with pytest.raises(UserError, match="comes with JetPack"):
        tensorrt_vision.TensorRTVisionEncoder(tmp_path / "vision.engine", BUILT)


def test_build_engine_refuses_bad_arguments_before_touching_tensorrt(no_tensorrt, bundle, tmp_path):
    from llava_edge.export.tensorrt_engine import build_engine

    onnx_file = bundle / "vision.fp32.onnx"
    with pytest.raises(UserError, match="unknown TensorRT precision 'int4'"):
        build_engine(onnx_file, tmp_path / "e", precision="int4")
    with pytest.raises(UserError, match="opt \\(9\\) <= max \\(8\\)"):
        build_engine(onnx_file, tmp_path / "e", opt_batch=9, max_batch=8)
    with pytest.raises(UserError, match="calibration cache"):
        build_engine(onnx_file, tmp_path / "e", precision="int8", calibration_cache=tmp_path / "missing.calib")
    with pytest.raises(UserError, match="ONNX file not found"):
        build_engine(tmp_path / "missing.onnx", tmp_path / "e")


def test_tensorrt_runtime_imports_without_torch():
    code = "import sys, llava_edge.runtimes.tensorrt_vision; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- on a machine with TensorRT and an NVIDIA GPU only --------------------------------------------------------


def test_tensorrt_engine_matches_onnx(bundle, pixels, tmp_path):
    pytest.importorskip("tensorrt")
    pytest.importorskip("cuda")
    from llava_edge.export.tensorrt_engine import build_engine, engine_file_name
    from llava_edge.runtimes.tensorrt_vision import TensorRTVisionEncoder

    ref = run(bundle / "vision.fp32.onnx", pixels)
    for precision, gate in (("fp32", 1e-3), ("fp16", 3e-2)):
        engine = tmp_path / engine_file_name(precision)
        record = build_engine(bundle / "vision.fp32.onnx", engine, precision=precision, max_batch=2,
                              timing_cache=tmp_path / "timing.cache", log=print)
        assert record["max_batch"] == 2 and record["precision"] == precision
        enc = TensorRTVisionEncoder(engine, record)
        got = enc.encode(pixels)  # 3 images through a max-batch-2 engine: split in two runs
        enc.close()
        cos = (got * ref).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(ref, axis=-1))
        print(f"TensorRT {precision} vs ONNX: min cosine {cos.min():.6f}, max abs {np.abs(got - ref).max():.2e}")
        assert cos.min() >= 0.999 and np.abs(got - ref).max() <= gate * np.abs(ref).max()
    assert (tmp_path / "timing.cache").stat().st_size > 0


# ---- build_engine's own logic against a stand-in for TensorRT (the real API is exercised above, on a GPU) ----


class _Enum:
    def __init__(self, *names):
        for n in names:
            setattr(self, n, n)


def fake_tensorrt(layers):
    """Just enough of TensorRT's Python API for build_engine's control flow, recording what it was asked."""
    trt = types.SimpleNamespace(__version__="10.1.0.27", float32="f32", float16="f16", int64="i64", asked={})
    trt.LayerType = _Enum("NORMALIZATION", "SOFTMAX", "REDUCE", "ELEMENTWISE", "MATRIX_MULTIPLY")
    trt.ElementWiseOperation = _Enum("POW", "SUM")
    trt.BuilderFlag = _Enum("FP16", "INT8", "OBEY_PRECISION_CONSTRAINTS")
    trt.MemoryPoolType = _Enum("WORKSPACE")
    trt.NetworkDefinitionCreationFlag = _Enum("EXPLICIT_BATCH")
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})

    class Tensor:
        def __init__(self, name, shape, dtype="f32"):
            self.name, self.shape, self.dtype = name, shape, dtype

    class Layer:
        def __init__(self, kind, dtype="f32", op=None):
            self.type, self.op, self.precision, self.out = kind, op, None, [Tensor("t", (), dtype)]
            self.num_outputs, self.output_types = 1, {}

        def get_output(self, j):
            return self.out[j]

        def set_output_type(self, j, dtype):
            self.output_types[j] = dtype

    trt.IElementWiseLayer = type("IElementWiseLayer", (Layer,), {})
    trt.built_layers = [Layer(*spec) for spec in layers]

    class Network:
        num_inputs, num_layers = 1, len(trt.built_layers)

        def get_input(self, i):
            return Tensor("pixel_values", (-1, 3, 112, 112))

        def get_output(self, i):
            return Tensor("image_embeds", (-1, 64, 128))

        def get_layer(self, i):
            return trt.built_layers[i]

    class Profile:
        def set_shape(self, name, lo, opt, hi):
            self.shape = (name, lo, opt, hi)

    class Cache:
        def __init__(self, blob):
            self.blob = blob

        def serialize(self):
            return self.blob + b"+timed"

    class Config:
        int8_calibrator = None

        def __init__(self):
            self.flags, self.profiles = set(), []

        def set_flag(self, flag):
            self.flags.add(flag)

        def add_optimization_profile(self, p):
            self.profiles.append(p.shape)

        def set_calibration_profile(self, p):
            trt.asked["calibration_profile"] = p.shape

        def create_timing_cache(self, blob):
            return Cache(blob)

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache

        def get_timing_cache(self):
            return self.cache

    class Builder:
        platform_has_fast_fp16 = platform_has_fast_int8 = True

        def __init__(self, logger):
            pass

        def create_network(self, flags):
            trt.asked["network_flags"] = flags
            return Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            trt.asked["config"] = config
            cal = config.int8_calibrator
            if cal is not None and cal.read_calibration_cache() is None:
                batches = []
                while (b := cal.get_batch(["pixel_values"])) is not None:
                    batches.append(b)
                trt.asked["calibration_batches"] = len(batches)
                cal.write_calibration_cache(b"TRT-1001-EntropyCalibration2\n")
            return b"engine-bytes"

    class OnnxParser:
        def __init__(self, network, logger):
            pass

        def parse_from_file(self, path):
            return True

    class IInt8EntropyCalibrator2:
        def __init__(self):
            pass

    trt.Builder, trt.OnnxParser, trt.IInt8EntropyCalibrator2 = Builder, OnnxParser, IInt8EntropyCalibrator2
    return trt


@pytest.fixture
def stand_in(monkeypatch):
    from llava_edge.export import tensorrt_engine

    layers = [("NORMALIZATION",), ("MATRIX_MULTIPLY",), ("SOFTMAX",), ("REDUCE", "i64"),
              ("ELEMENTWISE", "f32", "POW"), ("ELEMENTWISE", "f32", "SUM")]
    trt = fake_tensorrt(layers)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    platform = {"tensorrt_version": trt.__version__, "gpu": "Stand-in GPU", "compute_capability": "8.9"}
    monkeypatch.setattr(tensorrt_engine, "running_platform", lambda: dict(platform))
    return trt


def test_build_engine_sets_profile_precision_and_caches(stand_in, bundle, tmp_path):
    from llava_edge.export.tensorrt_engine import build_engine

    timing = tmp_path / "timing.cache"
    timing.write_bytes(b"old")
    record = build_engine(bundle / "vision.fp32.onnx", tmp_path / "v.engine", precision="fp16", max_batch=16,
                          opt_batch=4, timing_cache=timing, log=lambda _: None)
    config = stand_in.asked["config"]
    assert config.profiles == [("pixel_values", (1, 3, 112, 112), (4, 3, 112, 112), (16, 3, 112, 112))]
    assert config.flags == {"FP16", "OBEY_PRECISION_CONSTRAINTS"}
    assert stand_in.asked["network_flags"] == 0  # TensorRT 10: explicit batch is implicit
    kept = [(layer.type, layer.op) for layer in stand_in.built_layers if layer.precision == "f32"]
    assert kept == [("NORMALIZATION", None), ("SOFTMAX", None), ("ELEMENTWISE", "POW")]  # not int reduce, not SUM
    assert (tmp_path / "v.engine").read_bytes() == b"engine-bytes"
    assert timing.read_bytes() == b"old+timed"  # loaded, then saved after the build
    assert record == {"tensorrt_version": "10.1.0.27", "gpu": "Stand-in GPU", "compute_capability": "8.9",
                      "precision": "fp16", "min_batch": 1, "opt_batch": 4, "max_batch": 16, "image_size": 112,
                      "input": "pixel_values", "output": "image_embeds"}


def test_build_engine_int8_calibrates_once_then_reads_the_cache(stand_in, bundle, pixels, tmp_path, monkeypatch):
    from llava_edge.export import tensorrt_engine

    class FakeCudart:  # the calibrator copies batches to the GPU through cuda-python
        cudaMemcpyKind = types.SimpleNamespace(cudaMemcpyHostToDevice=1)
        cudaError_t = types.SimpleNamespace(cudaSuccess=0)
        copies = []

        def cudaMalloc(self, n):
            return (0, 4096)

        def cudaMemcpy(self, dst, src, n, kind):
            self.copies.append(n)
            return (0,)

        def cudaFree(self, ptr):
            return (0,)

    cudart = FakeCudart()
    monkeypatch.setattr(tensorrt_engine, "import_cudart", lambda: cudart)
    cache = tmp_path / "calib.cache"
    images = np.concatenate([pixels, pixels, pixels])  # 9 images, batch 4: two full batches, one dropped
    tensorrt_engine.build_engine(bundle / "vision.fp32.onnx", tmp_path / "a.engine", precision="int8",
                                 max_batch=4, calibration_images=images, calibration_cache=cache, log=lambda _: None)
    assert stand_in.asked["config"].flags == {"FP16", "INT8", "OBEY_PRECISION_CONSTRAINTS"}
    assert stand_in.asked["calibration_batches"] == 2 and cudart.copies == [4 * pixels[0].nbytes] * 2
    assert stand_in.asked["calibration_profile"][1] == (4, 3, 112, 112)
    assert cache.read_bytes().startswith(b"TRT-")
    stand_in.asked.pop("calibration_batches")
    tensorrt_engine.build_engine(bundle / "vision.fp32.onnx", tmp_path / "b.engine", precision="int8",
                                 calibration_cache=cache, log=lambda _: None)
    assert "calibration_batches" not in stand_in.asked  # the cache was read, nothing recalibrated
