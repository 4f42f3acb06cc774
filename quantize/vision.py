"""The vision tower + projector: the fp32 ONNX graph -> int8 and int4 variants, by onnxruntime's quantizers.

- ``int8`` (dynamic): ``quantize_dynamic``, weights int8 per output channel,
  activations quantized at run time per tensor (``MatMulInteger``). No
  calibration.
- ``int8-static``: ``quantize_static`` in QDQ form (QuantizeLinear /
  DequantizeLinear pairs around the int8 ops, the form TensorRT and other
  accelerators read), weights per channel, activation ranges calibrated
  (MinMax) on preprocessed images, symmetric activations (zero point 0, as
  TensorRT requires).
- ``int4``: ``MatMulNBitsQuantizer``: weight-only 4-bit blocks of
  ``block_size`` along the input dimension (``com.microsoft.MatMulNBits``,
  onnxruntime only); activations stay float.
- ``fp16`` is :func:`llava_edge.export.vision_fp16.convert_vision_fp16`.

What stays float (``protect=True``, the default), measured on the toy (see
docs/QUANTIZE.md): int8 activations are the hazard with CLIP. The quantized
ops are the weight matmuls only (the Linear layers); these stay fp32:

- LayerNorm and Softmax (row reductions; quantizing LayerNorm's input was the
  largest single loss measured on the trained toy),
- the patch embedding ``Conv`` (raw pixels in, every token depends on it),
- the activation-by-activation matmuls of attention (Q.K^T and attention.V:
  both sides have outliers; int8 there collapsed the worst token's cosine),
- the projector's last matmul (its output is what the language model reads).

Fusion (``optimize``; on by default for int8 and int4, which only
onnxruntime runs): each attention becomes onnxruntime's ``MultiHeadAttention``
(:mod:`.fuse_attention`), then onnxruntime's transformer optimizer
(``model_type "clip"``) fuses SkipLayerNorm and the GELUs, before quantizing.
The fused graph holds ``com.microsoft`` ops, so it runs in onnxruntime only.
"""

from __future__ import annotations

import contextlib
import io
import logging
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from llava_edge import atomic
from llava_edge.errors import UserError
from llava_edge.preprocess import ImageSpec, load_image, preprocess
from llava_edge.quality import token_cosine
from llava_edge.runtimes.vision import VisionEncoder

VISION_TYPES = ("fp16", "int8", "int8-static", "int4")
PRECISION = {"fp16": "fp16", "int8": "int8", "int8-static": "int8", "int4": "int4"}
INT4_BLOCK_SIZES = (16, 32, 64, 128, 256)  # MatMulNBits takes powers of two from 16
DEFAULT_BLOCK_SIZE = 32
DEFAULT_CALIB_COUNT = 32
# one image a calibration run: MinMax ranges do not depend on batching, and onnxruntime's calibration graph
# (every MatMul's inputs and outputs kept for their ReduceMin/ReduceMax) was killed for memory at CLIP-L/336
# size with 8 images a run on a 24 GiB machine
CALIB_BATCH = 1


def vision_file_name(name: str) -> str:
    return f"vision.{name}.onnx"


# ---- what int8/int4 must not touch ------------------------------------------------------------------


@dataclass
class KeepFloat:
    """Names of the nodes left in float, by reason."""

    patch_embedding: list[str] = field(default_factory=list)
    attention_matmuls: list[str] = field(default_factory=list)
    projector_out: list[str] = field(default_factory=list)

    def nodes(self) -> list[str]:
        return self.patch_embedding + self.attention_matmuls + self.projector_out

    def summary(self) -> dict:
        return {k: len(v) for k, v in asdict(self).items()}


def keep_float(model) -> KeepFloat:
    """Find the patch embedding, attention's activation matmuls and the projector's last matmul in ``model``.

    - patch embedding: a ``Conv`` reading a graph input (the pixels);
    - attention matmuls: ``MatMul`` nodes neither of whose inputs is a constant;
    - projector output: the first ``MatMul`` met walking back from the graph output.
    """
    g = model.graph
    constants = {t.name for t in g.initializer} | {o for n in g.node if n.op_type == "Constant" for o in n.output}
    inputs = {i.name for i in g.input}
    keep = KeepFloat()
    for n in g.node:
        if n.op_type == "Conv" and n.input[0] in inputs:
            keep.patch_embedding.append(n.name)
        elif n.op_type == "MatMul" and not any(i in constants for i in n.input):
            keep.attention_matmuls.append(n.name)
    producer = {o: n for n in g.node for o in n.output}
    frontier, seen = [o.name for o in g.output], set()
    while frontier:
        node = producer.get(frontier.pop(0))
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        if node.op_type == "MatMul" and any(i in constants for i in node.input):
            keep.projector_out.append(node.name)
            break
        frontier += [i for i in node.input if i and i not in constants]
    return keep


def _named(model):
    """The quantizers exclude nodes by name: name the unnamed ones (in place) and return the model."""
    from llava_edge.export.vision_fp16 import name_nodes

    name_nodes(model.graph)
    return model


# ---- graph fusion ---------------------------------------------------------------------------------------------


def tower_shape(model) -> tuple[int, int]:
    """(hidden width, attention heads) of the CLIP tower, read from the graph.

    The width is the patch ``Conv``'s output channels; the heads are the third
    dimension of the ``Reshape`` to (batch, tokens, heads, head width) that
    splits Q, K and V. The optimizer needs both to recognise attention.
    """
    from onnx import numpy_helper

    g = model.graph
    init = {t.name: t for t in g.initializer}
    convs = [n for n in g.node if n.op_type == "Conv" and n.input[1] in init]
    if not convs:
        raise UserError("fusing the vision graph: no patch embedding Conv in it (--no-optimize quantizes it unfused)")
    hidden = int(init[convs[0].input[1]].dims[0])
    for n in g.node:
        if n.op_type == "Reshape" and n.input[1] in init:
            shape = numpy_helper.to_array(init[n.input[1]]).tolist()
            if len(shape) == 4 and shape[2] > 0 and shape[2] * shape[3] == hidden:
                return hidden, int(shape[2])
    raise UserError("fusing the vision graph: no attention head count found in it (--no-optimize quantizes it unfused)")


FUSION = "multihead-attention+ort-clip"  # what ``optimize_tower`` does, as recorded in a variant's options
# The types only onnxruntime runs (its int8 and 4-bit matmul ops are not TensorRT layers): fused unless told not to.
# fp16 and int8-static (QDQ) are the forms TensorRT and other accelerators read: standard ops unless told to fuse.
FUSED_BY_DEFAULT = ("int8", "int4")


def fuses(name: str, optimize: bool | None) -> bool:
    """Whether the vision type ``name`` is made from the fused graph; ``optimize`` None: the type's default."""
    if name in ("fp16", "fp32"):  # the GPU/TensorRT paths and the reference: standard ops only
        return False
    return name in FUSED_BY_DEFAULT if optimize is None else optimize


def optimize_tower(model) -> tuple[object, dict]:
    """Fuse the vision tower for onnxruntime; returns (model, fused op counts).

    Attention first, by :func:`fuse_attention` (onnxruntime's optimizer does not
    fuse SigLIP's), then onnxruntime's transformer optimizer (``clip``) for
    SkipLayerNorm and the GELUs.
    """
    from onnxruntime.transformers.optimizer import optimize_model

    from .fuse_attention import fuse_attention

    hidden, heads = tower_shape(model)  # read before the fusion removes the head-splitting Reshapes
    attentions = fuse_attention(model)
    with _quiet():
        opt = optimize_model(model, model_type="clip", num_heads=heads, hidden_size=hidden, opt_level=0)
    stats = {k: v for k, v in opt.get_fused_operator_statistics().items() if v}
    if attentions:
        stats["MultiHeadAttention"] = attentions
    model = opt.model
    # The optimizer declares the contrib-op domain only when it saves a file; declare it here.
    if any(n.domain == "com.microsoft" for n in model.graph.node) and not any(
        o.domain == "com.microsoft" for o in model.opset_import
    ):
        model.opset_import.add(domain="com.microsoft", version=1)
    return model, stats


# ---- quantizers -----------------------------------------------------------------------------------------------


def quantize_int8_dynamic(model, dst: str | Path, protect: bool = True) -> dict:
    """Dynamic int8 (weights per channel). ``protect=False``: onnxruntime's defaults (every op it can)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = _named(model)
    keep = keep_float(model) if protect else KeepFloat()
    fused = any(n.op_type == "Attention" for n in model.graph.node)
    ops = (["MatMul", "Attention"] if fused else ["MatMul"]) if protect else None
    with atomic.atomic_path(dst) as tmp, _quiet():
        quantize_dynamic(model, tmp, op_types_to_quantize=ops, per_channel=True, weight_type=QuantType.QInt8,
                         nodes_to_exclude=keep.nodes())
    return {"method": "dynamic", "per_channel": True, "kept_float": keep.summary() if protect else "none"}


class PixelReader(CalibrationDataReader):
    """onnxruntime's calibration data reader over preprocessed pixels, ``CALIB_BATCH`` images a batch."""

    def __init__(self, pixels: np.ndarray, input_name: str = "pixel_values"):
        self.batches = [{input_name: pixels[i : i + CALIB_BATCH]} for i in range(0, len(pixels), CALIB_BATCH)]
        self.i = 0

    def get_next(self) -> dict | None:
        if self.i >= len(self.batches):
            return None
        self.i += 1
        return self.batches[self.i - 1]

    def __len__(self) -> int:
        return len(self.batches)


def quantize_int8_static(model, dst: str | Path, pixels: np.ndarray, protect: bool = True) -> dict:
    """Static int8 QDQ calibrated (MinMax) on ``pixels``. ``protect=False``: every op onnxruntime's QDQ can take."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if len(pixels) == 0:
        raise UserError("int8-static needs at least one calibration image")
    model = _named(model)
    keep = keep_float(model) if protect else KeepFloat()
    reader = PixelReader(pixels, model.graph.input[0].name)
    with atomic.atomic_path(dst) as tmp, _quiet():
        quantize_static(
            model, tmp, reader, quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
            op_types_to_quantize=["MatMul"] if protect else None, nodes_to_exclude=keep.nodes(),
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
        )
    return {"method": "static-qdq-minmax", "per_channel": True, "activations": "int8 symmetric",
            "calibration_images": int(len(pixels)), "kept_float": keep.summary() if protect else "none"}


def quantize_int4(model, dst: str | Path, block_size: int = DEFAULT_BLOCK_SIZE, protect: bool = True) -> dict:
    """Weight-only int4 (``MatMulNBits``, asymmetric, blocks of ``block_size`` input channels)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from llava_edge.export.vision_fp16 import save_onnx

    check_block_size(block_size)
    model = _named(model)
    keep = KeepFloat(projector_out=keep_float(model).projector_out) if protect else KeepFloat()
    with _quiet():
        q = MatMulNBitsQuantizer(model, bits=4, block_size=block_size, is_symmetric=False,
                                 nodes_to_exclude=keep.nodes(), op_types_to_quantize=("MatMul",))
        q.process()
    save_onnx(q.model.model, dst)
    return {"method": "weight-only MatMulNBits", "bits": 4, "block_size": block_size, "symmetric": False,
            "kept_float": keep.summary() if protect else "none"}


def check_block_size(block_size: int) -> None:
    if block_size not in INT4_BLOCK_SIZES:
        raise UserError(f"--block-size {block_size} is not supported; valid: {', '.join(map(str, INT4_BLOCK_SIZES))}")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """onnxruntime's quantization tools print progress and log advice at WARNING; keep the CLI's output clean."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logging.disable(previous)


# ---- images and measurement -------------------------------------------------------------------------------


def calibration_pixels(spec: ImageSpec, directory: str | Path | None = None, count: int = DEFAULT_CALIB_COUNT,
                       seed: int = 0) -> tuple[np.ndarray, str]:
    """(N, 3, S, S) float32 pixels preprocessed as the runtime does, and where they came from.

    From ``directory``: its image files in name order, the first ``count``.
    Without one: ``count`` synthetic scenes (``llava_edge.scenes``) rendered here with ``seed``: the toy
    models' own kind of picture (the quantize command asks a real model for its own images).
    """
    if count < 1:
        raise UserError("--calib-count must be at least 1")
    if directory is None:
        from llava_edge.scenes import random_scene, render

        rng = random.Random(seed)
        images = [render(random_scene(rng), rng=rng) for _ in range(count)]
        return np.stack([preprocess(im, spec) for im in images]), f"synthetic scenes (seed {seed})"
    from PIL import Image

    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"--calib-images {directory} is not a directory")
    suffixes = {ext.lower() for ext in Image.registered_extensions()}
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in suffixes)[:count]
    if not files:
        raise UserError(f"--calib-images {directory} holds no image files")
    return np.stack([preprocess(load_image(p), spec) for p in files]), f"{len(files)} images from {directory}"


def compare_to_reference(reference: str | Path, variant: str | Path, pixels: np.ndarray) -> dict:
    """Per image token cosine (min, mean) and relative L2 error of ``variant``'s embeddings against ``reference``'s.

    Both graphs run in onnxruntime on the CPU, so this also proves the variant loads and runs.
    """
    ref = run_graph(reference, pixels)
    got = run_graph(variant, pixels)
    if got.shape != ref.shape:
        raise UserError(f"{Path(variant).name} returns shape {got.shape}, the fp32 graph {ref.shape}")
    cos = token_cosine(got, ref)
    return {
        "min_cosine": round(float(cos.min()), 6),
        "mean_cosine": round(float(cos.mean()), 6),
        "rel_l2": round(float(np.linalg.norm(got - ref) / np.linalg.norm(ref)), 6),
        "images": int(len(pixels)),
    }


def run_graph(path: str | Path, pixels: np.ndarray) -> np.ndarray:
    """The graph at ``path`` on ``pixels`` in onnxruntime (CPU), float32 out, as the runtime runs it; a graph
    that does not load is one line."""
    return VisionEncoder(path, ["CPUExecutionProvider"]).encode(pixels)
