"""The vision ONNX graph -> a TensorRT engine, built with TensorRT's Python API on the device that runs it.

An engine holds kernels chosen by timing them on one GPU with one TensorRT
version, so it is built where it runs (a Jetson builds its own) and the record
returned here (TensorRT version, GPU, compute capability, precision, batch
range) goes into the manifest; ``runtimes/tensorrt_vision.py`` refuses the
engine on any other combination.

- Explicit batch with one optimization profile on the pixel input: batch
  ``1 .. max_batch``, tuned for ``opt_batch``.
- ``fp16``: the FP16 builder flag, with normalization and softmax layers (and
  reductions) constrained to fp32, as in the fp16 ONNX variant.
- ``int8``: INT8 (+ FP16 for layers without INT8 kernels) calibrated by an
  ``IInt8EntropyCalibrator2`` that reads a calibration cache (written by
  ``llava-edge quantize``) or computes one from calibration images and saves it.
  TensorRT 10 deprecates this implicit quantization but still runs it.
- A timing cache file is loaded when present and saved after the build, so a
  rebuild on the same device skips kernel timing.

Built from the fp32 ONNX: TensorRT picks layer precisions itself from the
builder flags, so feeding it the fp16 ONNX would add Cast layers and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from llava_edge import atomic
from llava_edge.errors import UserError
from llava_edge.runtimes.tensorrt_vision import cuda_call, import_cudart, import_tensorrt, running_platform

from .tensorrt_ops import DEFAULT_TENSORRT, TABLES, check_tensorrt_ops

PRECISIONS = ("fp32", "fp16", "int8")
DEFAULT_MAX_BATCH = 8
TIMING_CACHE = "tensorrt.timing.cache"
CALIBRATION_CACHE = "tensorrt.int8.calib"


def engine_file_name(precision: str) -> str:
    return f"vision.trt-{precision}.engine"


def build_engine(
    onnx_path: str | Path,
    engine_path: str | Path,
    *,
    precision: str = "fp16",
    max_batch: int = DEFAULT_MAX_BATCH,
    opt_batch: int = 1,
    calibration_cache: str | Path | None = None,
    calibration_images: np.ndarray | None = None,
    timing_cache: str | Path | None = None,
    workspace_mib: int | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Build and write (atomically) an engine for the vision graph ``onnx_path``; return its manifest record.

    ``calibration_images``: preprocessed pixels (N, 3, S, S) float32, only for
    ``int8`` when ``calibration_cache`` does not exist yet (it is written then).
    The record: ``tensorrt_version``, ``gpu``, ``compute_capability``,
    ``precision``, ``min_batch``, ``opt_batch``, ``max_batch``, ``image_size``,
    ``input``, ``output``.
    """
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if precision not in PRECISIONS:
        raise UserError(f"unknown TensorRT precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if not 1 <= opt_batch <= max_batch:
        raise UserError(f"TensorRT batch sizes need 1 <= opt ({opt_batch}) <= max ({max_batch})")
    if not onnx_path.is_file():
        raise UserError(f"ONNX file not found: {onnx_path}")
    cache_path = Path(calibration_cache) if calibration_cache else None
    if precision == "int8" and calibration_images is None and not (cache_path and cache_path.is_file()):
        raise UserError("INT8 needs a calibration cache (from `llava-edge quantize`) or calibration images")
    trt = import_tensorrt()
    platform = running_platform()
    log(f"TensorRT {platform['tensorrt_version']} on {platform['gpu']} (sm {platform['compute_capability']}): "
        f"building a {precision} engine for batch 1..{max_batch}")

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    major = int(trt.__version__.split(".")[0])
    # TensorRT 10 networks are always explicit-batch (the flag is deprecated); 8.x must ask for it.
    flags = 0 if major >= 10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # from the file: external weights resolve beside it
        errors = [str(parser.get_error(i).desc()) for i in range(parser.num_errors)]
        static = check_tensorrt_ops(onnx_path, _table_for(trt.__version__))
        hint = "" if static.ok else f" ({static.message()})"
        raise UserError(f"TensorRT's ONNX parser refused {onnx_path.name}: {errors[0] if errors else '?'}{hint}")

    if network.num_inputs != 1:
        raise UserError(f"{onnx_path.name} has {network.num_inputs} inputs; the vision graph has one (pixel_values)")
    inp = network.get_input(0)
    shape = tuple(inp.shape)
    if len(shape) != 4 or shape[0] != -1 or min(shape[1:]) < 1:
        raise UserError(f"{onnx_path.name}'s input {inp.name} has shape {shape}; "
                        "expected a dynamic batch and a fixed image size: (batch, 3, S, S)")
    per_image = tuple(int(d) for d in shape[1:])
    config = builder.create_builder_config()
    if workspace_mib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    profile = builder.create_optimization_profile()
    profile.set_shape(inp.name, (1, *per_image), (opt_batch, *per_image), (max_batch, *per_image))
    config.add_optimization_profile(profile)

    if precision in ("fp16", "int8"):
        if not getattr(builder, "platform_has_fast_fp16", True):
            log("warning: this GPU has no fast fp16; the engine will be slow")
        config.set_flag(trt.BuilderFlag.FP16)
        kept = keep_reductions_fp32(trt, network)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        log(f"{kept} normalization/softmax/reduce layers constrained to fp32")
    calibrator = None
    if precision == "int8":
        if not getattr(builder, "platform_has_fast_int8", True):
            log("warning: this GPU has no fast int8; the engine will be slow")
        config.set_flag(trt.BuilderFlag.INT8)
        calibrator = entropy_calibrator(trt, cache_path or engine_path.with_name(CALIBRATION_CACHE),
                                        calibration_images, per_image, max_batch)
        config.int8_calibrator = calibrator
        calib_profile = builder.create_optimization_profile()
        b = calibrator.get_batch_size()
        calib_profile.set_shape(inp.name, (b, *per_image), (b, *per_image), (b, *per_image))
        config.set_calibration_profile(calib_profile)

    timing = Path(timing_cache) if timing_cache else None
    blob = timing.read_bytes() if timing and timing.is_file() else b""
    config.set_timing_cache(config.create_timing_cache(blob), False)

    serialized = builder.build_serialized_network(network, config)
    if calibrator is not None:
        calibrator.free()
    if serialized is None:
        raise UserError(f"TensorRT could not build an engine from {onnx_path.name} (see its log above)")
    atomic.write_bytes(engine_path, bytes(serialized))
    if timing is not None:
        atomic.write_bytes(timing, bytes(config.get_timing_cache().serialize()))
    return {
        **platform,
        "precision": precision,
        "min_batch": 1,
        "opt_batch": opt_batch,
        "max_batch": max_batch,
        "image_size": per_image[-1],
        "input": inp.name,
        "output": network.get_output(0).name,
    }


def _table_for(version: str) -> str:
    """The op table closest to an installed TensorRT version (for error messages)."""
    major_minor = ".".join(version.split(".")[:2])
    if major_minor in TABLES:
        return major_minor
    return DEFAULT_TENSORRT if int(version.split(".")[0]) >= 10 else "8.5"


def keep_reductions_fp32(trt, network) -> int:
    """Constrain normalization, softmax and reduce layers (and ``x ** y``) to fp32; return how many."""
    names = ("NORMALIZATION", "SOFTMAX", "REDUCE")  # NORMALIZATION exists from TensorRT 8.6
    fp32_types = {getattr(trt.LayerType, n) for n in names if hasattr(trt.LayerType, n)}
    n = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        is_pow = layer.type == trt.LayerType.ELEMENTWISE and _elementwise_op(trt, layer) == trt.ElementWiseOperation.POW
        floating = all(layer.get_output(j).dtype in (trt.float32, trt.float16) for j in range(layer.num_outputs))
        if floating and (layer.type in fp32_types or is_pow):  # not the integer shape arithmetic
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                layer.set_output_type(j, trt.float32)
            n += 1
    return n


def _elementwise_op(trt, layer):
    layer.__class__ = trt.IElementWiseLayer  # the Python API hands out base ILayer objects
    return layer.op


def entropy_calibrator(trt, cache: Path, images: np.ndarray | None, per_image: tuple[int, ...], max_batch: int):
    """An ``IInt8EntropyCalibrator2`` over ``images`` that reads/writes ``cache``.

    With a cache file present TensorRT reads it and never asks for batches.
    Calibration batches have a fixed size (the calibration profile's); a last
    partial batch is dropped.
    """
    cudart = import_cudart() if images is not None else None
    if images is not None:
        images = np.ascontiguousarray(images, dtype=np.float32)
        if images.ndim != 4 or tuple(images.shape[1:]) != per_image:
            raise UserError(f"calibration images have shape {images.shape}; the engine input is (N, {per_image})")
    batch = min(max_batch, len(images)) if images is not None and len(images) else 1

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.next = 0
            self.device = None
            if images is not None:
                self.device = cuda_call(cudart, cudart.cudaMalloc(batch * images[0].nbytes))

        def get_batch_size(self) -> int:
            return batch

        def get_batch(self, names):  # noqa: ARG002 - one input
            if images is None or self.next + batch > len(images):
                return None
            chunk = images[self.next : self.next + batch]
            self.next += batch
            kind = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
            cuda_call(cudart, cudart.cudaMemcpy(self.device, chunk.ctypes.data, chunk.nbytes, kind))
            return [int(self.device)]

        def read_calibration_cache(self):
            return cache.read_bytes() if cache.is_file() else None

        def write_calibration_cache(self, data) -> None:
            atomic.write_bytes(cache, bytes(data))

        def free(self) -> None:
            if self.device is not None:
                cudart.cudaFree(self.device)
                self.device = None

    return EntropyCalibrator()
