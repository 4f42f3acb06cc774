"""``llava-edge eval judge``: LLaVA-Bench-style evaluation, a text-only LLM as the judge.

The bundle answers each question about its image (greedy, in this process). The judge
(any OpenAI-compatible endpoint) is shown the picture's context when there is one (its
captions), the question, the reference answer and the bundle's answer, and rates both
from 1 to 10 with an explanation. As in LLaVA-Bench, the result is the bundle's mean
score relative to the reference's, overall and per category (conversation, detail,
reasoning). Inputs are LLaVA-Bench's files: questions JSONL (``question_id``, ``image``,
``text``, ``category``), references JSONL (``question_id``, ``text``), optional context
JSONL (``image``, ``caption``).

Both steps are journaled (``answers.jsonl``, ``reviews.jsonl`` in the report directory):
a killed run resumes where it was. The report: ``reviews.jsonl`` (per question),
``summary.json``, ``report.md`` and ``scores.png``.
"""

from __future__ import annotations

import json
import re
import statistics
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from . import atomic
from .datagen.journal import Journal
from .datagen.llm import LLMError
from .errors import UserError

CATEGORIES = {"conv": "conversation", "conversation": "conversation", "detail": "detail",
              "complex": "reasoning", "reasoning": "reasoning"}
JUDGE_SYSTEM = "You review answers to questions about pictures, impartially and carefully."
JUDGE_TASK = (
    "Rate how helpful, relevant, accurate and detailed each assistant's answer is, from 1 (worst) to 10 "
    "(best). The context describes the picture the question is about; trust it. On the first line write "
    "only the two scores, Assistant 1's first, separated by a space (for example: 7 9). Then explain your "
    "rating in a few sentences. Do not let the order of the answers or their length sway you.")


def judge_messages(context: str | None, question: str, reference: str, answer: str) -> list[dict]:
    parts = []
    if context:
        parts.append(f"[Context]\n{context}")
    parts += [f"[Question]\n{question}", f"[Assistant 1]\n{reference}\n[End of Assistant 1]",
              f"[Assistant 2]\n{answer}\n[End of Assistant 2]", f"[Task]\n{JUDGE_TASK}"]
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": "\n\n".join(parts)}]


_NUM = r"(10(?:\.0+)?|\d(?:\.\d+)?)"


def parse_scores(text: str) -> tuple[float, float] | None:
    """The two scores in a judge's free-form text, or None.

    Tried in order: a first line that is just two numbers ("8 7", "8, 7", "8/10 7/10"); "Assistant 1 ...
    8" and "Assistant 2 ... 7" anywhere; the first two "N/10"; the first line with exactly two numbers
    from 1 to 10.
    """
    lines = [x.strip().strip("*#").strip() for x in (text or "").splitlines() if x.strip()]
    if not lines:
        return None
    m = re.fullmatch(rf"(?:scores?\s*[:=]?\s*)?{_NUM}(?:\s*/\s*10)?\s*(?:,|and|\s)\s*{_NUM}(?:\s*/\s*10)?\.?",
                     lines[0], re.I)
    if m:
        return float(m.group(1)), float(m.group(2))
    a1 = re.search(rf"assistant\s*1\b[^0-9\n]{{0,40}}{_NUM}", text, re.I)
    a2 = re.search(rf"assistant\s*2\b[^0-9\n]{{0,40}}{_NUM}", text, re.I)
    if a1 and a2:
        return float(a1.group(1)), float(a2.group(1))
    tens = re.findall(rf"{_NUM}\s*/\s*10\b", text)
    if len(tens) >= 2:
        return float(tens[0]), float(tens[1])
    for line in lines:
        nums = re.findall(rf"(?<![\d.]){_NUM}(?![\d.])", line)
        if len(nums) == 2 and all(1 <= float(n) <= 10 for n in nums):
            return float(nums[0]), float(nums[1])
    return None


def _jsonl(path: Path | None, what: str) -> list[dict]:
    if path is None:
        return []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UserError(f"{what} not found: {path}") from None
    out = []
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except ValueError:
                raise UserError(f"{what} {path} line {n} is not JSON") from None
    return out


def load_bench(questions: Path, references: Path, context: Path | None = None) -> list[dict]:
    """One item per question: id, image, text, category, reference, context (captions or None)."""
    refs = {str(r.get("question_id")): r.get("text") for r in _jsonl(references, "the references file")}
    ctx = {}
    for c in _jsonl(context, "the context file"):
        cap = c.get("caption")
        ctx[str(c.get("image"))] = "\n".join(cap) if isinstance(cap, list) else cap
    items = []
    for n, q in enumerate(_jsonl(questions, "the questions file"), 1):
        try:
            qid, image, text = str(q["question_id"]), str(q["image"]), str(q["text"])
        except KeyError as e:
            raise UserError(f"{questions} line {n} lacks {e.args[0]!r}") from None
        if qid not in refs:
            raise UserError(f"question {qid} has no reference answer in {references}")
        items.append({"id": qid, "image": image, "text": text, "reference": refs[qid],
                      "category": CATEGORIES.get(str(q.get("category", "")).lower(), str(q.get("category") or "all")),
                      "context": ctx.get(image)})
    if not items:
        raise UserError(f"no questions in {questions}")
    return items


def run(items: list[dict], answerer, judge, report: Path, images: Path | None = None, parallel: int = 4,
        max_tokens: int = 512, judge_max_tokens: int = 512, progress: Callable[[str, int, int], None] | None = None
        ) -> dict:
    """Answer, review, report. ``answerer.ask(question, image)`` -> text; ``judge.complete(messages)``."""
    report = Path(report)
    answers = Journal(report / "answers.jsonl")
    reviews = Journal(report / "reviews.jsonl")
    lock = threading.Lock()
    try:
        def image_of(item):
            path = Path(images) / item["image"] if images else Path(item["image"])
            if not path.is_file():
                raise UserError(f"image of question {item['id']} not found: {path}")
            return path

        for item in items:
            image_of(item)
        failed: list[str] = []

        def each(step: str, journal: Journal, work: Callable[[dict], dict]) -> None:
            """``work`` on every item the journal lacks, in parallel; what fails is listed, not journaled."""
            todo = [it for it in items if it["id"] not in journal]
            done = len(items) - len(todo)

            def one(item):
                nonlocal done
                try:
                    journal.add({"key": item["id"], **work(item)})
                except LLMError as e:
                    with lock:
                        failed.append(f"{item['id']} ({step}): {e}")
                    return
                with lock:
                    done += 1
                    if progress:
                        progress(step, done, len(items))

            with ThreadPoolExecutor(max(1, parallel)) as pool:
                list(pool.map(one, todo))

        def answer(item) -> dict:
            return {"answer": answerer.ask(item["text"], image_of(item), max_tokens=max_tokens)}

        def review(item) -> dict:
            ans = answers.entries[item["id"]]["answer"]
            msgs = judge_messages(item["context"], item["text"], item["reference"], ans)
            scores, text = None, ""
            for attempt in range(2):  # a judge that wrote no readable scores is asked once more
                text = judge.complete(msgs, max_tokens=judge_max_tokens, temperature=0.0 if attempt == 0 else 0.7,
                                      seed=attempt).text
                scores = parse_scores(text)
                if scores:
                    break
            return {"category": item["category"], "question": item["text"], "answer": ans,
                    "reference": item["reference"], "review": text, "scores": list(scores) if scores else None}

        each("answering", answers, answer)
        items = [it for it in items if it["id"] in answers]  # a question not answered is not judged
        each("judging", reviews, review)
        summary = summarize([reviews.entries[it["id"]] for it in items if it["id"] in reviews.entries])
        summary["failed"] = failed
        write_report(report, summary, [reviews.entries[it["id"]] for it in items if it["id"] in reviews.entries])
        return summary
    finally:
        answers.close()
        reviews.close()


def summarize(rows: list[dict]) -> dict:
    def block(rs):
        scored = [r["scores"] for r in rs if r.get("scores")]
        if not scored:
            return {"questions": len(rs), "scored": 0}
        ref, model = statistics.mean(s[0] for s in scored), statistics.mean(s[1] for s in scored)
        return {"questions": len(rs), "scored": len(scored), "reference": round(ref, 3), "model": round(model, 3),
                "relative": round(100 * model / ref, 1) if ref else None}

    cats = sorted({r["category"] for r in rows})
    return {"overall": block(rows), "categories": {c: block([r for r in rows if r["category"] == c]) for c in cats},
            "unparsed": sum(1 for r in rows if not r.get("scores"))}


def write_report(report: Path, summary: dict, rows: list[dict]) -> None:
    atomic.write_bytes(report / "summary.json", json.dumps(summary, indent=1).encode())
    lines = ["| category | questions | scored | model | reference | relative |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, b in [*summary["categories"].items(), ("overall", summary["overall"])]:
        rel = f"{b['relative']}%" if b.get("relative") is not None else "-"
        lines.append(f"| {name} | {b['questions']} | {b['scored']} | {b.get('model', '-')} | "
                     f"{b.get('reference', '-')} | {rel} |")
    md = ["# Judged evaluation", "", "Mean scores 1-10 given by the judge; relative = model / reference.", "",
          *lines, "", f"Reviews whose scores could not be read: {summary['unparsed']}."]
    atomic.write_bytes(report / "report.md", ("\n".join(md) + "\n").encode())
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return  # the table and JSON are the report; the chart needs matplotlib (the [drift] extra)
    names = [n for n, b in summary["categories"].items() if b.get("relative") is not None]
    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * max(1, len(names) + 1), 3.2))
    values = [summary["categories"][n]["relative"] for n in names] + [summary["overall"].get("relative") or 0]
    ax.bar(names + ["overall"], values, color=["#4c78a8"] * len(names) + ["#f58518"])
    ax.axhline(100, color="grey", lw=0.8, ls="--")
    ax.set_ylabel("relative score, %")
    for i, v in enumerate(values):
        ax.text(i, v + 1, f"{v:.0f}", ha="center", fontsize=8)
    fig.tight_layout()
    with atomic.atomic_path(report / "scores.png") as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
