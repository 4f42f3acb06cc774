"""llava-edge against its baselines, on the same weights, on this machine, in one run.

    python bench/side_by_side.py --model CKPT --bundle BUNDLE --out DIR [--rounds 5]
        [--sections vision,ttft,decode,export] [--export-model FULL_CKPT]

``CKPT`` is the llava-hf checkpoint ``BUNDLE`` was exported from (``llava-edge toy
model --preset llava-1.5-7b --layers N`` or ``--preset llava-v1.6-mistral-7b`` makes
one at real shape); the bundle needs its ONNX vision variants, one or more
language-model GGUFs and an mmproj GGUF. Every family the bundle may be of is
asked, not named: its image path (``families.by_name(manifest.family)``) says how
the picture becomes tiles and positions. Sections (docs/BENCHMARKS.md, "CPU"):

1. ``vision``: one picture through each of the bundle's ONNX vision variants
   (onnxruntime), Hugging Face's eager PyTorch model (the family's per-tile
   features) and llama.cpp's own CLIP (each mmproj, through ``mtmd_encode_chunk``
   of every image chunk: the graph alone, its preprocessing done beforehand as
   for the others). The picture is the tower's size for a one-tile family (no
   resize anywhere) and 640x480 for a tiled one, all its tiles one batch; each
   side's tiles and positions are recorded (LLaVA-NeXT at CLIP-L/336: 5 tiles
   each, 2340 positions for llava-edge, 2880 for llama.cpp, which neither
   unpads nor adds newlines). Each variant's worst image-token cosine against
   Hugging Face is measured here; the drift gates decide which variants may
   be used.
2. ``ttft``: image file + question -> first token, llava-edge's pipeline
   (:func:`llava_edge.bench.time_chat_pass`) against llama.cpp's multimodal
   pipeline (``Llama`` with llama-cpp-python's ``Llava15ChatHandler``, or
   ``Llava16ChatHandler`` for a tiled family: the mmproj and the same text GGUF;
   time to the first streamed chunk of ``create_chat_completion``). The two
   handlers differ only in their prompt text; mtmd tiles the picture as the
   mmproj's pinpoints say with either. Prompt and image positions of both
   pipelines are recorded. With ``--image-tokens K`` llava-edge also runs
   loaded with ``image_tokens=K`` (a tiled family caps each picture's positions
   at K with any vision variant; a one-tile family picks a reduced-token
   variant, or the race records why there is none).
   llava-edge four ways: an empty KV cache with the prompt's beginning saved by
   an earlier process (``runtimes/prefix_cache.py``; what every run after the
   first finds), an empty one with nothing saved (the first run ever), a warm
   process asked about a new image (the conversation before kept in the KV
   cache, so only the image and what follows are decoded), and (on a CPU) an
   empty KV cache asked about a picture asked about before (the cells through
   the image loaded from the file the untimed warm-up saved after its answer:
   no vision graph, only the question decoded).
3. ``decode``: llava-edge's ``generate`` against raw ``llama_decode`` of one
   token at a time on the same GGUF at the same context depth, and against the
   memory-bandwidth bound: bytes read per token (every weight but the token
   embedding table, plus the KV cache) over the copy bandwidth measured here.
4. ``followup``: a second question about the same image, after a first answer
   of ``ANSWER_TOKENS`` tokens: time to its first token. llava-edge's
   ``ChatSession`` keeps the image and the first exchange in the KV cache and
   decodes only the new turn; llama.cpp's chat handler clears its context and
   encodes the image again on every call (``Llava15ChatHandler.__call__`` in
   llama-cpp-python 0.3.36), so it pays a whole first turn again.
5. ``export``: ``llava-edge export`` in a child process per target: wall
   time, output MB/s and the child's peak resident memory.

Contestants of a comparison are timed interleaved (A, B, C, A, B, C, ... with
the order rotated every round) after one untimed warm-up each, and medians
are reported, so that a machine shared with other work slows all of them
alike; how busy it was is recorded (``other_cpu_share``). Everything runs
with the same thread count (``--threads``, default: every usable CPU).

Results: ``DIR/side_by_side.json`` (every timing, machine, versions) and
``DIR/side_by_side.md`` (the tables docs/BENCHMARKS.md quotes).
"""

from __future__ import annotations

import argparse
import base64
import ctypes
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from llava_edge import families
from llava_edge import manifest as bundle_manifest
from llava_edge.bench import (BENCH_IMAGE_SIZE, DEFAULT_QUESTION, OTHER_QUESTION, CpuShare, machine_info,
                              time_chat_pass, time_decode, versions, write_bench_image)

SECTIONS = ("vision", "ttft", "decode", "followup", "export")
# Drift gates on the vision side (the drift issue): an unquantized graph (fp32/fp16 ONNX) must keep every
# image token's cosine >= 0.999 against Hugging Face. Quantized graphs (int8, int4) are gated end to end
# (KL and accuracy with q8_0/q4_k_m language models on a trained model); random weights cannot measure
# that, so here they must pass the vision-side proxy `quantize` warns at: worst token cosine >= 0.99.
UNQUANTIZED_MIN_COSINE = 0.999
QUANTIZED_MIN_COSINE = 0.99
GOALS = {"vision": 0.5, "ttft": 0.8, "decode_vs_raw": 0.97, "decode_vs_bound": 0.60}
QUESTION = DEFAULT_QUESTION
FOLLOWUP = "What is in the bottom half of the image?"
ANSWER_TOKENS = 16  # the first answer's length: the history the follow-up question comes after
VERSION_EXTRA = ("torch", "transformers", "onnx", "gguf")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def interleaved(contestants: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Each contestant once untimed, then ``rounds`` rounds of all of them, order rotated each round.

    A contestant returns what it measured (seconds, or a bandwidth), so it can leave its setup out.
    """
    names = list(contestants)
    for n in names:
        contestants[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[: r % len(names)]:
            times[n].append(contestants[n]())
        log(f"  round {r + 1}/{rounds}: " + ", ".join(f"{n} {times[n][-1]:.4g}" for n in names))
    return times


def timed(fn: Callable[[], object]) -> Callable[[], float]:
    def run() -> float:
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    return run


def token_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(-1, a.shape[-1]).astype(np.float64), b.reshape(-1, b.shape[-1]).astype(np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


# -- llama.cpp -------------------------------------------------------------------------------------------


class LlamaCppClip:
    """llama.cpp's CLIP (an mmproj GGUF) on one image, with the graph timed apart from its preprocessing.

    A tiled picture is several image chunks (one per tile, llama.cpp's whole-picture tile among them); ``encode``
    runs them all, as ``mtmd_helper_eval_chunks`` does for a prompt.
    """

    def __init__(self, mmproj: Path, text_gguf: Path, rgb: np.ndarray, threads: int, use_gpu: bool = False):
        import llama_cpp
        from llama_cpp import mtmd_cpp as M

        from llava_edge.runtimes.mtmd import silence_mtmd_logs

        silence_mtmd_logs()
        self.M = M
        llama_cpp.llama_backend_init()
        mp = llama_cpp.llama_model_default_params()
        mp.vocab_only = True  # mtmd needs the text model's vocabulary, not its weights
        self.model = llama_cpp.llama_model_load_from_file(str(text_gguf).encode(), mp)
        p = M.mtmd_context_params_default()  # llama.cpp's defaults (flash attention: auto)
        p.use_gpu = use_gpu
        p.n_threads = threads
        p.print_timings = False
        p.warmup = False
        self.ctx = M.mtmd_init_from_file(str(mmproj).encode(), self.model, p)
        if not self.ctx:
            raise RuntimeError(f"mtmd could not load {mmproj}")
        h, w, _ = rgb.shape
        self._data = (ctypes.c_uint8 * rgb.size).from_buffer_copy(np.ascontiguousarray(rgb).tobytes())
        self.bitmap = M.mtmd_bitmap_init(w, h, self._data)
        self.chunks = M.mtmd_input_chunks_init()
        marker = M.mtmd_default_marker()
        text = M.mtmd_input_text(marker, len(marker), False, True)
        bitmaps = (M.mtmd_bitmap_p_ctypes * 1)(self.bitmap)
        if M.mtmd_tokenize(self.ctx, self.chunks, ctypes.byref(text), bitmaps, 1) != 0:  # preprocesses the image
            raise RuntimeError("mtmd could not tokenize the image")
        self.image_chunks = [c for c in (M.mtmd_input_chunks_get(self.chunks, i)
                                         for i in range(M.mtmd_input_chunks_size(self.chunks)))
                             if M.mtmd_input_chunk_get_type(c) == M.MTMD_INPUT_CHUNK_TYPE_IMAGE]
        if not self.image_chunks:
            raise RuntimeError("mtmd made no image chunk of the picture")
        self.chunk_positions = [int(M.mtmd_input_chunk_get_n_pos(c)) for c in self.image_chunks]
        self.n_tokens = sum(int(M.mtmd_input_chunk_get_n_tokens(c)) for c in self.image_chunks)

    @property
    def tiles(self) -> int:
        return len(self.image_chunks)

    @property
    def positions(self) -> int:
        return sum(self.chunk_positions)

    def encode(self) -> None:
        for chunk in self.image_chunks:
            if self.M.mtmd_encode_chunk(self.ctx, chunk) != 0:
                raise RuntimeError("mtmd failed to encode the image")

    def close(self) -> None:
        import llama_cpp

        self.M.mtmd_input_chunks_free(self.chunks)
        self.M.mtmd_bitmap_free(self.bitmap)
        self.M.mtmd_free(self.ctx)
        llama_cpp.llama_model_free(self.model)


HANDLERS = ("Llava15ChatHandler", "Llava16ChatHandler")


def chat_handler_for(family) -> str:
    """llama-cpp-python's handler for the family: ``Llava16ChatHandler`` for a tiled one (LLaVA-1.6), else
    ``Llava15ChatHandler``. In 0.3.36 both run mtmd on the mmproj, which alone decides the tiling; they differ
    in the prompt: 1.5's is LLaVA's vicuna_v1 (``SYSTEM\nUSER: <image>QUESTION\nASSISTANT: ``), 1.6's a
    system line, the image, a newline, the question and ``Answer:``. Neither is Mistral's ``[INST]``: the text
    positions differ from llava-edge's by a few dozen, both pipelines' counts are recorded."""
    return HANDLERS[1] if family.tiled else HANDLERS[0]


class LlamaCppChat:
    """llama.cpp's own multimodal pipeline: ``Llama`` + a llama-cpp-python LLaVA chat handler (mmproj + text GGUF)."""

    def __init__(self, text_gguf: Path, mmproj: Path, threads: int, n_ctx: int, n_gpu_layers: int = 0,
                 flash_attn: bool = True, extra_buffers: bool = True, handler: str = HANDLERS[0]):
        import llama_cpp.llama_cpp as C
        from llama_cpp import Llama, llama_chat_format

        if handler not in HANDLERS:
            raise ValueError(f"chat handler {handler!r}: one of {', '.join(HANDLERS)}")
        # its CLIP runs on the GPU whenever llama.cpp was built with one (the handler's default)
        self.handler = getattr(llama_chat_format, handler)(clip_model_path=str(mmproj), verbose=False)
        handler = self.handler
        # extra buffer types as llava-edge's plan has them (off for quantized weights on an AMX CPU, where they
        # crash: runtimes/devices.py, extra_buffers); Llama takes no such argument, so its default params are
        # replaced while it loads
        defaults = C.llama_model_default_params

        def params():
            p = defaults()
            p.use_extra_bufts = extra_buffers
            return p

        C.llama_model_default_params = params
        try:
            # flash attention: this wrapper offers on or off, not llama.cpp's "auto" that llava-edge's context
            # gets; the caller passes what auto resolves to (on for a CPU; off for a GPU build without its FA kernels)
            self.llama = Llama(model_path=str(text_gguf), chat_handler=handler, n_ctx=n_ctx, n_batch=512,
                               n_ubatch=512, n_threads=threads, n_threads_batch=threads, n_gpu_layers=n_gpu_layers,
                               flash_attn=flash_attn, verbose=False)
        finally:
            C.llama_model_default_params = defaults

    @staticmethod
    def messages(image: Path, question: str, history: tuple[tuple[str, str], ...] = ()) -> list[dict]:
        """The image with the first question, then the (answer, next question) pairs of ``history``."""
        uri = "data:image/jpeg;base64," + base64.b64encode(image.read_bytes()).decode()
        first = history[0][0] if history else question
        out = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                            {"type": "text", "text": first}]}]
        for i, (_q, answer) in enumerate(history):
            later = history[i + 1][0] if i + 1 < len(history) else question
            out += [{"role": "assistant", "content": answer}, {"role": "user", "content": later}]
        return out

    def answer(self, image: Path, question: str, max_tokens: int) -> str:
        r = self.llama.create_chat_completion(messages=self.messages(image, question), max_tokens=max_tokens,
                                              temperature=0.0)
        return r["choices"][0]["message"]["content"] or ""

    def first_token(self, image: Path, question: str, history: tuple[tuple[str, str], ...] = ()) -> tuple[float, int]:
        """(seconds from the image file to the first streamed chunk, prompt positions in the cache).

        ``history``: earlier (question, answer) pairs about the same image; the handler evaluates them
        all again, image included, as it does every call.
        """
        t = time.perf_counter()
        messages = self.messages(image, question, history)
        stream = self.llama.create_chat_completion(messages=messages, max_tokens=1, temperature=0.0, stream=True)
        next(iter(stream))
        seconds = time.perf_counter() - t
        for _ in stream:
            pass
        return seconds, self.llama.n_tokens

    def close(self) -> None:
        self.llama.close()


class RawDecode:
    """``llama_decode`` of one token at a time in a bare llama.cpp context: the speed llava-edge's loop wraps.

    Same GGUF and context settings as the runtime's ``LlamaText`` (context size, batch, threads, GPU layers,
    f16 KV cache, flash attention auto); the prompt is stand-in token ids of the same length, decoded untimed.
    """

    def __init__(self, gguf: Path, n_ctx: int, threads: int, n_gpu_layers: int = 0):
        import llama_cpp

        self.c = llama_cpp
        llama_cpp.llama_backend_init()
        mp = llama_cpp.llama_model_default_params()
        mp.n_gpu_layers = n_gpu_layers
        self.model = llama_cpp.llama_model_load_from_file(str(gguf).encode(), mp)
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch = n_ctx, 512, 512
        cp.n_threads = cp.n_threads_batch = threads
        cp.no_perf = False  # llama.cpp's own eval timer, reported beside the wall clock
        self.ctx = llama_cpp.llama_init_from_model(self.model, cp)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))

    def _decode(self, ids: list[int]) -> None:
        arr = (self.c.llama_token * len(ids))(*ids)
        if self.c.llama_decode(self.ctx, self.c.llama_batch_get_one(arr, len(ids))) != 0:
            raise RuntimeError("llama_decode failed")

    def run(self, prompt_len: int, steps: int) -> tuple[float, float]:
        """(wall seconds, llama.cpp's own eval seconds) of ``steps`` single-token decodes after ``prompt_len``."""
        c = self.c
        c.llama_memory_clear(c.llama_get_memory(self.ctx), True)
        ids = [(i * 7919) % (self.n_vocab - 100) + 100 for i in range(prompt_len)]
        for s in range(0, prompt_len, 512):
            self._decode(ids[s : s + 512])
        c.llama_perf_context_reset(self.ctx)
        tok = ids[-1]
        t = time.perf_counter()
        for _ in range(steps):
            self._decode([tok])
            c.llama_get_logits_ith(self.ctx, -1)
        wall = time.perf_counter() - t
        return wall, c.llama_perf_context(self.ctx).t_eval_ms / 1e3

    def close(self) -> None:
        self.c.llama_free(self.ctx)
        self.c.llama_model_free(self.model)


# -- memory bandwidth --------------------------------------------------------------------------------------


class Bandwidth:
    """Memory bandwidth measured with ``threads`` threads, each on its own arrays (allocated once).

    ``copy()``: STREAM's "copy" (bytes read plus bytes written per second); ``read()``: a read-only
    reduction (the access pattern of a matrix-vector product's weights). numpy releases the GIL in both.
    """

    def __init__(self, threads: int, mb_per_thread: int = 512, reps: int = 4):
        n = mb_per_thread * 1_000_000 // 8
        self.bufs = [(np.ones(n), np.empty(n)) for _ in range(threads)]
        for src, dst in self.bufs:
            np.copyto(dst, src)  # touch every page first
        self.n, self.reps = n, reps

    def _run(self, fn) -> float:
        barrier = threading.Barrier(len(self.bufs) + 1)

        def work(src, dst):
            barrier.wait()
            for _ in range(self.reps):
                fn(src, dst)

        ts = [threading.Thread(target=work, args=b) for b in self.bufs]
        for t in ts:
            t.start()
        barrier.wait()
        t0 = time.perf_counter()
        for t in ts:
            t.join()
        return 8 * self.n * self.reps * len(self.bufs) / (time.perf_counter() - t0)

    def copy(self) -> float:
        return 2 * self._run(lambda src, dst: np.copyto(dst, src))

    def read(self) -> float:
        return self._run(lambda src, dst: src.max())


class GpuBandwidth:
    """The same two measurements in the GPU's own memory, where llama.cpp's offloaded weights live.

    Through torch, which only this benchmark imports (the runtime never does); CUDA events are not needed:
    each measurement synchronizes before and after ``reps`` back-to-back kernels.
    """

    def __init__(self, mb: int = 2048, reps: int = 20):
        import torch

        self.torch = torch
        self.src = torch.ones(mb * 1_000_000 // 4, device="cuda")
        self.dst = torch.empty_like(self.src)
        self.reps = reps
        self.dst.copy_(self.src)
        torch.cuda.synchronize()

    def _seconds(self, fn) -> float:
        self.torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(self.reps):
            fn()
        self.torch.cuda.synchronize()
        return time.perf_counter() - t

    def copy(self) -> float:
        return 2 * self.src.nbytes * self.reps / self._seconds(lambda: self.dst.copy_(self.src))

    def read(self) -> float:
        return self.src.nbytes * self.reps / self._seconds(lambda: self.src.max())


def gpu_info() -> list[str]:
    """``nvidia-smi``'s name, memory and driver of each GPU (empty where there is none)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []


def bytes_per_token(gguf: Path, depth: int) -> dict:
    """What one decode step reads: every tensor but the token embedding table (one row of it is read),
    plus the f16 KV cache up to ``depth`` positions."""
    import gguf as gg

    r = gg.GGUFReader(str(gguf))
    weights = sum(int(t.n_bytes) for t in r.tensors if t.name != "token_embd.weight")
    arch = r.get_field("general.architecture").contents()
    n_layer = int(r.get_field(f"{arch}.block_count").contents())
    n_embd = int(r.get_field(f"{arch}.embedding_length").contents())
    n_head = int(r.get_field(f"{arch}.attention.head_count").contents())
    kv_field = r.get_field(f"{arch}.attention.head_count_kv")
    n_head_kv = int(kv_field.contents()) if kv_field is not None else n_head
    kv = 2 * n_layer * depth * (n_embd // n_head) * n_head_kv * 2  # K and V, f16
    return {"weights": weights, "kv_cache": kv, "total": weights + kv}


# -- the sections ------------------------------------------------------------------------------------------


def gate_threshold(precision: str) -> float:
    return UNQUANTIZED_MIN_COSINE if precision in ("fp32", "fp16") else QUANTIZED_MIN_COSINE


def bundle_images(bundle: Path, m):
    """The bundle's family and its image path as the runtime builds it (every patch of every tile, no cap)."""
    family = families.by_name(m.family)
    arrays = {name: families.read_array(bundle_manifest.bundle_file(bundle, a["file"], "array file"), name)
              for name, a in m.arrays.items()}
    return family, family.image_path(m.image, m.vision, int(m.vision["num_image_tokens"]), arrays)


def vision_picture(family, m, tmp: Path) -> tuple[Path, str]:
    """(the vision race's picture, its description): the tower's size for a one-tile family, so that nobody
    resizes it; 640x480 for a tiled one, so that it takes a grid of tiles as a photo does."""
    if family.tiled:
        w, h = BENCH_IMAGE_SIZE
        return write_bench_image(tmp / "vision.jpg", size=(w, h)), f"{w}x{h} JPEG"
    size = int(m.vision["image_size"])
    return write_bench_image(tmp / "square.png", size=(size, size)), f"{size}x{size} PNG"


def section_vision(model_dir: Path, bundle: Path, m, rounds: int, threads: int, tmp: Path,
                   gpu: bool = False) -> dict:
    import onnxruntime as ort
    import torch

    from llava_edge.checkpoint import load_hf_vision_half, open_checkpoint
    from llava_edge.preprocess import load_image
    from llava_edge.runtimes.vision import VisionEncoder

    family, images = bundle_images(bundle, m)
    image, picture = vision_picture(family, m, tmp)
    prepared = images.prepare(image)
    pixels = prepared.pixels  # (tiles, 3, S, S): one batch of the vision graph
    rgb = np.asarray(load_image(image).convert("RGB"))

    torch.set_num_threads(threads)
    ckpt = open_checkpoint(model_dir)
    hf = load_hf_vision_half(ckpt)  # only the tower and projector run here
    gc.collect()
    torch_device = "cuda" if gpu and torch.cuda.is_available() else "cpu"
    hf.to(torch_device)
    px = torch.from_numpy(pixels).to(torch_device)

    def hf_encode():  # the tiles' features before any packing: what the ONNX graph computes
        with torch.inference_mode():
            return ckpt.family.hf_tile_features(hf, px).float().cpu().numpy()

    reference = hf_encode()
    contestants: dict[str, Callable[[], float]] = {f"PyTorch eager (HF, {torch_device})": timed(hf_encode)}
    providers = ["CPUExecutionProvider"]
    if gpu and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    onnx, quality = {}, {}
    for v in m.variants:
        if v.kind == "vision" and v.extra.get("format", "onnx") == "onnx" and not v.device_specific:
            enc = VisionEncoder(bundle / v.file, providers, threads)
            onnx[v.name] = enc
            cos = token_cosines(enc.encode(pixels), reference)
            quality[v.name] = {"precision": v.precision, "min_cosine": float(cos.min()),
                               "mean_cosine": float(cos.mean()), "gate": gate_threshold(v.precision)}
            quality[v.name]["passes"] = quality[v.name]["min_cosine"] >= quality[v.name]["gate"]
            contestants[f"ONNX {v.name}"] = timed(lambda enc=enc: enc.encode(pixels))
    text = bundle / m.variant("llm").file
    clips = {}
    tiles: dict[str, int] = {"llava-edge": prepared.tiles}
    positions: dict[str, int] = {"llava-edge": prepared.positions}
    for v in m.variants:
        if v.kind == "mmproj":
            clips[v.name] = c = LlamaCppClip(bundle / v.file, text, rgb, threads, use_gpu=gpu)
            contestants[f"llama.cpp CLIP {v.name}"] = timed(c.encode)
            tiles[f"llama.cpp CLIP {v.name}"], positions[f"llama.cpp CLIP {v.name}"] = c.tiles, c.positions
    log(f"vision: {picture}, tiles {tiles}, positions {positions}")
    log(f"vision: {', '.join(contestants)}; {rounds} rounds")
    with CpuShare() as busy:
        times = interleaved(contestants, rounds)
    for c in clips.values():
        c.close()
    hf = onnx = None  # free the models before the next section
    gc.collect()
    med = {k: median(v) for k, v in times.items()}
    llama_best = min((k for k in med if k.startswith("llama.cpp")), key=med.get, default=None)
    gated = [n for n, q in quality.items() if q["passes"]]
    best = min(gated, key=lambda n: med[f"ONNX {n}"], default=None)
    ratio = med[f"ONNX {best}"] / med[llama_best] if best and llama_best else None
    return {"image": picture, "family": family.name, "grid": prepared.grid, "tiles": tiles,
            "positions": positions, "rounds": rounds, "threads": threads, "seconds": times,
            "torch_device": torch_device, "onnx_providers": providers,
            "median_s": med, "quality_vs_hf": quality,
            "llama_cpp_best": llama_best, "best_gated_onnx": best, "ratio_best_vs_llama_cpp": ratio,
            "goal": GOALS["vision"], "busy": busy.to_dict()}


def llama_cpp_image_positions(mmproj: Path, text_gguf: Path, image: Path) -> list[int]:
    """The positions mtmd gives the picture with this mmproj, one entry per image chunk (tile)."""
    from llava_edge.preprocess import load_image
    from llava_edge.runtimes.mtmd import image_positions

    return image_positions(mmproj, text_gguf, [np.asarray(load_image(image).convert("RGB"))])[0]


def section_ttft_decode(bundle: Path, m, llms: list[str], vision_variants: list[str], mmproj: str, rounds: int,
                        threads: int, decode_tokens: int, n_ctx: int, tmp: Path, sections: set[str],
                        device: str = "cpu", flash_attn: bool = True, extras: bool = True,
                        image_tokens: tuple[int, ...] = (), handler: str | None = None) -> dict:
    from llava_edge.errors import UserError
    from llava_edge.runtimes.pipeline import EdgeLLaVA

    family = families.by_name(m.family)
    handler = handler or chat_handler_for(family)
    w, h = BENCH_IMAGE_SIZE
    image = write_bench_image(tmp / "photo.jpg")  # both pipelines decode it, then pad/resize or tile it
    mm = bundle / m.variant("mmproj", mmproj).file
    their_chunks = llama_cpp_image_positions(mm, bundle / m.variant("llm", llms[0]).file, image)
    out: dict = {"image": f"{w}x{h} JPEG", "question": QUESTION, "mmproj": mmproj, "family": family.name,
                 "llama_cpp_handler": handler, "n_ctx": n_ctx,
                 "llama_cpp_image": {"tiles": len(their_chunks), "positions": sum(their_chunks),
                                     "positions_per_tile": their_chunks},
                 "image_tokens": list(image_tokens), "llm": {}}
    for llm in llms:
        gguf = bundle / m.variant("llm", llm).file
        res: dict = {}
        ours = {v: EdgeLLaVA.load(bundle, device=device, vision_variant=v, llm_variant=llm, threads=threads,
                                  n_ctx=n_ctx) for v in vision_variants}
        # the baselines offload what llava-edge's plan offloads (every layer on a GPU profile)
        layers = next(iter(ours.values())).plan.n_gpu_layers
        extra = next(iter(ours.values())).plan.extra_buffers  # and load weights into the same buffer types
        res["n_gpu_layers"], res["extra_buffers"] = layers, extra
        prompt_tokens: dict = {}
        res["llava_edge_plan"] = {v: x.explain() for v, x in ours.items() if hasattr(x, "explain")}
        if "ttft" in sections:
            # --image-tokens K: the runtime loaded with image_tokens=K. A family that caps positions caps every
            # picture at K with the same vision variant; a one-tile family picks a reduced-token variant instead
            capped: dict[str, EdgeLLaVA] = {}
            skipped: dict[str, str] = {}
            for k in image_tokens:
                kw = {"vision_variant": vision_variants[0]} if family.caps_positions else {}
                try:
                    x = EdgeLLaVA.load(bundle, device=device, llm_variant=llm, threads=threads, n_ctx=n_ctx,
                                       image_tokens=k, **kw)
                except UserError as e:
                    skipped[f"--image-tokens {k}"] = str(e)
                    log(f"ttft {llm}: --image-tokens {k} skipped: {e}")
                    continue
                capped[f"llava-edge ({x.vision_variant.name}, --image-tokens {k})"] = x
            theirs = LlamaCppChat(gguf, mm, threads, n_ctx, n_gpu_layers=layers, flash_attn=flash_attn,
                                  extra_buffers=extra, handler=handler)
            contestants: dict[str, Callable[[], float]] = {}
            image_positions: dict[str, int] = {"llama.cpp": sum(their_chunks)}
            phases: dict[str, list[dict]] = {}  # where llava-edge's time goes, seconds per phase
            # a second picture of the same size for the warm contestant: a new image in a running process
            other = write_bench_image(tmp / "photo2.jpg", seed=1)
            last_image: dict = {}  # the image each llava-edge model's KV cache holds a conversation about

            def run_ours(name: str, model, picture: Path, fresh: bool, saved_beginning: bool = True,
                         saved_image: bool = False, question: str = QUESTION) -> float:
                saved, model.prefix_cache = model.prefix_cache, model.prefix_cache if saved_beginning else None
                try:
                    r = time_chat_pass(model, picture, question, decode_tokens=1, fresh=fresh, saved_image=saved_image)
                finally:
                    model.prefix_cache = saved
                last_image[id(model)] = picture
                prompt_tokens[name] = r["prompt_positions"]
                decoded.setdefault(name, []).append(r["prefill_tokens"])
                phases.setdefault(name, []).append(
                    {k: r[k] / 1e3 for k in ("preprocess_ms", "vision_encode_ms", "tokenize_ms", "prefill_ms")})
                return r["ttft_ms"] / 1e3

            decoded: dict[str, list[int]] = {}
            for v, model in ours.items():
                contestants[f"llava-edge ({v})"] = lambda model=model, v=v: run_ours(
                    f"llava-edge ({v})", model, image, fresh=True)
            for name, model in capped.items():
                contestants[name] = lambda model=model, name=name: run_ours(name, model, image, fresh=True)
            # a new process's first question ever: the prompt's beginning not saved yet (prefix_cache.py)
            best_model = ours[vision_variants[0]]
            contestants[f"llava-edge ({vision_variants[0]}, nothing saved)"] = lambda: run_ours(
                f"llava-edge ({vision_variants[0]}, nothing saved)", best_model, image, fresh=True,
                saved_beginning=False)
            # warm: the KV cache keeps the conversation before, about another picture (so only the system
            # prompt before the image is shared); llama.cpp's handler clears its context on every call
            contestants[f"llava-edge ({vision_variants[0]}, warm process, new image)"] = lambda: run_ours(
                f"llava-edge ({vision_variants[0]}, warm process, new image)", best_model,
                other if last_image.get(id(best_model)) != other else image, fresh=False)
            # a new process asked about a picture one was asked about before (prefix_cache.py): the KV cache
            # through the image comes from the file the untimed warm-up saved after its answer; the warm-up
            # asks another question, so the timed rounds decode their whole question
            seen: list[int] = []

            def seen_image() -> float:
                seen.append(1)
                return run_ours(f"llava-edge ({vision_variants[0]}, image seen before, new process)", best_model,
                                image, fresh=True, saved_image=True,
                                question=QUESTION if len(seen) > 1 else OTHER_QUESTION)
            if best_model.prefix_cache is not None and best_model.plan.n_gpu_layers == 0:  # saved on the CPU only
                contestants[f"llava-edge ({vision_variants[0]}, image seen before, new process)"] = seen_image
            if not extras:  # each vision variant's first question about a new picture, against llama.cpp's only
                for k in [k for k in contestants if k.startswith(f"llava-edge ({vision_variants[0]}, ")
                          and k not in capped]:
                    del contestants[k]
            # what each llava-edge pipeline puts at the picture (untimed); the variants of the first vision
            # variant's race (nothing saved, warm, seen before) run its model
            runs_on = {**{k: best_model for k in contestants}, **{f"llava-edge ({v})": x for v, x in ours.items()},
                       **capped}
            for name in contestants:
                image_positions[name] = runs_on[name].prepare_image(image).positions

            def theirs_ttft() -> float:
                s, n = theirs.first_token(image, QUESTION)
                prompt_tokens["llama.cpp"] = n
                return s
            contestants["llama.cpp"] = theirs_ttft
            log(f"ttft {llm}: {', '.join(contestants)}; {rounds} rounds")
            with CpuShare() as busy:
                times = interleaved(contestants, rounds)
            theirs.close()
            for x in capped.values():
                x.close()
            med = {k: median(v) for k, v in times.items()}
            res["ttft"] = {"rounds": rounds, "threads": threads, "seconds": times, "median_s": med,
                           "prompt_positions": prompt_tokens, "image_positions": image_positions,
                           "text_positions": {k: prompt_tokens[k] - n for k, n in image_positions.items()
                                              if k in prompt_tokens},
                           "skipped": skipped, "llava_edge_decoded_positions": decoded,
                           "phases_median_s": {k: {p: median([r[p] for r in rs[1:]]) for p in rs[0]}
                                               for k, rs in phases.items()},  # [0]: the warm-up
                           "ratios_vs_llama_cpp": {k: med[k] / med["llama.cpp"] for k in med if k != "llama.cpp"},
                           "goal": GOALS["ttft"], "busy": busy.to_dict()}
        if "decode" in sections:
            model = ours[vision_variants[0]]
            key, emb = model.image_embeddings(image)
            slots = model.slots_for(model.template.prompt(QUESTION, image=True, history=[]), key, len(emb))
            raw = RawDecode(gguf, n_ctx, threads, n_gpu_layers=layers)
            steps_seen, internal = [], []

            def ours_decode() -> float:
                model.llm.reset()
                model.prefill(slots, emb)  # untimed: the prompt
                steps, seconds = time_decode(model, slots, emb, decode_tokens)
                steps_seen.append(steps)
                return seconds / steps

            def raw_decode() -> float:
                wall, inside = raw.run(len(slots), decode_tokens)
                internal.append(inside / decode_tokens)
                return wall / decode_tokens

            log(f"decode {llm}: llava-edge generate vs raw llama_decode vs memory bandwidth; {rounds} rounds")
            bw = GpuBandwidth() if layers != 0 else Bandwidth(threads)  # where the weights are read from
            res["bandwidth_of"] = "gpu" if layers != 0 else "cpu"
            with CpuShare() as busy:
                got = interleaved({"llava-edge": ours_decode, "raw llama.cpp": raw_decode,
                                   "copy bandwidth": bw.copy, "read bandwidth": bw.read}, rounds)
            raw.close()
            del bw
            per_tok = {k: median(got[k]) for k in ("llava-edge", "raw llama.cpp")}
            need = bytes_per_token(gguf, len(slots) + decode_tokens // 2)
            copy_bw, read_bw = median(got["copy bandwidth"]), median(got["read bandwidth"])
            ours_tps = 1 / per_tok["llava-edge"]
            res["decode"] = {
                "rounds": rounds, "threads": threads, "seconds_per_token": {k: got[k] for k in per_tok},
                "tokens_per_s": {k: 1 / v for k, v in per_tok.items()},
                "llama_cpp_internal_tokens_per_s": 1 / median(internal[1:] or internal),
                "steps_per_run": steps_seen, "depth": len(slots), "bytes_per_token": need,
                "copy_bandwidth_gb_s": [b / 1e9 for b in got["copy bandwidth"]],
                "read_bandwidth_gb_s": [b / 1e9 for b in got["read bandwidth"]],
                "bound_tokens_per_s": copy_bw / need["total"], "read_bound_tokens_per_s": read_bw / need["total"],
                "ratio_vs_raw": ours_tps * per_tok["raw llama.cpp"],
                "ratio_vs_bound": ours_tps * need["total"] / copy_bw,
                "ratio_vs_read_bound": ours_tps * need["total"] / read_bw,
                "goals": {"vs_raw": GOALS["decode_vs_raw"], "vs_bound": GOALS["decode_vs_bound"]},
                "busy": busy.to_dict(),
            }
        if "followup" in sections:
            res["followup"] = race_followup(ours[vision_variants[0]], gguf, mm, image, vision_variants[0], rounds,
                                            threads, n_ctx, layers, flash_attn, extra, handler)
        for model in ours.values():
            model.close()
        out["llm"][llm] = res
    return out


def race_followup(model, gguf: Path, mmproj: Path, image: Path, vision: str, rounds: int, threads: int,
                  n_ctx: int, layers: int, flash_attn: bool, extra_buffers: bool = True,
                  handler: str = HANDLERS[0]) -> dict:
    """Time to the first token of a second question about the same image (section ``followup``)."""
    theirs = LlamaCppChat(gguf, mmproj, threads, n_ctx, n_gpu_layers=layers, flash_attn=flash_attn,
                          extra_buffers=extra_buffers, handler=handler)
    their_answer = theirs.answer(image, QUESTION, ANSWER_TOKENS)  # untimed: the history of every round
    positions: dict[str, int] = {}
    decoded: list[int] = []
    first_answers: list[str] = []

    def ours_followup() -> float:
        model.llm.reset()  # every round starts a new conversation: the first turn is paid, untimed
        session = model.session(image)
        first_answers.append(session.ask(QUESTION, max_tokens=ANSWER_TOKENS))
        before = model.stats["prefill_tokens"]
        t = time.perf_counter()
        for _ in session.stream(FOLLOWUP, max_tokens=1):  # the first token (or EOS) ends the stream
            break
        seconds = time.perf_counter() - t
        decoded.append(model.stats["prefill_tokens"] - before)
        positions[f"llava-edge ({vision})"] = len(model.llm.slots)
        return seconds

    def theirs_followup() -> float:
        s, n = theirs.first_token(image, FOLLOWUP, history=((QUESTION, their_answer),))
        positions["llama.cpp"] = n
        return s

    contestants = {f"llava-edge ({vision})": ours_followup, "llama.cpp": theirs_followup}
    log(f"followup: {', '.join(contestants)}; {rounds} rounds")
    with CpuShare() as busy:
        times = interleaved(contestants, rounds)
    theirs.close()
    med = {k: median(v) for k, v in times.items()}
    return {"rounds": rounds, "threads": threads, "first_question": QUESTION, "followup": FOLLOWUP,
            "answer_tokens": ANSWER_TOKENS, "first_answers": {"llava-edge": first_answers[-1], "llama.cpp": their_answer},
            "seconds": times, "median_s": med, "positions_in_context": positions,
            "llava_edge_decoded_positions": decoded,
            "ratios_vs_llama_cpp": {k: med[k] / med["llama.cpp"] for k in med if k != "llama.cpp"},
            "busy": busy.to_dict()}


def _export_child(args: list[str]) -> dict:
    """Run ``llava-edge export ARGS`` as a child; wall seconds, its peak RSS (from wait4) and exit status."""
    t = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-c", "from llava_edge.cli import run; run()", "export", *args],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = p.stderr.read()
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - t
    if p.returncode != 0:
        raise RuntimeError(f"export {' '.join(args)} failed: {err.strip().splitlines()[-1:]}")
    return {"seconds": seconds, "peak_rss_gb": usage.ru_maxrss * 1024 / 1e9}


def _dir_bytes(path: Path, pattern: str = "*") -> int:
    return sum(f.stat().st_size for f in path.glob(pattern) if f.is_file())


def section_export(export_model: Path | None, small_model: Path, tmp: Path) -> dict:
    """GGUF and mmproj of the full-size model (streamed), the ONNX graph of the shortened one."""
    rows = []
    jobs = []
    if export_model is not None:
        out = tmp / "export-full"
        jobs += [(export_model, out, ["--target", "gguf", "--llm-outtype", "f16"], "llm.f16.gguf"),
                 (export_model, out, ["--target", "mmproj", "--dtype", "fp16", "--llm-outtype", "f16"],
                  "mmproj.f16.gguf")]
    jobs.append((small_model, tmp / "export-small", ["--target", "onnx"], "vision.fp32.onnx*"))
    for model, out, args, produced in jobs:
        log(f"export {model.name} {' '.join(args)}")
        with CpuShare() as busy:
            r = _export_child(["--model", str(model), "--out", str(out), *args])
        made = _dir_bytes(out, produced)
        rows.append({"model": model.name, "checkpoint_gb": _dir_bytes(model, "*.safetensors") / 1e9,
                     "args": " ".join(args), "output": produced, "output_gb": made / 1e9,
                     "mb_per_s": made / 1e6 / r["seconds"], **r, "busy": busy.to_dict()})
        log(f"  {made / 1e9:.2f} GB in {r['seconds']:.0f} s ({rows[-1]['mb_per_s']:.0f} MB/s), "
            f"peak RSS {r['peak_rss_gb']:.2f} GB")
    shutil.rmtree(tmp, ignore_errors=True)  # the outputs are large; the numbers are what is kept
    return {"rows": rows}


# -- report ------------------------------------------------------------------------------------------------


def markdown(report: dict) -> str:
    lines: list[str] = []
    mach, ver = report["machine"], report["versions"]
    gpus = "; GPU " + ", ".join(mach["gpus"]) if mach.get("gpus") else ""
    lines.append(f"Machine: {mach['cpu']}, {mach['usable_cpus']} CPUs, {mach.get('memory_gb')} GB, {mach['os']}"
                 f"{gpus}; Python {mach['python']}; " + ", ".join(f"{k} {v}" for k, v in ver.items() if v) + "."
                 f" Device profile: {report.get('device', 'cpu')}.")
    v = report.get("vision")
    if v:
        lines += ["", f"Vision encode, one {v['image']} ({_setup(v, report)}):", "",
                  "| contestant | median s | vs llama.cpp best | worst token cosine vs HF | drift gate |",
                  "| --- | --- | --- | --- | --- |"]
        base = v["median_s"][v["llama_cpp_best"]] if v["llama_cpp_best"] else None
        for name, s in sorted(v["median_s"].items(), key=lambda kv: kv[1]):
            q = v["quality_vs_hf"].get(name.removeprefix("ONNX "), {}) if name.startswith("ONNX ") else {}
            gate = (f"{'pass' if q['passes'] else 'fail'} (>= {q['gate']})" if q else "")
            cos = f"{q['min_cosine']:.5f}" if q else ""
            lines.append(f"| {name} | {s:.2f} | {s / base:.2f}x | {cos} | {gate} |" if base else
                         f"| {name} | {s:.2f} | | {cos} | {gate} |")
        lines.append(f"\nBest gated variant: {v['best_gated_onnx']}, **{_x(v['ratio_best_vs_llama_cpp'])}** of "
                     f"{v['llama_cpp_best']} (goal <= {v['goal']}x); {_busy(v['busy'])}.")
        if "tiles" in v:
            lines.append("Tiles and the positions they become: " + "; ".join(
                f"{k} {v['tiles'][k]} tile(s), {v['positions'][k]} positions" for k in v["tiles"]) + ".")
    t = report.get("ttft_decode")
    if t:
        for llm, res in t["llm"].items():
            if "ttft" in res:
                r = res["ttft"]
                handler = t.get("llama_cpp_handler", HANDLERS[0])
                lines += ["", f"Time to first token, {t['image']} + question, language model {llm} "
                          f"(mmproj {t['mmproj']} and {handler} for llama.cpp; {_setup(r, report)}):", "",
                          "| pipeline | median s | prompt positions | image positions | vs llama.cpp (ratio of "
                          "medians) | median of per-round ratios | where the time goes (median s) |",
                          "| --- | --- | --- | --- | --- | --- | --- |"]
                theirs = r["seconds"]["llama.cpp"]
                for name, s in sorted(r["median_s"].items(), key=lambda kv: kv[1]):
                    ratio = r["ratios_vs_llama_cpp"].get(name)
                    paired = median([a / b for a, b in zip(r["seconds"][name], theirs)]) if ratio else None
                    ph = r.get("phases_median_s", {}).get(name)
                    where = ", ".join(f"{k.removesuffix('_ms')} {x:.2f}" for k, x in ph.items()) if ph else ""
                    n = r["prompt_positions"].get(name, "?")
                    dec = _timed_median(r.get("llava_edge_decoded_positions", {}).get(name))
                    n = f"{n} ({dec:.0f} decoded)" if dec is not None and dec != n else n
                    img = r.get("image_positions", {}).get(name, "?")
                    lines.append(f"| {name} | {s:.2f} | {n} | {img} | "
                                 f"{_x(ratio) if ratio else '1'} | {_x(paired) if paired else ''} | {where} |")
                lines.append(f"\nGoal <= {r['goal']}x; {_busy(r['busy'])}.")
                lines += [f"Not raced, {k}: {why}" for k, why in r.get("skipped", {}).items()]
            if "followup" in res:
                f = res["followup"]
                lines += ["", f"Follow-up question about the same image after a {f['answer_tokens']}-token answer, "
                          f"language model {llm} ({_setup(f, report)}):", "",
                          "| pipeline | time to first token, median s | positions in context | positions decoded "
                          "for the question | vs llama.cpp |", "| --- | --- | --- | --- | --- |"]
                for name, s in sorted(f["median_s"].items(), key=lambda kv: kv[1]):
                    ours = name != "llama.cpp"
                    n = f["positions_in_context"].get(name, "?")
                    dec = (f"{_timed_median(f['llava_edge_decoded_positions']):.0f}" if ours
                           else f"{n} (all, image encoded again)")
                    ratio = f"**{_x(f['ratios_vs_llama_cpp'][name])}**" if ours else "1"
                    lines.append(f"| {name} | {s:.3f} | {n} | {dec} | {ratio} |")
                lines.append(f"\n{_busy(f['busy'])}.")
            if "decode" in res:
                d = res["decode"]
                where = f"{res.get('bandwidth_of', 'cpu').upper()} memory, llama.cpp GPU layers {res.get('n_gpu_layers', 0)}"
                lines += ["", f"Decode, {llm}, at depth {d['depth']} (tokens/s; {_setup(d, report)}; {where}):", "",
                          "| llava-edge generate | raw llama_decode (wall) | llama.cpp's own eval timer | "
                          "copy-bandwidth bound | read-bandwidth bound | vs raw | vs copy bound | vs read bound |",
                          "| --- | --- | --- | --- | --- | --- | --- | --- |",
                          f"| {d['tokens_per_s']['llava-edge']:.2f} | {d['tokens_per_s']['raw llama.cpp']:.2f} | "
                          f"{d['llama_cpp_internal_tokens_per_s']:.2f} | {d['bound_tokens_per_s']:.2f} | "
                          f"{d['read_bound_tokens_per_s']:.2f} | **{d['ratio_vs_raw']:.3f}** | "
                          f"**{d['ratio_vs_bound']:.0%}** | {d['ratio_vs_read_bound']:.0%} |",
                          f"\nBytes read per token: {d['bytes_per_token']['total'] / 1e9:.3f} GB (weights "
                          f"{d['bytes_per_token']['weights'] / 1e9:.3f} GB, KV cache "
                          f"{d['bytes_per_token']['kv_cache'] / 1e6:.1f} MB); bandwidth per round, copy "
                          f"{', '.join(f'{b:.1f}' for b in d['copy_bandwidth_gb_s'])} GB/s, read "
                          f"{', '.join(f'{b:.1f}' for b in d['read_bandwidth_gb_s'])} GB/s; goals >= "
                          f"{d['goals']['vs_raw']} and >= {d['goals']['vs_bound']:.0%}; {_busy(d['busy'])}."]
    e = report.get("export")
    if e:
        lines += ["", "Export (`llava-edge export` in a child process):", "",
                  "| checkpoint | target | checkpoint GB | output | output GB | seconds | MB/s | peak RSS GB |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in e["rows"]:
            lines.append(f"| {r['model']} | `{r['args']}` | {r['checkpoint_gb']:.2f} | {r['output']} | "
                         f"{r['output_gb']:.2f} | {r['seconds']:.0f} | {r['mb_per_s']:.0f} | {r['peak_rss_gb']:.2f} |")
    return "\n".join(lines) + "\n"


def _setup(section: dict, report: dict) -> str:
    return (f"{section.get('rounds', report['rounds'])} interleaved rounds, medians, "
            f"{section.get('threads', report['threads'])} threads")


def _timed_median(per_call: list | None) -> float | None:
    """The median over the timed rounds of a per-call record (its first entry is the untimed warm-up)."""
    return median(per_call[1:] or per_call) if per_call else None


def _x(r: float | None) -> str:
    return "?" if r is None else f"{r:.2f}x"


def _busy(b: dict) -> str:
    s = b.get("other_cpu_share")
    return (f"other processes used {'?' if s is None else f'{s:.0%}'} of the CPU meanwhile "
            f"(load average {b['load_average_start']} -> {b['load_average_end']})")


def context_size(family, m) -> int:
    """2048 positions, or more where the family's largest picture and the runtime's room for text need it
    (LLaVA-NeXT at CLIP-L/336: 2928 + 1024), so that neither pipeline's prompt overflows."""
    from llava_edge.runtimes.devices import TEXT_ROOM

    return max(2048, family.max_positions(m.image, int(m.vision["num_image_tokens"])) + TEXT_ROOM)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="llava-hf checkpoint the bundle was exported from")
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument("--llm", default=None, help="language-model variants (default: every one in the bundle)")
    ap.add_argument("--ttft-vision", default=None, help="llava-edge vision variants in the TTFT race (default: "
                    "the fastest gated one from the vision section, and fp32)")
    ap.add_argument("--mmproj", default=None, help="llama.cpp's mmproj in the TTFT race (default: the fastest "
                    "in the vision section)")
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--ttft-new-picture-only", action="store_true", help="time only each --ttft-vision variant's "
                    "first question about a new picture against llama.cpp (no warm, nothing-saved, seen-before runs)")
    ap.add_argument("--ctx", type=int, default=None, help="context size of every pipeline (default: 2048, or the "
                    "family's largest picture plus the runtime's text room where that is more)")
    ap.add_argument("--image-tokens", default=None, help="comma-separated K: llava-edge also loaded with "
                    "image_tokens=K in the TTFT race (a tiled family's cap on a picture's positions)")
    ap.add_argument("--handler", choices=HANDLERS, default=None, help="llama-cpp-python's chat handler in the "
                    "TTFT and follow-up races (default: Llava16ChatHandler for a tiled family, else "
                    "Llava15ChatHandler)")
    ap.add_argument("--export-model", type=Path, default=None, help="full-size checkpoint for the export section")
    ap.add_argument("--device", default="cpu", help="llava-edge's device profile (cpu, laptop-gpu, jetson, auto); "
                    "the baselines offload the same llama.cpp layers and run llama.cpp's CLIP on the GPU with them")
    ap.add_argument("--flash-attn", choices=("on", "off"), default="on",
                    help="flash attention of llama.cpp's chat pipeline: what llama.cpp's auto gives llava-edge "
                         "(on for a CPU; off for a CUDA build without its FA kernels)")
    a = ap.parse_args(argv)
    sections = {s.strip() for s in a.sections.split(",") if s.strip()}
    if not sections <= set(SECTIONS):
        ap.error(f"sections: {', '.join(SECTIONS)}")
    try:
        image_tokens = tuple(int(k) for k in a.image_tokens.split(",") if k.strip()) if a.image_tokens else ()
    except ValueError:
        ap.error("--image-tokens: comma-separated whole numbers")
    m = bundle_manifest.read(a.bundle)
    family = families.by_name(m.family)
    n_ctx = a.ctx or context_size(family, m)
    a.out.mkdir(parents=True, exist_ok=True)
    report: dict = {"machine": {**machine_info(), "gpus": gpu_info()}, "device": a.device,
                    "versions": {**versions(), **versions(VERSION_EXTRA)},
                    "model": str(a.model), "bundle": str(a.bundle), "family": family.name, "rounds": a.rounds,
                    "threads": a.threads,
                    "model_config": json.loads((a.model / "config.json").read_text())["text_config"]}
    json_path = a.out / "side_by_side.json"
    if json_path.is_file():  # sections run one at a time add up in one report
        report = {**json.loads(json_path.read_text()), **report}

    def save(key: str, value: dict) -> None:
        if key == "ttft_decode" and key in report:  # one language model at a time: keep the others
            old = report[key].get("llm", {})
            value = {**report[key], **value,
                     "llm": {**old, **{k: {**old.get(k, {}), **v} for k, v in value["llm"].items()}}}
        report[key] = value
        json_path.write_text(json.dumps(report, indent=2))

    with tempfile.TemporaryDirectory(prefix="side-by-side-") as tmp:
        tmp = Path(tmp)
        if "vision" in sections:
            save("vision", section_vision(a.model, a.bundle, m, a.rounds, a.threads, tmp, gpu=a.device != "cpu"))
        if sections & {"ttft", "decode", "followup"}:
            v = report.get("vision", {})
            best = v.get("best_gated_onnx")
            vis = a.ttft_vision.split(",") if a.ttft_vision else list(dict.fromkeys([x for x in (best, "fp32") if x]))
            mmproj = a.mmproj or (v.get("llama_cpp_best") or "").removeprefix("llama.cpp CLIP ") or \
                m.variant("mmproj").name
            llms = a.llm.split(",") if a.llm else [x.name for x in m.variants if x.kind == "llm"]
            save("ttft_decode", section_ttft_decode(a.bundle, m, llms, vis, mmproj, a.rounds, a.threads,
                                                    a.decode_tokens, n_ctx, tmp, sections, a.device,
                                                    a.flash_attn == "on", extras=not a.ttft_new_picture_only,
                                                    image_tokens=image_tokens, handler=a.handler))
        if "export" in sections:
            save("export", section_export(a.export_model, a.model, Path(tempfile.mkdtemp(dir=a.out))))
    md = markdown(report)
    (a.out / "side_by_side.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
