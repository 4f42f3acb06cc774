"""Which ONNX ops TensorRT's ONNX parser imports, and a check of a graph against that list.

The lists are the "Supported: Y" rows of onnx-tensorrt's ``docs/operators.md``
(github.com/onnx/onnx-tensorrt), read at these tags:

- ``10.1-GA`` (commit 96e78110, June 2024): "opset 9 to opset 20". The default:
  what ``pip install tensorrt`` gives on x86 and what JetPack 6.1+ ships (10.3).
- ``release/8.6-GA`` (commit 6ba67d34): "up to Opset 17". JetPack 6.0.
- ``release/8.5-GA`` (commit 3b008c46): "up to Opset 17". JetPack 5.1. It has no
  ``LayerNormalization`` importer, so opset-17 transformer graphs that use it
  (ours do) do not parse there.

No library exposes this list without TensorRT installed (the parser's own
``supports_model`` needs the ``tensorrt`` package and a GPU driver), which is
why it is kept here as data: the check then runs on any machine, in CI too.
Besides op names, the check covers the opset range and the restrictions the
table states for ops a vision graph may use (``axes`` inputs that must be
initializers; only ``LayerNormalization``'s first output).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from llava_edge.errors import UserError


@dataclass(frozen=True)
class ParserOps:
    tensorrt: str
    source: str
    min_opset: int
    max_opset: int
    ops: frozenset[str]


_TRT_10_1 = frozenset(
    """
    Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast CastLike Ceil
    Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DeformConv DepthToSpace
    DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor GRU Gather GatherElements
    GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample
    GroupNormalization HardSigmoid HardSwish Hardmax Identity If ImageScaler InstanceNormalization IsInf IsNaN LRN
    LSTM LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop LpNormalization LpPool MatMul Max MaxPool
    Mean MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or PRelu Pad
    ParametricSoftplus Pow QuantizeLinear RNN RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range
    Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum
    ReduceSumSquare Relu Reshape Resize ReverseSequence RoiAlign Round ScaledTanh Scan Scatter ScatterElements
    ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt
    Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
    """.split()
)
# The older tables differ from 10.1 only by these ops (diffs of the same file at the two tags).
_TRT_8_6 = _TRT_10_1 - {"CastLike", "DeformConv", "Gelu", "Hardmax", "Mish"}
_TRT_8_5 = _TRT_8_6 - {"GroupNormalization", "HardSwish", "IsInf", "LayerNormalization", "Mod", "OneHot"}

_DOC = "onnx/onnx-tensorrt docs/operators.md at "
TABLES: dict[str, ParserOps] = {
    "10.1": ParserOps("10.1", _DOC + "10.1-GA", 9, 20, _TRT_10_1),
    "8.6": ParserOps("8.6", _DOC + "release/8.6-GA", 7, 17, _TRT_8_6),
    "8.5": ParserOps("8.5", _DOC + "release/8.5-GA", 7, 17, _TRT_8_5),
}
DEFAULT_TENSORRT = "10.1"
ONNX_DOMAINS = ("", "ai.onnx")

# Restrictions from the same table: input index of ``axes``/``axis`` that must be an
# initializer (or a Constant), where the op has that input at the opset used.
_CONSTANT_INPUT = {
    "Slice": 3, "Squeeze": 1, "Unsqueeze": 1, "Pad": 3, "CumSum": 1, "TopK": 1,
    **{op: 1 for op in ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
                        "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare")},
}


@dataclass
class OpCheck:
    """What a graph uses and what TensorRT's parser (of ``tensorrt``) would refuse."""

    tensorrt: str
    opset: int
    ops: dict[str, int]  # "Domain::Op" for non-default domains
    unsupported: list[str] = field(default_factory=list)  # op names the parser has no importer for
    undefined: list[str] = field(default_factory=list)  # ops ONNX itself does not define at this opset
    restrictions: list[str] = field(default_factory=list)  # "node: reason"
    opset_in_range: bool = True

    @property
    def ok(self) -> bool:
        return self.opset_in_range and not (self.unsupported or self.undefined or self.restrictions)

    def message(self) -> str:
        if self.ok:
            return f"every op is supported by TensorRT {self.tensorrt}'s ONNX parser at opset {self.opset}"
        t = TABLES[self.tensorrt]
        parts = []
        if not self.opset_in_range:
            parts.append(f"opset {self.opset} is outside {t.min_opset}..{t.max_opset}")
        if self.unsupported:
            parts.append("unsupported ops: " + ", ".join(self.unsupported))
        if self.undefined:
            parts.append(f"ops not defined at opset {self.opset}: " + ", ".join(self.undefined))
        if self.restrictions:
            parts.append("; ".join(self.restrictions[:3]) + (" ..." if len(self.restrictions) > 3 else ""))
        return f"TensorRT {self.tensorrt}'s ONNX parser would refuse this graph: " + "; ".join(parts)


def check_tensorrt_ops(model, tensorrt: str = DEFAULT_TENSORRT) -> OpCheck:
    """Check ``model`` (a ``ModelProto`` or a path) against TensorRT ``tensorrt``'s parser table.

    Walks the main graph, every nested graph (``If``/``Loop``/``Scan`` bodies) and
    the bodies of model-local functions (the parser inlines those). Each op must
    be in the table, defined by ONNX at the model's opset, and meet the table's
    restrictions; ops of other domains (``com.microsoft`` ...) are unsupported.
    """
    import onnx

    if tensorrt not in TABLES:
        raise UserError(f"no TensorRT op table for {tensorrt!r}; known: {', '.join(TABLES)}")
    if not isinstance(model, onnx.ModelProto):
        path = Path(model)
        if not path.is_file():
            raise UserError(f"ONNX file not found: {path}")
        model = onnx.load(str(path), load_external_data=False)  # op names only: weights not needed
    table = TABLES[tensorrt]
    opset = next((o.version for o in model.opset_import if o.domain in ONNX_DOMAINS), 0)
    functions = {(f.domain, f.name): f for f in model.functions}
    counts: Counter[str] = Counter()
    unsupported, undefined, restrictions = set(), set(), []

    def visit(graph, constants: set[str]) -> None:
        constants = constants | {t.name for t in graph.initializer}
        constants |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
        used = {name for n in graph.node for name in n.input} | {o.name for o in graph.output}
        for node in graph.node:
            func = functions.get((node.domain, node.op_type))
            if func is not None:
                counts[f"{node.domain}::{node.op_type}"] += 1
                visit_function(func, constants)
                continue
            if node.domain not in ONNX_DOMAINS:
                key = f"{node.domain}::{node.op_type}"
                counts[key] += 1
                unsupported.add(key)
                continue
            counts[node.op_type] += 1
            if node.op_type not in table.ops:
                unsupported.add(node.op_type)
            elif not _defined(node.op_type, opset):
                undefined.add(node.op_type)
            restrictions.extend(_restriction(node, constants, used))
            for attr in node.attribute:
                for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    visit(sub, constants)

    def visit_function(func, constants: set[str]) -> None:
        fake = onnx.GraphProto(node=func.node)  # a function body has no initializers of its own
        visit(fake, constants)

    visit(model.graph, set())
    return OpCheck(
        tensorrt=table.tensorrt, opset=opset, ops=dict(sorted(counts.items())),
        unsupported=sorted(unsupported), undefined=sorted(undefined), restrictions=restrictions,
        opset_in_range=table.min_opset <= opset <= table.max_opset,
    )


def _defined(op_type: str, opset: int) -> bool:
    """Whether ONNX defines ``op_type`` at ``opset`` (e.g. LayerNormalization only from 17, Gelu from 20)."""
    import onnx.defs

    try:
        onnx.defs.get_schema(op_type, opset, "")
        return True
    except onnx.defs.SchemaError:
        return False


def _restriction(node, constants: set[str], used: set[str]) -> list[str]:
    where = node.name or node.op_type
    i = _CONSTANT_INPUT.get(node.op_type)
    if i is not None and len(node.input) > i and node.input[i] and node.input[i] not in constants:
        return [f"{where}: {node.op_type}'s axes input must be an initializer"]
    if node.op_type == "LayerNormalization" and any(o and o in used for o in node.output[1:]):
        return [f"{where}: only LayerNormalization's first output is supported"]
    return []
