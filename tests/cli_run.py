"""Running the CLI in a child process, and what every bad input must give: one error line, exit 2."""

import subprocess
import sys

from torchless import BLOCK_TORCH


def le(*args, block_torch=False, input=None, env=None, timeout=300):
    """``llava-edge ARGS`` in a fresh interpreter (``block_torch``: as on a device without torch)."""
    code = BLOCK_TORCH if block_torch else "import sys; from llava_edge.cli import main; sys.exit(main(sys.argv[1:]))"
    argv = [sys.executable, "-c", code, *(a if isinstance(a, bytes) else str(a) for a in args)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=input, env=env)


def one_line_error(r, *words, **kw) -> str:
    """:func:`assert_one_line_error`, returning the error line."""
    assert_one_line_error(r, *words, **kw)
    return [line for line in r.stderr.strip().splitlines() if line.startswith("error: ")][0]


def assert_one_line_error(r, *words, code=2, progress=False):
    """Exit ``code``, exactly one non-empty stderr line, starting "error: ", holding every word; no traceback.

    ``progress``: lines of progress may come first (export, quantize); the error is then the last line.
    """
    assert r.returncode == code, (r.returncode, r.stderr)
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0] and (progress or len(lines) == 1), r.stderr
    assert "Traceback" not in r.stderr
    for w in words:
        assert w in errors[0], (w, errors[0])
