"""The runtime on devices: hardware detection, device profiles, variant choice, --explain, context policy,
image inputs, KV reuse (measured), greedy parity with Hugging Face, and the GPU paths where a GPU is present."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torchless import BLOCK_TORCH  # tests/ is on sys.path under pytest

from llava_edge import manifest
from llava_edge.errors import UserError
from llava_edge.manifest import Variant
from llava_edge.runtimes import devices
from llava_edge.runtimes.devices import CPU_EP, CUDA_EP, TENSORRT_EP, Hardware, JetsonInfo, plan_runtime

MAX_NEW = 12  # answer length for the parity checks (the toy's answers are a few tokens)

CPU_BOX = Hardware(jetson=None, nvidia_driver=False, ort_providers=(CPU_EP,), llama_gpu_offload=False,
                   llama_backends=("CPU",), cpus=8, physical_cores=4, tensorrt_python=False)
GPU_LAPTOP = replace(CPU_BOX, nvidia_driver=True, ort_providers=(TENSORRT_EP, CUDA_EP, CPU_EP),
                     llama_gpu_offload=True, llama_backends=("CUDA", "CPU"), tensorrt_python=True)
JETSON = replace(GPU_LAPTOP, jetson=JetsonInfo("NVIDIA Jetson Orin Nano Developer Kit", "36.3.0",
                                              "/etc/nv_tegra_release"), nvidia_driver=False)
ORIN = {"tensorrt_version": "10.3.0", "gpu": "Orin", "compute_capability": "8.7"}


def write(root: Path, rel: str, data: bytes | str) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data.encode() if isinstance(data, str) else data)


def eval_images(toy_data) -> list[Path]:
    return sorted((toy_data / "images").glob("eval_*.png"))


# -- hardware detection (a fake root instead of /) ------------------------------------------------------------------
def test_jetson_detected_by_tegra_release_or_device_tree(tmp_path):
    assert devices.read_jetson(tmp_path) is None
    write(tmp_path / "pi", "proc/device-tree/model", b"Raspberry Pi 5 Model B Rev 1.0\0")
    assert devices.read_jetson(tmp_path / "pi") is None

    write(tmp_path / "l4t", "etc/nv_tegra_release",
          "# R36 (release), REVISION: 3.0, GCID: 36923193, BOARD: generic, EABI: aarch64, DATE: Fri Jul 19 2024\n")
    write(tmp_path / "l4t", "proc/device-tree/model", b"NVIDIA Jetson Orin Nano Developer Kit\0")
    j = devices.read_jetson(tmp_path / "l4t")
    assert j == JetsonInfo("NVIDIA Jetson Orin Nano Developer Kit", "36.3.0", "/etc/nv_tegra_release")

    write(tmp_path / "dt", "proc/device-tree/model", b"NVIDIA Jetson AGX Xavier\0")  # no L4T file (a container)
    assert devices.read_jetson(tmp_path / "dt").evidence == "device-tree model"
    write(tmp_path / "compat", "sys/firmware/devicetree/base/compatible", b"nvidia,p3768-0000\0nvidia,tegra234\0")
    assert devices.read_jetson(tmp_path / "compat").evidence == "device-tree compatible nvidia,tegra"

    hw = devices.detect_hardware(tmp_path / "l4t")  # the files decide, whatever this machine is
    assert hw.jetson == j
    profile, why = devices.pick_profile("auto", hw)
    assert profile.name == "jetson" and "nv_tegra_release" in why


def test_physical_cores_from_sysfs_topology(tmp_path):
    for cpu, core in enumerate([0, 1, 0, 1]):  # 2 cores with 2 hyper-threads each
        write(tmp_path, f"sys/devices/system/cpu/cpu{cpu}/topology/physical_package_id", "0\n")
        write(tmp_path, f"sys/devices/system/cpu/cpu{cpu}/topology/core_id", f"{core}\n")
    assert devices.physical_cores({0, 1, 2, 3}, tmp_path) == 2
    assert devices.physical_cores({0, 2}, tmp_path) == 1
    assert devices.physical_cores({0, 5}, tmp_path) == 2  # cpu5 has no topology: count CPUs
    write(tmp_path, "proc/driver/nvidia/version", "NVRM version: 550\n")
    assert devices.nvidia_driver_loaded(tmp_path) and not devices.nvidia_driver_loaded(tmp_path / "none")


def test_auto_profile_follows_the_hardware():
    assert devices.pick_profile("auto", CPU_BOX)[0].name == "cpu"
    assert devices.pick_profile("auto", GPU_LAPTOP)[0].name == "laptop-gpu"
    assert devices.pick_profile("auto", JETSON)[0].name == "jetson"
    metal = replace(CPU_BOX, llama_gpu_offload=True, llama_backends=("Metal", "CPU"))
    profile, why = devices.pick_profile("auto", metal)
    assert profile.name == "laptop-gpu" and "Metal" in why
    cuda_wheel_no_gpu = replace(CPU_BOX, ort_providers=(CUDA_EP, CPU_EP))  # onnxruntime-gpu on a box without GPU
    profile, why = devices.pick_profile("auto", cuda_wheel_no_gpu)
    assert profile.name == "cpu" and "no NVIDIA driver" in why
    assert devices.pick_profile("CPU", GPU_LAPTOP)[0].name == "cpu"  # asked for wins over detection
    with pytest.raises(UserError, match="unknown device 'tpu'.*auto, cpu, laptop-gpu, jetson"):
        devices.pick_profile("tpu", CPU_BOX)


# -- variant choice -----------------------------------------------------------------------------------------------
def fake_manifest(bundle, int8_cosine=0.995, engine=ORIN) -> manifest.Manifest:
    """The toy bundle's manifest with quantized variants and an engine listed (planning reads no files)."""
    m = manifest.read(bundle)

    def add(name, kind, precision, file, **extra):
        m.variants.append(Variant(name, kind, precision, file, 1, "0" * 64, extra))

    add("fp16", "vision", "fp16", "vision.fp16.onnx", format="onnx")
    add("int8", "vision", "int8", "vision.int8.onnx", format="onnx", quality={"against": "fp32", "min_cosine": int8_cosine})
    add("int4", "vision", "int4", "vision.int4.onnx", format="onnx", quality={"against": "fp32", "min_cosine": 0.93})
    add("trt-fp16", "vision", "fp16", "vision.trt-fp16.engine", format="tensorrt", **engine)
    add("q8_0", "llm", "q8_0", "llm.q8_0.gguf", format="gguf")
    add("q4_k_m", "llm", "q4_k_m", "llm.q4_k_m.gguf", format="gguf")
    return m


def test_profiles_pick_their_variants_offload_and_providers(bundle):
    m = fake_manifest(bundle)
    cpu = plan_runtime(m, "auto", hardware=CPU_BOX)
    assert (cpu.profile.name, cpu.vision.name, cpu.llm.name) == ("cpu", "int8", "q4_k_m")
    assert cpu.n_gpu_layers == 0 and cpu.providers == [CPU_EP] and cpu.threads == 4 and cpu.vision_backend == "onnxruntime"

    laptop = plan_runtime(m, "auto", hardware=replace(GPU_LAPTOP, ort_providers=(CUDA_EP, CPU_EP)),
                          trt_platform=lambda: {**ORIN, "gpu": "NVIDIA GeForce RTX 4060 Laptop GPU",
                                                "compute_capability": "8.9"})
    assert laptop.profile.name == "laptop-gpu" and laptop.n_gpu_layers == -1 and laptop.llm.name == "q4_k_m"
    assert laptop.vision.name == "fp16" and laptop.providers == [CUDA_EP, CPU_EP]  # the Orin engine is skipped
    assert "trt-fp16: this TensorRT engine was built for" in laptop.vision_why and "rebuild" in laptop.vision_why

    jetson = plan_runtime(m, "auto", hardware=JETSON, trt_platform=lambda: dict(ORIN))
    assert jetson.profile.name == "jetson" and jetson.vision.name == "trt-fp16" and jetson.vision_backend == "tensorrt"
    assert jetson.n_gpu_layers == -1 and jetson.n_ctx == 2048 and jetson.llm.name == "q4_k_m"

    def no_tensorrt():
        raise UserError("TensorRT is not installed: on a Jetson it comes with JetPack")

    fallback = plan_runtime(m, "jetson", hardware=JETSON, trt_platform=no_tensorrt)
    assert fallback.vision.name == "fp16" and "TensorRT is not installed" in fallback.vision_why
    assert fallback.provider_names() == [TENSORRT_EP, CUDA_EP, CPU_EP]
    trt_options = dict(fallback.providers[0][1])
    assert trt_options["trt_fp16_enable"] is True and trt_options["trt_engine_cache_enable"] is True
    int8_on_jetson = plan_runtime(m, "jetson", hardware=JETSON, vision_variant="int8", trt_platform=no_tensorrt)
    assert int8_on_jetson.provider_names() == [CUDA_EP, CPU_EP]  # no TensorRT EP for onnxruntime's int8 ops

    no_offload = plan_runtime(m, "laptop-gpu", hardware=CPU_BOX)
    assert no_offload.n_gpu_layers == 0 and "without GPU offload" in no_offload.offload_why
    assert no_offload.providers == [CPU_EP] and "CUDAExecutionProvider not in this onnxruntime" in no_offload.providers_why
    # without a GPU provider the fp16 graph would run on the CPU provider: the CPU's choice instead
    assert no_offload.vision.name == "int8" and "ONNX variants as for the CPU" in no_offload.vision_why


def test_the_cpu_prefers_dynamic_int8_to_static_qdq(bundle):
    """Measured: dynamic int8 runs CLIP-L/336 in 0.72 s on 2 Zen 4 cores, static QDQ in 1.24 s (docs/BENCHMARKS.md)."""
    m = fake_manifest(bundle)
    m.variants.append(Variant("int8-static", "vision", "int8", "vision.int8-static.onnx", 1, "0" * 64,
                              {"format": "onnx", "quality": {"against": "fp32", "min_cosine": 0.999}}))
    assert plan_runtime(m, "cpu", hardware=CPU_BOX).vision.name == "int8"
    m.variants = [v for v in m.variants if v.name != "int8"]
    assert plan_runtime(m, "cpu", hardware=CPU_BOX).vision.name == "int8-static"


def test_unquantized_the_cpu_prefers_bf16_where_llama_cpp_has_bf16_dot_products(bundle):
    """Measured on 2 Zen 4 cores: a bf16 GGUF prefills 1.6-1.75x faster than f16 (docs/BENCHMARKS.md)."""
    m = manifest.read(bundle)  # f32 first: the bundle's default
    m.variants.append(Variant("bf16", "llm", "bf16", "llm.bf16.gguf", 1, "0" * 64, {"format": "gguf"}))
    bf16_cpu = replace(CPU_BOX, llama_cpu_features=("AVX2", "AVX512", "AVX512_BF16"))
    plan = plan_runtime(m, "cpu", hardware=bf16_cpu)
    assert plan.llm.name == "bf16" and "AVX512_BF16" in plan.llm_why
    assert "bf16 dot products" in plan.hardware.describe()
    assert plan_runtime(m, "cpu", hardware=replace(CPU_BOX, llama_cpu_features=("AVX2",))).llm.name == "f32"
    # the language model on a GPU: the CPU's features do not matter
    gpu = replace(GPU_LAPTOP, llama_cpu_features=bf16_cpu.llama_cpu_features)
    assert plan_runtime(m, "laptop-gpu", hardware=gpu).llm.name == "f32"
    assert plan_runtime(m, "laptop-gpu", hardware=gpu, n_gpu_layers=0).llm.name == "bf16"
    # a quantized variant still comes first, and a named one wins
    assert plan_runtime(fake_manifest(bundle), "cpu", hardware=bf16_cpu).llm.name == "q4_k_m"
    assert plan_runtime(m, "cpu", hardware=bf16_cpu, llm_variant="f32").llm.name == "f32"


def test_llama_cpp_cpu_features_come_from_its_system_info():
    info = ("CUDA : ARCHS = 900 | USE_GRAPHS = 1 | PEER_MAX_BATCH_SIZE = 128 | "
            "CPU : SSE3 = 1 | AVX2 = 1 | AVX512 = 1 | AVX512_BF16 = 1 | AMX_INT8 = 0 | LLAMAFILE = 1 | ")
    assert devices.llama_cpu_features(info) == ("SSE3", "AVX2", "AVX512", "AVX512_BF16", "LLAMAFILE")
    assert devices.llama_cpu_features("CPU : NEON = 1 | ARM_FMA = 1 | ") == ("NEON", "ARM_FMA")
    assert devices.llama_cpu_features("Metal : EMBED_LIBRARY = 1 | ") == ()
    assert devices.llama_cpu_features(devices.llama_system_info())  # this build reports some


def test_a_degraded_quantized_vision_graph_is_not_picked_by_default(bundle):
    plan = plan_runtime(fake_manifest(bundle, int8_cosine=0.95), "cpu", hardware=CPU_BOX)
    assert plan.vision.name == "fp32"
    assert "int8: worst image token cosine vs fp32 0.9500 < 0.99" in plan.vision_why
    named = plan_runtime(fake_manifest(bundle, int8_cosine=0.95), "cpu", hardware=CPU_BOX, vision_variant="int8")
    assert named.vision.name == "int8"  # named: the user's call


def test_variant_overrides_use_quantize_names_and_errors_list_what_exists(bundle):
    m = fake_manifest(bundle)
    plan = plan_runtime(m, "cpu", hardware=CPU_BOX, vision_variant="FP16", llm_variant="Q8_0")
    assert (plan.vision.name, plan.llm.name) == ("fp16", "q8_0") and plan.vision_why.startswith("asked for")
    with pytest.raises(UserError) as e:
        plan_runtime(m, "cpu", hardware=CPU_BOX, llm_variant="q5_k_m")
    assert str(e.value) == "no llm variant 'q5_k_m' in the bundle (--llm-variant); it has: f32, q8_0, q4_k_m"
    with pytest.raises(UserError, match="vision variant 'int9'.*it has: fp32, fp16, int8, int4, trt-fp16"):
        plan_runtime(m, "cpu", hardware=CPU_BOX, vision_variant="int9")
    with pytest.raises(UserError, match="trt-fp16 cannot run here: .*GPU only"):
        plan_runtime(m, "cpu", hardware=CPU_BOX, vision_variant="trt-fp16")
    with pytest.raises(UserError, match="trt-fp16 cannot run here: this TensorRT engine was built for"):
        plan_runtime(m, "jetson", hardware=JETSON, vision_variant="trt-fp16",
                     trt_platform=lambda: {**ORIN, "tensorrt_version": "8.5.2"})


def test_explicit_settings_override_the_profile_and_say_so(bundle):
    m = fake_manifest(bundle)
    plan = plan_runtime(m, "jetson", hardware=JETSON, trt_platform=lambda: dict(ORIN), threads=3, n_gpu_layers=10,
                        n_ctx=4096, n_batch=64)
    assert (plan.threads, plan.n_gpu_layers, plan.n_ctx, plan.n_batch, plan.n_ubatch) == (3, 10, 4096, 64, 64)
    text = plan.explain()
    for line in ("profile: jetson", "vision variant: trt-fp16", "TensorRT engine", "llama.cpp GPU layers: 10 - asked",
                 "threads: 3 - asked", "context: 4096 tokens - asked", "beyond the 2048 tokens"):
        assert line in text, (line, text)


# -- the CLI: --explain, flags, errors (torch blocked, as on a device) ------------------------------------------------


def chat_cli(*args):
    return subprocess.run([sys.executable, "-c", BLOCK_TORCH, "chat", *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def test_explain_prints_the_choices_and_reasons_without_torch(bundle, toy_data):
    r = chat_cli("--bundle", bundle, "--device", "jetson", "--explain")
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""  # no prompt: explain and exit
    err = r.stderr
    for line in ("hardware: ", "profile: jetson", "(asked for (--device jetson))", "vision variant: fp32",
                 "vision backend: onnxruntime", "language model variant: f32", "llama.cpp GPU layers:",
                 "threads: ", "context: 2048 tokens"):
        assert line in err, (line, err)
    image = eval_images(toy_data)[0]
    r = chat_cli("--bundle", bundle, "--image", image, "--explain", "--device", "cpu", "--vision-variant", "fp32",
                 "--llm-variant", "F32", "--max-tokens", "3", "What shape is at the top left?")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and "profile: cpu" in r.stderr and "asked for (--llm-variant f32)" in r.stderr


def test_cli_variant_and_device_errors_are_one_line(bundle):
    for args, words in ((("--llm-variant", "q4_k_m"), ("no llm variant 'q4_k_m'", "it has: f32")),
                        (("--vision-variant", "int8"), ("no vision variant 'int8'", "it has: fp32")),
                        (("--device", "tpu"), ("unknown device 'tpu'", "laptop-gpu"))):
        r = chat_cli("--bundle", bundle, "--explain", *args)
        lines = [x for x in r.stderr.strip().splitlines() if x.strip()]
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
        assert all(w in lines[0] for w in words), lines[0]


# -- the runtime on the toy bundle ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cpu_runtime(bundle):
    """f32 variants on the CPU profile, exact mode (f32 KV cache): the parity reference setting."""
    from llava_edge import EdgeLLaVA

    m = EdgeLLaVA.load(bundle, device="cpu", vision_variant="fp32", llm_variant="f32", kv_cache="f32",
                       threads=1)  # one thread: a shared CI machine makes spinning OpenMP threads crawl
    yield m
    m.close()


def test_numpy_and_pil_images_answer_like_the_file(cpu_runtime, toy_data):
    path = eval_images(toy_data)[3]
    pil = Image.open(path).convert("RGB")
    arr = np.asarray(pil)
    q = "What color is the shape at the top right?"
    want = cpu_runtime.chat(path, q, max_tokens=6)
    encodes = cpu_runtime.stats["vision_encodes"]
    opaque_rgba = np.dstack([arr, np.full(arr.shape[:2], 255, np.uint8)])
    for im in (pil, arr, arr.astype(np.float32) / 255.0, opaque_rgba, Image.fromarray(opaque_rgba, "RGBA")):
        assert cpu_runtime.chat(im, q, max_tokens=6) == want
    assert cpu_runtime.stats["vision_encodes"] == encodes  # same pixels: the cached embeddings
    with pytest.raises(UserError, match="HxW"):
        cpu_runtime.chat(np.zeros((4, 4, 5), np.uint8), q)


def test_streamed_pieces_add_up_to_the_answer_across_byte_fallback_pieces(cpu_runtime, toy_data, monkeypatch):
    """Byte pieces: a valid one ('r' = <0x72>) followed by an invalid one (<0xE6>). Text already streamed must
    never be contradicted by what follows (found on held-out question 112, where the decoder then used turned
    the 'r' into U+FFFD too; SentencePiece, LLaVA's decoder, keeps the 'r' and gives U+FFFD for the invalid byte)."""
    from llava_edge.runtimes import pipeline

    tok = cpu_runtime.tokenizer
    script = [tok.token_id(t) for t in ("▁picture", "k", "<0x72>", "<0xE6>", "▁picture", "<0xE6>", "<0x72>")]
    assert None not in script and {script[2], script[3]} <= tok.byte_token_ids
    feed = iter(script)
    monkeypatch.setattr(pipeline, "sample", lambda logits, s, rng: next(feed))
    pieces = list(cpu_runtime.stream(eval_images(toy_data)[0], "What is it?", max_tokens=len(script)))
    assert "".join(pieces) == tok.decode(script) and cpu_runtime.last_ids == script
    assert "r\ufffd" in "".join(pieces) and "\ufffdr" in "".join(pieces)


def test_second_question_reuses_image_and_kv_cache_measured(bundle, toy_data):
    from llava_edge import EdgeLLaVA

    # prefix_cache off: the first turn decodes its whole prompt whatever earlier tests saved (test_prefix_cache.py)
    m = EdgeLLaVA.load(bundle, device="cpu", threads=1, prefix_cache=False)
    try:
        image = eval_images(toy_data)[4]
        n_image = m.manifest.vision["num_image_tokens"]
        s = m.session(image)
        t0 = time.perf_counter()
        s.ask("What shape is at the top left?", max_tokens=4)
        t1 = time.perf_counter()
        first_prefill, first_len = m.stats["prefill_tokens"], len(m.llm.slots)
        s.ask("And what color is it?", max_tokens=4)
        t2 = time.perf_counter()
        second = m.stats["prefill_tokens"] - first_prefill
        text = m.template.prompt("And what color is it?", history=s.history[:2])
        second_len = len(m.slots_for(text, "k", n_image))
        print(f"turn 1: {first_prefill} tokens prefilled in {t1 - t0:.3f} s; "
              f"turn 2: {second} of {second_len} in {t2 - t1:.3f} s; vision encodes {m.stats['vision_encodes']}")
        assert m.stats["vision_encodes"] == 1
        assert first_prefill >= n_image + 20  # the first turn did prefill the system prompt and the image
        assert second <= second_len - first_len + 4  # the second only its new tokens (+ the last answer token)
        # a separate one-shot chat about the same picture: no vision run, the system + image prefix kept
        before = m.stats["prefill_tokens"]
        m.chat(image, "How many shapes are there?", max_tokens=2)
        assert m.stats["vision_encodes"] == 1
        assert m.stats["prefill_tokens"] - before < 20
    finally:
        m.close()


def first_prompt_len(m, image_key: str, question: str) -> int:
    return len(m.slots_for(m.template.prompt(question), image_key, m.manifest.vision["num_image_tokens"]))


def test_context_overflow_is_a_message_and_drop_oldest_forgets_turns(bundle, toy_data, cpu_runtime):
    from llava_edge import EdgeLLaVA
    from llava_edge.runtimes.pipeline import ContextOverflowError

    image = eval_images(toy_data)[5]
    q1, q2 = "What shape is at the top left?", "Which shapes are there? " * 6
    # room for the long second question alone with its answer, not for it after the first exchange
    n_ctx = first_prompt_len(cpu_runtime, "k", q2) + 8 + 2
    m = EdgeLLaVA.load(bundle, device="cpu", n_ctx=n_ctx, threads=1)
    try:
        s = m.session(image)
        s.ask(q1, max_tokens=8)
        with pytest.raises(ContextOverflowError) as e:
            s.ask(q2, max_tokens=8)
        msg = str(e.value)
        assert f"context holds {n_ctx}" in msg and "--drop-oldest" in msg and "/reset" in msg and "\n" not in msg
        assert len(s.history) == 2  # nothing changed

        keep = m.session(image, on_overflow="drop-oldest")
        keep.ask(q1, max_tokens=8)
        before = m.stats["prefill_tokens"]
        answer = keep.ask(q2, max_tokens=8)
        assert isinstance(answer, str) and keep.dropped_turns == 1
        assert keep.history[0].image and keep.history[0].text == q2
        # the system prompt and the image stayed at the start: their KV entries were kept, not decoded again
        assert m.stats["prefill_tokens"] - before < first_prompt_len(m, "k", q2) - 64

        with pytest.raises(ContextOverflowError, match="raise --ctx"):  # one question alone too long: no turn to drop
            m.session(image, on_overflow="drop-oldest").ask("Describe everything. " * 40)
    finally:
        m.close()


def test_dropping_the_oldest_exchange_keeps_the_image_first():
    from llava_edge.runtimes.pipeline import drop_oldest_exchange
    from llava_edge.templates import Turn

    history = [Turn("user", "What is it?", image=True), Turn("assistant", "A circle."),
               Turn("user", "Which color?"), Turn("assistant", "Red."),
               Turn("user", "Where?"), Turn("assistant", "Top left.")]
    once = drop_oldest_exchange(history)
    assert once == [Turn("user", "Which color?", image=True), Turn("assistant", "Red."), *history[4:]]
    assert drop_oldest_exchange(drop_oldest_exchange(once)) == []
    text_only = [Turn("user", "Hi"), Turn("assistant", "Hello."), Turn("user", "Bye"), Turn("assistant", "Bye.")]
    assert drop_oldest_exchange(text_only) == text_only[2:]


def test_an_answer_that_fills_the_context_stops_there(bundle, toy_data, cpu_runtime):
    from llava_edge import EdgeLLaVA

    image = eval_images(toy_data)[6]
    q = "Describe the image."
    need = first_prompt_len(cpu_runtime, "k", q)
    m = EdgeLLaVA.load(bundle, device="cpu", n_ctx=need + 3, threads=1)
    try:
        s = m.session(image)
        s.ask(q, max_tokens=50)
        assert s.last_stop in ("context", "eos")
        if s.last_stop == "context":
            assert len(m.last_ids) == 4  # 3 decoded + the last one sampled
        assert len(m.llm.slots) <= need + 3
    finally:
        m.close()


# -- acceptance: greedy runtime answers == Hugging Face greedy answers -------------------------------------------------
def hf_greedy_ids(hf_model, tokenizer, template, spec, image, question, image_token_id, n_image, eos_id, pad_id):
    import torch

    from llava_edge.preprocess import preprocess
    from llava_edge.templates import expand_image

    ids = expand_image(tokenizer.encode_prompt(template.prompt(question), image_token_id), image_token_id,
                       [image_token_id] * n_image)
    px = torch.from_numpy(preprocess(image, spec))[None]
    with torch.no_grad():
        out = hf_model.generate(input_ids=torch.tensor([ids]), pixel_values=px, max_new_tokens=MAX_NEW,
                                do_sample=False, eos_token_id=eos_id, pad_token_id=pad_id)
    new = out[0, len(ids):].tolist()
    return new[: new.index(eos_id)] if eos_id in new else new


def check_parity(runtime, hf_model, toy_model, eval_file: Path) -> int:
    from llava_edge.checkpoint import open_checkpoint
    from llava_edge.templates import get_template
    from llava_edge.tokenizer import Tokenizer
    from llava_edge.toy.evaluate import question_of

    ckpt = open_checkpoint(toy_model)
    tok = Tokenizer(ckpt.path)
    template, spec = get_template(ckpt.conv_mode), ckpt.image_spec()
    records = json.loads(eval_file.read_text())
    generated = 0
    for r in records:
        image, question = eval_file.parent / r["image"], question_of(r)
        want = hf_greedy_ids(hf_model, tok, template, spec, image, question, ckpt.image_token_id,
                             ckpt.num_image_tokens(), tok.eos_id, tok.pad_id)
        got = runtime.chat(image, question, max_tokens=MAX_NEW, temperature=0)
        assert runtime.last_ids == want, (r["id"], question)
        assert got == tok.decode(want), r["id"]
        generated += len(want)
    assert generated > 0  # the comparison covered generated tokens, not only empty answers
    return len(records)


def test_greedy_answers_equal_hf_on_held_out_questions(cpu_runtime, hf_model, toy_model, toy_data):
    assert check_parity(cpu_runtime, hf_model, toy_model, toy_data / "eval.json") == 20


@pytest.mark.slow
def test_greedy_answers_equal_hf_on_all_200_held_out_questions(cpu_runtime, hf_model, toy_model, tmp_path):
    from llava_edge.toy.data import write_dataset

    paths = write_dataset(tmp_path, seed=0, n_stage1=0, n_stage2=0, n_eval=200)
    assert check_parity(cpu_runtime, hf_model, toy_model, paths["eval"]) == 200


# -- GPU paths: run where the hardware is, skipped with the reason where not -------------------------------------------
def _ort_providers() -> list[str]:
    import onnxruntime as ort

    return ort.get_available_providers()


def _gpu_reason() -> str | None:
    hw = devices.detect_hardware()
    if not (hw.nvidia_driver or hw.jetson):
        return "no NVIDIA GPU here (no /proc/driver/nvidia/version, /dev/nvidia0 or Jetson)"
    return None


def _cosine(a, b) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_cuda_execution_provider_runs_the_vision_graph(bundle, cpu_runtime, toy_data):
    if CUDA_EP not in _ort_providers():
        pytest.skip(f"this onnxruntime has no {CUDA_EP} (providers: {', '.join(_ort_providers())}); "
                    "install onnxruntime-gpu on a CUDA machine")
    if _gpu_reason():
        pytest.skip(_gpu_reason())
    from llava_edge import EdgeLLaVA

    m = EdgeLLaVA.load(bundle, device="laptop-gpu", vision_variant="fp32", llm_variant="f32", n_gpu_layers=0)
    try:
        assert m.vision.providers[0] == CUDA_EP, m.explain()
        image = eval_images(toy_data)[0]
        got, ref = m.image_embeddings(image)[1], cpu_runtime.image_embeddings(image)[1]
        assert _cosine(got, ref).min() > 0.9999
    finally:
        m.close()


def test_tensorrt_execution_provider_runs_the_vision_graph(bundle, cpu_runtime, toy_data, tmp_path, monkeypatch):
    if TENSORRT_EP not in _ort_providers():
        pytest.skip(f"this onnxruntime has no {TENSORRT_EP} (providers: {', '.join(_ort_providers())})")
    if _gpu_reason():
        pytest.skip(_gpu_reason())
    from llava_edge import EdgeLLaVA

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # the engine cache
    m = EdgeLLaVA.load(bundle, device="jetson", vision_variant="fp32", llm_variant="f32", n_gpu_layers=0)
    try:
        assert m.vision.providers[0] == TENSORRT_EP, m.explain()
        image = eval_images(toy_data)[0]
        assert _cosine(m.image_embeddings(image)[1], cpu_runtime.image_embeddings(image)[1]).min() > 0.999
    finally:
        m.close()


def test_tensorrt_engine_variant_is_chosen_and_runs(bundle, cpu_runtime, toy_data, tmp_path):
    for module in ("tensorrt", "cuda"):
        try:
            __import__(module)
        except ImportError:
            pytest.skip(f"Python package {module!r} is not installed (TensorRT engines need tensorrt and cuda-python)")
    if _gpu_reason():
        pytest.skip(_gpu_reason())
    from llava_edge import EdgeLLaVA
    from llava_edge.export.tensorrt_engine import build_engine, engine_file_name

    b = tmp_path / "b"
    shutil.copytree(bundle, b)
    record = build_engine(b / "vision.fp32.onnx", b / engine_file_name("fp32"), precision="fp32", max_batch=2,
                          log=print)
    m = manifest.read(b)
    record = {k: v for k, v in record.items() if k not in ("name", "kind", "precision", "file", "size", "sha256")}
    m.add_variant(b, "trt-fp32", "vision", "fp32", engine_file_name("fp32"), format="tensorrt", **record)
    manifest.write(b, m)
    rt = EdgeLLaVA.load(b, device="laptop-gpu", vision_variant="trt-fp32", llm_variant="f32", n_gpu_layers=0,
                        kv_cache="f32")
    try:
        assert rt.plan.vision_backend == "tensorrt" and "TensorRT engine" in rt.explain()
        image = eval_images(toy_data)[1]
        assert _cosine(rt.image_embeddings(image)[1], cpu_runtime.image_embeddings(image)[1]).min() > 0.999
        assert rt.chat(image, "What shape is at the top left?", max_tokens=4)
    finally:
        rt.close()


def test_llama_cpp_offloads_every_layer_to_the_gpu(bundle, cpu_runtime, toy_data):
    import llama_cpp

    if not llama_cpp.llama_supports_gpu_offload():
        offload, backends = devices.llama_capabilities()
        pytest.skip(f"this llama.cpp was built without GPU offload (backends: {', '.join(backends)}); "
                    "reinstall llama-cpp-python with CMAKE_ARGS=-DGGML_CUDA=on (or Metal/Vulkan)")
    from llava_edge import EdgeLLaVA

    m = EdgeLLaVA.load(bundle, device="laptop-gpu", vision_variant="fp32", llm_variant="f32", kv_cache="f32",
                       vision_providers=[CPU_EP])
    try:
        assert m.plan.n_gpu_layers == -1 and "every layer on the GPU" in m.explain()
        image = eval_images(toy_data)[2]
        text = m.template.prompt("What shape is at the top left?")
        got, ref = m.prompt_logits(image, text), cpu_runtime.prompt_logits(image, text)
        assert got.shape == ref.shape and _cosine(got, ref).min() > 0.999
        assert np.abs(got - ref).max() <= 1e-2 * np.abs(ref).max()
    finally:
        m.close()


def four_bit_manifest(bundle) -> manifest.Manifest:
    m = manifest.read(bundle)
    for name in ("q4_k_m", "q4_0", "q4_k_s", "iq4_nl"):
        m.variants.append(Variant(name, "llm", name, f"llm.{name}.gguf", 1, name[-1] * 64, {"format": "gguf"}))
    return m


def test_the_cpu_profile_orders_4_bit_types_as_measured_for_llama_cpp_s_kernels(bundle, monkeypatch):
    monkeypatch.delenv(devices.EXTRA_BUFFERS_ENV, raising=False)
    m = four_bit_manifest(bundle)
    avx512 = replace(CPU_BOX, llama_cpu_features=("AVX2", "AVX512"))  # extra buffer types on: CPU_REPACK
    amx = ("AVX2", "AVX512", "AMX_INT8")
    amx_ok = replace(CPU_BOX, llama_cpu_features=amx, llama_amx_batches=(True, "probed: works"))  # AMX on
    amx_broken = replace(CPU_BOX, llama_cpu_features=amx, llama_amx_batches=(False, "probed: crashed"))  # all off
    for hw, row in ((avx512, ("AVX512", True)), (amx_ok, ("AMX_INT8", True)), (amx_broken, ("AVX512", False))):
        plan = plan_runtime(m, "cpu", hardware=hw)
        assert plan.llm.name == devices.CPU_Q4_FASTEST[row][0] and "measured fastest" in plan.llm_why, row
        assert plan.extra_buffers == row[1], row
    assert "probed: works" in plan_runtime(m, "cpu", hardware=amx_ok).extra_buffers_why
    assert "probed: crashed" in plan_runtime(m, "cpu", hardware=amx_broken).extra_buffers_why
    assert plan_runtime(m, "cpu", hardware=replace(CPU_BOX, llama_cpu_features=("NEON",))).llm.name == "q4_k_m"
    # without AMX nothing is probed; with it, the probe's answer decides
    never = lambda: pytest.fail("probed without AMX")  # noqa: E731
    assert devices.extra_buffers(("AVX512",), amx_probe=never)[0]
    assert devices.extra_buffers(amx, amx_probe=lambda: (True, "ok"))[0]
    assert not devices.extra_buffers(amx, amx_probe=lambda: (False, "crashed"))[0]
    monkeypatch.setenv(devices.EXTRA_BUFFERS_ENV, "1")
    assert devices.extra_buffers(amx, amx_probe=never) == (True, f"${devices.EXTRA_BUFFERS_ENV}=1")
    monkeypatch.setenv(devices.EXTRA_BUFFERS_ENV, "0")
    assert devices.extra_buffers(amx, amx_probe=never) == (False, f"${devices.EXTRA_BUFFERS_ENV}=0")
    monkeypatch.setenv(devices.EXTRA_BUFFERS_ENV, "yes")
    with pytest.raises(UserError, match="must be 0 or 1"):
        devices.extra_buffers(amx)


def test_a_4_bit_type_that_failed_its_drift_gate_is_passed_over(bundle, monkeypatch):
    monkeypatch.delenv(devices.EXTRA_BUFFERS_ENV, raising=False)
    m = four_bit_manifest(bundle)
    hw = replace(CPU_BOX, llama_cpu_features=("AVX2", "AVX512"))
    first, second = devices.CPU_Q4_FASTEST[("AVX512", True)][:2]
    vision = m.variant("vision")
    bad = m.find("llm", name=first)[0]
    bad.extra["drift"] = {vision.name: {"gates": {"q4": False}, "date": "2026-12-04",
                                        "sha256": {"vision": vision.sha256, "llm": bad.sha256}}}
    plan = plan_runtime(m, "cpu", hardware=hw)
    assert plan.llm.name == second and f"{first}: it failed the drift gate q4" in plan.llm_why
    assert plan_runtime(m, "cpu", hardware=hw, llm_variant=first).llm.name == first  # asked for: loaded
    bad.extra["drift"][vision.name]["sha256"]["llm"] = "f" * 64  # a record of another file: not read
    assert plan_runtime(m, "cpu", hardware=hw).llm.name == first
