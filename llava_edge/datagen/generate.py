"""``llava-edge data generate``: instruction data written by a text-only LLM from captions and boxes, as LLaVA
made its 158K (conversation, detail, reasoning), in LLaVA's JSON, ready for ``train stage2 --data``.

Each (picture, kind) is one request: the kind's system prompt, its few-shot exchange and
the picture's context (``sources.Picture.context``). The answer is parsed and checked
(``kinds.parse``); what breaks the format or its bounds is rejected and counted by
reason, never repaired. Every finished item goes to the journal at once
(``journal.py``), so a killed run resumes where it was. The output is written at the end
(under a temporary name, then renamed), from the journal: kept records, duplicates
dropped.
"""

from __future__ import annotations

import collections
import json
import random
import re
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .. import atomic
from .journal import Journal
from .kinds import DETAIL_QUESTIONS, KindPrompt, Rejected, parse
from .llm import LLMError
from .sources import Picture

IMAGE = "<image>"


def llava_record(pic: Picture, kind: str, turns: list[tuple[str, str]], seed: int) -> dict:
    """LLaVA's JSON for one item; ``<image>`` before or after the first question at random, as LLaVA's data has it."""
    rid = f"{pic.key}_{kind}"
    rng = random.Random(f"{seed}:{rid}")
    if kind == "detail":
        turns = [(rng.choice(DETAIL_QUESTIONS), turns[0][1])]
    conv = []
    for i, (q, a) in enumerate(turns):
        if i == 0:
            q = f"{IMAGE}\n{q}" if rng.random() < 0.5 else f"{q}\n{IMAGE}"
        conv += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return {"id": rid, "image": pic.image, "conversations": conv}


def _fingerprint(record: dict, kind: str) -> str:
    """What makes two records the same: their words, without case, spacing or where <image> stands (for a
    description, its text alone: the question is drawn here, not written by the LLM)."""
    turns = record["conversations"][1::2] if kind == "detail" else record["conversations"]
    text = " ".join(t["value"].replace(IMAGE, "") for t in turns)
    return re.sub(r"\s+", " ", text).strip().lower()


class Summary:
    def __init__(self, kinds: list[str]):
        self.kinds = kinds
        self.counts = {k: collections.Counter() for k in kinds}
        self.reasons = {k: collections.Counter() for k in kinds}
        self.failures: list[str] = []

    def table(self) -> list[dict]:
        return [{"kind": k, **{n: self.counts[k][n] for n in ("requested", "kept", "rejected", "duplicates",
                                                                "failed", "tokens_in", "tokens_out")},
                 "rejected_by_reason": dict(self.reasons[k])} for k in self.kinds]


def generate(pictures: list[Picture], prompts: dict[str, KindPrompt], llm, out: Path, *, parallel: int = 4,
             seed: int = 0, max_tokens: int = 1024, temperature: float = 0.7, images: Path | None = None,
             journal: Path | None = None, progress: Callable[[int, int], None] | None = None) -> Summary:
    kinds = list(prompts)
    summary = Summary(kinds)
    missing = [p for p in pictures if images is not None and not (Path(images) / p.image).is_file()]
    for p in missing:
        for k in kinds:
            summary.counts[k]["missing_image"] += 1
    pictures = [p for p in pictures if p not in missing]
    j = Journal(journal or Path(str(out) + ".journal.jsonl"))
    try:
        todo = [(p, k) for p in pictures for k in kinds if f"{p.key}/{k}" not in j]
        total, finished = len(pictures) * len(kinds), len(pictures) * len(kinds) - len(todo)
        lock = threading.Lock()

        def one(item: tuple[Picture, str]) -> None:
            nonlocal finished
            pic, kind = item
            key = f"{pic.key}/{kind}"
            try:
                c = llm.complete(prompts[kind].messages(pic.context()), max_tokens=max_tokens,
                                 temperature=temperature, seed=seed)
            except LLMError as e:
                with lock:
                    summary.counts[kind]["failed"] += 1
                    summary.failures.append(f"{key}: {e}")
            else:
                entry = {"key": key, "kind": kind, "tokens_in": c.prompt_tokens, "tokens_out": c.completion_tokens,
                         "retries": c.retries}
                try:
                    entry.update(status="kept", record=llava_record(pic, kind, parse(kind, c.text), seed))
                except Rejected as r:
                    entry.update(status="rejected", reason=r.reason, text=c.text[:4000])
                j.add(entry)
            with lock:
                finished += 1
                if progress:
                    progress(finished, total)

        if progress:
            progress(finished, total)
        with ThreadPoolExecutor(max(1, parallel)) as pool:
            list(pool.map(one, todo))
        records, seen = [], set()
        wanted = {f"{p.key}/{k}" for p in pictures for k in kinds}
        for key, e in j.entries.items():
            if key not in wanted or e.get("kind") not in summary.counts:
                continue
            c = summary.counts[e["kind"]]
            c["requested"] += 1
            c["tokens_in"] += e.get("tokens_in", 0)
            c["tokens_out"] += e.get("tokens_out", 0)
            if e.get("status") == "rejected":
                c["rejected"] += 1
                summary.reasons[e["kind"]][e.get("reason", "?")] += 1
                continue
            fp = _fingerprint(e["record"], e["kind"])
            if fp in seen:
                c["duplicates"] += 1
                continue
            seen.add(fp)
            c["kept"] += 1
            records.append(e["record"])
        for k in kinds:
            summary.counts[k]["requested"] += summary.counts[k]["failed"]
        records.sort(key=lambda r: r["id"])
        atomic.write_bytes(out, json.dumps(records, indent=1, ensure_ascii=False).encode())
    finally:
        j.close()
    return summary
