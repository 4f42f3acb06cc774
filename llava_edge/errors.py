"""The one exception type that reaches the user as a one-line message, and how system errors are said."""

from __future__ import annotations

import errno


class UserError(Exception):
    """Bad input or an unmet precondition. The CLI prints ``str(err)`` and exits 2."""


_CAUSES = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large (the filesystem's or the process's file size limit; FAT32 stops at 4 GB)",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EISDIR: "is a directory",
    errno.ENOTDIR: "not a directory",
    errno.ENOENT: "no such file or directory",
    errno.EMFILE: "too many open files",
    errno.EIO: "input/output error (a failing disk or card?)",
}


def describe_os_error(e: OSError) -> str:
    """An ``OSError`` as people read it: the cause by name, then the path (``no space left on device: /x``)."""
    cause = _CAUSES.get(e.errno)
    if cause is None:
        text = e.strerror or (str(e) if e.errno is None else "") or type(e).__name__
        # numpy's tofile (gguf-py writes tensors with it) reports a short write with no errno
        short = e.errno is None and " requested and " in text and " written" in text
        cause = f"short write ({text}): is the disk full?" if short else text.lower()
    path = e.filename if e.filename is not None else None
    return f"{cause}: {path}" if path else cause
