"""The vision tower + projector graph in onnxruntime.

Providers are names or ``(name, options)`` pairs, in onnxruntime's order of
preference; those this onnxruntime build does not have are left out (the
device profile in ``devices.py`` explains which and why), and the CPU provider
is always the last resort. ``providers`` after loading is what onnxruntime
actually runs on: a GPU provider that fails to start falls back to the CPU.

onnxruntime comes as one of several packages that install the same ``onnxruntime``
module (``onnxruntime`` for CPUs, ``onnxruntime-gpu`` for NVIDIA GPUs and Jetsons, ...):
llava-edge installs the one its extra names (``[cpu]`` or ``[gpu]``), and
:func:`onnxruntime_packages` finds more than one installed, where the last one
installed has overwritten the other's files (typically: no CUDA provider).
"""

from __future__ import annotations

import concurrent.futures
import threading
from importlib import metadata
from pathlib import Path

import numpy as np

from llava_edge.errors import UserError

# distributions that install the `onnxruntime` module
ORT_PACKAGES = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino", "onnxruntime-qnn",
                "onnxruntime-training")
ORT_MISSING = ("onnxruntime is not installed: pip install 'llava-edge[cpu]', or 'llava-edge[gpu]' on an NVIDIA GPU "
               "(onnxruntime-gpu; on a Jetson, the onnxruntime-gpu wheel built for its JetPack)")


def onnxruntime_packages() -> tuple[str, ...]:
    """The installed distributions that provide the ``onnxruntime`` module (more than one is a conflict)."""
    found = []
    for name in ORT_PACKAGES:
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        found.append(name)
    return tuple(found)


def ort_conflict_fix(packages: tuple[str, ...]) -> str:
    """One line: what is wrong when several onnxruntime packages are installed, and the commands that fix it."""
    keep = "onnxruntime-gpu" if "onnxruntime-gpu" in packages else packages[-1]
    return (f"{' and '.join(packages)} are installed together: they write the same `onnxruntime` module, so "
            f"whichever was installed last is the one that runs; keep one: pip uninstall -y {' '.join(packages)} "
            f"&& pip install {keep}")


_ORT_THREAD: concurrent.futures.ThreadPoolExecutor | None = None
_ORT_THREAD_LOCK = threading.Lock()


def on_onnxruntime_thread(fn, *args):
    """``fn(*args)`` on a thread that runs onnxruntime and nothing else, and its result.

    On a CPU with AMX, onnxruntime's int8 kernels load their AMX tile configuration on the thread that calls
    them, and llama.cpp's AMX kernels load theirs once per thread (``ggml_tile_config_init``) and take it as
    still loaded: where both run on one thread, llama.cpp multiplies with onnxruntime's tile shapes. Measured
    on an AMX Xeon, a prefill after a vision encode on the same thread gave logits off by twice their own size,
    at half the speed. llama.cpp keeps the caller's thread (a hop per decoded token costs more than it may);
    every onnxruntime run here goes through this one thread instead, a hop per picture.
    """
    global _ORT_THREAD
    with _ORT_THREAD_LOCK:
        if _ORT_THREAD is None:
            _ORT_THREAD = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="onnxruntime")
    done = _ORT_THREAD.submit(fn, *args)
    try:
        return done.result()
    except BaseException:
        concurrent.futures.wait([done])  # interrupted: onnxruntime finishes before the caller goes on
        raise


def import_onnxruntime():
    """``onnxruntime``, or a one-line :class:`UserError` saying which extra installs it."""
    try:
        import onnxruntime
    except ImportError:
        raise UserError(ORT_MISSING) from None
    return onnxruntime


class VisionEncoder:
    def __init__(self, onnx_path: str | Path, providers: list | None = None, threads: int = 0):
        ort = import_onnxruntime()

        so = ort.SessionOptions()
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = threads
        available = ort.get_available_providers()
        providers = [p for p in (providers or []) if (p if isinstance(p, str) else p[0]) in available]
        names = [p if isinstance(p, str) else p[0] for p in providers]
        if "CPUExecutionProvider" not in names:
            providers.append("CPUExecutionProvider")
        if {"CUDAExecutionProvider", "TensorrtExecutionProvider"} & set(names) and hasattr(ort, "preload_dlls"):
            # onnxruntime-gpu's CUDA provider needs libcudart, libcublas and libcudnn. Installed as pip packages
            # (`onnxruntime-gpu[cuda,cudnn]`, or PyTorch's) they are not on the loader's path, and the session
            # would quietly fall back to the CPU; preload_dlls loads them from there, else from the default
            # paths (onnxruntime >= 1.21; its documented way, see its CUDA provider page)
            try:
                ort.preload_dlls(directory="")
            except Exception:  # noqa: BLE001 - best effort: the providers check below says what runs
                pass
        try:
            self.session = ort.InferenceSession(str(onnx_path), so, providers=providers)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises several unrelated types
            raise UserError(f"onnxruntime could not load {onnx_path}: {str(e).splitlines()[0]}") from None
        self.input = self.session.get_inputs()[0].name
        self.input_type = self.session.get_inputs()[0].type  # 'tensor(float)' or 'tensor(float16)'
        self.providers = self.session.get_providers()

    def encode(self, pixel_values: np.ndarray) -> np.ndarray:
        """(batch, 3, S, S) float32 -> (batch, image tokens, LM hidden) float32."""
        x = pixel_values.astype(np.float16 if "float16" in self.input_type else np.float32)
        return on_onnxruntime_thread(self.session.run, None, {self.input: x})[0].astype(np.float32)
