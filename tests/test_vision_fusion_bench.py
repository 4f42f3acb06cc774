"""bench/vision_fusion.py on the toy bundle: both graphs of each type made, timed and compared.

One round on a tiny tower, so nothing here is a timing claim; what is checked is what the script records."""

from __future__ import annotations

import json
import math

from bench_script import load_bench_script


def test_each_type_is_timed_both_ways_and_the_fused_graph_computes_the_same(bundle, tmp_path):
    out = tmp_path / "r.json"
    before = sorted(p.name for p in bundle.iterdir())
    assert load_bench_script("vision_fusion").main(["--bundle", str(bundle), "--types", "fp32,int8,int4", "--tiles",
                                                   "2", "--rounds", "1", "--threads", "1", "--out", str(out)]) == 0
    assert sorted(p.name for p in bundle.iterdir()) == before  # the graphs were made elsewhere
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"fp32", "int8", "int4"} and report["tiles"] == 2
    assert report["fusion"]["stats"]["MultiHeadAttention"] == 3  # the toy tower's 3 layers
    for t, r in report["results"].items():
        assert all(math.isfinite(r[k]) and r[k] > 0 for k in ("standard_s", "fused_s", "speedup")), (t, r)
        assert r["speedup"] == r["standard_s"] / r["fused_s"]
        assert len(r["per_round_s"]["standard"]) == len(r["per_round_s"]["fused"]) == 1
        assert r["fused_ops"]["MultiHeadAttention"] == 3 and "Softmax" not in r["fused_ops"]
        assert r["fused_vs_standard"]["min"] > 0.99, (t, r)
    assert report["results"]["fp32"]["fused_max_abs_diff_of_largest"] < 1e-5
    assert report["results"]["fp32"]["standard_vs_fp32"] is None
    int8_ops = report["results"]["int8"]["fused_ops"]
    assert int8_ops.get("DynamicQuantizeMatMul", 0) + int8_ops.get("MatMulInteger", 0) == 6 * 3 + 1
    md = out.with_suffix(".md").read_text()
    assert md.count("\n| ") == 2 + 3 and "**" in md  # header, rule, one row a type
