"""The attention fusion behind ``quantize --optimize``: each tower attention becomes onnxruntime's
``MultiHeadAttention`` and computes what the exported graph computes; anything off the pattern is left alone."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from next_helpers import toy_bundle

from llava_edge import manifest
from llava_edge.preprocess import ImageSpec
from llava_edge.quantize import vision as vq
from llava_edge.quantize.fuse_attention import fuse_attention

B, S, N, D = 2, 7, 3, 4
H = N * D


def attention_graph(*, mask: bool = False, probs_out: bool = False, k_perm=(0, 2, 3, 1)):
    """x -> q/k/v projections -> the exporter's attention pattern -> y, with optional deviations."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((H, H)).astype(np.float32), f"w{c}") for c in "qkv"]
    inits += [numpy_helper.from_array(np.array([0, 0, N, D], np.int64), "split"),
              numpy_helper.from_array(np.array([0, 0, H], np.int64), "merge"),
              numpy_helper.from_array(np.array(D ** -0.5, np.float32), "scale")]
    nodes = []
    for c in "qkv":
        perm = list(k_perm) if c == "k" else [0, 2, 1, 3]
        nodes += [helper.make_node("MatMul", ["x", f"w{c}"], [c]),
                  helper.make_node("Reshape", [c, "split"], [f"{c}4"]),
                  helper.make_node("Transpose", [f"{c}4"], [f"{c}t"], perm=perm)]
    nodes += [helper.make_node("MatMul", ["qt", "kt"], ["scores"]),
              helper.make_node("Mul", ["scores", "scale"], ["scaled"])]
    if mask:
        inits.append(numpy_helper.from_array(np.zeros((1, 1, S, S), np.float32), "mask"))
        nodes.append(helper.make_node("Add", ["scaled", "mask"], ["masked"]))
    nodes += [helper.make_node("Softmax", ["masked" if mask else "scaled"], ["probs"], axis=-1),
              helper.make_node("MatMul", ["probs", "vt"], ["ctx"]),
              helper.make_node("Transpose", ["ctx"], ["ctxt"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["ctxt", "merge"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [B, S, H])]
    if probs_out:
        outputs.append(helper.make_tensor_value_info("probs", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "attention", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [B, S, H])],
                              outputs, inits, value_info=[helper.make_tensor_value_info("probs", TensorProto.FLOAT,
                                                                                         None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def run(model, feeds: dict) -> np.ndarray:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def test_the_pattern_becomes_one_multihead_attention_with_the_same_result():
    model = attention_graph()
    x = {"x": np.random.default_rng(1).standard_normal((B, S, H)).astype(np.float32)}
    before = run(model, x)
    assert fuse_attention(model) == 1
    ops = [n.op_type for n in model.graph.node]
    assert ops == ["MatMul", "MatMul", "MatMul", "MultiHeadAttention"], ops
    (mha,) = [n for n in model.graph.node if n.op_type == "MultiHeadAttention"]
    attrs = {a.name: helper.get_attribute_value(a) for a in mha.attribute}
    assert mha.domain == "com.microsoft" and attrs["num_heads"] == N and attrs["scale"] == pytest.approx(D ** -0.5)
    assert list(mha.input) == ["q", "k", "v"] and list(mha.output) == ["y"]
    assert {t.name for t in model.graph.initializer} == {"wq", "wk", "wv"}  # shapes and scale no longer read
    assert not [vi for vi in model.graph.value_info if vi.name == "probs"]
    onnx.checker.check_model(model)
    after = run(model, x)
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5 * np.abs(before).max())


@pytest.mark.parametrize("deviation", [{"mask": True}, {"probs_out": True}, {"k_perm": (0, 2, 1, 3)}],
                         ids=["mask before the softmax", "probabilities read elsewhere", "keys not transposed"])
def test_an_attention_off_the_pattern_is_left_as_it_is(deviation):
    model = attention_graph(**deviation)
    before = model.SerializeToString()
    assert fuse_attention(model) == 0
    assert model.SerializeToString() == before


@pytest.fixture(scope="module", params=["toy-siglip", "clip"])
def tower(request, tmp_path_factory):
    """(fp32 vision graph, preprocessed pixels, layers) of a SigLIP toy and of the session's CLIP toy."""
    bundle = (toy_bundle(tmp_path_factory, "toy-siglip", seed=0)[1] if request.param == "toy-siglip"
              else request.getfixturevalue("bundle"))
    pixels, _ = vq.calibration_pixels(ImageSpec.from_dict(manifest.read(bundle).image), None, 2, seed=3)
    model = onnx.load(str(bundle / "vision.fp32.onnx"))
    return model, pixels, sum(n.op_type == "Softmax" for n in model.graph.node)


def test_every_tower_attention_is_fused_and_the_features_stay(tower):
    model, pixels, layers = tower
    feeds = {model.graph.input[0].name: pixels}
    before = run(model, feeds)
    fused = onnx.ModelProto.FromString(model.SerializeToString())
    assert layers >= 2 and fuse_attention(fused) == layers
    assert not any(n.op_type == "Softmax" for n in fused.graph.node)
    after = run(fused, feeds)
    assert np.abs(after - before).max() <= 1e-5 * np.abs(before).max()


def test_optimize_then_int8_keeps_the_projections_quantized(tower, tmp_path):
    model, pixels, layers = tower
    fused, stats = vq.optimize_tower(onnx.ModelProto.FromString(model.SerializeToString()))
    assert stats["MultiHeadAttention"] == layers and stats["SkipLayerNormalization"] >= layers
    vq.quantize_int8_dynamic(fused, tmp_path / "int8.onnx")
    q = onnx.load(str(tmp_path / "int8.onnx"))
    ops = [n.op_type for n in q.graph.node]
    assert ops.count("MultiHeadAttention") == layers
    # q, k, v, out and the two MLP matmuls of each layer, plus the projector's first: all int8
    assert sum(op in ("MatMulInteger", "DynamicQuantizeMatMul") for op in ops) >= 6 * layers
    ref = tmp_path / "fp32.onnx"
    onnx.save(model, str(ref))
    assert vq.compare_to_reference(ref, tmp_path / "int8.onnx", pixels)["min_cosine"] > 0.99
