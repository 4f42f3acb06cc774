"""Fuse a vision tower's attention into onnxruntime's ``com.microsoft.MultiHeadAttention``.

Written by hand because onnxruntime's transformer optimizer does not recognise
the attention the exporter writes for a SigLIP tower (its ``clip`` and ``vit``
patterns fuse the tower's LayerNorms and GELUs and leave all 26 attentions of
SigLIP-so400m as they are), and where it does fuse (CLIP) it packs Q, K and V
into one ``Attention`` whose weights stay float under dynamic int8.

The pattern is what ``torch.onnx`` writes for transformers' eager attention,
one per layer, Q/K/V being the bias-added projections (B, S, heads x width)::

    q -> Reshape(B, S, N, D) -> Transpose(0,2,1,3) --\
    k -> Reshape(B, S, N, D) -> Transpose(0,2,3,1) --> MatMul -> Mul(scale) -> Softmax
    v -> Reshape(B, S, N, D) -> Transpose(0,2,1,3) ------------------------------------> MatMul
         -> Transpose(0,2,1,3) -> Reshape(B, S, N x D) -> out

It becomes ``MultiHeadAttention(q, k, v, num_heads=N, scale=scale) -> out``.
The Q/K/V and output projections stay separate ``MatMul`` nodes, so dynamic
int8 still quantizes them; only the activation-by-activation products (which
stay float anyway) move into the fused kernel. Anything else (a mask added
before the softmax, another consumer of an intermediate tensor, other
permutations) is left as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CONTRIB = "com.microsoft"


@dataclass
class _Match:
    nodes: list  # the nodes the fused one replaces; the last (the merging Reshape) is where it goes
    q: str
    k: str
    v: str
    out: str
    heads: int
    scale: float


class _Graph:
    """Producer/consumer lookups and constants of an ONNX graph."""

    def __init__(self, graph, nodes: list):
        self.producer = {o: n for n in nodes for o in n.output}
        self.consumers: dict[str, list] = {}
        for n in nodes:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        # the tensors, not arrays: a tower's weights are read as arrays only if asked for (shapes and scales are)
        self._constants = {t.name: t for t in graph.initializer}
        for n in nodes:
            if n.op_type == "Constant":
                for a in n.attribute:
                    if a.name == "value":
                        self._constants[n.output[0]] = a.t
        self.outputs = {o.name for o in graph.output}

    def constant(self, name: str) -> np.ndarray | None:
        from onnx import numpy_helper

        t = self._constants.get(name)
        return None if t is None else numpy_helper.to_array(t)

    def made_by(self, name: str, op: str):
        n = self.producer.get(name)
        return n if n is not None and n.op_type == op else None

    def only_consumer(self, name: str):
        users = self.consumers.get(name, [])
        return users[0] if len(users) == 1 and name not in self.outputs else None

    def private(self, name: str) -> bool:
        """``name`` is read by exactly one node and is not a graph output."""
        return self.only_consumer(name) is not None


def _perm(node) -> list[int] | None:
    for a in node.attribute:
        if a.name == "perm":
            return list(a.ints)
    return None


def _axis(node, default: int) -> int:
    for a in node.attribute:
        if a.name == "axis":
            return a.i
    return default


def _split_heads(g: _Graph, name: str, perm: list[int]):
    """(source tensor, reshape, transpose, heads, head width) where ``name`` = Transpose(perm)(Reshape(src, 4-d))."""
    t = g.made_by(name, "Transpose")
    if t is None or _perm(t) != perm or not g.private(t.output[0]):
        return None
    r = g.made_by(t.input[0], "Reshape")
    shape = None if r is None else g.constant(r.input[1])
    if shape is None or not g.private(r.output[0]):
        return None
    shape = shape.tolist()
    if len(shape) != 4 or shape[2] <= 0 or shape[3] <= 0:
        return None
    return r.input[0], r, t, int(shape[2]), int(shape[3])


def _scalar(g: _Graph, name: str) -> float | None:
    value = g.constant(name)
    if value is None or value.size != 1:
        return None
    return float(np.asarray(value).reshape(()))


def _match(g: _Graph, softmax) -> _Match | None:
    if _axis(softmax, -1) != -1 or not g.private(softmax.output[0]):
        return None
    mul = g.made_by(softmax.input[0], "Mul")
    if mul is None or not g.private(mul.output[0]):
        return None
    scores, scale = None, None
    for a, b in ((0, 1), (1, 0)):
        s = _scalar(g, mul.input[b])
        if s is not None:
            scores, scale = mul.input[a], s
    if scores is None:
        return None
    qk = g.made_by(scores, "MatMul")
    if qk is None or not g.private(qk.output[0]):
        return None
    q = _split_heads(g, qk.input[0], [0, 2, 1, 3])
    k = _split_heads(g, qk.input[1], [0, 2, 3, 1])
    av = g.only_consumer(softmax.output[0])
    if q is None or k is None or av is None or av.op_type != "MatMul" or av.input[0] != softmax.output[0]:
        return None
    v = _split_heads(g, av.input[1], [0, 2, 1, 3])
    merge_t = g.only_consumer(av.output[0])
    if v is None or merge_t is None or merge_t.op_type != "Transpose" or _perm(merge_t) != [0, 2, 1, 3]:
        return None
    merge_r = g.only_consumer(merge_t.output[0])
    merged = None if merge_r is None or merge_r.op_type != "Reshape" else g.constant(merge_r.input[1])
    if merged is None:
        return None
    heads, width = q[3], q[4]
    if (k[3], k[4]) != (heads, width) or (v[3], v[4]) != (heads, width):
        return None
    merged = merged.tolist()
    if len(merged) != 3 or merged[2] != heads * width:
        return None
    nodes = [q[1], q[2], k[1], k[2], v[1], v[2], qk, mul, softmax, av, merge_t, merge_r]
    return _Match(nodes, q[0], k[0], v[0], merge_r.output[0], heads, scale)


def fuse_attention(model) -> int:
    """Replace each matched attention in ``model`` (in place) by ``MultiHeadAttention``; returns how many."""
    from onnx import helper

    # One list of the node objects for every lookup below: the matches are told apart by identity.
    nodes = list(model.graph.node)
    g = _Graph(model.graph, nodes)
    matches = [m for m in (_match(g, n) for n in nodes if n.op_type == "Softmax") if m is not None]
    if not matches:
        return 0
    replaced: dict[int, object] = {}  # id of each match's last node -> the fused node standing in its place
    dropped = set()
    for i, m in enumerate(matches):
        fused = helper.make_node("MultiHeadAttention", [m.q, m.k, m.v], [m.out], name=f"MultiHeadAttention_{i}",
                                 domain=CONTRIB, num_heads=m.heads, scale=m.scale)
        replaced[id(m.nodes[-1])] = fused
        dropped.update(id(n) for n in m.nodes[:-1])
    kept = [replaced.get(id(n), n) for n in nodes if id(n) not in dropped]
    gone = {o for m in matches for n in m.nodes[:-1] for o in n.output}
    kept = [type(n).FromString(n.SerializeToString()) for n in kept]  # copies: the originals go with the field
    del model.graph.node[:]
    model.graph.node.extend(kept)
    _drop_unused(model, gone)
    if not any(o.domain == CONTRIB for o in model.opset_import):
        model.opset_import.add(domain=CONTRIB, version=1)
    return len(matches)


def _drop_unused(model, gone: set[str]) -> None:
    """Remove the value_info of the tensors that no longer exist and the initializers nothing reads now."""
    g = model.graph
    keep_info = [vi for vi in g.value_info if vi.name not in gone]
    del g.value_info[:]
    g.value_info.extend(keep_info)
    read = {i for n in g.node for i in n.input} | {o.name for o in g.output} | {i.name for i in g.input}
    keep_init = [t for t in g.initializer if t.name in read]
    del g.initializer[:]
    g.initializer.extend(keep_init)
