"""The probe that decides whether llama.cpp's AMX buffer is used: its model, its verdicts, its cache, and its
answer for the llama.cpp this suite installed (the Makefile builds it so that AMX batches work)."""

from __future__ import annotations

import json
import signal
import subprocess

import gguf
import numpy as np
import pytest

from llava_edge.runtimes import devices, llama_amx


def test_the_probe_model_is_a_llama_block_with_q8_0_matrices(tmp_path):
    path = tmp_path / "probe.gguf"
    llama_amx.write_probe_model(path)
    r = gguf.GGUFReader(str(path))
    types = {t.name: t.tensor_type for t in r.tensors}
    matrices = [n for n in types if n.startswith("blk.") and not n.endswith("norm.weight")]
    assert len(matrices) == 7 * llama_amx.LAYERS
    assert all(types[n] == gguf.GGMLQuantizationType.Q8_0 for n in matrices)
    assert types["token_embd.weight"] == gguf.GGMLQuantizationType.F32
    arch = r.fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == "llama"


def test_the_installed_llama_cpp_answers_and_the_runtime_follows_it(tmp_path):
    """Where llama.cpp's CPU backend has AMX, the build this suite installed must multiply AMX batches
    correctly: that is what its compiler flags are for. Without AMX the probe says that nothing went to an
    AMX buffer."""
    features = devices.llama_cpu_features(devices.llama_system_info())
    works, why = llama_amx.amx_batches_work(cache_dir=tmp_path)
    if devices.AMX_CPU_FEATURE in features:
        assert works, why
        assert "equals the plain kernels'" in why
        diff = float(why.split("(")[-1].rstrip(")"))
        assert 0 <= diff <= llama_amx.TOLERANCE
        # the runtime's own choice follows the probe
        assert devices.extra_buffers(features, env={}, amx_probe=lambda: (works, why))[0]
    else:
        assert not works and "AMX buffer" in why
    cached = json.loads((tmp_path / llama_amx.CACHE_NAME).read_text())
    assert cached == {llama_amx.library_key(): {"works": works, "why": why}}


class _Runs:
    """Stands in for subprocess.run: answers with the given exit status and output, counting calls."""

    def __init__(self, returncode: int, stdout: str = "", stderr: str = ""):
        self.result = (returncode, stdout, stderr)
        self.calls = 0

    def __call__(self, cmd, **kw):
        self.calls += 1
        assert cmd[1:3] == ["-m", llama_amx.__name__] and cmd[3].endswith(".gguf")
        return subprocess.CompletedProcess(cmd, self.result[0], self.result[1], self.result[2])


@pytest.mark.parametrize("returncode, stdout, works, said", [
    (-signal.SIGSEGV, "", False, "killed the probe (SIGSEGV)"),
    (-signal.SIGILL, "", False, "killed the probe (SIGILL)"),
    (0, '{"relative_difference": 0.0027}', True, "equals the plain kernels' (2.7e-03)"),
    (3, "llama.cpp put none of the probe's Q8_0 weights in its AMX buffer", False, "none of the probe's"),
    (4, '{"relative_difference": 0.9}', False, "differs from the plain kernels'"),
])
def test_each_way_the_child_ends_is_a_verdict_that_is_kept(tmp_path, monkeypatch, returncode, stdout, works, said):
    runs = _Runs(returncode, stdout)
    monkeypatch.setattr(llama_amx.subprocess, "run", runs)
    first = llama_amx.amx_batches_work(cache_dir=tmp_path)
    assert first[0] is works and said in first[1]
    again = llama_amx.amx_batches_work(cache_dir=tmp_path)
    assert again[0] is works and said in again[1] and "probed once for this build" in again[1]
    assert runs.calls == 1
    # another build of the library is probed again
    monkeypatch.setattr(llama_amx, "library_key", lambda: "another-build")
    llama_amx.amx_batches_work(cache_dir=tmp_path)
    assert runs.calls == 2
    assert len(json.loads((tmp_path / llama_amx.CACHE_NAME).read_text())) == 2


def test_a_probe_that_fails_otherwise_answers_no_and_is_tried_again(tmp_path, monkeypatch):
    runs = _Runs(1, "", "Traceback (most recent call last):\nRuntimeError: llama.cpp could not load")
    monkeypatch.setattr(llama_amx.subprocess, "run", runs)
    works, why = llama_amx.amx_batches_work(cache_dir=tmp_path)
    assert not works and "the probe failed (exit status 1: RuntimeError: llama.cpp could not load)" in why
    llama_amx.amx_batches_work(cache_dir=tmp_path)
    assert runs.calls == 2 and not (tmp_path / llama_amx.CACHE_NAME).exists()

    def too_slow(cmd, **kw):
        raise subprocess.TimeoutExpired(cmd, kw["timeout"])

    monkeypatch.setattr(llama_amx.subprocess, "run", too_slow)
    assert llama_amx.amx_batches_work(cache_dir=tmp_path, timeout=7) == (False, "the probe did not finish in 7 s")


def test_a_damaged_or_read_only_cache_costs_a_probe_and_nothing_else(tmp_path, monkeypatch):
    runs = _Runs(0, '{"relative_difference": 0.001}')
    monkeypatch.setattr(llama_amx.subprocess, "run", runs)
    (tmp_path / llama_amx.CACHE_NAME).write_text("{not json")
    assert llama_amx.amx_batches_work(cache_dir=tmp_path)[0]
    assert json.loads((tmp_path / llama_amx.CACHE_NAME).read_text())[llama_amx.library_key()]["works"] is True
    (tmp_path / llama_amx.CACHE_NAME).write_text(json.dumps({llama_amx.library_key(): {"works": "yes"}}))
    assert llama_amx.amx_batches_work(cache_dir=tmp_path)[0] and runs.calls == 2

    def refuse(path, obj):
        raise PermissionError(f"read-only: {path}")

    monkeypatch.setattr(llama_amx.atomic, "write_json", refuse)
    assert llama_amx.amx_batches_work(cache_dir=tmp_path / "elsewhere")[0] and runs.calls == 3


def test_the_library_key_changes_with_the_library_files(tmp_path, monkeypatch):
    import llama_cpp

    key = llama_amx.library_key()
    assert key == llama_amx.library_key() and len(key) == 32
    fake = tmp_path / "llama_cpp"
    (fake / "lib").mkdir(parents=True)
    (fake / "lib" / "libggml-cpu.so").write_bytes(b"one")
    monkeypatch.setattr(llama_cpp, "__file__", str(fake / "__init__.py"))
    a = llama_amx.library_key()
    (fake / "lib" / "libggml-cpu.so").write_bytes(b"other")
    assert llama_amx.library_key() != a != key


def test_the_probe_s_logits_are_repeatable_and_its_tolerance_tells_other_logits_apart(tmp_path):
    """What the child compares: two plain loads of the probe model give the same logits, on any CPU, and
    logits of other positions are further apart than the tolerance."""
    path = tmp_path / "probe.gguf"
    llama_amx.write_probe_model(path)
    plain = llama_amx._batch_logits(path, extra_buffers=False)
    assert plain.shape == (llama_amx.BATCH, 259) and np.isfinite(plain).all()
    assert np.abs(plain).max() > 0
    again = llama_amx._batch_logits(path, extra_buffers=False)
    np.testing.assert_array_equal(plain, again)
    shuffled = plain[::-1]
    assert np.abs(shuffled - plain).max() / np.abs(plain).max() > llama_amx.TOLERANCE


_SAME_THREAD_CHILD = r"""
import json, sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper, save

from llava_edge.runtimes import llama_amx
from llava_edge.runtimes.devices import CPU_EP
from llava_edge.runtimes.llm import LlamaOptions, LlamaText
from llava_edge.runtimes.vision import VisionEncoder

tmp = Path(sys.argv[1])
# an int8 graph of a size onnxruntime's AMX kernel takes: float in, DynamicQuantizeLinear + MatMulInteger, float out
rng = np.random.default_rng(1)
m, k, n = 729, 1152, 1024
w = numpy_helper.from_array(rng.integers(-127, 127, (k, n), dtype=np.int8), "w")
nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"]),
         helper.make_node("MatMulInteger", ["q", "w", "z"], ["y32"]),
         helper.make_node("Cast", ["y32"], ["y"], to=TensorProto.FLOAT)]
graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])], [w])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
model.ir_version = 8
save(model, str(tmp / "int8.onnx"))
pixels = rng.random((m, k), dtype=np.float32)

llama_amx.write_probe_model(tmp / "probe.gguf")
text = LlamaText(tmp / "probe.gguf", LlamaOptions(n_ctx=llama_amx.BATCH * 2, n_batch=llama_amx.BATCH))
ids = [3 + (i * 37) % 256 for i in range(llama_amx.BATCH)]


def logits():
    text.reset()
    return text.feed_tokens(ids, logits="all")


before = logits()
VisionEncoder(tmp / "int8.onnx", [CPU_EP], 2).encode(pixels)  # the runtime's way
through_encoder = logits()
so = ort.SessionOptions()
so.intra_op_num_threads = 2
ort.InferenceSession(str(tmp / "int8.onnx"), so, providers=["CPUExecutionProvider"]).run(None, {"x": pixels})
on_this_thread = logits()  # onnxruntime run on llama.cpp's thread
scale = float(np.abs(before).max())
print(json.dumps({"through_encoder": float(np.abs(through_encoder - before).max()) / scale,
                  "on_this_thread": float(np.abs(on_this_thread - before).max()) / scale}))
"""


def test_a_vision_encode_leaves_llama_cpp_s_amx_tiles_alone(tmp_path, monkeypatch):
    """The runtime encodes a picture with onnxruntime and then decodes with llama.cpp, in one process. Both
    load AMX tile configurations, llama.cpp once per thread, so every onnxruntime run goes through a thread of
    its own: llama.cpp's logits after a vision encode are its logits before it. Where llama.cpp's AMX batches
    work, the same onnxruntime run on llama.cpp's thread changes them (what the thread prevents), which shows
    that the graph reaches onnxruntime's AMX kernel. In a child process: that run leaves its thread broken."""
    import sys

    monkeypatch.delenv(devices.EXTRA_BUFFERS_ENV, raising=False)
    r = subprocess.run([sys.executable, "-c", _SAME_THREAD_CHILD, str(tmp_path)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["through_encoder"] == 0.0, got
    features = devices.llama_cpu_features(devices.llama_system_info())
    if devices.AMX_CPU_FEATURE in features and llama_amx.amx_batches_work(cache_dir=tmp_path)[0]:
        assert got["on_this_thread"] > llama_amx.TOLERANCE, got
