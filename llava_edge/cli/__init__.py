"""``llava-edge``: the command line. Thin: each command parses its options and calls the library.

One module per command group (``toy``, ``train``, ``bundle``: export/quantize/info, ``chat``,
``evaluate``: drift/bench); options several commands share are in ``options``. Heavy libraries
(torch, transformers) are imported inside the commands that need them, so ``llava-edge chat``
and ``info`` start without them. Every ``UserError``, system error or missing optional package
ends as one line on stderr and exit 2 (:func:`main`).
"""

from __future__ import annotations

import sys

from ..errors import UserError, describe_os_error
from . import bundle, chat, data, evaluate, serve, toy, train  # noqa: F401 - registers the commands
from ._app import app, say

# optional packages -> the extra that installs them (a command that needs one says so in one line)
EXTRA_OF = {"torch": "export", "transformers": "export", "onnx": "export",
            "onnxscript": "export", "peft": "train", "accelerate": "train", "tensorrt": "tensorrt", "cuda": "tensorrt",
            "fastapi": "serve", "uvicorn": "serve", "starlette": "serve", "prometheus_client": "serve",
            "httpx": "serve"}


def missing_package_message(e: ModuleNotFoundError) -> str | None:
    """The one-line error for an optional package this command needs, or None for anything else."""
    top = (e.name or "").split(".")[0]
    if top == "onnxruntime":
        from ..runtimes.vision import ORT_MISSING

        return ORT_MISSING
    if top in EXTRA_OF:
        return f"this command needs {top}, which is not installed: pip install 'llava-edge[{EXTRA_OF[top]}]'"
    return None


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; usage errors are click's, a :class:`UserError` is one line on stderr, exit 2."""
    try:
        app(args=argv, prog_name="llava-edge", standalone_mode=True)
    except UserError as e:
        say(f"error: {e}")
        return 2
    except ModuleNotFoundError as e:
        msg = missing_package_message(e)
        if msg is None:
            raise
        say(f"error: {msg}")
        return 2
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    except OSError as e:  # what the system refused (full disk, read-only, permissions), named with its path
        say(f"error: {describe_os_error(e)}")
        return 2
    except MemoryError:
        say("error: out of memory (a smaller variant, --ctx or image may fit)")
        return 2
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


def run() -> None:  # console-script entry point
    sys.exit(main())
