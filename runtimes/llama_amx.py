"""Whether this machine's llama.cpp multiplies batches correctly with AMX, probed once per library build.

On a CPU with AMX-INT8, llama.cpp moves Q4_0/Q8_0/K-quant/IQ4_XS weights into its AMX buffer, where a batch
of more than one token runs on the tile unit: measured on a 2-vCPU Xeon at the LLaVA-OneVision-0.5B shape,
3.5x the prefill and 1.7x the decode of the same weights loaded plain (docs/BENCHMARKS.md). In some builds
that path kills the process instead: GCC 12's ``_tile_loadconfig`` tells the compiler that it reads 8 bytes
of the 64-byte tile configuration, the stores that fill the rest are dropped as dead, and the first tile
load faults (llama.cpp#20824; llama.cpp PR #26954 moves the configuration out of reach of that). Nothing in
the library says which kind of build it is, so a child process asks it: a tiny model in the AMX buffer
decodes one batch, and its logits are compared with the same model loaded plain. The answer is kept per
build of llama-cpp-python's shared libraries (their names, sizes and modification times) in the cache
directory, so the probe runs once per installation.

The Makefile builds llama-cpp-python with ``-fno-tree-dse -fno-dse`` (``LLAMA_CMAKE_ARGS``), which keeps
those stores; a wheel built without them answers "broken" here and runs without extra buffer types.
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from llava_edge import atomic

# the probe model: one llama block whose matrices are Q8_0 (a type with AMX kernels), 512 wide so that
# every matrix fits the AMX buffer's tile multiples; 48 positions make three 16-row tiles
WIDTH, FF, HEADS, LAYERS = 512, 1024, 8, 1
BATCH = 48
# AMX and the plain kernels both round the activations to 8 bits per block of 32: measured on the probe
# model, each lies 7.1e-3 of the largest logit from the same weights in f32, and 2.7e-3 from the other.
# A kernel that reads a wrong tile is off by the logits' own size.
TOLERANCE = 2e-2
CACHE_NAME = "llama-amx.json"


def library_key() -> str:
    """What identifies this installation's llama.cpp build: its shared libraries' names, sizes, mtimes."""
    import llama_cpp

    lib = Path(llama_cpp.__file__).parent / "lib"
    h = hashlib.sha256()
    for f in sorted(lib.glob("*.so*")) if lib.is_dir() else ():
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:32]


def write_probe_model(path: Path) -> None:
    """A one-block llama GGUF with random Q8_0 matrices and a byte vocabulary (259 tokens)."""
    import gguf

    rng = np.random.default_rng(0)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.BYTE] * 256
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(BATCH * 2)
    w.add_embedding_length(WIDTH)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FF)
    w.add_head_count(HEADS)
    w.add_head_count_kv(HEADS)
    w.add_rope_dimension_count(WIDTH // HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    def f32(name: str, shape: tuple[int, ...], scale: float = 1.0, mean: float = 0.0) -> None:
        w.add_tensor(name, (mean + rng.standard_normal(shape) * scale).astype(np.float32))

    def q8(name: str, rows: int, cols: int) -> None:
        data = (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)
        w.add_tensor(name, gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0),
                     raw_dtype=gguf.GGMLQuantizationType.Q8_0)

    f32("token_embd.weight", (len(tokens), WIDTH))
    for b in range(LAYERS):
        f32(f"blk.{b}.attn_norm.weight", (WIDTH,), 0.1, 1.0)
        for n in ("attn_q", "attn_k", "attn_v", "attn_output"):
            q8(f"blk.{b}.{n}.weight", WIDTH, WIDTH)
        f32(f"blk.{b}.ffn_norm.weight", (WIDTH,), 0.1, 1.0)
        q8(f"blk.{b}.ffn_gate.weight", FF, WIDTH)
        q8(f"blk.{b}.ffn_up.weight", FF, WIDTH)
        q8(f"blk.{b}.ffn_down.weight", WIDTH, FF)
    f32("output_norm.weight", (WIDTH,), 0.1, 1.0)
    f32("output.weight", (len(tokens), WIDTH), 1 / np.sqrt(WIDTH))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _batch_logits(gguf_path: Path, extra_buffers: bool) -> np.ndarray:
    from .llm import LlamaOptions, LlamaText

    text = LlamaText(gguf_path, LlamaOptions(n_ctx=BATCH * 2, n_batch=BATCH, kv_cache="f32",
                                             extra_buffers=extra_buffers, verbose=True))
    try:
        return text.feed_tokens([3 + (i * 37) % 256 for i in range(BATCH)], logits="all")
    finally:
        text.close()


def _child(gguf_path: Path) -> int:
    """The probe itself, in a process of its own: exit 0 and print the largest difference where the AMX
    batch equals the plain one; 3 where no weight went to the AMX buffer; 4 where the logits differ."""
    import re

    from .llm import captured_llama_log

    with captured_llama_log() as lines:  # the load log says which buffer types took the weights
        amx = _batch_logits(gguf_path, extra_buffers=True)
    if not re.search(r"\bAMX model buffer size =\s*[1-9]", "".join(lines)):
        print("llama.cpp put none of the probe's Q8_0 weights in its AMX buffer")
        return 3
    plain = _batch_logits(gguf_path, extra_buffers=False)
    diff = float(np.abs(amx - plain).max() / max(float(np.abs(plain).max()), 1e-30))
    print(json.dumps({"relative_difference": diff}))
    return 0 if diff <= TOLERANCE else 4


def _run_probe(timeout: float) -> tuple[bool | None, str]:
    """(works, why) from a child process; works is None where the probe itself failed (not cached)."""
    with tempfile.TemporaryDirectory(prefix="llava-edge-amx-") as d:
        model = Path(d) / "probe.gguf"
        write_probe_model(model)
        try:
            r = subprocess.run([sys.executable, "-m", __name__, str(model)], capture_output=True, text=True,
                               timeout=timeout)
        except subprocess.TimeoutExpired:
            return None, f"the probe did not finish in {timeout:.0f} s"
    said = (r.stdout.strip().splitlines() or [""])[-1]
    if r.returncode < 0:
        name = signal.Signals(-r.returncode).name
        return False, (f"a batch of {BATCH} tokens through AMX-buffer weights killed the probe ({name}): this "
                       f"build drops the AMX tile configuration (llama.cpp#20824)")
    if r.returncode == 0:
        diff = json.loads(said)["relative_difference"]
        return True, f"a batch of {BATCH} tokens through AMX-buffer weights equals the plain kernels' ({diff:.1e})"
    if r.returncode == 3:
        return False, said
    if r.returncode == 4:
        return False, f"a batch through AMX-buffer weights differs from the plain kernels' ({said})"
    err = (r.stderr.strip().splitlines() or ["no message"])[-1][:200]
    return None, f"the probe failed (exit status {r.returncode}: {err})"


def amx_batches_work(cache_dir: Path | None = None, timeout: float = 300.0) -> tuple[bool, str]:
    """Whether llama.cpp's AMX buffer multiplies batches correctly in this installation, and why.

    The first call per build runs the probe (about a second) and keeps the answer in ``cache_dir``
    (default: llava-edge's cache directory); a probe that fails for another reason answers no, uncached.
    """
    from llava_edge.cache_dir import default_cache_dir

    path = (cache_dir or default_cache_dir()) / CACHE_NAME
    key = library_key()
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if not isinstance(known, dict):
        known = {}
    if isinstance(known.get(key), dict) and isinstance(known[key].get("works"), bool):
        return known[key]["works"], f"{known[key].get('why', '')} (probed once for this build, {path})"
    works, why = _run_probe(timeout)
    if works is None:
        return False, why
    known[key] = {"works": works, "why": why}
    try:
        atomic.write_json(path, known)
    except OSError:
        pass  # a read-only cache costs one probe per run, nothing else
    return works, why


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m llava_edge.runtimes.llama_amx PROBE.gguf")
    sys.exit(_child(Path(sys.argv[1])))
