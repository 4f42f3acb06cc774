"""The layers of docs/ARCHITECTURE.md, read from the imports themselves (ast): a forbidden edge fails here.

    core  <-  runtimes  <-  export, quantize | train  <-  evaluation (drift, bench, datagen, judge)  <-  recipes (toy)  <-  cli

A module imports only from its own layer or the layers to its left; export/quantize and train, side by side,
import neither each other. The package's ``__init__`` (the public ``EdgeLLaVA``) is the one exception.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"llava_edge": "llava_edge", "runtimes": "llava_edge.runtimes", "export": "llava_edge.export",
           "quantize": "llava_edge.quantize", "train": "llava_edge.train"}
RANK = {"core": 0, "runtimes": 1, "export/quantize": 2, "train": 2, "evaluation": 3, "recipes": 4, "cli": 5}


def layer(module: str) -> str:
    if module.startswith("llava_edge.cli"):
        return "cli"
    if module.startswith("llava_edge.toy"):
        return "recipes"
    if module.startswith(("llava_edge.drift", "llava_edge.bench", "llava_edge.datagen", "llava_edge.judge")):
        return "evaluation"
    if module.startswith(("llava_edge.export", "llava_edge.quantize")):
        return "export/quantize"
    if module.startswith("llava_edge.train"):
        return "train"
    if module.startswith("llava_edge.runtimes"):
        return "runtimes"
    return "core"


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = [FOLDERS[rel.parts[0]], *rel.parts[1:]]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported llava_edge module or name) of every import in ``path``, relative ones resolved."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out += [(node.lineno, f"{target}.{a.name}") for a in node.names]
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
    return [(line, t) for line, t in out if t.startswith("llava_edge.")]


def sources() -> list[Path]:
    return sorted(p for folder in FOLDERS for p in (ROOT / folder).rglob("*.py"))


def test_no_module_imports_a_layer_above_its_own():
    bad = []
    for path in sources():
        m = module_name(path)
        if m == "llava_edge":  # the package's facade: `from llava_edge import EdgeLLaVA`
            continue
        for line, target in imports(path):
            lm, lt = layer(m), layer(target)
            if RANK[lt] > RANK[lm] or (lm != lt and RANK[lm] == RANK[lt]):
                bad.append(f"{path.relative_to(ROOT)}:{line}: {lm} imports {lt} ({target})")
    assert not bad, "\n".join(bad)


def test_the_rule_reads_imports_as_python_does():
    # a sample of what the reader must see, so that a broken reader cannot pass the rule above
    found = {t for p in sources() if p.name == "bundle.py" and p.parent.name == "export" for _, t in imports(p)}
    assert "llava_edge.checkpoint.Checkpoint" in found and "llava_edge.export.llm_gguf.export_llm_gguf" in found
    assert layer("llava_edge.toy.build") == "recipes" and layer("llava_edge.runtimes.pipeline") == "runtimes"
    assert len(sources()) >= 50
