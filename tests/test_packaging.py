"""Installing: one onnxruntime package per install, conflicts diagnosed, missing optional packages named in one line."""

import re
import subprocess
import sys
import tomllib
import types
from dataclasses import replace
from pathlib import Path

from cli_run import one_line_error
from torchless import without  # tests/ is on sys.path under pytest

from llava_edge.runtimes import vision
from llava_edge.runtimes.devices import CPU_EP, Hardware, plan_runtime

ROOT = Path(__file__).resolve().parents[1]
ORT = {"onnxruntime", "onnxruntime-gpu"}


def requirements(extras: tuple[str, ...]) -> set[str]:
    """Distribution names `pip install 'llava-edge[EXTRAS]'` asks for (self-references followed)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    optional = project["optional-dependencies"]
    names, todo, seen = set(), list(extras), set()

    def add(req: str) -> None:
        m = re.match(r"([A-Za-z0-9_.-]+)(?:\[([^\]]*)\])?", req)
        if m.group(1) == project["name"]:
            todo.extend(x.strip() for x in m.group(2).split(","))
        else:
            names.add(m.group(1).lower())

    for req in project["dependencies"]:
        add(req)
    while todo:
        extra = todo.pop()
        if extra not in seen:
            seen.add(extra)
            for req in optional[extra]:
                add(req)
    return names


def test_every_install_gets_at_most_one_onnxruntime_package():
    """Both packages write the `onnxruntime` module: the CPU one would hide onnxruntime-gpu's CUDA provider."""
    assert requirements(()) & ORT == set()  # the base install chooses neither
    assert requirements(("cpu",)) & ORT == {"onnxruntime"}
    assert requirements(("dev",)) & ORT == {"onnxruntime"}  # `make test`
    for combo in [("gpu",), ("gpu", "train"), ("gpu", "drift"), ("gpu", "export"), ("gpu", "tensorrt")]:
        assert requirements(combo) & ORT == {"onnxruntime-gpu"}, combo
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for extra in project["optional-dependencies"]:
        assert len(requirements((extra,)) & ORT) <= 1, extra


def test_two_onnxruntime_packages_are_named_with_the_commands_that_fix_them(monkeypatch):
    installed = {"onnxruntime": "1.32.0", "onnxruntime-gpu": "1.32.0"}

    def version(name):
        if name not in installed:
            raise vision.metadata.PackageNotFoundError(name)
        return installed[name]

    monkeypatch.setattr(vision.metadata, "version", version)
    assert vision.onnxruntime_packages() == ("onnxruntime", "onnxruntime-gpu")
    hw = Hardware(jetson=None, nvidia_driver=True, ort_providers=(CPU_EP,), llama_gpu_offload=False,
                  llama_backends=("CPU",), cpus=4, physical_cores=2, tensorrt_python=False,
                  ort_packages=vision.onnxruntime_packages())
    assert "onnxruntime packages: onnxruntime, onnxruntime-gpu (conflict)" in hw.describe()
    m = _manifest()
    plan = plan_runtime(m, "laptop-gpu", hardware=hw)
    assert any("pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu" in n for n in plan.notes)
    assert "pip install 'llava-edge[gpu]'" in plan.providers_why  # the CUDA provider is missing: what installs it
    assert not any("installed together" in n for n in plan_runtime(m, "cpu", hardware=replace(
        hw, ort_packages=("onnxruntime",))).notes)
    none = plan_runtime(m, "cpu", hardware=replace(hw, ort_packages=(), ort_providers=()))
    assert vision.ORT_MISSING in none.notes and "onnxruntime not installed" in none.hardware.describe()


def _manifest():
    from llava_edge.manifest import Manifest, Variant

    m = Manifest(source={}, conv_mode="vicuna_v1", image={}, vision={}, llm={}, tokenizer={})
    m.variants = [Variant("fp32", "vision", "fp32", "vision.fp32.onnx", 1, "0" * 64, {"format": "onnx"}),
                  Variant("f16", "llm", "f16", "llm.f16.gguf", 1, "0" * 64, {"format": "gguf"})]
    return m


def cli_without(packages, *args):
    return subprocess.run([sys.executable, "-c", without(*packages), *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def test_without_onnxruntime_chat_and_quantize_say_which_extra_installs_it(bundle, toy_data, tmp_path):
    image = sorted((toy_data / "images").glob("eval_*.png"))[0]
    line = one_line_error(cli_without(["onnxruntime"], "chat", "--bundle", bundle, "--image", image, "Hi"))
    assert "onnxruntime is not installed: pip install 'llava-edge[cpu]', or 'llava-edge[gpu]'" in line
    line = one_line_error(cli_without(["onnxruntime"], "quantize", bundle, "--vision", "int8"))
    assert "pip install 'llava-edge[cpu]'" in line


def test_without_torch_export_says_which_extra_installs_it(toy_model, tmp_path):
    line = one_line_error(cli_without(["torch"], "export", "--model", toy_model, "--out", tmp_path / "b",
                                      "--target", "onnx"))
    assert line == "error: this command needs torch, which is not installed: pip install 'llava-edge[export]'"
    assert not (tmp_path / "b").exists()


def fake_onnxruntime(available: list[str], calls: list):
    """An `onnxruntime` stand-in that records preload_dlls and the providers a session is asked for."""
    class Session:
        def __init__(self, path, so, providers):
            calls.append(("session", [p if isinstance(p, str) else p[0] for p in providers]))

        def get_inputs(self):
            return [types.SimpleNamespace(name="pixel_values", type="tensor(float)")]

        def get_providers(self):
            return ["CPUExecutionProvider"]

    return types.SimpleNamespace(SessionOptions=lambda: types.SimpleNamespace(), InferenceSession=Session,
                                 get_available_providers=lambda: list(available),
                                 preload_dlls=lambda directory=None: calls.append(("preload_dlls", directory)))


def test_a_gpu_provider_preloads_the_cuda_libraries_pip_installed(monkeypatch, tmp_path):
    """onnxruntime-gpu with pip's CUDA/cuDNN: without preload_dlls its CUDA provider quietly falls back to the CPU."""
    calls = []
    monkeypatch.setitem(sys.modules, "onnxruntime", fake_onnxruntime(["CUDAExecutionProvider", "CPUExecutionProvider"],
                                                                     calls))
    vision.VisionEncoder(tmp_path / "v.onnx", ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert calls == [("preload_dlls", ""), ("session", ["CUDAExecutionProvider", "CPUExecutionProvider"])]
    calls.clear()
    vision.VisionEncoder(tmp_path / "v.onnx", ["CPUExecutionProvider"])  # a CPU session loads no CUDA library
    assert calls == [("session", ["CPUExecutionProvider"])]
    calls.clear()
    monkeypatch.setitem(sys.modules, "onnxruntime", fake_onnxruntime(["CPUExecutionProvider"], calls))
    vision.VisionEncoder(tmp_path / "v.onnx", ["CUDAExecutionProvider"])  # not in this onnxruntime: left out
    assert calls == [("session", ["CPUExecutionProvider"])]
