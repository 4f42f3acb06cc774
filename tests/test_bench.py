"""``llava-edge bench``: it runs on the toy bundle and reports every metric; bad input is one line.

Timings are never asserted (they say nothing on a shared test machine); only that each metric
was measured (present, finite, positive) and the report is complete.
"""

import json
import math
import subprocess
import sys
import textwrap

import pytest

from cli_run import le

from llava_edge import manifest
from llava_edge.bench import METRICS, BenchSettings, parse_pairs, write_bench_image
from llava_edge.errors import UserError


def test_bench_command_writes_every_metric(bundle, tmp_path, monkeypatch):
    monkeypatch.setenv("LLAVA_EDGE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "bench.json"
    r = le("bench", bundle, "--runs", "2", "--decode-tokens", "4", "--json", out)
    assert r.returncode == 0, r.stderr
    report = json.loads(out.read_text())
    m = manifest.read(bundle)
    assert [(x["vision"], x["llm"]) for x in report["results"]] == parse_pairs(None, m)
    for res in report["results"]:
        for key in METRICS:
            assert math.isfinite(res[key]) and res[key] > 0, (key, res[key])
        assert len(res["runs"]) == 2
        assert res["prefill_tokens"] > m.vision["num_image_tokens"]  # the image tokens and the prompt
        assert 1 <= res["decode_tokens"] <= 4
        # a picture asked about before (CPU: its KV cells saved): no vision graph, only the question decoded
        seen = res["seen_image_runs"]
        assert len(seen) == 2 and res["ttft_seen_image_ms"] > 0
        assert all(x["vision_encode_ms"] == 0 and 0 < x["prefill_tokens"] < 20 for x in seen), seen
    assert report["settings"]["runs"] == 2
    assert report["machine"]["logical_cpus"] >= 1 and report["versions"]["onnxruntime"]
    assert set(report["metrics"]) == set(METRICS)
    # the table on stdout has one row per pair
    rows = [line for line in r.stdout.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + len(report["results"]) and "TTFT, image seen" in rows[0]
    # the user's cache gets the prompt's beginning only: the bench picture's cells went to a temporary directory
    assert len(list((tmp_path / "cache" / "prefix-kv").iterdir())) == 1


def test_bench_measures_without_torch(bundle, tmp_path):
    """The runtime benchmark loads what `chat` loads: torch stays out (and out of its peak memory)."""
    image = write_bench_image(tmp_path / "im.jpg", size=(200, 150))
    code = textwrap.dedent(f"""
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split('.')[0] in ('torch', 'transformers'):
                    raise ImportError('blocked: ' + name)
        sys.meta_path.insert(0, Block())
        from llava_edge.bench import BenchSettings, measure_pair
        r = measure_pair({str(bundle)!r}, 'fp32', 'f32', BenchSettings(runs=1, warmup=0, decode_tokens=2),
                         {str(image)!r})
        assert r['ttft_ms'] > r['vision_encode_ms'] > 0
        assert not any(m.split('.')[0] in ('torch', 'transformers') for m in sys.modules)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr


def test_variant_pairs(bundle):
    m = manifest.read(bundle)
    vision, llm = m.variant("vision").name, m.variant("llm").name
    assert parse_pairs(f"{vision}:{llm}", m) == [(vision, llm)]
    assert parse_pairs(f" {vision} , {vision}:{llm} ", m) == [(vision, llm)]  # bare name, repeats dropped
    assert parse_pairs(f":{llm}", m) == [(vision, llm)]
    with pytest.raises(UserError, match="no vision variant 'int9'.*it has"):
        parse_pairs(f"int9:{llm}", m)
    with pytest.raises(UserError, match="no vision or llm variant 'nope'"):
        parse_pairs("nope", m)


@pytest.mark.parametrize("args, words", [
    (["--runs", "0"], ["--runs"]),
    (["--decode-tokens", "0"], ["--decode-tokens"]),
    (["--variants", "fp32:q9"], ["q9"]),
    (["--image", "/nonexistent.png"], ["--image"]),
])
def test_bad_input_is_one_line(bundle, args, words):
    r = le("bench", bundle, *args)
    assert r.returncode == 2, r.stderr
    lines = [x for x in r.stderr.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for w in words:
        assert w in lines[0]


def test_not_a_bundle(tmp_path):
    r = le("bench", tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_settings_validate():
    BenchSettings().validate()
    with pytest.raises(UserError):
        BenchSettings(warmup=-1).validate()
