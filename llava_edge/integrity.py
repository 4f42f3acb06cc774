"""Bundle files checked against their manifest sha256 before they are loaded, each file version hashed once.

A damaged file (a bad copy to an SD card, a truncated download, a flipped block)
of the right size loads and answers garbage with no error; the manifest records
every file's sha256, so the runtime checks it. Hashing a 4 GB GGUF takes
seconds, so a file that verified is remembered by what identifies its content
on this machine without reading it: device, inode, size, modification and
change times (ctime moves on every write and cannot be set back by a user).
The record lives in ``$LLAVA_EDGE_CACHE/verified-files.json``; a later load of
an unchanged file costs a ``stat``. ``EdgeLLaVA.load(verify=False)`` /
``chat --no-verify`` skips the check; ``llava-edge info --verify`` hashes every
file afresh.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from . import atomic
from .cache_dir import default_cache_dir
from .errors import UserError

RECORD = "verified-files.json"
KEEP = 512  # remembered file versions; the oldest are forgotten first


def _identity(path: Path) -> str:
    st = path.stat()
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def _record_file() -> Path:
    return default_cache_dir() / RECORD


def _read_record() -> dict:
    try:
        d = json.loads(_record_file().read_text())
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


def _remember(identity: str, sha256: str) -> None:
    """Add a verified file version (best effort: a read-only cache only costs the next load a hash)."""
    record = _read_record()
    record.pop(identity, None)
    record[identity] = sha256
    if len(record) > KEEP:
        record = dict(list(record.items())[-KEEP:])
    try:
        f = _record_file()
        f.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_json(f, record)
        os.chmod(f, 0o600)
    except OSError:
        pass


def sha256_file(path: Path) -> str:
    from .manifest import sha256_file as digest

    return digest(path)


def verify(path: Path, sha256: str, name: str, remember: bool = True) -> bool:
    """Raise a one-line ``UserError`` naming ``name`` when ``path`` does not hash to ``sha256``.

    Returns whether the file was hashed now (False: this version verified before). ``remember=False`` always
    hashes and records nothing.
    """
    identity = _identity(path)
    if remember and _read_record().get(identity) == sha256:
        return False
    if sha256_file(path) != sha256:
        raise UserError(f"bundle file {name} does not match its sha256 in the manifest (damaged or replaced): "
                        "export or quantize it again (chat --no-verify skips this check)")
    if remember:
        _remember(identity, sha256)
    return True
