"""The vision graph as a TensorRT engine, torch-free.

A serialized TensorRT engine runs only with the TensorRT version that built it
and on the kind of GPU it was built for (its kernels were timed and chosen
there). The manifest therefore records, for each engine, the TensorRT version,
GPU name and compute capability (see ``export/tensorrt_engine.py``), and
:func:`engine_mismatch` compares that record with the running machine before
TensorRT is asked to deserialize anything, so a mismatch is a one-line message
saying what to rebuild instead of a deserialization failure.

Device buffers go through NVIDIA's ``cuda-python`` (``cudart``); TensorRT's own
Python API allocates nothing. Both are imported lazily, so this module imports
on machines without either.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from llava_edge.errors import UserError

RECORD_KEYS = ("tensorrt_version", "gpu", "compute_capability")


def on_jetson() -> bool:
    return os.path.exists("/etc/nv_tegra_release")


def tensorrt_install_hint() -> str:
    """How to get TensorRT's Python package on this kind of machine."""
    if on_jetson():
        return ("on a Jetson it comes with JetPack (`sudo apt install nvidia-jetpack`, which includes "
                "python3-libnvinfer); build the engine on the Jetson itself")
    return ("on x86-64 with an NVIDIA GPU and driver: `pip install tensorrt cuda-python` "
            "(or `pip install 'llava-edge[tensorrt]'`); on a Jetson it comes with JetPack")


def import_tensorrt():
    try:
        import tensorrt
    except ImportError:
        raise UserError(f"TensorRT is not installed: {tensorrt_install_hint()}") from None
    return tensorrt


def import_cudart():
    """cuda-python's runtime API (module path changed in cuda-python 12.6)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError:
            raise UserError("cuda-python is not installed (TensorRT needs it here for GPU buffers): "
                            "`pip install cuda-python` matching your CUDA major version") from None
    return cudart


def cuda_call(cudart, result):
    """Unwrap a cuda-python ``(error, *values)`` tuple, raising on an error."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        _, text = cudart.cudaGetErrorString(err)
        raise RuntimeError(f"CUDA error {int(err)}: {text.decode() if isinstance(text, bytes) else text}")
    return values[0] if len(values) == 1 else values


def running_platform(device: int = 0) -> dict:
    """``{"tensorrt_version", "gpu", "compute_capability"}`` of this machine (needs TensorRT and a GPU)."""
    trt = import_tensorrt()
    cudart = import_cudart()
    prop = cuda_call(cudart, cudart.cudaGetDeviceProperties(device))
    name = prop.name.split(b"\0", 1)[0].decode() if isinstance(prop.name, bytes) else str(prop.name)
    return {"tensorrt_version": trt.__version__, "gpu": name, "compute_capability": f"{prop.major}.{prop.minor}"}


def _release(version: str) -> str:
    """TensorRT checks major.minor.patch when deserializing; the fourth (build) number is packaging."""
    return ".".join(str(version).split(".")[:3])


def engine_mismatch(recorded: dict, running: dict) -> str | None:
    """Why an engine built on ``recorded`` cannot run on ``running``, or ``None`` if it can.

    Both are dicts with :data:`RECORD_KEYS`. Pure: no TensorRT, no GPU needed.
    """
    missing = [k for k in RECORD_KEYS if not recorded.get(k)]
    if missing:
        return (f"the manifest does not record the {', '.join(missing)} this TensorRT engine was built for; "
                "rebuild it with `llava-edge export --target tensorrt`")
    problems = []
    if _release(recorded["tensorrt_version"]) != _release(running["tensorrt_version"]):
        problems.append(f"TensorRT {recorded['tensorrt_version']} (this machine has {running['tensorrt_version']})")
    if str(recorded["compute_capability"]) != str(running["compute_capability"]):
        problems.append(f"compute capability {recorded['compute_capability']} "
                        f"(this GPU has {running['compute_capability']})")
    if recorded["gpu"] != running["gpu"]:
        problems.append(f"GPU {recorded['gpu']} (this machine has {running['gpu']})")
    if not problems:
        return None
    return ("this TensorRT engine was built for " + ", ".join(problems)
            + "; engines do not move between TensorRT versions or GPU models: rebuild it on this device with "
              "`llava-edge export --target tensorrt`")


def check_engine(recorded: dict, running: dict) -> None:
    """Raise :class:`UserError` with :func:`engine_mismatch`'s message when the engine cannot run here."""
    problem = engine_mismatch(recorded, running)
    if problem:
        raise UserError(problem)


class TensorRTVisionEncoder:
    """``encode(pixel_values) -> image embeddings`` like ``runtimes.vision.VisionEncoder``, on a TensorRT engine.

    ``record`` is the engine's entry from the manifest (what ``build_engine``
    returned). Batches larger than the engine's profile maximum are split.
    Not exercised in CI: it needs TensorRT, cuda-python and an NVIDIA GPU.
    """

    def __init__(self, engine_path: str | Path, record: dict, device: int = 0):
        trt = import_tensorrt()
        self._cudart = cudart = import_cudart()
        check_engine(record, running_platform(device))
        cuda_call(cudart, cudart.cudaSetDevice(device))
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise UserError(f"TensorRT could not deserialize {engine_path} (see its log above)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        if len(inputs) != 1 or len(outputs) != 1:
            raise UserError(f"{engine_path} is not a vision engine (inputs {inputs}, outputs {outputs})")
        self.input, self.output = inputs[0], outputs[0]
        self.in_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(self.input)))
        self.out_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(self.output)))
        _, max_shape = self._profile_limits()
        self.max_batch = int(max_shape[0])
        self.context.set_input_shape(self.input, tuple(max_shape))
        out_max = tuple(self.context.get_tensor_shape(self.output))
        self._stream = cuda_call(cudart, cudart.cudaStreamCreate())
        self._d_in = cuda_call(cudart, cudart.cudaMalloc(int(np.prod(max_shape)) * self.in_dtype.itemsize))
        self._d_out = cuda_call(cudart, cudart.cudaMalloc(int(np.prod(out_max)) * self.out_dtype.itemsize))
        self.context.set_tensor_address(self.input, int(self._d_in))
        self.context.set_tensor_address(self.output, int(self._d_out))

    def _profile_limits(self):
        lo, _opt, hi = self.engine.get_tensor_profile_shape(self.input, 0)
        return tuple(lo), tuple(hi)

    def encode(self, pixel_values: np.ndarray) -> np.ndarray:
        """(batch, 3, S, S) float32 -> (batch, image tokens, LM hidden) float32."""
        x = np.asarray(pixel_values)
        parts = [self._run(x[i : i + self.max_batch]) for i in range(0, len(x), self.max_batch)]
        return np.concatenate(parts).astype(np.float32, copy=False)

    def _run(self, x: np.ndarray) -> np.ndarray:
        cudart = self._cudart
        x = np.ascontiguousarray(x, dtype=self.in_dtype)
        self.context.set_input_shape(self.input, x.shape)
        y = np.empty(tuple(self.context.get_tensor_shape(self.output)), dtype=self.out_dtype)
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        cuda_call(cudart, cudart.cudaMemcpyAsync(self._d_in, x.ctypes.data, x.nbytes, h2d, self._stream))
        if not self.context.execute_async_v3(int(self._stream)):
            raise RuntimeError("TensorRT execution failed (see its log above)")
        cuda_call(cudart, cudart.cudaMemcpyAsync(y.ctypes.data, self._d_out, y.nbytes, d2h, self._stream))
        cuda_call(cudart, cudart.cudaStreamSynchronize(self._stream))
        return y

    def close(self) -> None:
        cudart = getattr(self, "_cudart", None)
        for name in ("_d_in", "_d_out"):
            ptr = getattr(self, name, None)
            if ptr is not None and cudart is not None:
                cudart.cudaFree(ptr)
                setattr(self, name, None)
        if getattr(self, "_stream", None) is not None:
            cudart.cudaStreamDestroy(self._stream)
            self._stream = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
