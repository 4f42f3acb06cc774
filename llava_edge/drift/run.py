"""``llava-edge drift``: measure every (vision, language model) variant pair of a bundle against the reference.

For each pair the bundle is loaded through the runtime (``EdgeLLaVA``: the
vision graph in onnxruntime, the GGUF in llama.cpp, with llama.cpp's default
f16 KV cache unless told otherwise: what a device runs), and for each question:

1. the image is encoded by the variant's vision graph and compared with the
   reference's image features (cosine per image token, relative error);
2. the reference's answer is fed after the prompt (teacher forcing) and the
   logits at each answer position are compared with the reference's (KL,
   top-1 agreement, change of the reference token's probability);
3. the variant answers greedily on its own, and its answer is compared with the
   reference's answer and, where the set has gold answers, scored.

Pairs run one after the other, each with its own ``EdgeLLaVA`` (the runtime's
public API; loading a GGUF is memory-mapped and quick).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from llava_edge import families
from llava_edge import manifest as bundle_manifest
from llava_edge import variants
from llava_edge.variants import Pair
from llava_edge.errors import UserError

from . import metrics
from .formats import EvalSet, parse_picture_counts, with_pictures
from .reference import Reference

WORST_TOKENS = 10  # positions with the largest KL kept per pair, for finding out why a gate fails
WORST_IMAGES = 5  # images with the worst image-token cosine kept per pair
FLIPS = 20  # positions where the variant's most likely token differs from the reference's, kept per pair
DISAGREEMENTS = 20  # answers that differ from the reference's kept per pair
# pictures a prompt by default, for a model trained with several a conversation: each one-picture question
# alone, then among one and two other pictures
SEVERAL_PICTURES = (1, 2, 3)


def picture_counts(m: bundle_manifest.Manifest, text: str | None) -> tuple[int, ...]:
    """``--pictures``: how many pictures each one-picture question is asked with; by default 1, 2 and 3 for a
    model trained with several pictures a conversation (the manifest's ``image.several_images``), else 1."""
    if text is None:
        return SEVERAL_PICTURES if several_images(m) else (1,)
    counts = parse_picture_counts(text)
    if max(counts) > 1:
        check_several(m, max(counts), f"--pictures {text}")
    return counts


def several_images(m: bundle_manifest.Manifest) -> bool:
    return bool(m.image.get("several_images"))


def check_several(m: bundle_manifest.Manifest, n: int, what: str) -> None:
    """A one-line error for prompts of ``n`` pictures (``what`` asked for them) where the model takes one."""
    if n > 1 and not several_images(m):
        raise UserError(f"{what}: {families.by_name(m.family).title} checkpoints like this one were trained with "
                        f"one picture a conversation (the bundle's image.several_images is not set)")


def runnable_variants(m: bundle_manifest.Manifest, kind: str) -> list[bundle_manifest.Variant]:
    """The variants of ``kind`` the CPU runtime can run (TensorRT engines need their GPU)."""
    return m.find(kind, portable=True)


def parse_pairs(text: str | None, m: bundle_manifest.Manifest) -> list[Pair]:
    """``--variants`` by ``variants.parse_pairs``; by default every combination."""
    return variants.parse_pairs(text, m, default=variants.every_pair)


def feature_key(v: bundle_manifest.Variant) -> str | None:
    """Which of the reference's image features vision variant ``v`` is compared with: None, LLaVA's own (every
    patch); else its reduction's, and with a tuned projector that projector's (by its file's sha256)."""
    r = v.token_reduction
    if r is None:
        return None
    proj = v.extra.get("projector")
    return r.label if proj is None else f"{r.label}-tuned-{str(proj.get('sha256'))[:16]}"


def tuned_projector(bundle: Path, v: bundle_manifest.Variant) -> tuple:
    """(reduction, weights) of the projector ``v`` was made with (``quantize --projector``), read from where it was
    made from (relative to the working directory quantize ran in, or to the bundle) and checked by sha256."""
    from llava_edge.image_tokens import read_projector

    rec = v.extra["projector"]
    src = Path(str(rec.get("from")))
    for path in (src, bundle / src) if not src.is_absolute() else (src,):
        if path.exists():
            break
    else:
        raise UserError(f"its tuned projector {src} is not there any more")
    weights, sha = read_projector(path, v.token_reduction)
    if sha != rec.get("sha256"):
        raise UserError(f"its tuned projector {src} changed since the variant was made (sha256)")
    return v.token_reduction, weights


def measure_pair(bundle: Path, pair: Pair, eval_set: EvalSet, ref: Reference, *, max_tokens: int,
                 kv_cache: str = "f16", threads: int = 0, image_tokens: int | None = None) -> dict:
    """Every metric of one pair (see the module docstring); answers included for scoring. ``image_tokens``: a
    tiled family's cap on a picture's positions (its image features are then not compared: the reference's
    are every position's; its logits and answers are, against the full reference)."""
    from llava_edge.runtimes.pipeline import EdgeLLaVA, Sampling

    t0 = time.time()

    def load(**kw) -> EdgeLLaVA:
        return EdgeLLaVA.load(bundle, vision_variant=pair.vision, llm_variant=pair.llm, kv_cache=kv_cache,
                              threads=threads, **({} if image_tokens is None else {"image_tokens": image_tokens}), **kw)

    m = load()
    # the runtime sizes its context for one picture at most; a prompt of several may need more (the context's
    # size does not change a logit)
    need = max((r.positions + max(max_tokens, len(r.answer_ids)) for r in ref.items), default=0)
    if need > m.plan.n_ctx:
        m.close()
        m = load(n_ctx=need)
    try:
        cosines, rel_errors, drifts, answers = [], [], [], []
        by_count: dict[int, list[metrics.TokenDrift]] = {}  # pictures a prompt -> its prompts' token drift
        worst: list[dict] = []
        images: list[dict] = []
        flips: list[dict] = []
        prompt_mismatch = 0
        reduction = m.vision_variant.token_reduction
        cap = m.plan.position_cap
        tuned = "projector" in m.vision_variant.extra
        fkey = feature_key(m.vision_variant)
        for item, r in zip(eval_set.items, ref.items):
            pictures = _embedded(m, item.pictures)
            features = (None if cap is not None else r.image_features if reduction is None
                        else r.reduced_features.get(fkey))
            for j, (_, emb) in enumerate(pictures if features is not None else []):
                cosines.append(metrics.cosine_rows(emb, features[j]))
                rel_errors.append(metrics.relative_error(emb, features[j]))
                images.append({"id": item.id if len(pictures) == 1 else f"{item.id} picture {j + 1}",
                               "cos_min": float(cosines[-1].min()), "worst_token": int(cosines[-1].argmin()),
                               "rel_error": rel_errors[-1]})
            parts = m.template.prompt(item.question, image=len(pictures))
            prompt_mismatch += m.tokenizer.encode_prompt(parts, m.image_token_id,
                                                       **m.template.encoding) != r.prompt_ids
            slots = m.picture_slots(parts, [(key, len(emb)) for key, emb in pictures])
            embeds = dict(pictures)
            n = len(r.answer_ids)
            if n:
                m.llm.reset()
                logits = m.prefill(slots + list(r.answer_ids[:-1]), embeds, logits="all")[-n:]
                d = metrics.token_drift(r.logits, logits, r.answer_ids)
                drifts.append(d)
                by_count.setdefault(len(pictures), []).append(d)
                worst += _positions(item.id, np.argsort(-d.kl)[:WORST_TOKENS], d, r, logits, m.tokenizer)
                worst = sorted(worst, key=lambda w: -w["kl"])[:WORST_TOKENS]
                if len(flips) < FLIPS:
                    flips += _positions(item.id, np.flatnonzero(~d.same_top1), d, r, logits, m.tokenizer)[
                        : FLIPS - len(flips)]
            answers.append("".join(m.generate(slots, embeds, Sampling(max_tokens=max_tokens))).strip())
    finally:
        m.close()
    same = [a == r.answer.strip() for a, r in zip(answers, ref.items)]
    v_var, l_var = m.vision_variant, m.llm_variant
    return {
        "vision": pair.vision, "llm": pair.llm,
        "vision_precision": v_var.precision, "llm_precision": l_var.precision,
        "image_tokens": m.n_image_tokens,
        "token_reduction": ({"method": "bilinear-cap", "tokens": cap} if cap is not None else None
                            if reduction is None else {**reduction.to_dict(), "tuned_projector": tuned}),
        "sha256": {"vision": v_var.sha256, "llm": l_var.sha256},
        "files": {"vision": v_var.file, "llm": l_var.file},
        "llm_tensor_types": l_var.extra.get("tensor_types"),
        "vision_drift": metrics.summarize_vision(cosines, rel_errors),
        "token_drift": metrics.summarize_tokens(metrics.TokenDrift.concat(drifts)),
        "answer_agreement": float(np.mean(same)) if same else None,
        "by_pictures": by_pictures(eval_set, by_count, same),
        "disagreements": [{"id": i.id, "reference": r.answer.strip(), "variant": a}
                          for i, r, a, s in zip(eval_set.items, ref.items, answers, same) if not s][:DISAGREEMENTS],
        "worst_tokens": worst,
        "top1_flips": flips,
        "worst_images": sorted(images, key=lambda x: x["cos_min"])[:WORST_IMAGES],
        "prompt_mismatches": prompt_mismatch,
        "vision_providers": getattr(m.vision, "providers", None),
        "answers": answers,
        "seconds": round(time.time() - t0, 1),
    }


def _embedded(m, pictures: tuple) -> list[tuple[str, np.ndarray]]:
    """(key, embeddings) of each picture of a prompt, as the runtime takes them: a picture alone as the family
    takes one picture, each of several as it takes one of several (LLaVA-OneVision: one padded tile and a
    newline)."""
    from llava_edge.runtimes.pipeline import only_image

    alone = only_image(list(pictures))
    out = []
    for picture in pictures:
        prepared, embeddings = m.lazy_image(picture, alone=alone)
        out.append((prepared.key, embeddings()))
    return out


def by_pictures(eval_set: EvalSet, drifts: dict[int, list], same: list[bool]) -> dict[str, dict]:
    """The pair's drift split by how many pictures a prompt shows: prompts, answers equal to the reference's,
    and the token measures (KL, top-1, delta p) of those prompts."""
    out = {}
    for n, prompts in eval_set.picture_counts().items():
        agree = [s for i, s in zip(eval_set.items, same) if len(i.pictures) == int(n)]
        out[n] = {"prompts": prompts, "answer_agreement": float(np.mean(agree)) if agree else None,
                  "token_drift": metrics.summarize_tokens(metrics.TokenDrift.concat(drifts.get(int(n), [])))}
    return out


def _positions(item_id: str, where, d: metrics.TokenDrift, r, logits: np.ndarray, tokenizer) -> list[dict]:
    """Answer positions ``where`` of one question, described for a person: tokens, both probabilities, the margin.

    ``ref_margin``: the reference's probability of its top token minus that of
    the variant's top token; a top-1 flip at a small margin is a near tie that
    any rounding can tip, a flip at a large margin is real damage.
    """
    lp_ref = metrics.log_softmax(r.logits)

    def text(t: int) -> str:
        return tokenizer.decode([int(t)]) or f"<{int(t)}>"

    out = []
    for i in where:
        i = int(i)
        top_v = int(logits[i].argmax())
        out.append({
            "id": item_id, "position": i, "token": text(r.answer_ids[i]), "kl": float(d.kl[i]),
            "p_ref": float(d.p_ref[i]), "p_variant": float(d.p_variant[i]), "top1_variant": text(top_v),
            "ref_margin": float(np.exp(lp_ref[i]).max() - np.exp(lp_ref[i, top_v])),
        })
    return out


def run_drift(bundle: str | Path, reference: str | Path, eval_set: EvalSet, pairs: list[Pair] | None = None, *,
              max_tokens: int = 32, kv_cache: str = "f16", threads: int = 0, device: str = "auto",
              image_tokens: int | None = None, log: Callable[[str], None] = print) -> dict:
    """Measure ``pairs`` (default: every combination) of ``bundle`` against the Hugging Face model ``reference``
    (``image_tokens``: a tiled family's cap on a picture's positions, applied to every pair).

    Returns the whole result (what ``drift.json`` holds), without gate verdicts
    (:func:`llava_edge.drift.gates.evaluate` adds them).
    """
    from .reference import compute_reference

    bundle = Path(bundle)
    if max_tokens < 1:
        raise UserError("--max-tokens must be at least 1")
    if kv_cache not in ("f16", "f32"):
        raise UserError(f"unknown --kv-cache {kv_cache!r} (f16 or f32)")
    m = bundle_manifest.read(bundle)
    most = max((len(i.pictures) for i in eval_set.items), default=0)
    check_several(m, most, f"the evaluation set has prompts with {most} pictures")
    pairs = pairs or parse_pairs(None, m)
    reductions = tuple(dict.fromkeys(r for r in (m.variant("vision", p.vision).token_reduction for p in pairs) if r))
    notes = list(eval_set.notes)
    projectors = {}
    for v in (m.variant("vision", name) for name in dict.fromkeys(p.vision for p in pairs)):
        if "projector" in v.extra:
            try:
                projectors[feature_key(v)] = tuned_projector(bundle, v)
            except UserError as e:
                notes.append(f"{v.name}'s image features are not compared with the reference's: {e}")
                log(f"warning: {notes[-1]}")
    ref = compute_reference(reference, eval_set.items, m.conv_mode, m.chat_template, max_new_tokens=max_tokens,
                            device=device, reductions=reductions, projectors=projectors, log=log)
    ref_score = eval_set.score([r.answer for r in ref.items])
    for note in source_notes(m.source or {}, ref, reference):
        notes.append(note)
        log(f"warning: {note}")
    results = []
    counts = eval_set.picture_counts()
    if len(counts) > 1:
        log("prompts by pictures: " + ", ".join(f"{k} with {n}" for n, k in counts.items()))
    for pair in pairs:
        log(f"drift {pair.label}: {len(eval_set.items)} questions")
        r = measure_pair(bundle, pair, eval_set, ref, max_tokens=max_tokens, kv_cache=kv_cache, threads=threads,
                         image_tokens=image_tokens)
        score = eval_set.score(r.pop("answers"))
        r["score"] = score
        if score is not None and ref_score is not None:
            r["accuracy"] = score["accuracy"]
            r["accuracy_drop_points"] = round(100 * (ref_score["accuracy"] - score["accuracy"]), 6)
        t, v = r["token_drift"], r["vision_drift"]
        log((f"  vision cos mean {v['cos_mean']:.6f} min {v['cos_min']:.6f}; " if "cos_min" in v
             else "  vision not compared; ")
            + f"KL mean {t.get('kl_mean', float('nan')):.3g} p99 {t.get('kl_p99', float('nan')):.3g}; "
            f"top-1 {t.get('top1', float('nan')):.2%}; answers as reference {r['answer_agreement']:.1%}"
            + (f"; accuracy {r['accuracy']:.1%}" if "accuracy" in r else "") + f" ({r['seconds']} s)")
        results.append(r)
    return {
        "bundle": str(bundle),
        "reference": {**ref.info(), "score": ref_score,
                      "answers_ending_in_eos": sum(bool(i.answer_ids) and i.answer_ids[-1] == m.llm["eos_id"]
                                                   for i in ref.items)},
        "eval": {"format": eval_set.format, "source": eval_set.source, "questions": len(eval_set.items),
                 "with_image": sum(bool(i.pictures) for i in eval_set.items), "gold": eval_set.has_gold,
                 "pictures": counts},
        "runtime": _runtime_info(kv_cache, threads, max_tokens),
        "notes": notes,
        "pairs": results,
    }


def source_notes(source: dict, ref: Reference, reference: str | Path) -> list[str]:
    """Warnings when the reference is not (or may not be) the checkpoint the bundle was exported from.

    The fingerprint covers config and tensor headers (the architecture); the
    stamp, the checkpoint files' names, sizes and times (a copy or retrained
    weights change it, so it is a hint, not proof).
    """
    if source.get("fingerprint") and source["fingerprint"] != ref.fingerprint:
        return [f"the reference {reference} is not the checkpoint the bundle was exported from (fingerprint "
                f"{ref.fingerprint[:12]}, the bundle's {source['fingerprint'][:12]})"]
    if source.get("stamp") and source["stamp"] != ref.stamp:
        return [f"the reference {reference} has the architecture of the bundle's source but other files (names, "
                "sizes or times): a copy, or not the weights the bundle was exported from"]
    return []


def _runtime_info(kv_cache: str, threads: int, max_tokens: int) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    def ver(p: str) -> str:
        try:
            return version(p)
        except PackageNotFoundError:
            return "?"

    return {"vision": f"onnxruntime {ver('onnxruntime')} (CPU)", "llm": f"llama-cpp-python {ver('llama-cpp-python')} "
            "(CPU)", "kv_cache": kv_cache, "threads": threads or "all cores", "max_tokens": max_tokens,
            "decoding": "greedy"}


def drift_bundle(bundle: str | Path, reference: str | Path, *, eval_file: str | Path | None = None,
                 eval_format: str = "auto", image_folder: str | Path | None = None, variants: str | None = None,
                 report: str | Path | None = None, fail_on: str | None = None, limit: int | None = None,
                 max_tokens: int = 32, kv_cache: str = "f16", threads: int = 0, device: str = "auto",
                 eval_source: str | None = None, gate_limit: str | None = None, record: bool = False,
                 image_tokens: int | None = None, pictures: str | None = None,
                 log: Callable[[str], None] = print) -> tuple[dict, list[dict]]:
    """What ``llava-edge drift`` does: check the arguments, measure, judge the gates, write the report.

    ``eval_source``: how the report names the questions (default: the file's path). ``gate_limit``: limits
    that replace the gates' (``gates.with_limits``). ``record``: write each pair's outcome into the bundle's
    manifest (:func:`record_drift`), where ``chat --explain`` and the device profiles read it. ``pictures``:
    ``--pictures`` (:func:`picture_counts`; :func:`~llava_edge.drift.formats.with_pictures`).

    Returns (the result, the failed verdicts of the gates named in ``fail_on``).
    Everything that can be checked before the (slow) measuring is checked first.
    ``eval_file`` is required here; the CLI generates toy questions when none is given.
    """
    from . import gates
    from .diagnose import diagnose_failures
    from .formats import read_eval
    from .report import markdown, write_report

    bundle = Path(bundle)
    if limit is not None and limit < 1:
        raise UserError("--limit must be at least 1")
    m = bundle_manifest.read(bundle)
    pairs = parse_pairs(variants, m)
    counts = picture_counts(m, pictures)
    if image_tokens is not None:
        family = families.by_name(m.family)
        family.check_cap(image_tokens)
        if record:
            raise UserError("--record writes what the bundle's variants cost as they load; a cap set with "
                            "--image-tokens at run time is reported, not recorded: leave out --record")
    limits = gates.with_limits(gate_limit)
    precision = {(v.kind, v.name): v.precision for v in m.variants}
    names = gates.parse_fail_on(fail_on, [(precision[("vision", p.vision)], precision[("llm", p.llm)],
                                           image_tokens is not None
                                           or m.variant("vision", p.vision).token_reduction is not None)
                                          for p in pairs])
    if eval_file is None:
        raise UserError("drift needs questions: --eval FILE (toy, ScienceQA or POPE format)")
    eval_set = with_pictures(read_eval(eval_file, eval_format, image_folder, limit), counts)
    if eval_source:
        eval_set.source = eval_source
    result = run_drift(bundle, reference, eval_set, pairs, max_tokens=max_tokens, kv_cache=kv_cache,
                       threads=threads, device=device, image_tokens=image_tokens, log=log)
    result["gates"] = gates.evaluate(result["pairs"], limits)
    if record:
        record_drift(bundle, result, log=log)
    diagnose_failures(bundle, result["pairs"], result["gates"])
    result["fail_on"] = names
    failed = gates.failures(result["gates"], names)
    if report is not None:
        for p in write_report(result, report, log=log):
            log(f"wrote {p}")
    else:
        print(markdown(result), end="")
    for v in failed:
        log(f"FAILED {gates.describe(v)}")
    return result, failed


RECORD_KEYS = ("accuracy", "accuracy_drop_points", "answer_agreement")


def record_drift(bundle: str | Path, result: dict, log: Callable[[str], None] = print) -> None:
    """Write what drift measured into the manifest: on each vision and language-model variant of a measured pair,
    ``drift[<the other variant's name>]`` = accuracy, its drop against the reference in points, answer agreement,
    mean KL, top-1 agreement, the gates it passed or failed, the questions, the date, and the sha256 of both files
    measured (a record whose files have changed since is not read: ``Manifest.drift_records``)."""
    import datetime

    from llava_edge import bundle_lock

    bundle = Path(bundle)
    when = datetime.date.today().isoformat()
    verdicts = {}
    for v in result.get("gates", []):
        verdicts.setdefault(v["pair"], {})[v["gate"]] = v["ok"]
    with bundle_lock.writing(bundle, log=log):
        m = bundle_manifest.read(bundle)
        for p in result["pairs"]:
            rec = {k: p.get(k) for k in RECORD_KEYS}
            rec.update(kl_mean=p["token_drift"].get("kl_mean"), top1=p["token_drift"].get("top1"),
                       gates=verdicts.get(f"{p['vision']}:{p['llm']}", {}), image_tokens=p.get("image_tokens"),
                       questions=result["eval"]["questions"], eval=result["eval"]["source"], date=when,
                       sha256=p["sha256"])
            for kind, other in (("vision", "llm"), ("llm", "vision")):
                found = m.find(kind, name=p[kind])
                if found and found[0].sha256 == p["sha256"][kind]:
                    found[0].extra.setdefault("drift", {})[p[other]] = rec
        bundle_manifest.write(bundle, m)
    log(f"recorded {len(result['pairs'])} pair(s) in {bundle / bundle_manifest.MANIFEST}")

