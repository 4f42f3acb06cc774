"""An append-only JSONL journal of finished work, so that an interrupted run resumes without redoing or
duplicating anything.

One line per finished item (kept or rejected, with its key), flushed as it is written;
a request that failed is not written, so a resumed run tries it again. A line cut short
by a kill is dropped when the journal is opened again (its item is redone). Two runs on
one journal would each redo the other's items: the second one stops with an error
(an exclusive ``flock``, dropped by the kernel however the first one ends).
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from ..errors import UserError

try:
    import fcntl
except ImportError:  # Windows: no flock
    fcntl = None


class Journal:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.entries: dict[str, dict] = {}
        self._lock = threading.Lock()
        self._f = open(self.path, "a+b")
        if fcntl is not None:
            try:
                fcntl.flock(self._f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                self._f.close()
                raise UserError(f"another run is writing {self.path}; wait for it to end") from None
        self._f.seek(0)
        data = self._f.read()
        keep = data.rfind(b"\n") + 1  # a last line without its newline was cut short
        if keep < len(data):
            self._f.truncate(keep)
        for line in data[:keep].splitlines():
            try:
                e = json.loads(line)
                self.entries[e["key"]] = e
            except (ValueError, KeyError, TypeError):
                continue  # a damaged line: its item is redone

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def add(self, entry: dict) -> None:
        line = (json.dumps(entry, ensure_ascii=False) + "\n").encode()
        with self._lock:
            self._f.seek(0, os.SEEK_END)
            self._f.write(line)
            self._f.flush()
            self.entries[entry["key"]] = entry

    def close(self) -> None:
        self._f.close()
