"""Reduced-token vision graphs: the bundle's fp32 graph with a token reduction spliced in before the projector.

The reduction itself is ``llava_edge.image_tokens.reducer_module`` (the torch code
training's recovery fine-tune runs), exported by ``torch.onnx`` and inserted
into the graph between the feature layer and the projector. Working on the
bundle's graph rather than on a checkpoint keeps one base for every vision
variant: the reduced fp32 graph is then quantized by the same int8/int4 code
as the full one, and a bundle whose checkpoint is gone can still get one.

Where to splice is read from the graph, with checks that fail loudly rather
than guess:

- the projector's input is the ``Slice`` that drops the class token, met
  walking back from the graph output through per-token ops only (MatMul/Add
  with constant weights, the activation's element-wise ops);
- the feature layer's attention probabilities are the output of the last
  ``Softmax`` before that ``Slice`` (the tower is cut after the feature layer,
  so its last attention is the feature layer's), of shape (B, heads, 1 + N,
  1 + N).

A projector fine-tuned for the reduced tokens (``train stage2 --image-tokens K
--tune projector``) replaces the graph's projector weights: its two linear
layers map in order onto the projector's MatMul weights (stored transposed) and
Add biases.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from llava_edge.errors import UserError
from llava_edge.image_tokens import TokenReduction, reducer_module

# ops a per-token projector (Linear -> activation -> Linear) is made of in an exported graph
PER_TOKEN_OPS = {"MatMul", "Add", "Gelu", "Mul", "Div", "Erf", "Tanh", "Pow", "Sigmoid", "Cast", "Identity", "Sub"}


def _constants(g) -> set[str]:
    return {t.name for t in g.initializer} | {o for n in g.node if n.op_type == "Constant" for o in n.output}


def find_splice(model) -> tuple[str, str | None, list]:
    """(the projector's input tensor, the feature layer's attention probabilities, the projector's nodes)."""
    g = model.graph
    if len(g.output) != 1:
        raise UserError(f"the vision graph has {len(g.output)} outputs, not one (image_embeds)")
    constants = _constants(g)
    producer = {o: n for n in g.node for o in n.output}
    projector, slices, seen = [], [], set()
    frontier = [g.output[0].name]
    while frontier:  # every ancestor of the output up to the class-token Slice
        node = producer.get(frontier.pop())
        if node is None:
            raise UserError("no class-token Slice before the projector in the vision graph: is its feature "
                            "selection LLaVA's 'default'? (a reduction needs the patch tokens alone)")
        if id(node) in seen:
            continue
        seen.add(id(node))
        if node.op_type == "Slice":
            slices.append(node)
            continue
        if node.op_type not in PER_TOKEN_OPS:
            raise UserError(f"the vision graph's projector holds a {node.op_type} node ({node.name}): not a "
                            "per-token projector a token reduction can be put before")
        projector.append(node)
        frontier += [i for i in node.input if i and i not in constants]
    if len(slices) != 1:
        raise UserError(f"the vision graph's projector starts from {len(slices)} Slice nodes, not one")
    node = slices[0]
    order = {id(n): i for i, n in enumerate(g.node)}
    projector.sort(key=lambda n: order[id(n)])
    feats = node.output[0]
    softmax = [n for n in g.node if n.op_type == "Softmax" and order[id(n)] < order[id(node)]]
    return feats, (softmax[-1].output[0] if softmax else None), projector


def reducer_graph(r: TokenReduction, width: int, heads: int, opset: int):
    """The torch reducer exported to ONNX: (feats (B, N, width), probs (B, heads, 1+N, 1+N)) -> (B, K, width)."""
    import onnx
    import torch

    from llava_edge.export.vision_onnx import _quiet_exporter

    n = r.full
    feats = torch.randn(2, n, width)
    probs = torch.softmax(torch.randn(2, heads, n + 1, n + 1), dim=-1)
    batch = torch.export.Dim("batch", min=1, max=64)
    with torch.no_grad(), _quiet_exporter():
        program = torch.onnx.export(reducer_module(r), (feats, probs), None, input_names=["feats", "probs"],
                                    output_names=["reduced"], dynamic_shapes={"feats": {0: batch}, "probs": {0: batch}},
                                    opset_version=opset, dynamo=True, optimize=True, verbose=False)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "reducer.onnx"
        program.save(str(path))
        sub = onnx.load(str(path))
    if next(o.version for o in sub.opset_import if o.domain in ("", "ai.onnx")) != opset:
        # torch.onnx writes opset 18 or later whatever it is asked; the vision graph's opset is what counts
        from onnx import version_converter

        sub = version_converter.convert_version(sub, opset)
    return sub


def splice(model, r: TokenReduction, projector_weights: dict[str, np.ndarray] | None = None):
    """A new ModelProto: ``model`` (the fp32 vision graph) giving ``r.tokens`` image tokens; the projector's weights
    replaced by ``projector_weights`` (``linear_1.weight`` ... as a ``LlavaMultiModalProjector`` names them) if given."""
    import onnx
    from onnx import numpy_helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    g = model.graph
    feats, probs, projector = find_splice(model)
    if r.method == "dominant" and probs is None:
        raise UserError("no attention softmax in the vision graph: dominant selection needs the feature layer's "
                        "attention probabilities")
    heads, width = _shapes(model, probs, feats, r)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
    sub = reducer_graph(r, width, heads, opset)
    prefix = f"reduce_{r.label}/"
    sub = onnx.compose.add_prefix(sub, prefix)
    rename = {prefix + "feats": feats, prefix + "probs": probs or feats}
    out_name = prefix + "reduced"
    nodes = []
    for n in sub.graph.node:
        for i, name in enumerate(n.input):
            n.input[i] = rename.get(name, name)
        nodes.append(n)
    for n in projector:  # the projector now reads the reduced tokens
        for i, name in enumerate(n.input):
            if name == feats:
                n.input[i] = out_name
    at = max(i for i, n in enumerate(g.node) if feats in n.output or (probs and probs in n.output)) + 1
    for k, n in enumerate(nodes):
        g.node.insert(at + k, n)
    g.initializer.extend(sub.graph.initializer)
    for o in sub.opset_import:
        if o.domain not in {x.domain for x in model.opset_import}:
            model.opset_import.append(o)
    # shapes recorded for the projector's tensors said N tokens: drop them, and give the output K tokens
    downstream = {o for n in projector for o in n.output} | {out_name}
    keep = [v for v in g.value_info if v.name not in downstream]
    del g.value_info[:]
    g.value_info.extend(keep)
    dims = g.output[0].type.tensor_type.shape.dim
    if len(dims) == 3:
        dims[1].ClearField("dim_param")
        dims[1].dim_value = r.tokens
    if projector_weights is not None:
        _replace_projector(g, projector, projector_weights, numpy_helper)
    return model


def _shapes(model, probs: str | None, feats: str, r: TokenReduction) -> tuple[int, int]:
    """(attention heads, feature width), from the graph's recorded shapes, checked against the reduction's grid."""
    info = {v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]
            for v in list(model.graph.value_info) + list(model.graph.output)}
    f = info.get(feats)
    if f is None or len(f) != 3 or not isinstance(f[2], int) or f[2] <= 0:
        raise UserError("the vision graph does not record the shape of its projector input; export it again")
    if isinstance(f[1], int) and f[1] != r.full:
        raise UserError(f"the vision graph gives {f[1]} patch tokens, the manifest's grid {r.grid}x{r.grid}")
    heads = 1
    if probs is not None:
        p = info.get(probs)
        if p is None or len(p) != 4 or not isinstance(p[1], int):
            raise UserError("the vision graph does not record the shape of its attention probabilities")
        if isinstance(p[2], int) and p[2] != r.full + 1:
            raise UserError(f"the last attention of the vision graph covers {p[2]} tokens, not 1 + {r.full}")
        heads = p[1]
    return heads, f[2]


def _replace_projector(g, projector: list, weights: dict[str, np.ndarray], numpy_helper) -> None:
    """``linear_1``/``linear_2`` of a ``LlavaMultiModalProjector`` onto the projector's two MatMuls (weights stored
    transposed) and the Adds of a constant that read them (the biases)."""
    init = {t.name: t for t in g.initializer}
    matmuls = [n for n in projector if n.op_type == "MatMul" and any(x in init for x in n.input)]
    if len(matmuls) != 2:
        raise UserError(f"the vision graph's projector has {len(matmuls)} weight matrices, not LLaVA's two")
    places = []
    for k, mm in enumerate(matmuls, start=1):
        bias = [n for n in projector if n.op_type == "Add" and mm.output[0] in n.input]
        places.append((f"linear_{k}.weight", mm, True))
        if len(bias) == 1:
            places.append((f"linear_{k}.bias", bias[0], False))
    for key, node, transpose in places:
        if key not in weights:
            raise UserError(f"the projector file lacks {key}")
        const = [x for x in node.input if x in init]
        if len(const) != 1:
            raise UserError(f"cannot find where {key} goes in the vision graph's projector")
        t = init[const[0]]
        value = np.ascontiguousarray(weights[key].T if transpose else weights[key], dtype=np.float32)
        if tuple(t.dims) != value.shape:
            raise UserError(f"projector {key} has shape {tuple(weights[key].shape)}; the graph's is "
                            f"{tuple(t.dims)}{' transposed' if transpose else ''}")
        # a new initializer, not the old one overwritten: the exporter shares equal constants between nodes
        # (a zero bias of the projector can be the tower's LayerNorm bias too)
        name = f"tuned_projector.{key}"
        g.initializer.append(numpy_helper.from_array(value, name))
        node.input[list(node.input).index(const[0])] = name
    used = {i for n in g.node for i in n.input}
    kept = [t for t in g.initializer if t.name in used]  # the replaced ones no node reads any more
    del g.initializer[:]
    g.initializer.extend(kept)
