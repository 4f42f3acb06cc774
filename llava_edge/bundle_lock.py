"""One writer at a time: an advisory lock on the bundle directory while export or quantize runs.

Two writers of one bundle (``quantize B --vision ...`` and ``quantize B --llm ...``
at once) each read the manifest, add their variants and write it back: the later
write drops the earlier one's registrations, and each one's clean-up of killed
runs' temporaries deletes the other's files in progress. A writer therefore holds
an exclusive ``flock`` on the bundle directory itself (no lock file is left in
the bundle) from before it reads the manifest until after it writes it; the
second writer waits, saying so, or with ``wait=False`` (``--no-wait``) stops with
a one-line error. The kernel drops the lock when the process ends, however it
ends, so a killed writer never leaves the bundle locked.

Readers (``chat``, ``info``) take no lock: every file and the manifest are
replaced by a rename, so a reader sees the old state or the new, never half.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError

try:
    import fcntl
except ImportError:  # Windows: no flock; writers are then not serialised
    fcntl = None


def check_writable(folder: str | Path) -> None:
    """A one-line error, before any work, when ``folder`` cannot be written: a read-only file system, no permission."""
    folder = Path(folder)
    try:
        if os.statvfs(folder).f_flag & os.ST_RDONLY:
            raise UserError(f"read-only file system: {folder}")
    except (AttributeError, OSError):  # no statvfs here: the write itself will say
        pass
    if not os.access(folder, os.W_OK):
        raise UserError(f"permission denied: {folder} is not writable")


@contextmanager
def writing(bundle: str | Path, wait: bool = True, log: Callable[[str], None] = print) -> Iterator[None]:
    """Hold the bundle's writer lock (``bundle`` must be an existing directory)."""
    bundle = Path(bundle)
    check_writable(bundle)
    if fcntl is None:
        yield
        return
    try:
        fd = os.open(bundle, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as e:
        raise UserError(f"cannot open the bundle {bundle}: {e.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                raise UserError(f"another llava-edge (export or quantize) is writing {bundle}; run again when it "
                                "is done, or without --no-wait to wait for it") from None
            log(f"waiting for another llava-edge (export or quantize) writing {bundle} to finish ...")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
