"""Where llava-edge keeps what it can rebuild: converted checkpoints, TensorRT engines, saved prompt prefixes."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """``$LLAVA_EDGE_CACHE``, else ``$XDG_CACHE_HOME/llava-edge``, else ``~/.cache/llava-edge``."""
    if os.environ.get("LLAVA_EDGE_CACHE"):
        return Path(os.environ["LLAVA_EDGE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "llava-edge"
