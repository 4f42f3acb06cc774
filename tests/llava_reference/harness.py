"""The main venv's side of the LLaVA reference: run ``llava_side.py`` in ``.venv-llava`` and read its JSON.

    from llava_reference import harness    # tests/ is on sys.path in pytest, as for original_llava_layout
    ok, why = harness.available()          # skip the test with `why` when not ok
    tok = harness.llama_tokenizer_dir(tmp_path, legacy=False)
    res = harness.run("preprocess", {"tokenizer_dir": str(tok), "mode": "v1", "records": [...]})

``make llava-ref`` (a dependency of ``make test``) makes ``.venv-llava`` and ``.cache/llama-spm``.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
LLAVA_PYTHON = ROOT / ".venv-llava" / "bin" / "python"
SIDE = HERE / "llava_side.py"
SPM_DIR = ROOT / ".cache" / "llama-spm"
GGUF = SPM_DIR / "ggml-vocab-llama-spm.gguf"
VOCAB_FILES = (GGUF, Path(str(GGUF) + ".inp"), Path(str(GGUF) + ".out"))

_built: dict[str, Path] = {}


def available(vocab: bool = True) -> tuple[bool, str]:
    """Whether the reference can run here, and if not why (for pytest.skip); ``vocab``: the test needs the
    LLaMA vocabulary too."""
    if not LLAVA_PYTHON.exists():
        return False, f"{LLAVA_PYTHON.relative_to(ROOT)} missing: run `make llava-ref`"
    if not any(LLAVA_PYTHON.parents[1].glob("lib/python*/site-packages/llava/train/train.py")):
        return False, "llava-torch is not installed in .venv-llava: run `make llava-ref`"
    missing = [p for p in VOCAB_FILES if not p.exists()] if vocab else []
    if missing:
        return False, f"{missing[0].relative_to(ROOT)} missing: run `make llava-ref`"
    return True, ""


def llama_model_file() -> Path:
    """The LLaMA SentencePiece ``tokenizer.model`` rebuilt from the cached GGUF (once per process)."""
    if "model" not in _built:
        from . import build_llama_vocab

        folder = tempfile.mkdtemp(prefix="llama-spm-")
        atexit.register(shutil.rmtree, folder, True)
        out = Path(folder) / "tokenizer.model"
        build_llama_vocab.build(GGUF, out)
        _built["model"] = out
    return _built["model"]


def llama_tokenizer_dir(tmp, legacy: bool, extra_special=()) -> Path:
    """A LLaVA-1.5 tokenizer folder (slow LlamaTokenizer files) on the LLaMA vocabulary, in ``tmp``."""
    from . import build_llama_vocab

    tag = "legacy" if legacy else "nonlegacy"
    if extra_special:
        tag += "-extra" + str(len(extra_special))
    return build_llama_vocab.write_llava_tokenizer_dir(Path(tmp) / f"llama-tokenizer-{tag}", llama_model_file(),
                                                       legacy, extra_special)


def run(subcommand: str, request: dict, timeout: float = 600, script: Path = SIDE) -> dict:
    """Run ``llava_side.py SUBCOMMAND`` (or another reference-side ``script``) on ``request`` in .venv-llava;
    its JSON result."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False, encoding="utf-8") as f:
        json.dump(request, f)
        path = f.name
    try:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        proc = subprocess.run([str(LLAVA_PYTHON), str(script), subcommand, path], cwd=str(ROOT), env=env,
                              capture_output=True, text=True, timeout=timeout)
    finally:
        os.unlink(path)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.splitlines()[-30:])
        raise RuntimeError(f"{Path(script).name} {subcommand} failed (exit {proc.returncode}):\n{tail}")
    try:
        return json.loads(proc.stdout)
    except json.JSONDecodeError as e:
        raise RuntimeError(f"{Path(script).name} {subcommand}: no JSON on stdout ({e}): {proc.stdout[-2000:]!r}\n"
                           + "\n".join(proc.stderr.splitlines()[-30:])) from None


if __name__ == "__main__":  # cd tests && python -m llava_reference.harness SUBCOMMAND REQUEST.json
    print(json.dumps(run(sys.argv[1], json.loads(Path(sys.argv[2]).read_text())), indent=1, ensure_ascii=False))
