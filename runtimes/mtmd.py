"""llama.cpp's own image path: its CLIP (mtmd) on the bundle's mmproj GGUF.

Not what ``chat`` runs (that is the ONNX vision graph, with the embeddings fed to
llama.cpp: llama-cpp-python 0.3.36's CLIP computes LLaVA's tower with the class
token in the wrong place, llama.cpp#25814). It is the baseline the benchmarks
race (``bench/side_by_side.py``) and how the mmproj export is checked against
Hugging Face (``tests/test_mmproj_gguf.py``). torch-free.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np

from llava_edge.errors import UserError


def silence_mtmd_logs() -> None:
    """Keep llama.cpp's and mtmd's log lines off stderr (they print per image)."""
    import llama_cpp
    from llama_cpp import mtmd_cpp

    @llama_cpp.llama_log_callback
    def _quiet(level, text, user_data):  # noqa: ARG001 - ggml's log signature
        return None

    silence_mtmd_logs.callback = _quiet  # keep a reference: llama.cpp holds the pointer
    llama_cpp.llama_log_set(_quiet, None)
    mtmd_cpp.mtmd_log_set(_quiet, None)
    mtmd_cpp.mtmd_helper_log_set(_quiet, None)


def image_embeddings(
    mmproj: str | Path,
    text_gguf: str | Path,
    images: list[np.ndarray],
    flash_attn: bool = False,
    n_threads: int = 2,
    verbose: bool = False,
) -> list[np.ndarray]:
    """Encode RGB uint8 images (H, W, 3) with llama.cpp's own CLIP; one (tokens, width) array per image.

    This is llama.cpp's whole image path (its preprocessing, then its graph), as
    ``llama-mtmd-cli`` runs it: the bitmap is tokenized with the media marker
    and every image chunk encoded with ``mtmd_encode_chunk``, in the order the
    language model receives them (a tiled picture gives one chunk per tile).
    An image of exactly the tower's size is not resized by llama.cpp, so its
    pixels reach the graph as ``(u8 / 255 - mean) / std``: the same values
    Hugging Face gets. The text model is loaded vocabulary-only: mtmd needs it
    for its width and tokens. ``flash_attn`` off by default: ggml's CPU flash
    attention rounds to f16.
    """
    return [np.concatenate(c) for c in image_chunks(mmproj, text_gguf, images, flash_attn, n_threads, verbose)]


def image_chunks(
    mmproj: str | Path,
    text_gguf: str | Path,
    images: list[np.ndarray],
    flash_attn: bool = False,
    n_threads: int = 2,
    verbose: bool = False,
) -> list[list[np.ndarray]]:
    """Like :func:`image_embeddings`, with each image's chunks apart: a list of (tokens, width) arrays per image,
    in prompt order (for a tiled picture, llama.cpp's tiles and its overview)."""
    with _context(mmproj, text_gguf, flash_attn, n_threads, verbose) as (M, ctx):
        n_embd = _projection_dim(mmproj)  # a vocabulary-only model reports width 0
        return [_encode_one(M, ctx, _rgb(im), n_embd) for im in images]


def image_positions(
    mmproj: str | Path, text_gguf: str | Path, images: list[np.ndarray], verbose: bool = False,
) -> list[list[int]]:
    """How many positions llama.cpp gives each image, chunk by chunk (tokenized and preprocessed, not encoded)."""
    with _context(mmproj, text_gguf, False, 1, verbose) as (M, ctx):
        return [_tokenized(M, ctx, _rgb(im), M.mtmd_input_chunk_get_n_pos) for im in images]


@contextmanager
def _context(mmproj, text_gguf, flash_attn: bool, n_threads: int, verbose: bool):
    import llama_cpp
    from llama_cpp import mtmd_cpp as M

    if not verbose:
        silence_mtmd_logs()
    llama_cpp.llama_backend_init()
    mp = llama_cpp.llama_model_default_params()
    mp.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(text_gguf).encode(), mp)
    if not model:
        raise UserError(f"llama.cpp could not load {text_gguf}")
    ctx = None
    try:
        p = M.mtmd_context_params_default()
        p.use_gpu = False
        p.n_threads = n_threads
        p.print_timings = False
        p.warmup = False
        fa = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        p.flash_attn_type = fa
        ctx = M.mtmd_init_from_file(str(mmproj).encode(), model, p)
        if not ctx:
            raise UserError(f"llama.cpp's mtmd could not load {mmproj} with {text_gguf}")
        yield M, ctx
    finally:
        if ctx:
            M.mtmd_free(ctx)
        llama_cpp.llama_model_free(model)


def _projection_dim(mmproj: str | Path) -> int:
    import gguf

    field = gguf.GGUFReader(str(mmproj)).get_field(gguf.Keys.ClipVision.PROJECTION_DIM)
    if field is None:
        raise UserError(f"{mmproj} has no {gguf.Keys.ClipVision.PROJECTION_DIM}")
    return int(field.contents())


def _rgb(im) -> np.ndarray:
    rgb = np.ascontiguousarray(im, dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise UserError(f"expected an RGB image array (H, W, 3), got shape {rgb.shape}")
    return rgb


def _tokenized(M, ctx, rgb: np.ndarray, each):
    """``each(chunk)`` for every image chunk mtmd makes of the picture, in prompt order."""
    import ctypes

    h, w, _ = rgb.shape
    data = (ctypes.c_uint8 * rgb.size).from_buffer_copy(rgb.tobytes())
    bitmap = M.mtmd_bitmap_init(w, h, data)
    chunks = M.mtmd_input_chunks_init()
    try:
        text = M.mtmd_default_marker()
        inp = M.mtmd_input_text(text, len(text), False, True)
        bitmaps = (M.mtmd_bitmap_p_ctypes * 1)(bitmap)
        if M.mtmd_tokenize(ctx, chunks, ctypes.byref(inp), bitmaps, 1) != 0:
            raise UserError("llama.cpp's mtmd could not tokenize the image")
        out = [each(c) for c in (M.mtmd_input_chunks_get(chunks, i) for i in range(M.mtmd_input_chunks_size(chunks)))
               if M.mtmd_input_chunk_get_type(c) == M.MTMD_INPUT_CHUNK_TYPE_IMAGE]
        if not out:
            raise UserError("llama.cpp's mtmd produced no image chunk")
        return out
    finally:
        M.mtmd_input_chunks_free(chunks)
        M.mtmd_bitmap_free(bitmap)


def _encode_one(M, ctx, rgb: np.ndarray, n_embd: int) -> list[np.ndarray]:
    def encode(chunk) -> np.ndarray:
        n = M.mtmd_input_chunk_get_n_tokens(chunk)
        if M.mtmd_encode_chunk(ctx, chunk) != 0:
            raise UserError("llama.cpp's mtmd failed to encode the image")
        out = M.mtmd_get_output_embd(ctx)
        return np.ctypeslib.as_array(out, shape=(n * n_embd,)).reshape(n, n_embd).copy()

    return _tokenized(M, ctx, rgb, encode)
