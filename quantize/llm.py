"""The language model: an f32/f16/bf16 GGUF -> a quantized GGUF, by llama.cpp's own quantizer.

``llama_model_quantize`` (exposed by llama-cpp-python) is the code behind
llama.cpp's ``llama-quantize`` tool: it picks each tensor's type from the file
type's mixture (Q4_K_M keeps ``attn_v`` and half of ``ffn_down`` at Q6_K, the
output matrix at Q6_K, ...), quantizes, and writes a GGUF that stock llama.cpp
loads. Nothing here re-implements a quantization format.

Row-length fallback: K-quants (Q2_K..Q6_K) and IQ4_XS pack 256 values per
block, the legacy types (Q4_0, Q5_0, Q5_1, Q8_0) and IQ4_NL 32. A tensor whose
rows are not a multiple of the block size cannot take the type; llama.cpp then
falls back per tensor (K-quants to Q4_0/Q5_0/Q5_1/Q8_0 of similar bits, IQ4_XS
to IQ4_NL, rows not a multiple of 32 to F16) and logs it. On a real Llama
(4096-wide) nothing falls back; on the toy (128 wide, 344-wide ``ffn_down``
rows) nearly everything does: see docs/QUANTIZE.md for the measured outcome.
The tensor types that were actually written, and how many tensors fell back,
are returned for the manifest.
"""

from __future__ import annotations

import ctypes
import re
import shutil
from collections import Counter
from pathlib import Path

from llava_edge import atomic
from llava_edge.errors import UserError
from llava_edge.runtimes.llm import captured_llama_log

# Type names users pass -> llama.cpp's ``enum llama_ftype`` (llama.h of the pinned llama-cpp-python).
LLM_TYPES: dict[str, int] = {
    "q8_0": 7,
    "q6_k": 18,
    "q5_k_m": 17,
    "q5_k_s": 16,
    "q5_1": 9,
    "q5_0": 8,
    "q4_k_m": 15,
    "q4_k_s": 14,
    "q4_1": 3,
    "q4_0": 2,
    # the non-linear 4-bit codebooks; neither needs an importance matrix (llama.cpp requires one only for the
    # 1-3 bit IQ types). Without one, llama.cpp keeps the first eighth of ffn_down (and attn_v with GQA >= 4) at Q5_K.
    "iq4_nl": 25,  # 32-value blocks, 4.5 bits per weight
    "iq4_xs": 30,  # 256-value super-blocks, 4.25 bits per weight
    "q3_k_l": 13,
    "q3_k_m": 12,
    "q3_k_s": 11,
    "q2_k": 10,
}
# Precisions a quantization may start from (llama.cpp quantizes from float weights; re-quantizing a
# quantized file compounds the errors, and llama.cpp refuses it unless told otherwise).
BASE_PRECISIONS = ("f32", "bf16", "f16")
_FALLBACK = re.compile(r"(\d+) of (\d+) tensor\(s\) required fallback")


def llm_file_name(type_name: str) -> str:
    return f"llm.{type_name}.gguf"


def quantize_gguf(src: str | Path, dst: str | Path, type_name: str, threads: int = 0) -> dict:
    """Write ``dst`` (atomically), the ``type_name`` quantization of the float GGUF ``src``.

    ``threads``: llama.cpp's worker threads (0: all cores). The output does not
    depend on it. Returns the record for the manifest: ``{"ftype", "tensor_types",
    "fallback_tensors", "tensors"}``, where ``tensor_types`` counts the GGML types
    written (read back from the file) and ``fallback_tensors`` is how many tensors
    llama.cpp could not give the requested type (from its log).
    """
    import llama_cpp

    if type_name not in LLM_TYPES:
        raise UserError(f"unknown --llm type {type_name!r}; valid: {', '.join(LLM_TYPES)}")
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise UserError(f"GGUF file not found: {src}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLM_TYPES[type_name]
    params.nthread = max(0, int(threads))
    dst.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(dst.parent).free
    with atomic.atomic_path(dst) as tmp, captured_llama_log() as log:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0:
            raise UserError(f"llama.cpp could not quantize {src.name} to {type_name}: {_last_error(log)}"
                            f"{_space_hint(free, dst.parent, src)}")
        types = tensor_types(tmp)
    m = _FALLBACK.search("".join(log))
    return {
        "ftype": type_name.upper(),
        "tensor_types": types,
        "tensors": sum(types.values()),
        "fallback_tensors": int(m.group(1)) if m else 0,
    }


def _space_hint(free: int, directory: Path, src: Path) -> str:
    """A note on disk space when less was free than the float source's size (the output is smaller)."""
    return (f" ({free / 1e6:.1f} MB were free in {directory}, less than the source's size: no space left on device?)"
            if free < src.stat().st_size else "")


def tensor_types(path: str | Path) -> dict[str, int]:
    """How many tensors of each GGML type a GGUF holds (gguf-py's reader)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    return dict(sorted(Counter(t.tensor_type.name for t in reader.tensors).items()))


def _last_error(log: list[str]) -> str:
    """What llama.cpp said when a quantization failed (it reports errors only in its log)."""
    text = "".join(log)
    m = re.findall(r"failed to quantize: ([^\n]*)", text)
    if m:
        return m[-1].strip()[:300]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines or ["no message"])[-1][:300]


