"""``llava-edge bench``: how fast a bundle runs on this machine, per variant, as a table and JSON.

    llava-edge bench BUNDLE [--device auto] [--variants fp32:f16,int8:q4_k_m] [--runs 5] [--json out.json]

For each (vision variant, language-model variant) pair, in a fresh process of
its own (so peak memory is that pair's alone and one pair's caches do not help
the next), after ``warmup`` untimed passes, ``runs`` timed passes of one
image + question, each timing every phase of the chat path as the runtime
runs it:

- image preprocessing (file decode, resize/pad/crop, normalise),
- vision encode (the ONNX graph, or the engine, on one image),
- prefill of the image + prompt into the language model (tokens/s),
- time to first token: from the image file to the first sampled token,
  everything above included,
- decode (tokens/s): ``EdgeLLaVA.generate``, the loop ``chat`` streams from,
  tokenizer decode and sampling included,
- peak memory: the process's peak resident set (``VmHWM``).

Reported values are medians over the runs; the raw runs are in the JSON. The
JSON also records the machine, the library versions and how busy the CPU was
with other processes while the pairs ran (``other_cpu_share``): timings from a
shared machine are only comparable as ratios measured side by side
(``bench/side_by_side.py``, docs/BENCHMARKS.md).

Torch-free: this is the runtime's benchmark. The phases are timed by calling
the same public pieces ``ChatSession.stream`` calls (``preprocess``,
``EdgeLLaVA.vision.encode``, ``slots_for``, ``prefill``, ``sample``,
``generate``), one after another, so no hook inside the runtime is needed.
"""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

from . import atomic, variants
from . import manifest as bundle_manifest
from .errors import UserError
from .variants import Pair

# Every metric a pair reports (medians); the test checks each is present and positive.
METRICS = ("preprocess_ms", "vision_encode_ms", "prefill_tokens_per_s", "ttft_ms", "decode_tokens_per_s",
           "peak_memory_mb")
UNITS = {"preprocess_ms": "ms", "vision_encode_ms": "ms", "prefill_tokens_per_s": "tok/s", "ttft_ms": "ms",
         "decode_tokens_per_s": "tok/s", "peak_memory_mb": "MB"}
DEFAULT_QUESTION = "Describe the image in detail."
OTHER_QUESTION = "What colors are in the image?"  # asked first about the picture that is then "seen before"
BENCH_IMAGE_SIZE = (640, 480)  # a photo-like, non-square input: resize and padding both run
VERSION_PACKAGES = ("llava-edge", "numpy", "onnxruntime", "llama_cpp_python", "tokenizers", "pillow")
# Python's own distribution name for llama-cpp-python is normalised by importlib.metadata
_DIST_NAMES = {"llama_cpp_python": "llama-cpp-python"}


@dataclass
class BenchSettings:
    """What one ``bench`` run measures; saved in the JSON beside the results."""

    runs: int = 5
    warmup: int = 1
    decode_tokens: int = 32
    question: str = DEFAULT_QUESTION
    threads: int = 0  # 0: the runtime's default (all cores)
    device: str = "auto"
    n_ctx: int | None = None

    def validate(self) -> None:
        if self.runs < 1:
            raise UserError(f"--runs must be at least 1, not {self.runs}")
        if self.warmup < 0:
            raise UserError(f"--warmup must be 0 or more, not {self.warmup}")
        if self.decode_tokens < 1:
            raise UserError(f"--decode-tokens must be at least 1, not {self.decode_tokens}")
        if self.threads < 0:
            raise UserError("--threads must be 0 (all cores) or more")


# -- which pairs -----------------------------------------------------------------------------------


def parse_pairs(text: str | None, m: bundle_manifest.Manifest) -> list[Pair]:
    """``--variants`` by ``variants.parse_pairs``; by default each variant once (engines only when named)."""
    return variants.parse_pairs(text, m, default=variants.each_variant_once)


# -- the input ---------------------------------------------------------------------------------------


def write_bench_image(path: str | Path, size: tuple[int, int] = BENCH_IMAGE_SIZE, seed: int = 0) -> Path:
    """A JPEG scene of ``size`` (width, height), rendered here: benchmarks never download an image."""
    from .scenes import random_scene, render

    rng = random.Random(seed)
    im = render(random_scene(rng), size=max(size), rng=rng).resize(size)
    path = Path(path)
    with atomic.atomic_path(path) as tmp:
        im.save(tmp, format="JPEG", quality=90)
    return path


# -- one pass of the chat path, phase by phase -------------------------------------------------------------


def time_chat_pass(model, image, question: str, decode_tokens: int, fresh: bool = True,
                   saved_image: bool = False) -> dict:
    """Time one question about ``image`` through ``model`` (an ``EdgeLLaVA``), from an empty KV cache.

    The steps are those of ``ChatSession.stream`` -> ``EdgeLLaVA.lazy_image`` ->
    ``EdgeLLaVA.generate``, called one by one so each phase has its own clock. The
    pipeline's image cache is not used (each pass encodes the image, as a new picture would).
    From an empty KV cache the prompt's beginning before the image is loaded from the file an
    earlier pass saved (``runtimes/prefix_cache.py``; the warm-up pass saves it), as in every
    process after the first; ``model.prefix_cache = None`` decodes it too, as the first process
    ever does. ``saved_image=True`` lets the KV cache through the image come from a file as well
    (as for a picture a process on this machine was asked about before: no vision encode, no
    image prefill; the warm-up pass saves it); by default it is not, so the image is encoded and
    decoded. ``fresh=False`` keeps the KV cache of the conversation before, as a running process
    (``chat``'s REPL, a server) does: what the two prompts share (the system prompt, up to
    the image when the image is new) is not decoded again. ``image`` may be a list: several pictures
    opening one question (a family trained with several), each prepared as one of several and encoded on
    its own, as ``ChatSession`` does.
    """
    from .runtimes.pipeline import Sampling, sample

    cache = model.prefix_cache
    with model.using_prefix_cache(cache.with_settings(images=saved_image) if cache is not None else None):
        if fresh:
            model.llm.reset()
        vision_s: list[float] = []
        several = isinstance(image, list)
        pictures = image if several else [image]

        def encoded(picture) -> np.ndarray:  # called by prefill only if the image's positions must be decoded
            t = time.perf_counter()
            emb = model.encode([picture])[0]
            vision_s.append(time.perf_counter() - t)
            return emb

        t0 = time.perf_counter()
        prepared = [model.prepare_image(p, alone=len(pictures) == 1) for p in pictures]
        t1 = time.perf_counter()
        slots = chat_pass_slots(model, prepared, question, several)
        embeddings = {p.key: (lambda p=p: encoded(p)) for p in prepared}
        t2 = time.perf_counter()
        before = model.stats["prefill_tokens"]
        logits = model.prefill(slots, embeddings)
        t3 = time.perf_counter()
        decoded = model.stats["prefill_tokens"] - before
        sample(logits, Sampling(), np.random.default_rng(0))  # the first token: greedy, as `chat` by default
        t4 = time.perf_counter()
        steps, decode_s = time_decode(model, slots, embeddings, decode_tokens)
    prefill_s = t3 - t2 - sum(vision_s)
    return {
        "preprocess_ms": (t1 - t0) * 1e3,
        "vision_encode_ms": sum(vision_s) * 1e3,  # 0 when the saved KV cache held the image
        "tokenize_ms": (t2 - t1) * 1e3,
        "prefill_ms": prefill_s * 1e3,
        "prompt_positions": len(slots),
        "image_positions": sum(p.positions for p in prepared),
        "prefill_tokens": decoded,  # positions decoded: all of the prompt when fresh and nothing saved
        "prefill_tokens_per_s": decoded / prefill_s,
        "ttft_ms": (t4 - t0) * 1e3,
        "decode_tokens": steps,
        "decode_ms": decode_s * 1e3,
        "decode_tokens_per_s": steps / decode_s,
    }


def chat_pass_slots(model, prepared: list, question: str, several: bool = False) -> list:
    """The first question's prompt slots about ``prepared`` pictures (``several``: they were given as a list, so the
    prompt opens with as many picture places; else the conversation's one picture)."""
    text = model.template.prompt(question, image=len(prepared) if several else True, history=[])
    return model.picture_slots(text, [(p.key, p.positions) for p in prepared])


def time_decode(model, slots: list, emb, tokens: int) -> tuple[int, float]:
    """(decode steps, seconds) of ``EdgeLLaVA.generate`` answering ``slots``, whose prompt is already cached.

    ``generate`` re-decodes the last prompt position (the cache holds the whole prompt), then one token
    per step until ``tokens`` or end of sequence: every step is one single-token ``llama_decode``, with
    the sampling, detokenizing and streaming of the real loop around it.
    """
    from .runtimes.pipeline import Sampling

    before = len(model.llm.slots)
    t = time.perf_counter()
    for _ in model.generate(slots, emb, Sampling(max_tokens=tokens)):
        pass
    seconds = time.perf_counter() - t
    return len(model.llm.slots) - before + 1, seconds


def peak_memory_mb() -> float:
    """This process's peak resident set in MB (``VmHWM``; ``ru_maxrss`` where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e6
    except OSError:
        pass
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1e6 if sys.platform == "darwin" else rss * 1024 / 1e6  # bytes on macOS, KiB elsewhere


def medians(runs: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def measure_pair(bundle: str | Path, vision: str, llm: str, settings: BenchSettings, image: str | Path) -> dict:
    """Load the pair, run ``warmup`` + ``runs`` passes; medians, raw runs and peak memory. In-process."""
    from .runtimes.pipeline import EdgeLLaVA

    t = time.perf_counter()
    model = EdgeLLaVA.load(bundle, device=settings.device, vision_variant=vision, llm_variant=llm,
                           threads=settings.threads, n_ctx=settings.n_ctx)
    load_s = time.perf_counter() - t
    try:
        for _ in range(settings.warmup):
            time_chat_pass(model, image, settings.question, settings.decode_tokens)
        runs = [time_chat_pass(model, image, settings.question, settings.decode_tokens)
                for _ in range(settings.runs)]
        seen = time_seen_image(model, image, settings)
        providers = [str(x) for x in getattr(model.vision, "providers", []) or []]
        explain = getattr(model, "explain", None)  # the device profile's choices, where the runtime has them
        plan = explain() if callable(explain) else None
    finally:
        model.close()
    return {"vision": vision, "llm": llm, "load_s": load_s, **medians(runs), "peak_memory_mb": peak_memory_mb(),
            "ttft_seen_image_ms": statistics.median(r["ttft_ms"] for r in seen) if seen else None,
            "vision_providers": providers, "plan": plan, "runs": runs, "seen_image_runs": seen}


def time_seen_image(model, image, settings: BenchSettings) -> list[dict]:
    """Passes asking about a picture asked about before, the KV cache emptied as in a new process.

    The first (untimed) pass asks another question and saves the KV cache through the image after its
    answer (``runtimes/prefix_cache.py``); each timed pass loads it, runs no vision graph and decodes
    its question. Files go to a temporary directory, not the user's cache. Empty where the runtime
    saves no images (layers offloaded to a GPU, or the prefix cache off).
    """
    cache = model.prefix_cache
    if cache is None or not cache.images:
        return []
    with tempfile.TemporaryDirectory(prefix="llava-edge-bench-kv-") as tmp, \
            model.using_prefix_cache(cache.with_settings(directory=Path(tmp))):
        time_chat_pass(model, image, OTHER_QUESTION, 1, saved_image=True)
        return [time_chat_pass(model, image, settings.question, settings.decode_tokens, saved_image=True)
                for _ in range(settings.runs)]


def measure_pair_isolated(bundle: str | Path, vision: str, llm: str, settings: BenchSettings,
                          image: str | Path) -> dict:
    """:func:`measure_pair` in a fresh Python process: its own peak memory, no warm state from other pairs."""
    with tempfile.TemporaryDirectory(prefix="llava-edge-bench-") as tmp:
        out = Path(tmp) / "result.json"
        job = {"bundle": str(bundle), "vision": vision, "llm": llm, "settings": asdict(settings),
               "image": str(image), "out": str(out)}
        proc = subprocess.run([sys.executable, "-m", "llava_edge.bench", json.dumps(job)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0 or not out.is_file():
            lines = [x for x in proc.stderr.strip().splitlines() if x.strip()]
            why = lines[-1] if lines else f"exit status {proc.returncode}"
            raise UserError(f"benchmark of {vision}:{llm} failed: {why.removeprefix('error: ')}")
        return json.loads(out.read_text())


def _worker(job_json: str) -> int:
    job = json.loads(job_json)
    try:
        result = measure_pair(job["bundle"], job["vision"], job["llm"], BenchSettings(**job["settings"]), job["image"])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    Path(job["out"]).write_text(json.dumps(result))
    return 0


# -- the machine -------------------------------------------------------------------------------------


def machine_info() -> dict:
    """CPU model, cores, memory, OS and Python: what a benchmark result is only valid for."""
    info = {"cpu": platform.processor() or platform.machine(), "logical_cpus": os.cpu_count(),
            "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "os": platform.platform(), "python": platform.python_version()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["memory_gb"] = round(int(line.split()[1]) * 1024 / 1e9, 1)
                break
    except OSError:
        pass
    return info


def versions(packages: tuple[str, ...] = VERSION_PACKAGES) -> dict:
    """Installed versions, read from package metadata (nothing is imported: no torch here)."""
    out = {}
    for p in packages:
        try:
            out[p] = metadata.version(_DIST_NAMES.get(p, p))
        except metadata.PackageNotFoundError:
            out[p] = None
    return out


class CpuShare:
    """How much of the machine's CPU other processes used while a block ran (0: idle machine, 1: all of it).

    Read from ``/proc/stat`` (all CPUs' busy time) minus this process's own CPU time and its
    children's; ``None`` where /proc is missing. A busy machine slows every contestant, so only ratios
    measured interleaved in the same run mean anything then.
    """

    def __enter__(self) -> "CpuShare":
        self.share: float | None = None
        self._start = (time.monotonic(), _busy_seconds(), _own_seconds(), os.getloadavg()[0])
        return self

    def __exit__(self, *exc) -> None:
        t0, busy0, own0, self.load_start = self._start
        wall, busy = time.monotonic() - t0, _busy_seconds()
        self.load_end = os.getloadavg()[0]
        if busy is not None and busy0 is not None and wall > 0:
            others = (busy - busy0) - (_own_seconds() - own0)
            self.share = min(1.0, max(0.0, others / (wall * (os.cpu_count() or 1))))

    def to_dict(self) -> dict:
        return {"other_cpu_share": None if self.share is None else round(self.share, 3),
                "load_average_start": round(self.load_start, 2), "load_average_end": round(self.load_end, 2)}


def _busy_seconds() -> float | None:
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    guest = sum(fields[8:10]) if len(fields) > 9 else 0  # guest time is already counted in user/nice
    return (sum(fields) - idle - guest) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


# -- the command -------------------------------------------------------------------------------------


def run_bench(bundle: str | Path, settings: BenchSettings | None = None, variants: str | None = None,
              image: str | Path | None = None, json_out: str | Path | None = None,
              log: Callable[[str], None] = print) -> dict:
    """Benchmark every requested pair of ``bundle``; returns the report (also written to ``json_out``)."""
    settings = settings or BenchSettings()
    settings.validate()
    bundle = Path(bundle)
    m = bundle_manifest.read(bundle)
    pairs = parse_pairs(variants, m)
    if image is not None and not Path(image).is_file():
        raise UserError(f"--image {image} is not a file")
    if json_out is not None and Path(json_out).is_dir():
        raise UserError(f"--json {json_out} is a directory; give a file name")
    results = []
    with tempfile.TemporaryDirectory(prefix="llava-edge-bench-") as tmp, CpuShare() as busy:
        img = Path(image) if image is not None else write_bench_image(Path(tmp) / "bench.jpg")
        for vision, llm in pairs:
            log(f"bench {vision}:{llm}: {settings.warmup} warm-up + {settings.runs} runs")
            results.append(measure_pair_isolated(bundle, vision, llm, settings, img))
            r = results[-1]
            log(f"  ttft {r['ttft_ms']:.0f} ms, vision {r['vision_encode_ms']:.0f} ms, "
                f"decode {r['decode_tokens_per_s']:.1f} tok/s")
    report = {
        "bundle": str(bundle.resolve()),
        "machine": machine_info(),
        "versions": versions(),
        "settings": {**asdict(settings), "image": str(image) if image else f"rendered JPEG {BENCH_IMAGE_SIZE}"},
        "busy": busy.to_dict(),
        "metrics": {k: UNITS[k] for k in METRICS},
        "results": results,
    }
    if json_out is not None:
        atomic.write_json(json_out, report)
    return report


def format_table(report: dict) -> str:
    """The medians as a Markdown table (one row per pair), with the machine and how busy it was."""
    head = ["vision", "llm", "preprocess ms", "vision ms", "prefill tok/s", "TTFT ms", "TTFT, image seen ms",
            "decode tok/s", "peak MB"]
    seen = lambda r: "-" if r.get("ttft_seen_image_ms") is None else f"{r['ttft_seen_image_ms']:.0f}"  # noqa: E731
    rows = [[r["vision"], r["llm"], f"{r['preprocess_ms']:.1f}", f"{r['vision_encode_ms']:.1f}",
             f"{r['prefill_tokens_per_s']:.1f}", f"{r['ttft_ms']:.0f}", seen(r), f"{r['decode_tokens_per_s']:.2f}",
             f"{r['peak_memory_mb']:.0f}"] for r in report["results"]]
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    out = [line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)]
    mach, s, b = report["machine"], report["settings"], report["busy"]
    share = b.get("other_cpu_share")
    out.append(f"\n{mach.get('cpu')}, {mach.get('usable_cpus')} CPUs, {mach.get('memory_gb', '?')} GB; "
               f"medians of {s['runs']} runs after {s['warmup']} warm-up; "
               f"prompt {report['results'][0]['prefill_tokens']:.0f} tokens, {s['decode_tokens']} decoded; "
               f"other processes used {'?' if share is None else f'{share:.0%}'} of the CPU")
    out.append("TTFT, image seen: the same picture asked about again with an empty KV cache, as in a new process "
               "(its cells through the image loaded from the file saved after a first answer; - where the runtime "
               "saves none: layers on a GPU)")
    return "\n".join(out)


if __name__ == "__main__":  # the per-pair worker of measure_pair_isolated
    sys.exit(_worker(sys.argv[1]))
