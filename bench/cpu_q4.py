"""Which 4-bit GGUF types llama.cpp prefills and decodes fastest on this CPU, against its memory bandwidth.

    python bench/cpu_q4.py --bundle B --types q4_0,iq4_nl,q4_k_m,q4_k_s --rounds 5 --threads 2 \
        [--modes default,repack,plain] [--out FILE]

Each type is quantized from the bundle's float GGUF by ``llava-edge quantize``'s
own code (``quantize_bundle``: a variant already made and up to date is reused),
then loaded once in a bare llama.cpp context (llama-cpp-python's low-level API,
CPU only, f16 KV cache, flash attention auto, ``--threads`` threads) and timed:

- prefill: a ``--prefill``-position prompt of stand-in token ids in one
  ``llama_decode`` (n_batch = n_ubatch = the prompt), tokens/s;
- decode: ``--decode-tokens`` single-token ``llama_decode`` steps after a
  ``--decode-prompt``-position prompt (decoded untimed), tokens/s, wall clock
  (and llama.cpp's own eval timer beside it);
- bytes read per decoded token: every tensor of the GGUF but the token
  embedding table, plus the f16 KV cache at the mean depth of the steps
  (``side_by_side.bytes_per_token``); the copy-bandwidth bound is the copy
  bandwidth measured here with the same thread count (side_by_side's meter:
  bytes read plus bytes written) over those bytes; the read bound likewise with
  a read-only stream (a numpy sum per thread). A decode only reads, so the
  read bound is the one a kernel can reach.

Modes (``--modes``), the same file loaded three ways:

- ``default``: llama.cpp's own choice (``use_extra_bufts``): a weight goes to
  the first "extra" buffer type that has a kernel for it and is rearranged at
  load time: ``AMX`` where the CPU backend was built with AMX-INT8 (Q4_0, Q4_1,
  Q8_0, Q4_K, Q5_K, Q6_K, IQ4_XS), then ``CPU_REPACK`` (interleaved 8x8 layouts;
  on x86 with AVX2: Q4_0, Q4_K, IQ4_NL, MXFP4, and Q2_K with AVX-512); which ones
  it used is read from its load log.
- ``repack``: what llama.cpp does on the same CPU without AMX (AMD Zen 4, any
  AVX2 x86): ``CPU_REPACK`` for exactly the tensors its x86 repack rule takes
  (``ggml_repack_get_optimal_repack_type``: type as above, rows a multiple of
  8), every other weight in the ordinary CPU buffer (``use_extra_bufts`` off,
  ``tensor_buft_overrides`` naming those tensors).
- ``plain``: ``use_extra_bufts`` off: every weight as the file has it, so
  ggml-cpu's per-row ``vec_dot`` kernels (and llamafile's sgemm in prefill) run.

llama.cpp's AMX matrix product of more than one row (``tinygemm_kernel_amx``)
crashes in some builds (llama.cpp#20824; the tile configuration on the stack is
optimised away, llama.cpp PR #26954), so a contestant with weights in the AMX
buffer first runs its prefill in a child process; where that dies, its prefill
is not timed (recorded as ``batch_crash``) and its decode prompt is fed one
token at a time.

All contestants stay loaded for the whole run unless ``--reload`` (each loaded
again, untimed, every time it runs: one model in memory at a time).

Contestants (type x mode) and the two bandwidth meters are timed interleaved,
``side_by_side.interleaved``: one untimed warm-up each, then ``--rounds``
rounds with the order rotated; medians are reported. How busy the machine was
(load average at start and end, other processes' CPU share) is recorded: on a
shared machine only ratios between contestants of one run are meaningful.

Results: a JSON (``--out``; default ``bench/results/<date>-cpu-<model>-q4-types.json``)
and the same table in markdown, printed and written beside it (``.md``).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # bench/ is a folder of scripts, not a package
    sys.path.insert(0, str(HERE))

import side_by_side as sbs  # noqa: E402 - the raw llama_decode loop, bandwidth meters, bytes per token

from llava_edge import manifest as bundle_manifest  # noqa: E402
from llava_edge.bench import CpuShare, machine_info, versions  # noqa: E402

DEFAULT_TYPES = ("q4_0", "iq4_nl", "q4_k_m", "q4_k_s")
MODES = ("default", "repack", "plain")
GOAL_VS_COPY_BOUND = 0.70  # the goal for the cpu profile's 4-bit choice
VERSION_EXTRA = ("gguf",)
# llama.cpp's load log: "load_tensors:   CPU_REPACK model buffer size =   123.45 MiB"
_BUFFER = re.compile(r"(\S+) model buffer size =\s*([\d.]+) MiB")
# ggml-cpu/repack.cpp (debug level): "repack: repack tensor blk.0.attn_q.weight with iq4_nl_8x8"
_REPACKED = re.compile(r"repack tensor (\S+) with (\S+)")
# buffers that hold weights as the file has them (mmap'ed or read); any other one rearranged them at load
_PLAIN_BUFFERS = {"CPU", "CPU_Mapped"}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def loadavg() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return [round(x, 2) for x in os.getloadavg()]


# ggml-cpu/repack.cpp, ggml_repack_get_optimal_repack_type, x86 branch: the GGML types CPU_REPACK interleaves
# (8 rows x 8 bytes: q4_0_8x8, q4_K_8x8, iq4_nl_8x8, mxfp4_8x8) on a CPU with AVX2; Q2_K needs AVX-512
_REPACK_X86_AVX2 = frozenset({"Q4_0", "Q4_K", "IQ4_NL", "MXFP4"})
_REPACK_X86_AVX512 = frozenset({"Q2_K"})


class _BuftOverride(ctypes.Structure):
    """llama.h's ``struct llama_model_tensor_buft_override`` (llama-cpp-python leaves the field a void pointer)."""

    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


def extra_buffer_types() -> dict[str, int]:
    """llama.cpp's CPU extra buffer types, name -> ``ggml_backend_buffer_type_t`` (``"AMX"``, ``"CPU_REPACK"``, ...).

    Through the CPU backend's registry (``ggml_backend_dev_get_extra_bufts``), as llama.cpp's loader finds them.
    """
    import llama_cpp

    def loaded(soname: str) -> ctypes.CDLL:
        # by soname: the copy libllama.so pulled in (the wheel also holds unversioned copies of each file,
        # and a second copy of libggml-cpu would have buffer types of its own that llama.cpp does not know)
        try:
            return ctypes.CDLL(soname)
        except OSError:
            return ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / soname))

    base, cpu = loaded("libggml-base.so.0"), loaded("libggml-cpu.so.0")
    cpu.ggml_backend_cpu_reg.restype = ctypes.c_void_p
    base.ggml_backend_reg_dev_get.restype = ctypes.c_void_p
    base.ggml_backend_reg_dev_get.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    base.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
    base.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    base.ggml_backend_buft_name.restype = ctypes.c_char_p
    base.ggml_backend_buft_name.argtypes = [ctypes.c_void_p]
    reg = cpu.ggml_backend_cpu_reg()
    fn = base.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_dev_get_extra_bufts")
    if not fn:
        return {}
    get = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)(fn)
    arr, out = get(base.ggml_backend_reg_dev_get(reg, 0)), {}
    for i in range(16):
        if not arr[i]:
            break
        out[base.ggml_backend_buft_name(arr[i]).decode()] = arr[i]
    return out


def repack_tensors(gguf: Path, cpu_features: tuple[str, ...]) -> list[str]:
    """The weights llama.cpp's CPU_REPACK takes on this x86 CPU: matrices (not the token embedding table, which
    is read by row) of a repackable type with a row count that is a multiple of 8."""
    import gguf as gg

    if "AVX2" not in cpu_features:
        raise RuntimeError("mode repack: the x86 AVX2 repack rule does not apply to this CPU")
    types = _REPACK_X86_AVX2 | (_REPACK_X86_AVX512 if "AVX512" in cpu_features else frozenset())
    return [t.name for t in gg.GGUFReader(str(gguf)).tensors
            if len(t.shape) == 2 and t.name != "token_embd.weight" and t.tensor_type.name in types
            and int(t.shape[1]) % 8 == 0]


class TypeRun(sbs.RawDecode):
    """One GGUF in a bare CPU context: side_by_side's raw decode loop, plus a timed prefill and the load log.

    ``mode``: see the module docstring. ``batches_ok`` false: every ``llama_decode`` gets one token (the
    untimed decode prompt included), for weights whose multi-row kernel crashes.
    """

    def __init__(self, gguf: Path, n_ctx: int, n_batch: int, threads: int, mode: str = "default",
                 batches_ok: bool = True, cpu_features: tuple[str, ...] = ()):
        import llama_cpp

        from llava_edge.runtimes.llm import captured_llama_log

        self.c = llama_cpp
        self.batches_ok = batches_ok
        llama_cpp.llama_backend_init()
        mp = llama_cpp.llama_model_default_params()
        mp.n_gpu_layers = 0
        mp.use_extra_bufts = mode == "default"
        self.overridden: list[str] = []
        if mode == "repack":
            self.overridden = repack_tensors(gguf, cpu_features)
            if self.overridden:
                pattern = "^(" + "|".join(re.escape(n) for n in self.overridden) + ")$"
                self._pattern = pattern.encode()
                self._overrides = (_BuftOverride * 2)(_BuftOverride(self._pattern, extra_buffer_types()["CPU_REPACK"]),
                                                      _BuftOverride(None, None))
                mp.tensor_buft_overrides = ctypes.cast(self._overrides, ctypes.c_void_p)
        with captured_llama_log() as lines:
            self.model = llama_cpp.llama_model_load_from_file(str(gguf).encode(), mp)
            if not self.model:
                raise RuntimeError(f"llama.cpp could not load {gguf}")
            cp = llama_cpp.llama_context_default_params()
            cp.n_ctx, cp.n_batch, cp.n_ubatch = n_ctx, n_batch, n_batch
            cp.n_threads = cp.n_threads_batch = threads
            cp.no_perf = False
            self.ctx = llama_cpp.llama_init_from_model(self.model, cp)
            if not self.ctx:
                raise RuntimeError(f"llama.cpp could not make a context for {gguf}")
        self.load_log = "".join(lines)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))

    def _decode(self, ids: list[int]) -> None:
        if self.batches_ok:
            return super()._decode(ids)
        for i in ids:
            super()._decode([i])

    def prefill(self, n: int) -> tuple[float, float]:
        """(wall seconds, llama.cpp's prompt-eval seconds) of one ``llama_decode`` of ``n`` positions."""
        c = self.c
        c.llama_memory_clear(c.llama_get_memory(self.ctx), True)
        ids = [(i * 7919) % (self.n_vocab - 100) + 100 for i in range(n)]
        c.llama_perf_context_reset(self.ctx)
        t = time.perf_counter()
        self._decode(ids)
        c.llama_get_logits_ith(self.ctx, -1)
        wall = time.perf_counter() - t
        return wall, c.llama_perf_context(self.ctx).t_p_eval_ms / 1e3


class _Bandwidth(sbs.Bandwidth):
    """side_by_side's meter with a read-only stream numpy vectorises (a sum): its ``max`` is compute-bound here
    (about 29 GB/s with 2 threads where a sum reads 32 GB/s on this 2-vCPU Xeon)."""

    def read(self) -> float:
        return self._run(lambda src, dst: src.sum())


def batch_crash(gguf: Path, mode: str, threads: int, n: int = 8) -> str | None:
    """Decode ``n`` positions in one ``llama_decode`` in a child process; what killed it, or None if it lived."""
    import signal

    r = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--probe", str(gguf), "--probe-mode", mode,
                        "--threads", str(threads), "--prefill", str(n)], capture_output=True, text=True)
    if r.returncode == 0:
        return None
    if r.returncode < 0:
        return signal.Signals(-r.returncode).name
    return f"exit status {r.returncode}: {(r.stderr.strip().splitlines() or [''])[-1][:200]}"


def _probe(gguf: Path, mode: str, threads: int, n: int) -> int:
    from llava_edge.runtimes.devices import llama_cpu_features, llama_system_info

    r = TypeRun(gguf, n + 16, n, threads, mode=mode, cpu_features=llama_cpu_features(llama_system_info()))
    r.prefill(n)
    r.close()
    return 0


def weight_buffers(load_log: str) -> dict[str, float]:
    """MiB of each buffer type llama.cpp put the weights in, from its load log."""
    out: dict[str, float] = {}
    for name, mib in _BUFFER.findall(load_log):
        out[name] = out.get(name, 0.0) + float(mib)
    return out


def repacked_tensors(load_log: str) -> dict[str, int]:
    """How many tensors CPU_REPACK rearranged, per layout ("q4_0_8x8": 154), from its debug log."""
    return dict(sorted(Counter(layout for _, layout in _REPACKED.findall(load_log)).items()))


def ensure_types(bundle: Path, types: list[str], threads: int) -> dict[str, Path]:
    """Each type's GGUF in the bundle, quantized from its float GGUF unless already made and up to date.

    A name ``llava-edge quantize`` does not make (``bf16``, ``f16``: a reference) must be a language-model
    variant the bundle already has.
    """
    from llava_edge.quantize.command import quantize_bundle
    from llava_edge.quantize.llm import LLM_TYPES

    quantized = [t for t in types if t in LLM_TYPES]
    if quantized:
        quantize_bundle(bundle, ",".join(quantized), threads=threads, log=log)
    m = bundle_manifest.read(bundle)
    return {t: bundle / m.variant("llm", t).file for t in types}


def contestant_name(t: str, mode: str) -> str:
    return t if mode == "default" else f"{t} ({mode})"


def measure(bundle: Path, types: list[str], modes: list[str], rounds: int, threads: int, prefill: int = 512,
            decode_prompt: int = 32, decode_tokens: int = 64, bandwidth_mb: int = 512,
            label: str | None = None, reload: bool = False) -> dict:
    """Quantize (or reuse) every type, time them interleaved, and return the report (see the module docstring)."""
    from llava_edge.quantize.llm import tensor_types
    from llava_edge.runtimes.devices import llama_cpu_features, llama_system_info

    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ValueError(f"unknown mode(s) {bad}; modes: {', '.join(MODES)}")
    load_start = loadavg()
    info = llama_system_info()
    features = llama_cpu_features(info)
    files = ensure_types(bundle, types, threads)
    m = bundle_manifest.read(bundle)
    base = min((v for v in m.find("llm", precisions=("f32", "bf16", "f16"))),
               key=lambda v: ("f32", "bf16", "f16").index(v.precision))
    n_ctx = max(prefill, decode_prompt + decode_tokens) + 64
    runs: dict[str, TypeRun | None] = {}
    rows: dict[str, dict] = {}
    per_round: dict[str, dict[str, list[float]]] = {}

    def load(t: str, mode: str, batches_ok: bool = True) -> TypeRun:
        return TypeRun(files[t], n_ctx, max(prefill, decode_prompt), threads, mode=mode, batches_ok=batches_ok,
                       cpu_features=features)

    for t in types:
        for mode in modes:
            name = contestant_name(t, mode)
            r = load(t, mode)
            buffers = weight_buffers(r.load_log)
            # only AMX's multi-row kernel is known to crash; it is tried in a child process first
            crash = batch_crash(files[t], mode, threads, prefill) if "AMX" in buffers else None
            if crash:
                log(f"{name}: a {prefill}-position llama_decode killed the child process ({crash}): "
                    f"prefill not timed")
                r.batches_ok = False
            layouts = repacked_tensors(r.load_log)
            extra = sorted(b for b in buffers if b not in _PLAIN_BUFFERS)
            v = m.variant("llm", t)
            rows[name] = {"type": t, "mode": mode, "file": v.file, "file_bytes": files[t].stat().st_size,
                          "tensor_types": tensor_types(files[t]),
                          "fallback_tensors": v.extra.get("fallback_tensors"),
                          "weight_buffers_mib": buffers, "repacked": bool(extra), "repacked_into": extra,
                          "cpu_repack_layouts": layouts, "overridden_to_cpu_repack": len(r.overridden),
                          "batch_crash": crash}
            per_round[name] = {"prefill_s": [], "prefill_internal_s": [], "decode_s": [], "decode_internal_s": []}
            log(f"loaded {name}: {files[t].name}, weight buffers {buffers}"
                + (f", CPU_REPACK layouts {layouts}" if layouts else ""))
            if reload:  # loaded again (untimed) each time it runs: one model in memory at a time
                r.close()
                r = None
            runs[name] = r

    def contestant(name: str):
        rec, row = per_round[name], rows[name]

        def run() -> float:
            r = runs[name] or load(row["type"], row["mode"], batches_ok=row["batch_crash"] is None)
            try:
                if r.batches_ok:
                    wall, inside = r.prefill(prefill)
                    rec["prefill_s"].append(wall)
                    rec["prefill_internal_s"].append(inside)
                wall, inside = r.run(decode_prompt, decode_tokens)
            finally:
                if runs[name] is None:
                    r.close()
            rec["decode_s"].append(wall / decode_tokens)
            rec["decode_internal_s"].append(inside / decode_tokens)
            return wall / decode_tokens

        return run

    bw = _Bandwidth(threads, mb_per_thread=bandwidth_mb)
    contestants = {name: contestant(name) for name in runs}
    loads: list[float] = []  # the 1-minute load average, once per round (the warm-up's first)

    def copy_bandwidth() -> float:
        loads.append(loadavg()[0])
        return bw.copy()

    contestants["copy bandwidth"] = copy_bandwidth
    contestants["read bandwidth"] = bw.read
    log(f"{', '.join(runs)}; {rounds} interleaved rounds, {threads} threads")
    with CpuShare() as busy:
        got = sbs.interleaved(contestants, rounds)
    for r in runs.values():
        if r is not None:
            r.close()
    del bw
    # interleaved() keeps only the timed rounds of what it returns; the closures above also kept the warm-up
    copy_bw, read_bw = statistics.median(got["copy bandwidth"]), statistics.median(got["read bandwidth"])
    depth = decode_prompt + decode_tokens // 2
    for name, row in rows.items():
        rec = {k: v[1:] for k, v in per_round[name].items()}  # [0]: the untimed warm-up
        need = sbs.bytes_per_token(files[row["type"]], depth)
        decode_tps = 1 / statistics.median(rec["decode_s"])
        timed_prefill = bool(rec["prefill_s"])
        row.update({
            "prefill_tokens_per_s": prefill / statistics.median(rec["prefill_s"]) if timed_prefill else None,
            "prefill_internal_tokens_per_s":
                prefill / statistics.median(rec["prefill_internal_s"]) if timed_prefill else None,
            "decode_tokens_per_s": decode_tps,
            "decode_internal_tokens_per_s": 1 / statistics.median(rec["decode_internal_s"]),
            "bytes_per_token": need,
            "copy_bound_tokens_per_s": copy_bw / need["total"],
            "read_bound_tokens_per_s": read_bw / need["total"],
            "fraction_of_copy_bound": decode_tps * need["total"] / copy_bw,
            "fraction_of_read_bound": decode_tps * need["total"] / read_bw,
            "seconds": rec,
        })
    prefilled = [n for n in rows if rows[n]["prefill_tokens_per_s"]]
    return {
        "question": "which 4-bit GGUF types llama.cpp prefills and decodes fastest on this CPU",
        "machine": machine_info(), "versions": {**versions(), **versions(VERSION_EXTRA)},
        "llama_system_info": info, "llama_cpu_features": list(features),
        "bundle": str(bundle), "model": label or model_name(bundle), "base_gguf": base.file,
        "types": types, "modes": modes, "rounds": rounds, "threads": threads,
        "prefill_positions": prefill, "decode_prompt_positions": decode_prompt, "decode_tokens": decode_tokens,
        "decode_mean_depth": depth, "n_ctx": n_ctx, "kv_cache": "f16", "flash_attn": "auto", "reload": reload,
        "read_meter": "numpy sum of float64 arrays, one per thread",
        "copy_bandwidth_gb_s": [b / 1e9 for b in got["copy bandwidth"]],
        "read_bandwidth_gb_s": [b / 1e9 for b in got["read bandwidth"]],
        "copy_bandwidth_median_gb_s": copy_bw / 1e9, "read_bandwidth_median_gb_s": read_bw / 1e9,
        "goal_fraction_of_copy_bound": GOAL_VS_COPY_BOUND,
        "load_average_start": load_start, "load_average_end": loadavg(), "load_average_per_round": loads[1:],
        "busy": busy.to_dict(),
        "results": rows,
        "fastest": {"decode": max(rows, key=lambda n: rows[n]["decode_tokens_per_s"]),
                    "prefill": max(prefilled, key=lambda n: rows[n]["prefill_tokens_per_s"]) if prefilled else None},
    }


def model_name(bundle: Path) -> str:
    """A short name for the bundle's model: the folder of the checkpoint it was exported from, else its own."""
    try:
        src = bundle_manifest.read(bundle).source or {}
    except Exception:  # noqa: BLE001 - a label for the report, nothing depends on it
        src = {}
    name = Path(str(src["model"])).name if src.get("model") else bundle.name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "model"


def markdown(report: dict) -> str:
    mach = report["machine"]
    lines = [f"{report['model']} on {mach['cpu']} ({mach['usable_cpus']} CPUs; llama.cpp CPU features: "
             f"{', '.join(report['llama_cpu_features'])}), llama-cpp-python {report['versions'].get('llama_cpp_python')}"
             f"; {report['rounds']} interleaved rounds, medians, {report['threads']} threads. Prefill: "
             f"{report['prefill_positions']} positions in one llama_decode; decode: {report['decode_tokens']} steps "
             f"after {report['decode_prompt_positions']} positions. Copy bandwidth "
             f"{report['copy_bandwidth_median_gb_s']:.1f} GB/s, read {report['read_bandwidth_median_gb_s']:.1f} GB/s.",
             "", "| type | weights in | file MB | prefill tok/s | decode tok/s | bytes/token MB | copy-bound tok/s | "
             "% of copy bound | % of read bound | repacked |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in sorted(report["results"].items(), key=lambda kv: -kv[1]["decode_tokens_per_s"]):
        bufs = ", ".join(f"{b} {mib:.0f}" for b, mib in sorted(r["weight_buffers_mib"].items(), key=lambda kv: -kv[1]))
        pre = (f"{r['prefill_tokens_per_s']:.1f}" if r["prefill_tokens_per_s"]
               else f"not timed: batch crashed ({r['batch_crash']})")
        lines.append(f"| {name} | {bufs} MiB | {r['file_bytes'] / 1e6:.0f} | {pre} | "
                     f"{r['decode_tokens_per_s']:.2f} | {r['bytes_per_token']['total'] / 1e6:.0f} | "
                     f"{r['copy_bound_tokens_per_s']:.2f} | **{r['fraction_of_copy_bound']:.0%}** | "
                     f"{r['fraction_of_read_bound']:.0%} | "
                     f"{('yes: ' + ', '.join(r['repacked_into'])) if r['repacked'] else 'no'} |")
    b = report["busy"]
    lines += ["", f"Fastest decode: {report['fastest']['decode']}; fastest prefill: {report['fastest']['prefill']}. "
              f"Load average {report['load_average_start'][0]} -> {report['load_average_end'][0]} (per round: "
              f"{', '.join(str(x) for x in report.get('load_average_per_round', []))}); other processes "
              f"used {b['other_cpu_share'] if b['other_cpu_share'] is None else format(b['other_cpu_share'], '.0%')} "
              f"of the CPU meanwhile."]
    return "\n".join(lines) + "\n"


def default_out(model: str) -> Path:
    return HERE / "results" / f"{time.strftime('%Y-%m-%d')}-cpu-{model}-q4-types.json"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, help="a bundle with an f32/bf16/f16 language-model GGUF")
    ap.add_argument("--types", default=",".join(DEFAULT_TYPES), help="llava-edge quantize --llm types to compare; "
                    "the bundle's own float variants (bf16, f16, f32) may be listed as references")
    ap.add_argument("--modes", default="default", help="default (llama.cpp's own weight layouts: AMX, CPU_REPACK), "
                    "repack (CPU_REPACK only, as on a CPU without AMX), plain (use_extra_bufts off), or a list")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--prefill", type=int, default=512, help="prompt positions of the prefill (one llama_decode)")
    ap.add_argument("--decode-prompt", type=int, default=32, help="positions decoded, untimed, before the steps")
    ap.add_argument("--decode-tokens", type=int, default=64, help="single-token decode steps timed")
    ap.add_argument("--bandwidth-mb", type=int, default=512, help="MB per thread and array of the bandwidth meter")
    ap.add_argument("--reload", action="store_true", help="load each contestant again (untimed) every time it "
                    "runs, so that only one model is in memory at a time")
    ap.add_argument("--name", default=None, help="the model's name in the report and the default file name "
                    "(default: the folder of the checkpoint the bundle was exported from)")
    ap.add_argument("--out", type=Path, default=None, help="JSON to write (default: bench/results/DATE-cpu-MODEL-"
                    "q4-types.json); the markdown table goes beside it")
    ap.add_argument("--probe", type=Path, default=None, help=argparse.SUPPRESS)  # the child of batch_crash
    ap.add_argument("--probe-mode", default="default", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.probe:
        return _probe(a.probe, a.probe_mode, a.threads, a.prefill)
    types = [t.strip().lower() for t in a.types.split(",") if t.strip()]
    modes = [x.strip() for x in a.modes.split(",") if x.strip()]
    if not set(modes) <= set(MODES):
        ap.error(f"--modes: {', '.join(MODES)}")
    if a.bundle is None:
        ap.error("--bundle is required")
    report = measure(a.bundle, types, modes, a.rounds, a.threads, a.prefill, a.decode_prompt, a.decode_tokens,
                     a.bandwidth_mb, a.name, a.reload)
    out = a.out or default_out(report["model"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    md = markdown(report)
    out.with_suffix(".md").write_text(md)
    print(md)
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
