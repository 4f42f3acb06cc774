"""Which machine this is, which device profile fits it, and what the runtime will run on it (and why).

A *device profile* (``cpu``, ``laptop-gpu``, ``jetson``) decides everything the
runtime can choose for the hardware: onnxruntime execution providers for the
vision graph, llama.cpp GPU offload, threads, llama.cpp batch sizes, a context
cap and which of the bundle's variants to prefer. ``auto`` (the default) picks
the profile from what it finds:

- a Jetson: ``/etc/nv_tegra_release`` (written by L4T/JetPack) or a device-tree
  model or ``compatible`` string naming a Jetson / Tegra (``/proc/device-tree``
  or ``/sys/firmware/devicetree/base``);
- else a GPU the runtime can use: llama.cpp built with GPU offload (CUDA,
  Metal, Vulkan...), or onnxruntime's CUDA/TensorRT provider with an NVIDIA
  driver loaded;
- else the CPU.

:func:`plan_runtime` turns (bundle manifest, profile, explicit overrides,
detected hardware) into a :class:`RuntimePlan` without loading anything heavy;
``RuntimePlan.explain`` is what ``llava-edge chat --explain`` prints. Every
choice carries its reason, so the explanation is the decision log, not a
re-derivation of it.

Torch-free; onnxruntime and llama_cpp are asked what they support, TensorRT only
when the bundle holds an engine a GPU profile would use.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from llava_edge import families
from llava_edge.errors import UserError
from llava_edge.manifest import Manifest, Variant
from llava_edge.quality import VISION_VARIANT_MIN_COSINE

DEVICES = ("auto", "cpu", "laptop-gpu", "jetson")
CPU_EP, CUDA_EP, TENSORRT_EP = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"
# A quantized vision variant whose worst image token is below VISION_VARIANT_MIN_COSINE against fp32 (recorded
# by `llava-edge quantize` as its quality against fp32) is never chosen without being named.

# -- the hardware ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class JetsonInfo:
    model: str | None  # "NVIDIA Jetson Orin Nano Developer Kit", from the device tree
    l4t: str | None  # "35.4.1", from /etc/nv_tegra_release
    evidence: str  # the file that said so


@dataclass(frozen=True)
class Hardware:
    jetson: JetsonInfo | None
    nvidia_driver: bool  # an NVIDIA kernel driver is loaded (/proc/driver/nvidia/version or /dev/nvidia0)
    ort_providers: tuple[str, ...]  # onnxruntime.get_available_providers()
    llama_gpu_offload: bool  # llama_cpp.llama_supports_gpu_offload()
    llama_backends: tuple[str, ...]  # backends llama.cpp was built with, from llama_print_system_info
    cpus: int  # logical CPUs this process may run on
    physical_cores: int
    tensorrt_python: bool  # TensorRT's Python package is importable (not imported here)
    ort_packages: tuple[str, ...] | None = None  # installed onnxruntime distributions (None: not looked at)
    llama_cpu_features: tuple[str, ...] = ()  # what llama.cpp's CPU backend was built to use ("AVX2", "AVX512_BF16")
    # where that includes AMX_INT8: whether its AMX buffer multiplies batches correctly in this build, and why
    # (llama_amx.amx_batches_work); None: not asked
    llama_amx_batches: tuple[bool, str] | None = None

    def describe(self) -> str:
        parts = []
        if self.jetson:
            j = self.jetson
            parts.append(f"Jetson ({j.model or 'model unknown'}{f', L4T {j.l4t}' if j.l4t else ''}; {j.evidence})")
        parts.append(f"{self.physical_cores} physical cores / {self.cpus} CPUs")
        parts.append("NVIDIA driver loaded" if self.nvidia_driver else "no NVIDIA driver")
        if self.ort_packages == ():
            parts.append("onnxruntime not installed")
        else:
            parts.append("onnxruntime providers: " + ", ".join(self.ort_providers))
            if self.ort_packages and len(self.ort_packages) > 1:
                parts.append("onnxruntime packages: " + ", ".join(self.ort_packages) + " (conflict)")
        parts.append("llama.cpp backends: " + (", ".join(self.llama_backends) or "?")
                     + ("; GPU offload supported" if self.llama_gpu_offload else "; no GPU offload")
                     + ("; bf16 dot products (AVX512_BF16)" if BF16_CPU_FEATURE in self.llama_cpu_features else "")
                     + (f"; AMX batches {'work' if self.llama_amx_batches[0] else 'broken'}"
                        if self.llama_amx_batches is not None else ""))
        parts.append("TensorRT Python package " + ("present" if self.tensorrt_python else "absent"))
        return "; ".join(parts)


def _read_text(path: Path) -> str | None:
    try:
        return path.read_bytes().replace(b"\0", b"\n").decode("utf-8", "replace").strip()
    except OSError:
        return None


def read_jetson(root: str | Path = "/") -> JetsonInfo | None:
    """A Jetson's model and L4T release, or ``None`` on anything else. ``root`` lets tests fake the files."""
    root = Path(root)
    model = compatible = None
    for base in ("proc/device-tree", "sys/firmware/devicetree/base"):
        model = model or _read_text(root / base / "model")
        compatible = compatible or _read_text(root / base / "compatible")
    release = _read_text(root / "etc/nv_tegra_release")
    l4t = None
    if release:  # "# R35 (release), REVISION: 4.1, GCID: ..."
        m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", release)
        l4t = f"{m.group(1)}.{m.group(2)}" if m else None
    if release is not None:
        evidence = "/etc/nv_tegra_release"
    elif model and re.search(r"jetson", model, re.I):
        evidence = "device-tree model"
    elif compatible and "nvidia,tegra" in compatible.lower():
        evidence = "device-tree compatible nvidia,tegra"
    else:
        return None
    return JetsonInfo(model=model.splitlines()[0] if model else None, l4t=l4t, evidence=evidence)


def nvidia_driver_loaded(root: str | Path = "/") -> bool:
    root = Path(root)
    return (root / "proc/driver/nvidia/version").exists() or (root / "dev/nvidia0").exists()


def usable_cpus() -> set[int]:
    if hasattr(os, "sched_getaffinity"):
        return set(os.sched_getaffinity(0))
    return set(range(os.cpu_count() or 1))


def physical_cores(cpus: set[int], root: str | Path = "/") -> int:
    """Cores (not SMT threads) among ``cpus``, from sysfs topology; ``len(cpus)`` where sysfs says nothing.

    llama.cpp's own default is one thread per physical core: token generation is
    memory-bound and a second hyper-thread on a core mostly contends for it.
    """
    seen = set()
    for c in cpus:
        topo = Path(root) / f"sys/devices/system/cpu/cpu{c}/topology"
        pkg, core = _read_text(topo / "physical_package_id"), _read_text(topo / "core_id")
        if pkg is None or core is None:
            return len(cpus)
        seen.add((pkg, core))
    return max(1, len(seen))


def llama_system_info() -> str:
    """llama.cpp's ``llama_print_system_info``: "CUDA : ARCHS = 890 | ... | CPU : SSE3 = 1 | AVX2 = 1 | ..."."""
    import llama_cpp

    info = llama_cpp.llama_print_system_info()
    return info.decode("utf-8", "replace") if isinstance(info, bytes) else str(info)


def llama_capabilities(info: str | None = None) -> tuple[bool, tuple[str, ...]]:
    """(GPU offload supported, backends llama.cpp was built with); ``info``: :func:`llama_system_info`'s text."""
    import llama_cpp

    # each backend's features start with "NAME : "
    info = llama_system_info() if info is None else info
    backends = tuple(dict.fromkeys(re.findall(r"(?:^|\|\s*)([A-Za-z][\w-]*) : ", info)))
    return bool(llama_cpp.llama_supports_gpu_offload()), backends


AMX_CPU_FEATURE = "AMX_INT8"
EXTRA_BUFFERS_ENV = "LLAVA_EDGE_LLAMA_EXTRA_BUFFERS"


def extra_buffers(features: tuple[str, ...], env: dict | None = None,
                  amx_probe: Callable[[], tuple[bool, str]] | None = None) -> tuple[bool, str]:
    """Whether llama.cpp may load weights into its extra buffer types (``use_extra_bufts``), and why.

    Where its CPU backend has AMX, llama.cpp moves Q4_0/Q8_0/K-quant/IQ4_XS weights into AMX buffers, which
    prefill 3.5x and decode 1.7x faster than the same weights loaded plain on a 2-vCPU Xeon (docs/BENCHMARKS.md)
    but crash every batch of more than one token in builds that drop the tile configuration (llama.cpp#20824).
    ``amx_probe`` (default: :func:`llama_amx.amx_batches_work`, run once per build) tells them apart; where it
    answers no, every extra buffer type is off, CPU_REPACK's interleaved layouts with it (measured at TinyLLaVA
    size: Q4_K_M prefills 1.5-1.6x faster and decodes at 0.76-0.81x, "4-bit types on the CPU").
    ``$LLAVA_EDGE_LLAMA_EXTRA_BUFFERS`` = 1 or 0 decides instead.
    """
    env = os.environ if env is None else env
    asked = (env.get(EXTRA_BUFFERS_ENV) or "").strip()
    if asked in ("0", "1"):
        return asked == "1", f"${EXTRA_BUFFERS_ENV}={asked}"
    if asked:
        raise UserError(f"${EXTRA_BUFFERS_ENV} must be 0 or 1, not {asked!r}")
    if AMX_CPU_FEATURE not in features:
        return True, "llama.cpp's default (no AMX in its CPU backend)"
    if amx_probe is None:
        from .llama_amx import amx_batches_work as amx_probe
    works, why = amx_probe()
    if works:
        return True, f"on, AMX included: {why}"
    return False, (f"off because llama.cpp's CPU backend has {AMX_CPU_FEATURE} and {why}; "
                   f"${EXTRA_BUFFERS_ENV}=1 turns them on")


def llama_cpu_features(info: str) -> tuple[str, ...]:
    """The features llama.cpp's CPU backend was built to use (``NAME = 1`` after ``CPU :`` in ``info``)."""
    cpu = info.split("CPU :", 1)[1] if "CPU :" in info else ""
    cpu = re.split(r"\|\s*[A-Za-z][\w-]* : ", cpu)[0]  # up to the next backend, if any
    return tuple(re.findall(r"([A-Z][A-Z0-9_]*) = 1\b", cpu))


def detect_hardware(root: str | Path = "/") -> Hardware:
    """What this machine offers the runtime. ``root`` replaces ``/`` for the files read (tests)."""
    from .vision import onnxruntime_packages

    try:
        import onnxruntime as ort

        providers, packages = tuple(ort.get_available_providers()), onnxruntime_packages()
    except ImportError:  # said when a vision graph is loaded (VisionEncoder), and in --explain
        providers, packages = (), ()
    info = llama_system_info()
    offload, backends = llama_capabilities(info)
    features = llama_cpu_features(info)
    amx = None
    if AMX_CPU_FEATURE in features:
        from .llama_amx import amx_batches_work

        amx = amx_batches_work()
    cpus = usable_cpus()
    return Hardware(
        jetson=read_jetson(root),
        nvidia_driver=nvidia_driver_loaded(root),
        ort_providers=providers,
        llama_gpu_offload=offload,
        llama_backends=backends,
        cpus=len(cpus),
        physical_cores=physical_cores(cpus, root),
        tensorrt_python=importlib.util.find_spec("tensorrt") is not None,
        ort_packages=packages,
        llama_cpu_features=features,
        llama_amx_batches=amx,
    )


# -- the profiles ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Profile:
    name: str
    purpose: str
    providers: tuple[str, ...]  # onnxruntime execution providers in order of preference (CPU always last)
    gpu_offload: bool  # offload every llama.cpp layer where llama.cpp was built with a GPU backend
    n_batch: int  # llama.cpp logical batch (tokens per llama_decode call)
    n_ubatch: int  # llama.cpp physical batch (tokens per compute graph)
    max_ctx: int  # context cap when none is asked for (KV cache memory)
    vision_preference: tuple[str, ...]  # variant names, best first; then the bundle's default
    llm_preference: tuple[str, ...]


# Q4_K_M: llama.cpp's usual size/quality point for edge chat (about 4.8 bits per weight).
_LLM_EDGE = ("q4_k_m", "q4_k_s", "q5_k_m", "q5_k_s", "q6_k", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
# Unquantized, a bf16 GGUF is preferred where llama.cpp's CPU matmuls use bf16 dot products: TinyLLaVA-1.1B on
# 2 Zen 4 cores prefills 1.6-1.75x faster than with f16 and decodes at 0.83-0.98x of its speed (`llava-edge bench`,
# docs/BENCHMARKS.md), so the first token comes 1.5-1.65x sooner. Elsewhere the bundle's default.
BF16_CPU_FEATURE = "AVX512_BF16"
# 4-bit GGUF types, fastest decode first, measured with llama.cpp's kernels for (CPU feature, whether its extra
# buffer types are on) by bench/cpu_q4.py (docs/BENCHMARKS.md, "4-bit types on the CPU"); the first row that
# matches wins. AMX on: Q4_0, the K-quants and IQ4_XS in llama.cpp's AMX buffer, IQ4_NL in CPU_REPACK, measured
# on an AMX Xeon at the LLaVA-OneVision-0.5B shape (Q4_0 decodes 1.6x and prefills 3x as fast as Q4_K_M there).
# AVX-512 on: Q4_0, IQ4_NL and the K-quants are repacked into interleaved layouts (CPU_REPACK), measured on AMD
# Zen 4 (AVX-512 without AMX); off: llama.cpp's plain vec_dot kernels, measured on an AMX Xeon whose build
# crashed AMX batches. Where the CPU matches no row, llama.cpp's usual size/quality point, Q4_K_M, leads.
CPU_Q4_FASTEST: dict[tuple[str, bool], tuple[str, ...]] = {
    ("AMX_INT8", True): ("q4_0", "iq4_xs", "iq4_nl", "q4_k_s", "q4_k_m"),
    ("AVX512", True): ("q4_k_m", "q4_k_s", "iq4_nl", "q4_0", "iq4_xs"),
    ("AVX512", False): ("q4_k_m", "q4_k_s", "iq4_xs", "q4_0", "iq4_nl"),
}

PROFILES: dict[str, Profile] = {
    "cpu": Profile(
        name="cpu", purpose="CPU only: onnxruntime's CPU provider, llama.cpp on all physical cores",
        providers=(CPU_EP,), gpu_offload=False, n_batch=512, n_ubatch=512, max_ctx=4096,
        # int8 matmuls are what a CPU runs fastest; fp16 ONNX has few fast CPU kernels (casts around them).
        # Dynamic int8 before static QDQ: at CLIP-L/336 on 2 Zen 4 cores 0.72 s against 1.24 s (fp32 2.00 s),
        # and closer to fp32 (docs/BENCHMARKS.md, TinyLLaVA section)
        vision_preference=("int8", "int8-static", "fp32"),
        llm_preference=_LLM_EDGE,
    ),
    "laptop-gpu": Profile(
        name="laptop-gpu", purpose="a discrete GPU: onnxruntime's CUDA provider, every llama.cpp layer offloaded",
        providers=(CUDA_EP, CPU_EP), gpu_offload=True, n_batch=2048, n_ubatch=512, max_ctx=4096,
        # a TensorRT engine when one was built for this GPU, else fp16 on CUDA (tensor cores)
        vision_preference=("trt-fp16", "fp16", "fp32"),
        llm_preference=_LLM_EDGE,
    ),
    "jetson": Profile(
        name="jetson", purpose="NVIDIA Jetson: TensorRT for vision, llama.cpp offloaded to the integrated GPU",
        providers=(TENSORRT_EP, CUDA_EP, CPU_EP), gpu_offload=True, n_batch=512, n_ubatch=512, max_ctx=2048,
        # GPU and CPU share the board's memory: a smaller context keeps the KV cache small
        vision_preference=("trt-fp16", "fp16", "fp32"),
        llm_preference=_LLM_EDGE,
    ),
}


def pick_profile(device: str, hw: Hardware) -> tuple[Profile, str]:
    """The profile for ``device`` (one of :data:`DEVICES`) and why."""
    device = (device or "auto").strip().lower()
    if device not in DEVICES:
        raise UserError(f"unknown device {device!r}; choose one of: {', '.join(DEVICES)}")
    if device != "auto":
        return PROFILES[device], f"asked for (--device {device})"
    if hw.jetson:
        return PROFILES["jetson"], f"auto: a Jetson ({hw.jetson.evidence})"
    gpu_ep = [p for p in (CUDA_EP, TENSORRT_EP) if p in hw.ort_providers]
    if hw.llama_gpu_offload:
        return PROFILES["laptop-gpu"], (f"auto: llama.cpp can offload to a GPU "
                                         f"({', '.join(b for b in hw.llama_backends if b != 'CPU') or 'GPU backend'})")
    if gpu_ep and hw.nvidia_driver:
        return PROFILES["laptop-gpu"], f"auto: onnxruntime has {gpu_ep[0]} and an NVIDIA driver is loaded"
    why = "no Jetson, llama.cpp built without GPU offload"
    if gpu_ep:
        why += f", {gpu_ep[0]} present but no NVIDIA driver loaded"
    else:
        why += ", no CUDA/TensorRT provider in onnxruntime"
    return PROFILES["cpu"], f"auto: {why}"


# -- variants ---------------------------------------------------------------------------------------------------------
def _find(m: Manifest, kind: str, name: str) -> Variant | None:
    found = m.find(kind, name=name)
    return found[0] if found else None


def _names(m: Manifest, kind: str) -> str:
    return ", ".join(v.name for v in m.find(kind)) or "none"


def vision_quality_problem(v: Variant) -> str | None:
    """Why a quantized vision variant is too far from fp32 to pick by default (``None``: fine or unmeasured)."""
    rec = v.extra.get("quality")
    if not isinstance(rec, dict) or rec.get("against") != "fp32":
        return None
    worst = rec.get("min_cosine")
    if not isinstance(worst, (int, float)) or isinstance(worst, bool):
        return None if worst is None else "its recorded quality is not a number"
    if not worst >= VISION_VARIANT_MIN_COSINE:  # NaN included
        return f"worst image token cosine vs fp32 {worst:.4f} < {VISION_VARIANT_MIN_COSINE}"
    return None


def cpu_llm_preference(features: tuple[str, ...], extra: bool) -> tuple[tuple[str, ...], str]:
    """The cpu profile's language-model order for llama.cpp's CPU ``features`` with extra buffer types ``extra``:
    the measured 4-bit order first, then the rest of the edge list; and why."""
    for (feature, with_extra), order in CPU_Q4_FASTEST.items():
        if feature in features and with_extra == extra:
            rest = tuple(n for n in _LLM_EDGE if n not in order)
            return order + rest, (f"4-bit types in the order measured fastest to decode with llama.cpp's {feature} "
                                  f"kernels, extra buffer types {'on' if extra else 'off'}")
    return _LLM_EDGE, "no 4-bit speed measured for this CPU's kernels: llama.cpp's usual Q4_K_M first"


def llm_drift_problem(m: Manifest, v: Variant) -> str | None:
    """A 4-bit variant that failed its drift gate (``drift --record``) is not picked unasked."""
    for other, rec in m.drift_records(v).items():
        failed = [g for g, ok in (rec.get("gates") or {}).items() if ok is False]
        if failed:
            return f"it failed the drift gate {', '.join(failed)} with vision {other} ({rec.get('date')})"
    return None


def reduced_problem(v: Variant) -> str | None:
    """A reduced-token vision variant is never picked unasked: it changes what the model sees."""
    r = v.token_reduction
    return None if r is None else f"it gives {r.tokens} image tokens of {r.full} (ask for it with --image-tokens)"


def choose_reduced(m: Manifest, tokens: int | None, method: str | None, preference: tuple[str, ...],
                   problem: Callable[[Variant], str | None]) -> tuple[Variant, str]:
    """The vision variant giving ``tokens`` image positions (by ``method`` if given), and why.

    Among those, what decides accuracy first: a projector fine-tuned for the reduction, then the least accuracy
    lost in the variant's drift record (``drift --record``), else ``pool`` before ``dominant`` (training-free
    on the trained toy, pooling lost 2.0 / 9.5 points at 32 / 16 of 64 tokens, selection 14.0 / 19.5: see
    docs/BENCHMARKS.md; VisionZip reports the opposite on LLaVA-1.5, so measure a real model with drift);
    then speed: a type within its quality limit, in the profile's type order (``int8-pool144`` is int8).
    """
    from llava_edge.image_tokens import METHODS

    full = int(m.vision["num_image_tokens"])
    if method is not None and method not in METHODS:
        raise UserError(f"unknown --token-method {method!r}; valid: {', '.join(METHODS)}")
    if tokens is not None and tokens == full and method is None:
        return choose_variant(m, "vision", None, preference, lambda v: problem(v) or reduced_problem(v),
                              "--vision-variant")
    found = [v for v in m.find("vision") if v.token_reduction is not None
             and (tokens is None or v.token_reduction.tokens == tokens)
             and (method is None or v.token_reduction.method == method)]
    have = sorted({f"{v.token_reduction.tokens} ({v.token_reduction.method})" for v in m.find("vision")
                   if v.token_reduction is not None})
    asked = " ".join(x for x in (f"{tokens} image tokens" if tokens else "", f"by {method}" if method else "") if x)
    if not found:
        raise UserError(f"the bundle has no vision variant with {asked}; it has "
                        f"{', '.join(have) or 'only the full ' + str(full)} (make one: llava-edge quantize BUNDLE "
                        f"--image-tokens {tokens or 'K'} --token-method {method or 'pool'})")
    usable = [v for v in found if not problem(v)]
    if not usable:
        raise UserError(f"no vision variant with {asked} can run here: "
                        + "; ".join(f"{v.name}: {problem(v)}" for v in found))

    def rank(v: Variant) -> tuple:
        kind = v.extra.get("type", v.precision)
        pref = preference.index(kind) if kind in preference else len(preference)
        drops = [r.get("accuracy_drop_points") for r in m.drift_records(v).values()]
        drops = [d for d in drops if isinstance(d, (int, float)) and not isinstance(d, bool)]
        drop = min(drops) if drops else None
        return ("projector" not in v.extra, drop if isinstance(drop, (int, float)) else float("inf"),
                METHODS.index(v.token_reduction.method), vision_quality_problem(v) is not None, pref)

    v = min(usable, key=rank)
    why = (f"asked for {asked}; of {', '.join(x.name for x in found)}: a projector tuned for the reduction first, "
           "then the least accuracy lost in the bundle's drift record (else pool before dominant), then a type "
           f"within its quality limit in the profile's order {' > '.join(preference)}")
    return v, why


def choose_variant(m: Manifest, kind: str, requested: str | None, preference: tuple[str, ...],
                   problem: Callable[[Variant], str | None], flag: str,
                   avoid: Callable[[Variant], str | None] | None = None) -> tuple[Variant, str]:
    """The variant of ``kind`` to load and why.

    ``requested`` (a name as ``quantize``/``export`` gave it, any case) wins, or is
    an error listing the bundle's names. Otherwise the first of ``preference``
    present in the bundle for which ``problem`` says nothing; otherwise the
    bundle's default (the first portable variant ``problem`` accepts). ``avoid``: why a preferred variant is
    passed over (it still runs: a measured quality problem), like a vision graph below its cosine limit.
    """
    if not any(v.kind == kind for v in m.variants):
        raise UserError(f"the bundle has no {kind} variant; export one first")
    if requested:
        v = _find(m, kind, requested)
        if v is None:
            raise UserError(f"no {kind} variant {requested!r} in the bundle ({flag}); it has: {_names(m, kind)}")
        why_not = problem(v)
        if why_not:
            raise UserError(f"{kind} variant {v.name} cannot run here: {why_not}")
        return v, f"asked for ({flag} {v.name})"
    skipped = []
    for name in preference:
        v = _find(m, kind, name)
        if v is None:
            continue
        why_not = (problem(v) or (vision_quality_problem(v) if kind == "vision" else None)
                   or (avoid(v) if avoid else None))
        if why_not:
            skipped.append(f"{v.name}: {why_not}")
            continue
        return v, (f"the profile prefers {' > '.join(preference)}; the bundle has {_names(m, kind)}"
                   + (f"; skipped {'; '.join(skipped)}" if skipped else ""))
    for v in m.variants:
        if v.kind == kind and not v.device_specific and not problem(v):
            lead = "none of the profile's choices" if not skipped else "no usable choice of the profile"
            return v, (f"{lead} ({', '.join(preference)}) in the bundle, which has {_names(m, kind)}: "
                       "its default" + (f"; skipped {'; '.join(skipped)}" if skipped else ""))
    raise UserError(f"no {kind} variant of this bundle can run here ({'; '.join(skipped) or _names(m, kind)})")


# -- the plan ---------------------------------------------------------------------------------------------------------
Provider = str | tuple[str, dict]


@dataclass
class RuntimePlan:
    """Everything chosen for one load, each with its reason."""

    profile: Profile
    profile_why: str
    hardware: Hardware
    vision: Variant
    vision_why: str
    vision_backend: str  # "onnxruntime" or "tensorrt"
    providers: list[Provider]
    providers_why: str
    llm: Variant
    llm_why: str
    n_gpu_layers: int  # -1: all (llama.cpp: "a negative value means all layers")
    offload_why: str
    threads: int
    threads_why: str
    n_batch: int
    n_ubatch: int
    n_ctx: int
    ctx_why: str
    kv_cache: str
    notes: list[str] = field(default_factory=list)
    extra_buffers: bool = True  # llama.cpp's use_extra_bufts: repacked (AMX, CPU_REPACK) weight layouts
    extra_buffers_why: str = "llama.cpp's default"
    position_cap: int | None = None  # a tiled family's --image-tokens: the most positions a picture takes

    def provider_names(self) -> list[str]:
        return [p if isinstance(p, str) else p[0] for p in self.providers]

    def explain(self, running_providers: list[str] | None = None) -> str:
        """What was chosen and why, one item a line (``llava-edge chat --explain``)."""
        v, lm = self.vision, self.llm
        layers = "all" if self.n_gpu_layers < 0 else str(self.n_gpu_layers)
        lines = [
            f"hardware: {self.hardware.describe()}",
            f"profile: {self.profile.name} - {self.profile.purpose} ({self.profile_why})",
            f"vision variant: {v.name} ({v.file}, {v.precision}) - {self.vision_why}",
        ]
        if self.vision_backend == "tensorrt":
            lines.append("vision backend: TensorRT engine (TensorRTVisionEncoder) - the variant is an engine "
                         f"built for {v.extra.get('gpu', '?')}, TensorRT {v.extra.get('tensorrt_version', '?')}")
        else:
            used = running_providers or self.provider_names()
            lines.append(f"vision backend: onnxruntime, providers {', '.join(used)} - {self.providers_why}")
            if running_providers and running_providers[0] != self.provider_names()[0]:
                lines.append(f"  note: onnxruntime could not start {self.provider_names()[0]}; it runs on "
                             f"{running_providers[0]}")
        lines += [
            f"language model variant: {lm.name} ({lm.file}, {lm.precision}) - {self.llm_why}",
            f"llama.cpp GPU layers: {layers} - {self.offload_why}",
            f"threads: {self.threads} - {self.threads_why}",
            f"llama.cpp batch: {self.n_batch} (micro-batch {self.n_ubatch}) - profile {self.profile.name}",
            f"context: {self.n_ctx} tokens - {self.ctx_why}; KV cache {self.kv_cache}",
            f"llama.cpp repacked weight layouts: {'on' if self.extra_buffers else 'off'} - {self.extra_buffers_why}",
        ]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def engine_problem_finder(platform: Callable[[], dict] | None = None) -> Callable[[Variant], str | None]:
    """``variant -> why it cannot run here`` for TensorRT engines (``None`` for ONNX/GGUF and runnable engines).

    ``platform`` returns the running TensorRT version / GPU / compute capability
    (default: ``tensorrt_vision.running_platform``); it is called once, and only
    when an engine is considered.
    """
    from .tensorrt_vision import engine_mismatch, running_platform

    cache: list = []

    def problem(v: Variant) -> str | None:
        if not v.device_specific:
            return None
        if not cache:
            try:
                cache.append((platform or running_platform)())
            except UserError as e:
                cache.append(str(e))
            except Exception as e:  # noqa: BLE001 - cuda-python raises RuntimeError without a GPU, others vary
                cache.append(f"no usable CUDA GPU ({str(e).splitlines()[0] if str(e) else type(e).__name__})")
        running = cache[0]
        if isinstance(running, str):
            return running
        return engine_mismatch(v.extra, running)

    return problem


def trt_cache_dir(v: Variant) -> Path:
    """Where onnxruntime's TensorRT provider keeps the engines it builds for ``v`` (the bundle may be read-only)."""
    from llava_edge.cache_dir import default_cache_dir

    return default_cache_dir() / "ort-tensorrt" / v.sha256[:16]


def onnx_providers(profile: Profile, hw: Hardware, v: Variant) -> tuple[list[Provider], str]:
    """onnxruntime providers (with options) for the ONNX variant ``v`` under ``profile``, and why."""
    wanted = list(profile.providers)
    why = []
    if TENSORRT_EP in wanted and v.precision not in ("fp32", "fp16"):
        wanted.remove(TENSORRT_EP)  # onnxruntime's int8/int4 quantization ops are not TensorRT layers
        why.append(f"TensorRT provider not used for a {v.precision} graph (onnxruntime quantization ops)")
    missing = [p for p in wanted if p not in hw.ort_providers]
    if missing:
        why.append(f"{', '.join(missing)} not in this onnxruntime (GPU providers come with onnxruntime-gpu: "
                   "pip install 'llava-edge[gpu]'; on a Jetson the onnxruntime-gpu wheel for its JetPack)")
    elif CUDA_EP in wanted and not hw.nvidia_driver and not hw.jetson:
        why.append("no NVIDIA driver found: onnxruntime falls back to the CPU if the GPU provider cannot start")
    chosen: list[Provider] = []
    for p in wanted:
        if p not in hw.ort_providers:
            continue
        if p == TENSORRT_EP:
            cache = trt_cache_dir(v)
            chosen.append((p, {"trt_fp16_enable": v.precision == "fp16", "trt_engine_cache_enable": True,
                               "trt_engine_cache_path": str(cache)}))
            why.append(f"TensorRT builds its engine on first use and caches it in {cache}")
        else:
            chosen.append(p)
    if CPU_EP not in chosen:
        chosen.append(CPU_EP)
    lead = f"profile {profile.name} asks for {', '.join(profile.providers)}"
    return chosen, "; ".join([lead, *why])


MAX_THREADS_PER_CPU = 4  # more threads than this only spin; tens of thousands take a machine down


TEXT_ROOM = 1024  # positions the context keeps for the conversation's text beside the largest picture


def plan_runtime(m: Manifest, device: str = "auto", *, vision_variant: str | None = None,
                 llm_variant: str | None = None, hardware: Hardware | None = None, threads: int = 0,
                 n_gpu_layers: int | None = None, n_ctx: int | None = None, n_batch: int | None = None,
                 vision_providers: list[Provider] | None = None, kv_cache: str = "f16",
                 trt_platform: Callable[[], dict] | None = None, image_tokens: int | None = None,
                 token_method: str | None = None) -> RuntimePlan:
    """Choose profile, variants, providers, offload, threads, batch and context for the bundle ``m``.

    Explicit arguments override the profile (each says so in the explanation);
    nothing is loaded here. ``hardware`` and ``trt_platform`` replace detection (tests).
    """
    hw = hardware or detect_hardware()
    profile, profile_why = pick_profile(device, hw)
    notes: list[str] = []
    if hw.ort_packages and len(hw.ort_packages) > 1:
        from .vision import ort_conflict_fix

        notes.append(ort_conflict_fix(hw.ort_packages))
    elif hw.ort_packages == ():
        from .vision import ORT_MISSING

        notes.append(ORT_MISSING)

    engine_problem = engine_problem_finder(trt_platform)

    def vision_problem(v: Variant) -> str | None:
        if v.device_specific and profile.name == "cpu":
            return "it is a TensorRT engine (GPU only) and the device profile is cpu"
        return engine_problem(v)

    vision_preference = profile.vision_preference
    gpu_providers = [p for p in profile.providers if p != CPU_EP]
    cpu_only_onnx = bool(gpu_providers) and not any(p in hw.ort_providers for p in gpu_providers)
    if cpu_only_onnx:  # an ONNX graph would run on the CPU provider anyway: prefer what the CPU runs best
        vision_preference = (tuple(n for n in profile.vision_preference if n.startswith("trt-"))
                             + PROFILES["cpu"].vision_preference)
    family = families.by_name(m.family)
    cap = None  # a tiled family's --image-tokens: a cap in its packing, with whichever vision variant is chosen
    if family.caps_positions and (image_tokens is not None or token_method is not None):
        if token_method is not None:
            raise UserError(f"--token-method chooses among one-tile models' reduced-token variants; {family.title} "
                            "caps a picture's positions (--image-tokens K) by scaling its features bilinearly")
        family.check_cap(image_tokens)
        cap = image_tokens
    if cap is None and (image_tokens is not None or token_method is not None):
        if vision_variant:
            raise UserError("--vision-variant names one variant; --image-tokens/--token-method choose among the "
                            "reduced ones: pass one or the other")
        vision, vision_why = choose_reduced(m, image_tokens, token_method, vision_preference, vision_problem)
    else:
        vision, vision_why = choose_variant(
            m, "vision", vision_variant, vision_preference,
            vision_problem if vision_variant else (lambda v: vision_problem(v) or reduced_problem(v)),
            "--vision-variant")
    if cpu_only_onnx and not vision_variant:
        vision_why += f" (this onnxruntime has no {' or '.join(gpu_providers)}: ONNX variants as for the CPU)"
    lm_on_cpu = n_gpu_layers == 0 if n_gpu_layers is not None else not (profile.gpu_offload and hw.llama_gpu_offload)
    bf16_dots = lm_on_cpu and BF16_CPU_FEATURE in hw.llama_cpu_features
    amx = hw.llama_amx_batches
    extra, extra_why = extra_buffers(hw.llama_cpu_features, amx_probe=None if amx is None else lambda: amx)
    llm_order, order_why = profile.llm_preference, ""
    if profile.name == "cpu" and lm_on_cpu:
        llm_order, order_why = cpu_llm_preference(hw.llama_cpu_features, extra)
    llm_preference = llm_order + (("bf16",) if bf16_dots else ())
    llm, llm_why = choose_variant(m, "llm", llm_variant, llm_preference, lambda _v: None, "--llm-variant",
                                  avoid=lambda v: llm_drift_problem(m, v))
    if order_why and not llm_variant:
        llm_why += f" ({order_why})"
    if bf16_dots and llm.name == "bf16" and not llm_variant:
        llm_why += f" (bf16 before f16/f32: llama.cpp runs bf16 matmuls with this CPU's {BF16_CPU_FEATURE})"

    if vision.device_specific:
        backend, providers, providers_why = "tensorrt", [], "a TensorRT engine runs in TensorRT itself"
    elif vision_providers:
        backend = "onnxruntime"
        providers = [p for p in vision_providers if (p if isinstance(p, str) else p[0]) in hw.ort_providers]
        providers = providers or [CPU_EP]
        providers_why = "asked for"
    else:
        backend = "onnxruntime"
        providers, providers_why = onnx_providers(profile, hw, vision)

    if n_gpu_layers is not None:
        layers, offload_why = n_gpu_layers, "asked for"
        if n_gpu_layers and not hw.llama_gpu_offload:
            notes.append("GPU layers were asked for but this llama.cpp has no GPU offload: they run on the CPU")
    elif not profile.gpu_offload:
        layers, offload_why = 0, f"profile {profile.name} runs the language model on the CPU"
    elif hw.llama_gpu_offload:
        gpu = ", ".join(b for b in hw.llama_backends if b != "CPU") or "a GPU backend"
        layers, offload_why = -1, f"llama.cpp was built with {gpu}: every layer on the GPU"
    else:
        layers, offload_why = 0, ("this llama.cpp was built without GPU offload (reinstall llama-cpp-python with "
                                  "CMAKE_ARGS=\"-DGGML_CUDA=on\", or Metal/Vulkan): CPU only")

    if threads < 0 or threads > MAX_THREADS_PER_CPU * hw.cpus:
        raise UserError(f"--threads {threads} is out of range: 0 (the profile's choice) to "
                        f"{MAX_THREADS_PER_CPU * hw.cpus} ({MAX_THREADS_PER_CPU} per CPU of this machine's {hw.cpus})")
    if threads and threads > 0:
        n_threads, threads_why = int(threads), "asked for (--threads)"
    else:
        n_threads = hw.physical_cores
        threads_why = f"one per physical core ({hw.physical_cores} of {hw.cpus} CPUs), as llama.cpp's default"

    trained = int(m.llm.get("n_ctx_train") or profile.max_ctx)
    if n_ctx:
        if n_ctx < 1:
            raise UserError(f"the context size must be positive, not {n_ctx}")
        ctx, ctx_why = int(n_ctx), "asked for (--ctx)"
        if n_ctx > trained:
            notes.append(f"a context of {n_ctx} is beyond the {trained} tokens the model was trained with")
    else:
        ctx = min(trained, profile.max_ctx)
        ctx_why = f"the model's training context {trained}, capped at {profile.max_ctx} by profile {profile.name}"
        try:
            tokens = m.image_tokens(vision)
        except (KeyError, TypeError, ValueError):
            tokens = None  # the runtime names the missing or malformed count in one line when it loads the graph
        picture = 0 if tokens is None else family.max_positions(m.image, tokens, cap)
        if picture + TEXT_ROOM > ctx and ctx < trained:  # a tiled picture must never overflow the profile's cap
            ctx = min(trained, picture + TEXT_ROOM)
            ctx_why += (f", raised to {ctx}: the largest picture takes {picture} positions and a conversation "
                        f"{TEXT_ROOM} more")

    batch = int(n_batch) if n_batch else profile.n_batch
    if batch < 1:
        raise UserError(f"the batch size must be positive, not {batch}")
    ubatch = min(batch, profile.n_ubatch)
    return RuntimePlan(extra_buffers=extra, extra_buffers_why=extra_why,
                       profile=profile, profile_why=profile_why, hardware=hw, vision=vision, vision_why=vision_why,
                       vision_backend=backend, providers=providers, providers_why=providers_why, llm=llm,
                       llm_why=llm_why, n_gpu_layers=layers, offload_why=offload_why, threads=n_threads,
                       threads_why=threads_why, n_batch=batch, n_ubatch=ubatch, n_ctx=ctx, ctx_why=ctx_why,
                       kv_cache=kv_cache, notes=notes, position_cap=cap)
