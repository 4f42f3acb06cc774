"""Checkpoint weights on disk: the one place that knows safetensors' layout, dtypes and how to read them.

Readers go by the header alone until a tensor's bytes are needed, and then read
exactly those bytes with ordinary file reads (``np.fromfile``), one tensor at a
time. Not through ``safetensors.safe_open``: it memory-maps the file, and every
page a tensor read touches stays mapped, counted as resident memory of the
process, until the handle closes; over a whole model that is the model's size.
Export of a 7B model stays under 1 GB of memory this way.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserError

# safetensors dtype name -> bytes per value
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
# the float dtypes a reader widens to float32, and how numpy reads their bytes (bf16: as its 16 raw bits)
FLOAT_NUMPY = {"F32": "<f4", "F16": "<f2", "BF16": "<u2", "F64": "<f8"}
# safetensors dtype name <-> torch dtype name
TORCH_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
               "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def read_safetensors_header_bytes(path: Path) -> bytes:
    """The JSON header of a safetensors file, its length checked and parsed once."""
    try:
        fh = open(path, "rb")
    except OSError as e:
        raise UserError(f"cannot read weights {path}: {e.strerror}") from None
    with fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise UserError(f"corrupt safetensors file (truncated header): {path}")
        (n,) = struct.unpack("<Q", raw)
        if n > 100_000_000:
            raise UserError(f"corrupt safetensors file (header size {n}): {path}")
        header = fh.read(n)
        if len(header) != n:
            raise UserError(f"corrupt safetensors file (truncated header): {path}")
    try:
        json.loads(header)
    except ValueError:
        raise UserError(f"corrupt safetensors file (header is not JSON): {path}") from None
    return header


def check_safetensors(path: Path) -> dict:
    """The parsed header of a safetensors file, after checking it describes the file exactly.

    A truncated download keeps a valid header but loses data: every tensor's byte
    range must match its dtype and shape, the ranges must tile the data without
    gaps, and the data must end where the file ends (as the safetensors library
    itself requires when it opens the file).
    """
    raw = read_safetensors_header_bytes(path)
    header = json.loads(raw)
    if not isinstance(header, dict):
        raise UserError(f"corrupt safetensors file (header is not an object): {path}")
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (int(x) for x in info["data_offsets"])
            size = DTYPE_BYTES[info["dtype"]]
            for d in info["shape"]:
                size *= int(d)
        except (KeyError, TypeError, ValueError):
            raise UserError(f"corrupt safetensors file (bad entry for {name}): {path}") from None
        if end - begin != size:
            raise UserError(f"corrupt safetensors file ({name} has {end - begin} bytes, its shape needs {size}): "
                            f"{path}")
        spans.append((begin, end))
    expected = 0
    for begin, end in sorted(spans):
        if begin != expected:
            raise UserError(f"corrupt safetensors file (tensor data overlaps or has gaps): {path}")
        expected = end
    actual = path.stat().st_size - 8 - len(raw)
    if actual != expected:
        kind = "truncated" if actual < expected else "trailing bytes"
        raise UserError(f"corrupt safetensors file ({kind}: {actual} data bytes, header says {expected}): {path}")
    return header


@dataclass(frozen=True)
class StoredTensor:
    """One tensor of a safetensors file, located by its header: read only when asked."""

    file: Path
    key: str
    shape: tuple[int, ...]
    dtype: str = "F32"  # safetensors dtype name
    offset: int = 0  # absolute byte offset of the data in ``file``

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_BYTES[self.dtype]

    def float32(self) -> np.ndarray:
        """The values as float32 (bfloat16 widened by shifting its 16 bits into the high half of a float32)."""
        if self.dtype not in FLOAT_NUMPY:
            raise UserError(f"unsupported weight dtype {self.dtype} for {self.key} in {self.file.name} "
                            f"(supported: {', '.join(FLOAT_NUMPY)})")
        raw = np.fromfile(self.file, dtype=FLOAT_NUMPY[self.dtype], count=math.prod(self.shape), offset=self.offset)
        if raw.size != math.prod(self.shape):
            raise UserError(f"corrupt safetensors file {self.file}: {self.key} is truncated")
        if self.dtype == "BF16":
            wide = raw.astype(np.uint32)
            del raw
            wide <<= 16  # in place: one float32-sized buffer, not two
            return wide.view(np.float32).reshape(self.shape)
        return raw.astype(np.float32, copy=False).reshape(self.shape)

    def raw(self) -> np.ndarray:
        """The stored bytes as they are (uint8), for a copy in the source's own dtype."""
        data = np.fromfile(self.file, dtype=np.uint8, count=self.nbytes, offset=self.offset)
        if data.size != self.nbytes:
            raise UserError(f"corrupt safetensors file {self.file}: {self.key} is truncated")
        return data


def stored_tensors(path: Path, check: bool = True) -> dict[str, StoredTensor]:
    """Every tensor of a safetensors file by key, from its header (``check``: the header describes the file)."""
    header = check_safetensors(path) if check else json.loads(read_safetensors_header_bytes(path))
    start = 8 + len(read_safetensors_header_bytes(path))
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            begin, end = (int(x) for x in info["data_offsets"])
            t = StoredTensor(path, key, tuple(int(d) for d in info["shape"]), str(info["dtype"]), start + begin)
        except (KeyError, TypeError, ValueError):
            raise UserError(f"corrupt safetensors file (bad entry for {key}): {path}") from None
        if t.dtype not in DTYPE_BYTES or end - begin != t.nbytes:
            raise UserError(f"corrupt safetensors file {path}: {key} has the wrong byte size or dtype")
        out[key] = t
    return out


# -- writing, tensor by tensor ------------------------------------------------------------------------------------
MAX_SHARD_BYTES = 5 * 1024**3  # what transformers' save_pretrained uses


@dataclass
class OutTensor:
    """A tensor to write: its name, safetensors dtype, shape, and a producer of its bytes in order."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    chunks: Callable[[], Iterable[object]]  # buffers (numpy arrays / bytes), concatenated = the tensor

    @property
    def nbytes(self) -> int:
        n = DTYPE_BYTES[self.dtype]
        for d in self.shape:
            n *= d
        return n


def write_safetensors(path: Path, tensors: list[OutTensor], metadata: dict | None = None) -> None:
    """Write one safetensors file tensor by tensor.

    Written here because ``safetensors.save_file`` takes every tensor at once (the
    whole model in memory); the format is an 8-byte header length, a JSON header
    with dtype/shape/offsets, then the raw bytes, which is all a streaming writer needs.
    """
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for t in tensors:
            written = 0
            for buf in t.chunks():
                mv = memoryview(buf).cast("B")
                f.write(mv)
                written += mv.nbytes
            if written != t.nbytes:
                raise RuntimeError(f"{t.name}: wrote {written} bytes, expected {t.nbytes}")
        f.flush()
        os.fsync(f.fileno())


def write_sharded(folder: Path, tensors: list[OutTensor], max_shard_bytes: int = MAX_SHARD_BYTES) -> list[str]:
    """``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` + index when over ``max_shard_bytes``."""
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    if len(shards) == 1:
        write_safetensors(folder / "model.safetensors", shards[0])
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, group in zip(names, shards):
        write_safetensors(folder / name, group)
        weight_map.update({t.name: name for t in group})
    total = sum(t.nbytes for t in tensors)
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    return names
