"""Real-size presets (``llava-edge toy model --preset llava-1.5-7b --layers N``) without downloads.

The 7B preset cut to one language-model layer is still a 1.6 GB checkpoint at LLaVA-1.5's
real widths (CLIP ViT-L/14-336 whole, 4096-wide Llama, 32064-row embedding): it must be
written without holding it in memory, load through the same code as llava-hf checkpoints,
and carry LLaVA-1.5-7B's configuration.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from llava_edge.errors import UserError


def _write_in_child(out, preset: str, layers: int, **kw) -> dict:
    """Write in a fresh process and report its memory: its own peak RSS (VmHWM), and RSS once the libraries are imported."""
    code = textwrap.dedent(f"""
        import json, resource, sys
        import torch, transformers, numpy  # the baseline: what any writer pays to start
        from llava_edge.toy.model import write_streamed_model
        def rss():
            return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
        base = rss()
        write_streamed_model({str(out)!r}, {preset!r}, layers={layers}, **{kw!r})
        # VmHWM, not ru_maxrss: a child started by pytest carries the parent's RSS in ru_maxrss (Linux keeps
        # the largest RSS across exec), which made this check depend on how big pytest had grown
        peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
        print(json.dumps({{"base": base, "peak": peak}}))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def llava7b_1layer(tmp_path_factory):
    out = tmp_path_factory.mktemp("real") / "llava7b"
    mem = _write_in_child(out, "llava-1.5-7b", 1)
    return out, mem


def test_7b_preset_writes_in_little_memory(llava7b_1layer):
    out, mem = llava7b_1layer
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    assert size > 1.4e9  # CLIP-L (0.3B) + one 4096-wide layer + two 32064x4096 matrices, 2 bytes each
    grown = mem["peak"] - mem["base"]  # ~165 MB seen (tokenizer training, meta model, 16 MB chunks); the same at 14 GB
    assert grown < size / 4, f"writing grew memory by {grown / 1e6:.0f} MB for a {size / 1e6:.0f} MB checkpoint"


def test_7b_preset_has_llava_1_5_7b_configuration(llava7b_1layer):
    from llava_edge.checkpoint import check_safetensors, open_checkpoint

    ckpt = open_checkpoint(llava7b_1layer[0])
    t, v = ckpt.text_config, ckpt.vision_config
    assert (v["image_size"], v["patch_size"], ckpt.num_image_tokens()) == (336, 14, 576)
    assert (v["hidden_size"], v["num_hidden_layers"], v["num_attention_heads"], v["intermediate_size"]) == (
        1024, 24, 16, 4096)
    assert (t["hidden_size"], t["num_attention_heads"], t["num_key_value_heads"], t["intermediate_size"]) == (
        4096, 32, 32, 11008)
    assert t["vocab_size"] == 32064 and t["num_hidden_layers"] == 1  # --layers cut the language model only
    assert ckpt.config["vision_feature_layer"] == -2 and ckpt.config["projector_hidden_act"] == "gelu"
    spec = ckpt.image_spec()
    assert (spec.resize, spec.crop) == (336, 336)
    for f in ckpt.weight_files():  # stored in bf16, as the config says
        header = check_safetensors(f)
        assert {h["dtype"] for k, h in header.items() if k != "__metadata__"} == {"BF16"}
    assert ckpt.config.get("dtype", ckpt.config.get("torch_dtype")) == "bfloat16"


def test_7b_preset_loads_every_tensor_from_the_file(llava7b_1layer):
    """Loaded weights equal the stored ones: a misnamed tensor would be silently re-initialised."""
    import torch
    from safetensors import safe_open

    from llava_edge.checkpoint import load_hf_model, open_checkpoint

    ckpt = open_checkpoint(llava7b_1layer[0])
    model = load_hf_model(ckpt, dtype="bfloat16")
    state = model.state_dict()
    stored = {}
    for f in ckpt.weight_files():
        with safe_open(str(f), "pt") as st:
            for name in st.keys():
                stored[name] = (f, name)
    assert len(stored) == len(state)
    saved = {"language_model.model.": "model.language_model.", "language_model.lm_head.": "lm_head.",
             "vision_tower.": "model.vision_tower.", "multi_modal_projector.": "model.multi_modal_projector."}
    picks = [n for n in stored if n.endswith(("lm_head.weight", "layers.0.mlp.down_proj.weight",
                                              "layers.23.self_attn.q_proj.weight", "linear_2.weight"))]
    assert len(picks) == 4
    for name in picks:
        f, key = stored[name]
        with safe_open(str(f), "pt") as st:
            want = st.get_tensor(key)
        prefix = next(p for p in saved if name.startswith(p))
        got = state[saved[prefix] + name[len(prefix):]]
        assert torch.equal(got, want), name
        assert 0.015 < want.float().std().item() < 0.025  # random weights at transformers' init scale


def test_saved_names_match_save_pretrained(toy_model):
    """The streaming writer names tensors exactly as save_pretrained does (checked on the toy)."""
    from safetensors import safe_open
    from transformers import LlavaConfig

    from llava_edge.toy.model import saved_tensor_names

    with safe_open(str(toy_model / "model.safetensors"), "pt") as st:
        written = {k: tuple(st.get_slice(k).get_shape()) for k in st.keys()}
    assert saved_tensor_names(LlavaConfig.from_pretrained(toy_model)) == written


def test_tinyllava_fp16_shards_with_an_index(tmp_path):
    from llava_edge.checkpoint import check_safetensors, open_checkpoint

    out = tmp_path / "tiny"
    _write_in_child(out, "tinyllava-1.1b", 1, dtype="float16", shard_bytes=300_000_000)
    ckpt = open_checkpoint(out)  # checks every shard against the index
    files = ckpt.weight_files()
    assert len(files) >= 3 and (out / "model.safetensors.index.json").is_file()
    assert all(f.stat().st_size < 400_000_000 for f in files)
    t = ckpt.text_config
    assert (t["hidden_size"], t["num_attention_heads"], t["num_key_value_heads"]) == (2048, 32, 4)
    assert {h["dtype"] for f in files for k, h in check_safetensors(f).items() if k != "__metadata__"} == {"F16"}


def test_bad_preset_and_layers_are_one_line_errors(tmp_path, capsys):
    from llava_edge.cli import main
    from llava_edge.toy.model import preset_shape

    with pytest.raises(UserError, match="--layers"):
        preset_shape("llava-1.5-7b", 0)
    assert main(["toy", "model", "--out", str(tmp_path / "m"), "--preset", "llava-3-70b"]) == 2
    assert "unknown preset 'llava-3-70b'" in capsys.readouterr().err
    assert main(["toy", "model", "--out", str(tmp_path / "m"), "--preset", "llava-1.5-7b", "--dtype", "int8"]) == 2
    assert "--dtype" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_throughput_bench_runs_the_real_loop_on_cpu(tmp_path):
    """bench/train_throughput.py end to end at toy size: samples/s from the loop's own step log."""
    from bench_script import load_bench_script

    bench = load_bench_script("train_throughput")
    out = tmp_path / "r.json"
    rc = bench.main(["--preset", "toy", "--runs", "s1,s2lora", "--steps", "2", "--warmup", "1", "--batch-s1", "2",
                     "--batch-s2", "2", "--text-tokens-s2", "24", "--workers", "0", "--out", str(out)])
    report = json.loads(out.read_text())
    assert rc == 0, report
    s1, s2 = report["runs"]
    assert s1["stage"] == "s1" and s2["lora"] and s2["params_trainable"] > s1["params_trainable"]
    for r in (s1, s2):
        assert r["steps"] == 2 and r["samples_per_s"] > 0 and len(r["losses"]) == 2
        assert r["mean_tokens_per_sample"] > 64  # the toy's 64 image tokens + text
        # the rate is the timed steps' samples over the loop's own clock, past the one warm-up step; all of it
        # recorded unrounded, so these relations hold at any speed of the machine
        assert r["timed_steps"] == 1 and r["seconds_timed"] == r["step_seconds"][1] - r["step_seconds"][0] > 0
        assert r["samples_per_s"] == pytest.approx(r["timed_steps"] * r["global_batch"] / r["seconds_timed"])
        assert r["llava_reference_samples_per_s"] == bench.LLAVA_REFERENCE[r["stage"]]
        assert r["ratio_to_llava"] == pytest.approx(r["samples_per_s"] / r["llava_reference_samples_per_s"])


@pytest.mark.slow
def test_int8_static_calibrates_clip_l_336_in_bounded_memory(llava7b_1layer, tmp_path):
    """Static int8 of the real-size tower: onnxruntime's calibration graph at 8 images a run was killed for memory
    on a 24 GiB machine; one image a run peaks near 11 GB (measured), whatever the number of images."""
    out, _ = llava7b_1layer
    b = tmp_path / "b"
    r = subprocess.run([sys.executable, "-m", "llava_edge.cli", "export", "--model", str(out), "--out", str(b),
                        "--target", "onnx"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    code = textwrap.dedent(f"""
        import json
        from llava_edge.quantize.command import quantize_bundle
        quantize_bundle({str(b)!r}, vision="int8-static", calib_count=16, log=lambda _: None)
        peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
        print(json.dumps({{"peak": peak}}))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-2000:]
    peak = json.loads(r.stdout.strip().splitlines()[-1])["peak"]
    assert peak < 16e9, f"int8-static calibration peaked at {peak / 1e9:.1f} GB"
    assert (b / "vision.int8-static.onnx").is_file()


@pytest.mark.slow
def test_fewer_image_tokens_end_to_end_at_7b_shape(llava7b_1layer, tmp_path):
    """Reduced-token variants, the recovery fine-tune, drift and the runtime's choice at LLaVA-1.5-7B's widths
    (CLIP-L/336: 24x24 patches, a 1024 -> 4096 projector), the language model cut to one layer."""
    import numpy as np
    import torch

    from cli_run import le
    from llava_edge import manifest
    from llava_edge.checkpoint import load_hf_model, open_checkpoint
    from llava_edge.image_tokens import image_features, plan
    from llava_edge.preprocess import ImageSpec, load_image, preprocess
    from llava_edge.quantize.vision import run_graph

    model, _ = llava7b_1layer
    data, b, tuned = tmp_path / "data", tmp_path / "b", tmp_path / "tuned"

    def ok(*args, timeout=1800):
        r = le(*args, timeout=timeout)
        assert r.returncode == 0, r.stderr[-3000:]
        return r

    ok("toy", "data", "--out", data, "--n-stage1", "1", "--n-stage2", "4", "--n-eval", "2", "--image-size", "336")
    ok("export", "--model", model, "--out", b, "--target", "all", "--llm-outtype", "f16", "--mmproj-outtype", "f16")
    ok("quantize", b, "--image-tokens", "144", "--token-method", "pool,dominant")
    m = manifest.read(b)
    for name, method in (("fp32-pool144", "pool"), ("fp32-dominant144", "dominant")):
        v = m.find("vision", name=name)[0]
        assert m.image_tokens(v) == 144 and v.token_reduction.method == method

    # the spliced graph computes the torch reduction of the model it came from, 144 positions of 4096
    image = sorted((data / "images").glob("eval_*.png"))[0]
    px = preprocess(load_image(image), ImageSpec.from_dict(m.image))[None]
    hf = load_hf_model(open_checkpoint(model), dtype="float32").eval()
    with torch.no_grad():
        want = image_features(hf, torch.from_numpy(px), plan("pool", 144, 24)).numpy()
    del hf
    got = run_graph(b / "vision.fp32-pool144.onnx", px)
    assert got.shape == want.shape == (1, 144, 4096)
    assert np.abs(got - want).max() < 1e-3 * np.abs(want).max()

    # the recovery fine-tune at this size (LLaVA-1.5's preset; fp32 on a CPU), then its own variant
    ok("train", "stage2", "--model", model, "--data", data / "stage2_instruct.json", "--image-folder", data,
       "--output", tuned, "--preset", "llava-1.5-7b", "--image-tokens", "144", "--token-method", "pool",
       "--tune", "projector", "--max-steps", "2", "--global-batch", "2", "--per-device-batch", "1")
    assert json.loads((tuned / "mm_projector.json").read_text())["token_reduction"]["tokens"] == 144
    ok("quantize", b, "--image-tokens", "144", "--token-method", "pool", "--projector", tuned)

    # drift of every 144-token variant against the full reference, recorded in the bundle
    ok("drift", b, "--reference", model, "--eval", data / "eval.json", "--report", tmp_path / "drift", "--record",
       "--variants", "fp32:f16,fp32-pool144:f16,fp32-dominant144:f16,fp32-pool144-tuned:f16", "--max-tokens", "4")
    pairs = {f"{p['vision']}:{p['llm']}": p for p in json.loads((tmp_path / "drift" / "drift.json").read_text())["pairs"]}
    assert {p["image_tokens"] for k, p in pairs.items() if k != "fp32:f16"} == {144}
    full = pairs["fp32:f16"]["token_drift"]
    for k in ("fp32-pool144:f16", "fp32-dominant144:f16", "fp32-pool144-tuned:f16"):
        d = pairs[k]["token_drift"]
        assert d["positions"] == full["positions"] > 0 and np.isfinite(d["kl_mean"])
        assert pairs[k]["vision_drift"]["tokens"] == 144 * 2  # both questions' features against torch's
    m = manifest.read(b)
    assert m.drift_records(m.find("vision", name="fp32-pool144-tuned")[0])["f16"]["image_tokens"] == 144

    # asked for 144 tokens, the runtime takes the tuned projector and says what it cost
    r = ok("chat", "--bundle", b, "--image-tokens", "144", "--explain", "--image", image, "--max-tokens", "2",
           "What is in the image?")
    assert "fp32-pool144-tuned" in r.stdout + r.stderr
    assert "image tokens: 144 of 576" in r.stdout + r.stderr and "measured with f16 on 2 questions" in r.stdout + r.stderr
