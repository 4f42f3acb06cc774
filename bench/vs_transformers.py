"""llava-edge against transformers' own ``generate``, on the same LLaVA-OneVision checkpoint, on this machine.

    python bench/vs_transformers.py --model CKPT --bundle BUNDLE --out DIR [--rounds 3]
        [--variants int8:q8_0,fp32:f32] [--scenes one,two] [--new-tokens 32] [--threads N]

llama.cpp has no LLaVA-OneVision image path, so what a user runs today is transformers:
``LlavaOnevisionForConditionalGeneration.from_pretrained(CKPT, dtype=torch.float32)`` and its ``generate``,
the pictures prepared by ``LlavaOnevisionImageProcessorPil.from_pretrained(CKPT)`` (the default image
processor class needs torchvision). ``BUNDLE`` was exported from ``CKPT``; each ``--variants`` pair
(vision:language model) is one llava-edge contestant (``EdgeLLaVA`` with the CPU profile).

Both sides get the same prompt ids: llava-edge's, its picture positions written as the checkpoint's image
token. transformers' model replaces those tokens with the features it computes and refuses a prompt whose
count differs, and the features it computed are counted here as well: both sides prefill the same
positions, every one exact.

Scenes: ``one``, a 640x480 picture (tiled on OneVision's grids, shrunk under ``anyres_max_9``); ``two``,
two 640x480 pictures in one prompt (each padded to a square: one tile and one newline each). Every
contestant answers ``--new-tokens`` tokens from an empty KV cache, end of sequence ignored (the weights
are random: ``min_new_tokens`` in transformers; in llava-edge the end-of-generation test and stop strings
are switched off for the run). Measured per round:

- TTFT: the picture files given -> the first answer token (read, preprocess, vision encode, prefill,
  greedy pick). llava-edge: :func:`llava_edge.bench.time_chat_pass` with no saved prefix, so it decodes
  the whole prompt as transformers does; transformers: timed to the streamer's first new token.
- decode tokens/s: the answer's single-token steps. llava-edge: ``EdgeLLaVA.generate``'s steps
  (:func:`llava_edge.bench.time_decode`); transformers: the new tokens after the first over the time
  between the first and the last reaching the streamer.

Contestants are timed interleaved after one untimed warm-up each (``side_by_side.interleaved``), medians
reported, the same thread count for torch, onnxruntime and llama.cpp. Results:
``DIR/vs_transformers.json`` and ``DIR/vs_transformers.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import side_by_side as sbs  # noqa: E402

from llava_edge import families  # noqa: E402
from llava_edge import manifest as bundle_manifest  # noqa: E402
from llava_edge.bench import (BENCH_IMAGE_SIZE, DEFAULT_QUESTION, CpuShare, chat_pass_slots, machine_info,  # noqa: E402
                              time_chat_pass, versions, write_bench_image)
from llava_edge.runtimes.llm import ImageSlot  # noqa: E402

SCENES = {"one": 1, "two": 2}  # scene -> pictures in its prompt
GOALS = {"ttft": 0.3, "decode": 3.0}  # llava-edge's TTFT at most 0.3x transformers', its decode at least 3x
HF = "transformers generate (fp32)"
VERSION_EXTRA = ("torch", "transformers")


class TokenClock:
    """A ``generate`` streamer that notes when each new token arrives (the first ``put`` is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt = True

    def put(self, value) -> None:
        if self._prompt:
            self._prompt = False
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


class Transformers:
    """What a transformers user runs: the checkpoint's class in fp32, its PIL image processor, ``generate``."""

    def __init__(self, model_dir: Path, family, threads: int):
        import torch
        import transformers
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
            LlavaOnevisionImageProcessorPil)

        torch.set_num_threads(threads)
        self.torch = torch
        self.model = getattr(transformers, family.hf_class_name).from_pretrained(str(model_dir),
                                                                                dtype=torch.float32).eval()
        self.processor = LlavaOnevisionImageProcessorPil.from_pretrained(str(model_dir))
        self.image_token = int(self.model.config.image_token_id)
        inner = self.model.model
        features = inner.get_image_features
        self.vision: list[tuple[int, float]] = []  # (positions, seconds) of each call of its vision path

        @functools.wraps(features)  # generate reads its signature to pass it the pixels
        def counted(*a, **kw):  # the model's own image path, timed, its positions counted
            t = time.perf_counter()
            out = features(*a, **kw)
            self.vision.append((sum(int(f.shape[0]) for f in out.pooler_output), time.perf_counter() - t))
            return out

        inner.get_image_features = counted

    def answer(self, pictures: list[Path], ids: list[int], eos: int, new_tokens: int) -> dict:
        from PIL import Image

        torch = self.torch
        clock = TokenClock()
        t0 = time.perf_counter()
        ims = [Image.open(p).convert("RGB") for p in pictures]
        # several pictures of one prompt are one nested list: each padded to a square, one tile (not tiled)
        px = self.processor(images=ims if len(ims) == 1 else [ims], return_tensors="pt")
        t1 = time.perf_counter()
        input_ids = torch.tensor([ids])
        with torch.inference_mode():
            self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                pixel_values=px["pixel_values"], image_sizes=px["image_sizes"],
                                batch_num_images=px["batch_num_images"], max_new_tokens=new_tokens,
                                min_new_tokens=new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=eos,
                                streamer=clock)
        positions, vision_s = self.vision[-1]
        ttft = clock.times[0] - t0
        return {"ttft_s": ttft, "tokens": len(clock.times), "image_positions": positions,
                "prompt_positions": len(ids),
                "decode_tokens_per_s": (len(clock.times) - 1) / (clock.times[-1] - clock.times[0]),
                "phases_s": {"preprocess": t1 - t0, "vision_encode": vision_s,
                             "prefill": ttft - (t1 - t0) - vision_s}}


class _NoStop:
    """A conversation mode without stop strings (its ``stop`` is a property of the mode's style)."""

    stop = ()

    def __init__(self, template):
        self._template = template

    def __getattr__(self, name):
        return getattr(self._template, name)


@contextlib.contextmanager
def eos_ignored(model):
    """``model`` (an ``EdgeLLaVA``) answers its whole ``max_tokens``: no end-of-generation token, no stop string."""
    saved = model.eos_id, model.template
    model.eos_id = -1
    model.llm.is_eog = lambda token: False
    model.template = _NoStop(model.template)
    try:
        yield model
    finally:
        model.eos_id, model.template = saved
        del model.llm.is_eog


def edge_answer(model, pictures: list[Path], question: str, new_tokens: int) -> dict:
    with eos_ignored(model):
        r = time_chat_pass(model, pictures, question, decode_tokens=new_tokens, fresh=True)
    return {"ttft_s": r["ttft_ms"] / 1e3, "tokens": r["decode_tokens"], "image_positions": r["image_positions"],
            "prompt_positions": r["prompt_positions"], "decode_tokens_per_s": r["decode_tokens_per_s"],
            "decoded_positions": r["prefill_tokens"],
            "phases_s": {"preprocess": r["preprocess_ms"] / 1e3, "vision_encode": r["vision_encode_ms"] / 1e3,
                         "prefill": (r["tokenize_ms"] + r["prefill_ms"]) / 1e3}}


def race(scene: str, pictures: list[Path], hf: Transformers, ours: dict, question: str, new_tokens: int,
         rounds: int) -> dict:
    first = next(iter(ours.values()))
    prepared = [first.prepare_image(p, alone=len(pictures) == 1) for p in pictures]
    slots = chat_pass_slots(first, prepared, question, several=len(pictures) > 1)
    ids = [hf.image_token if isinstance(s, ImageSlot) else int(s) for s in slots]
    records: dict[str, list[dict]] = {}

    def contestant(name, fn):
        def run() -> float:
            records.setdefault(name, []).append(fn())
            return records[name][-1]["ttft_s"]
        return run

    contestants = {HF: contestant(HF, lambda: hf.answer(pictures, ids, first.eos_id, new_tokens))}
    for name, model in ours.items():
        contestants[name] = contestant(name, lambda model=model: edge_answer(model, pictures, question, new_tokens))
    sbs.log(f"{scene}: {', '.join(contestants)}; {rounds} rounds")
    with CpuShare() as busy:
        sbs.interleaved(contestants, rounds)
    timed = {k: v[1:] for k, v in records.items()}  # [0]: the warm-up
    ttft = {k: sbs.median([r["ttft_s"] for r in v]) for k, v in timed.items()}
    tps = {k: sbs.median([r["decode_tokens_per_s"] for r in v]) for k, v in timed.items()}
    return {
        "pictures": len(pictures), "image": f"{BENCH_IMAGE_SIZE[0]}x{BENCH_IMAGE_SIZE[1]} JPEG",
        "rounds": rounds, "new_tokens": new_tokens,
        "ttft_s": {k: [r["ttft_s"] for r in v] for k, v in timed.items()},
        "decode_tokens_per_s": {k: [r["decode_tokens_per_s"] for r in v] for k, v in timed.items()},
        "median_ttft_s": ttft, "median_decode_tokens_per_s": tps,
        "tokens_answered": {k: [r["tokens"] for r in v] for k, v in records.items()},
        "image_positions": {k: v[-1]["image_positions"] for k, v in records.items()},
        "prompt_positions": {k: v[-1]["prompt_positions"] for k, v in records.items()},
        "llava_edge_decoded_positions": {k: [r["decoded_positions"] for r in v] for k, v in records.items()
                                         if k != HF},
        "phases_median_s": {k: {p: sbs.median([r["phases_s"][p] for r in v]) for p in v[0]["phases_s"]}
                            for k, v in timed.items()},
        "ttft_ratio_vs_transformers": {k: ttft[k] / ttft[HF] for k in ttft if k != HF},
        "decode_ratio_vs_transformers": {k: tps[k] / tps[HF] for k in tps if k != HF},
        "busy": busy.to_dict(),
    }


def markdown(report: dict) -> str:
    mach, ver = report["machine"], report["versions"]
    lines = [f"Machine: {mach['cpu']}, {mach['usable_cpus']} CPUs, {mach.get('memory_gb')} GB, {mach['os']}; "
             f"Python {mach['python']}; " + ", ".join(f"{k} {v}" for k, v in ver.items() if v) + ".",
             f"transformers: {report['transformers']['class']} in {report['transformers']['dtype']} "
             f"({report['transformers']['attention']} attention), LlavaOnevisionImageProcessorPil; "
             f"{report['threads']} threads everywhere; {report['rounds']} interleaved rounds, medians; "
             f"{report['new_tokens']} new tokens, end of sequence ignored."]
    for scene, s in report["scenes"].items():
        lines += ["", f"Scene `{scene}`: {s['pictures']} {s['image']} picture(s) + question:", "",
                  "| contestant | TTFT median s | vs transformers | decode tok/s median | vs transformers | "
                  "prompt positions | image positions | where TTFT goes (median s) |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for name, t in sorted(s["median_ttft_s"].items(), key=lambda kv: kv[1]):
            ours = name != HF
            tr = f"**{s['ttft_ratio_vs_transformers'][name]:.2f}x**" if ours else "1"
            dr = f"**{s['decode_ratio_vs_transformers'][name]:.2f}x**" if ours else "1"
            where = ", ".join(f"{k} {x:.2f}" for k, x in s["phases_median_s"][name].items())
            lines.append(f"| {name} | {t:.2f} | {tr} | {s['median_decode_tokens_per_s'][name]:.2f} | {dr} | "
                         f"{s['prompt_positions'][name]} | {s['image_positions'][name]} | {where} |")
        met = [f"{name}: TTFT {'met' if s['ttft_ratio_vs_transformers'][name] <= GOALS['ttft'] else 'missed'}, "
               f"decode {'met' if s['decode_ratio_vs_transformers'][name] >= GOALS['decode'] else 'missed'}"
               for name in s["ttft_ratio_vs_transformers"]]
        lines.append(f"\nGoals: TTFT <= {GOALS['ttft']}x, decode >= {GOALS['decode']}x; " + "; ".join(met) +
                     f"; {sbs._busy(s['busy'])}.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="llava-hf checkpoint the bundle was exported from")
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--variants", default="int8:q8_0", help="llava-edge contestants, comma-separated "
                    "VISION:LLM variant pairs of the bundle, each optionally :KV, the KV cache type: f16 (the "
                    "default; llama.cpp's flash attention on) or f32 (flash attention off)")
    ap.add_argument("--scenes", default=",".join(SCENES), help=f"comma-separated: {', '.join(SCENES)}")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--question", default=DEFAULT_QUESTION)
    a = ap.parse_args(argv)
    scenes = [s.strip() for s in a.scenes.split(",") if s.strip()]
    if not scenes or not set(scenes) <= set(SCENES):
        ap.error(f"--scenes: comma-separated, of {', '.join(SCENES)}")
    if a.rounds < 1 or a.threads < 1 or a.new_tokens < 2:
        ap.error("--rounds and --threads must be at least 1, --new-tokens at least 2")
    pairs = [tuple(p.split(":")) for p in a.variants.split(",") if p.strip()]
    if not pairs or any(len(p) not in (2, 3) or not all(p) or p[2:] not in ((), ("f16",), ("f32",)) for p in pairs):
        ap.error("--variants: comma-separated VISION:LLM[:KV] (KV f16 or f32), e.g. int8:q8_0,fp32:f32,int8:q4_0:f32")
    pairs = [(p[0], p[1], p[2] if len(p) == 3 else "f16") for p in pairs]
    if not (a.model / "config.json").is_file():
        ap.error(f"--model {a.model}: no config.json there (a llava-hf checkpoint directory)")
    m = bundle_manifest.read(a.bundle)
    family = families.by_name(m.family)
    if family.name != "llava-onevision":
        ap.error(f"the bundle is {family.title}: this compares LLaVA-OneVision with transformers; "
                 "bench/side_by_side.py compares the other families with llama.cpp")
    from llava_edge.runtimes.pipeline import EdgeLLaVA

    n_ctx = sbs.context_size(family, m)
    ours = {f"llava-edge ({v}, {llm}{', KV f32' if kv == 'f32' else ''})":
            EdgeLLaVA.load(a.bundle, device="cpu", vision_variant=v, llm_variant=llm, threads=a.threads,
                           n_ctx=n_ctx, prefix_cache=False, kv_cache=kv)
            for v, llm, kv in pairs}
    hf = Transformers(a.model, family, a.threads)
    a.out.mkdir(parents=True, exist_ok=True)
    report: dict = {"machine": machine_info(), "versions": {**versions(), **versions(VERSION_EXTRA)},
                    "model": str(a.model), "bundle": str(a.bundle), "family": family.name, "rounds": a.rounds,
                    "threads": a.threads, "new_tokens": a.new_tokens, "question": a.question, "n_ctx": n_ctx,
                    "variants": [f"{v}:{llm}:{kv}" for v, llm, kv in pairs], "goals": GOALS,
                    "transformers": {"class": family.hf_class_name, "dtype": str(hf.model.dtype).removeprefix("torch."),
                                     "attention": hf.model.config._attn_implementation},
                    "model_config": json.loads((a.model / "config.json").read_text())["text_config"],
                    "scenes": {}}
    with tempfile.TemporaryDirectory(prefix="vs-transformers-") as tmp:
        photos = [write_bench_image(Path(tmp) / f"photo{i}.jpg", seed=i) for i in range(max(SCENES.values()))]
        for scene in scenes:
            report["scenes"][scene] = race(scene, photos[: SCENES[scene]], hf, ours, a.question, a.new_tokens,
                                           a.rounds)
            (a.out / "vs_transformers.json").write_text(json.dumps(report, indent=2))
    for model in ours.values():
        model.close()
    md = markdown(report)
    (a.out / "vs_transformers.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
