"""bench/cpu_q4.py on the toy bundle: every 4-bit type quantized, loaded both ways, timed, and reported.

One round on a 128-wide toy, so nothing here is a timing claim; what is checked
is what the script records (every type and mode, positive numbers, the
bandwidth fractions derived from them, what llama.cpp's load log said).
"""

from __future__ import annotations

import json
import shutil

import pytest

from bench_script import load_bench_script

TYPES = ["q4_0", "iq4_nl", "q4_k_m", "q4_k_s", "iq4_xs", "f32"]  # f32: the bundle's own GGUF, a reference


@pytest.fixture(scope="module")
def cpu_q4():
    return load_bench_script("cpu_q4")


@pytest.fixture(scope="module")
def report(cpu_q4, bundle, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cpu_q4")
    qb = shutil.copytree(bundle, tmp / "b")  # quantizing adds variants: the session's bundle stays as it was
    out = tmp / "result.json"
    assert cpu_q4.main(["--bundle", str(qb), "--types", ",".join(TYPES), "--modes", "default,repack,plain", "--rounds", "1",
                        "--threads", "2", "--prefill", "64", "--decode-prompt", "8", "--decode-tokens", "8",
                        "--bandwidth-mb", "16", "--name", "toy", "--out", str(out)]) == 0
    return json.loads(out.read_text()), out.with_suffix(".md").read_text(), qb


def test_every_type_and_mode_is_measured_with_positive_numbers(report, cpu_q4):
    data, md, qb = report
    names = {t if m == "default" else f"{t} ({m})" for t in TYPES for m in ("default", "repack", "plain")}
    assert set(data["results"]) == names
    assert data["rounds"] == 1 and data["threads"] == 2 and data["model"] == "toy"
    for name, r in data["results"].items():
        for key in ("decode_tokens_per_s", "decode_internal_tokens_per_s", "copy_bound_tokens_per_s",
                    "read_bound_tokens_per_s", "fraction_of_copy_bound", "fraction_of_read_bound", "file_bytes"):
            assert r[key] > 0, (name, key)
        # prefill is timed unless a multi-token llama_decode killed the probe (AMX builds: llama.cpp#20824),
        # which only weights in llama.cpp's AMX buffer can do
        if r["batch_crash"]:
            assert r["mode"] == "default" and "AMX" in r["weight_buffers_mib"], name
            assert r["prefill_tokens_per_s"] is None and r["seconds"]["prefill_s"] == []
            assert "not timed: batch crashed" in md
        else:
            assert r["prefill_tokens_per_s"] > 0 and r["prefill_internal_tokens_per_s"] > 0, name
            assert r["prefill_tokens_per_s"] == pytest.approx(64 / r["seconds"]["prefill_s"][0])
        # one timed round after the untimed warm-up
        assert len(r["seconds"]["decode_s"]) == 1 and r["seconds"]["decode_s"][0] > 0, name
        assert (qb / r["file"]).stat().st_size == r["file_bytes"]
        assert r["tensor_types"] and sum(r["tensor_types"].values()) > 0
        assert r["weight_buffers_mib"] and all(mib > 0 for mib in r["weight_buffers_mib"].values())
        assert f"| {name} |" in md
    assert data["fastest"]["decode"] in names and data["fastest"]["prefill"] in names


def test_the_bandwidth_fraction_is_computed_from_the_measured_numbers(report):
    data, _, _ = report
    copy_bw, read_bw = data["copy_bandwidth_median_gb_s"] * 1e9, data["read_bandwidth_median_gb_s"] * 1e9
    assert copy_bw > 0 and read_bw > 0 and len(data["copy_bandwidth_gb_s"]) == 1
    for r in data["results"].values():
        need = r["bytes_per_token"]
        assert need["total"] == need["weights"] + need["kv_cache"] and need["kv_cache"] > 0
        # the token embedding table is not read per token: the weights are less than the file
        assert 0 < need["weights"] < r["file_bytes"]
        assert r["decode_tokens_per_s"] == pytest.approx(1 / r["seconds"]["decode_s"][0])
        assert r["copy_bound_tokens_per_s"] == pytest.approx(copy_bw / need["total"])
        assert r["fraction_of_copy_bound"] == pytest.approx(r["decode_tokens_per_s"] / r["copy_bound_tokens_per_s"])
        assert r["fraction_of_read_bound"] == pytest.approx(r["decode_tokens_per_s"] * need["total"] / read_bw)


def test_each_mode_puts_the_weights_where_it_says(report):
    data, _, _ = report
    for name, r in data["results"].items():
        assert isinstance(r["repacked"], bool)
        assert r["repacked"] == bool(r["repacked_into"])
        if r["mode"] == "plain":  # use_extra_bufts = false: no AMX, no CPU_REPACK
            assert not r["repacked"] and not r["cpu_repack_layouts"], name
            assert set(r["weight_buffers_mib"]) <= {"CPU", "CPU_Mapped"}, name
        if r["mode"] == "repack":  # CPU_REPACK for what llama.cpp's x86 rule takes, never AMX
            assert "AMX" not in r["weight_buffers_mib"], name
            assert sum(r["cpu_repack_layouts"].values()) == r["overridden_to_cpu_repack"], name
            assert r["repacked"] == (r["overridden_to_cpu_repack"] > 0), name
    # the toy's 128-wide Q4_0 and IQ4_NL matrices are repackable (rows a multiple of 8), on any AVX2 x86
    if "AVX2" in data["llama_cpu_features"]:
        assert set(data["results"]["q4_0 (repack)"]["cpu_repack_layouts"]) == {"q4_0_8x8"}
        assert set(data["results"]["iq4_nl (repack)"]["cpu_repack_layouts"]) == {"iq4_nl_8x8"}


def test_the_machine_and_llama_cpp_are_recorded(report):
    data, _, _ = report
    assert "CPU :" in data["llama_system_info"]
    assert data["versions"]["llama_cpp_python"]
    assert len(data["load_average_start"]) == 3 and len(data["load_average_end"]) == 3
    assert len(data["load_average_per_round"]) == data["rounds"]
    assert set(data["busy"]) >= {"other_cpu_share", "load_average_start", "load_average_end"}


def test_a_type_already_in_the_bundle_is_reused_not_quantized_again(report, cpu_q4):
    _, _, qb = report
    before = {p.name: p.stat().st_mtime_ns for p in qb.glob("llm.*.gguf")}
    files = cpu_q4.ensure_types(qb, ["q4_0", "iq4_nl"], threads=1)
    assert {p.name for p in files.values()} == {"llm.q4_0.gguf", "llm.iq4_nl.gguf"}
    assert cpu_q4.ensure_types(qb, ["f32"], threads=1) == {"f32": qb / "llm.f32.gguf"}  # a reference, as exported
    assert {p.name: p.stat().st_mtime_ns for p in qb.glob("llm.*.gguf")} == before


def test_reload_measures_one_model_at_a_time_with_the_same_record(cpu_q4, report, tmp_path):
    _, _, qb = report  # its q4_0 is already made: reused
    out = tmp_path / "reload.json"
    assert cpu_q4.main(["--bundle", str(qb), "--types", "q4_0,f32", "--modes", "default,plain", "--rounds", "1",
                        "--threads", "2", "--prefill", "32", "--decode-prompt", "4", "--decode-tokens", "4",
                        "--bandwidth-mb", "16", "--reload", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["reload"] is True and set(data["results"]) == {"q4_0", "q4_0 (plain)", "f32", "f32 (plain)"}
    for r in data["results"].values():
        assert r["decode_tokens_per_s"] > 0 and len(r["seconds"]["decode_s"]) == 1
        assert r["prefill_tokens_per_s"] is None if r["batch_crash"] else r["prefill_tokens_per_s"] > 0
