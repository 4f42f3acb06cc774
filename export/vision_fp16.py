"""fp32 vision ONNX -> fp16 ONNX, with the numerically fragile ops kept in fp32.

Weights and most activations become float16 (half the file, and the fast path
on GPUs and Jetsons). LayerNormalization and Softmax stay float32: both reduce
over a row, and their sums of squares / exponentials overflow or lose the small
terms in float16. Where a graph carries LayerNorm decomposed (opsets below 17:
``ReduceMean``, ``Pow``, ``Add``, ``Sqrt``, ``Div``), the variance chain is kept
in float32 too. The graph's input and output stay float32, so a runtime feeds
the same pixels to either variant and gets float32 embeddings back.

The conversion itself is onnxruntime's ``float16.convert_float_to_float16``
(the converter onnxconverter-common also ships) with an op and node block list;
this module only chooses what to block, sorts the result and writes it.
``llava-edge export`` and ``llava-edge quantize --vision fp16`` both call
:func:`convert_vision_fp16`.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from pathlib import Path

from llava_edge import atomic
from llava_edge.errors import UserError

# Row reductions that must not run in float16 (see the module docstring).
FP32_OPS = ("LayerNormalization", "Softmax")
# Ops of a decomposed LayerNorm's variance chain: x^2 -> mean -> + eps -> sqrt -> (1 /) -> divide.
_VARIANCE_CHAIN = {"ReduceMean", "Add", "Sqrt", "Reciprocal"}
_VARIANCE_END = {"Div", "Mul"}
EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's limit is 2 GiB for the whole file


def convert_vision_fp16(src: str | Path, dst: str | Path) -> dict:
    """Write the fp16 variant of the fp32 graph ``src`` to ``dst`` (atomically).

    Returns what was kept in float32: ``{"fp32_ops": [...], "fp32_nodes": n,
    "nodes": n}``, which the caller can store in the manifest's variant entry.
    """
    import onnx

    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise UserError(f"ONNX file not found: {src}")
    try:
        model = onnx.load(str(src))
    except Exception as e:  # noqa: BLE001 - protobuf raises DecodeError, onnx raises others
        raise UserError(f"{src} is not a readable ONNX model ({type(e).__name__})") from None
    fp16, kept = to_fp16(model)
    save_onnx(fp16, dst)
    return kept


def to_fp16(model):
    """In memory: ``(fp16 ModelProto, summary)``. The input model is not modified."""
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST
    from onnxruntime.transformers.onnx_model import OnnxModel

    float_io = [v for v in list(model.graph.input) + list(model.graph.output)]
    if any(v.type.tensor_type.elem_type != onnx.TensorProto.FLOAT for v in float_io):
        raise UserError("the vision graph to convert to fp16 must have float32 inputs and outputs "
                        "(is it already fp16?)")
    model = onnx.ModelProto.FromString(model.SerializeToString())
    name_nodes(model.graph)
    op_block = set(DEFAULT_OP_BLOCK_LIST) | set(FP32_OPS)
    node_block = decomposed_layernorm_nodes(model.graph)
    if node_block:
        op_block.add("ReduceMean")  # the mean of a decomposed LayerNorm accumulates a whole row, too
    # OnnxModel's wrapper runs the converter, then removes the Cast pairs it puts
    # between two fp32 nodes (fp32 -> fp16 -> fp32 would round, and overflow, the
    # very values kept in fp32) and the casts that no longer change a type.
    wrapper = OnnxModel(model)
    wrapper.convert_float_to_float16(
        use_symbolic_shape_infer=False, keep_io_types=True,
        op_block_list=sorted(op_block), node_block_list=sorted(node_block),
    )
    fp16 = wrapper.model
    # The converter appends its Cast nodes at the end of the node list; ONNX (and
    # TensorRT's parser) want the nodes in topological order.
    OnnxModel.graph_topological_sort(fp16.graph)
    # It also retypes every float value_info to float16, including entries that
    # describe initializers it kept in float32 (the exporter writes some): drop
    # those, the initializer itself carries its type.
    initializers = {t.name for t in fp16.graph.initializer}
    keep = [v for v in fp16.graph.value_info if v.name not in initializers]
    del fp16.graph.value_info[:]
    fp16.graph.value_info.extend(keep)
    kept = [n for n in fp16.graph.node if n.op_type in op_block or n.name in node_block]
    summary = {
        "fp32_ops": sorted(Counter(n.op_type for n in kept)),
        "fp32_nodes": len(kept),
        "nodes": len(fp16.graph.node),
    }
    return fp16, summary


def decomposed_layernorm_nodes(graph) -> set[str]:
    """Names of the nodes of LayerNorms written out as elementwise ops (the variance chain).

    Starts at each ``Pow`` whose result is averaged by a ``ReduceMean`` (x - mean)^2
    and follows consumers through ``ReduceMean``/``Add``/``Sqrt``/``Reciprocal`` up
    to the ``Div``/``Mul`` that normalizes. A GELU's ``Pow(x, 3)`` has no
    ``ReduceMean`` after it and is left alone.
    """
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def after(node):
        return [c for out in node.output for c in consumers.get(out, [])]

    blocked: set[str] = set()
    for pow_node in (n for n in graph.node if n.op_type == "Pow"):
        if not any(c.op_type == "ReduceMean" for c in after(pow_node)):
            continue
        blocked.add(pow_node.name)
        frontier = [c for c in after(pow_node) if c.op_type == "ReduceMean"]
        while frontier:
            node = frontier.pop()
            if node.name in blocked:
                continue
            blocked.add(node.name)
            if node.op_type in _VARIANCE_END:
                continue
            frontier += [c for c in after(node) if c.op_type in _VARIANCE_CHAIN | _VARIANCE_END]
    return blocked


def name_nodes(graph) -> None:
    """The converter blocks nodes by name: give unnamed nodes unique ones."""
    taken = {n.name for n in graph.node if n.name}
    for i, node in enumerate(graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)


def save_onnx(model, out_file: str | Path) -> None:
    """Save ``model`` atomically: inside the file under 2 GB, otherwise with ``<name>.data`` beside it."""
    import onnx

    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    if model.ByteSize() < EXTERNAL_DATA_BYTES:
        with atomic.atomic_path(out_file) as tmp:
            onnx.save_model(model, str(tmp))
        return
    data_name = out_file.name + ".data"
    with tempfile.TemporaryDirectory(dir=out_file.parent, prefix=f".{out_file.name}.", suffix=atomic.TMP_SUFFIX) as tmp:
        staged = Path(tmp) / out_file.name
        onnx.save_model(model, str(staged), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name)
        os.replace(Path(tmp) / data_name, out_file.with_name(data_name))
        os.replace(staged, out_file)


def fp16_options(fp32) -> dict:
    """What the fp16 graph is made from and with, the same for ``export --dtype fp16`` and ``quantize --vision fp16``
    (so either one finds the other's file up to date). ``fp32``: the bundle's fp32 vision variant."""
    return {"base_sha256": fp32.sha256, "kept_in_fp32": list(FP32_OPS)}
