"""The vision tower + projector graph in onnxruntime.

Providers are names or ``(name, options)`` pairs, in onnxruntime's order of
preference; those this onnxruntime build does not have are left out (the
device profile in ``devices.py`` explains which and why), and the CPU provider
is always the last resort. ``providers`` after loading is what onnxruntime
actually runs on: a GPU provider that fails to start falls back to the CPU.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from llava_edge.errors import UserError


class VisionEncoder:
    def __init__(self, onnx_path: str | Path, providers: list | None = None, threads: int = 0):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = threads
        available = ort.get_available_providers()
        providers = [p for p in (providers or []) if (p if isinstance(p, str) else p[0]) in available]
        if not any((p if isinstance(p, str) else p[0]) == "CPUExecutionProvider" for p in providers):
            providers.append("CPUExecutionProvider")
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
        return self.session.run(None, {self.input: x})[0].astype(np.float32)
