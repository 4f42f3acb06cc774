"""Making a bundle variant: the one way export and quantize both do it.

A variant is built in a staging folder inside the bundle (an ONNX graph with its
``.data`` sidecar beside it, under their final names), checked by its builder,
then moved in by rename. Before the rename the file is unregistered wherever it
is listed (the manifest in memory, and ``manifest.json`` on disk), so no
manifest ever lists content it did not record; after it, the variant is
registered with one record schema and the manifest state saved (export: its
unfinished-export state; quantize: ``manifest.json``). A registered variant whose
file is intact and was made with the same ``options`` is kept as it is.

The record, beyond ``manifest.Variant``'s name, kind, precision, file, size and
sha256: ``format`` (onnx, gguf, tensorrt), ``options`` (what the file was made
from and with: equal options make an equal file, whichever command made it),
``quality`` (how close it came to what it approximates: ``against`` is
``huggingface`` or ``fp32``), and what its builder reports.

The caller holds the bundle's writer lock (``bundle_lock.py``).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from . import atomic, manifest
from .manifest import Manifest, Variant

STAGING = ".staging" + atomic.TMP_SUFFIX  # removed by atomic.remove_partials too
RECORD_KEYS = ("name", "kind", "precision", "file", "size", "sha256", "format", "options")


def as_stored(obj):
    """``obj`` as it reads back from the manifest (tuples become lists), so option dicts compare equal."""
    return json.loads(json.dumps(obj))


class VariantMaker:
    """Variants of one bundle, made one at a time, with the manifest ``m`` kept current and saved by ``save``."""

    def __init__(self, bundle: str | Path, m: Manifest, save: Callable[[Path, Manifest], None],
                 log: Callable[[str], None] = print):
        self.bundle, self.m, self.save, self.log = Path(bundle), m, save, log
        self._sha: dict[tuple, str] = {}

    def registered(self, kind: str, name: str) -> Variant | None:
        return next((v for v in self.m.variants if v.kind == kind and v.name == name), None)

    def sha256(self, path: Path) -> str:
        """A file's sha256, remembered for this run by path, size and modification time."""
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        if key not in self._sha:
            self._sha[key] = manifest.sha256_file(path)
        return self._sha[key]

    def up_to_date(self, kind: str, name: str, file: str, options: dict) -> Variant | None:
        """The registered variant when it can be kept as it is: same file, same options, intact."""
        v = self.registered(kind, name)
        if v is None or v.file != file or v.extra.get("options") != as_stored(options):
            return None
        path = manifest.bundle_file(self.bundle, file)
        if not path.is_file() or path.stat().st_size != v.size or self.sha256(path) != v.sha256:
            return None
        return v

    def make(self, kind: str, name: str, precision: str, file: str, options: dict, build: Callable[[Path], dict],
             fmt: str) -> tuple[Variant, bool]:
        """Keep the variant if up to date, else ``build(staged path)`` it, move it in and register it.

        ``build`` writes the file (and an ONNX graph's ``.data`` sidecar beside it) and returns what it reports.
        Returns ``(variant, made)``.
        """
        done = self.up_to_date(kind, name, file, options)
        if done is not None:
            return done, False
        staging = self.bundle / STAGING
        staging.mkdir(exist_ok=True)
        try:
            staged = staging / file
            report = build(staged)
            self._move_in(staged, file)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        report = {k: x for k, x in as_stored(report).items() if k not in RECORD_KEYS}
        v = self.m.add_variant(self.bundle, name, kind, precision, file, format=fmt, options=as_stored(options),
                               **report)
        self.save(self.bundle, self.m)
        return v, True

    def _move_in(self, staged: Path, file: str) -> None:
        """Rename a finished file (and its external data) into the bundle, unregistering the old one first."""
        if manifest.is_bundle(self.bundle):
            on_disk = manifest.read(self.bundle)
            if on_disk.remove_file(file):
                manifest.write(self.bundle, on_disk)  # never a manifest.json listing content it did not record
        if self.m.remove_file(file):
            self.save(self.bundle, self.m)
        data = staged.with_name(staged.name + ".data")
        if data.exists():
            os.replace(data, self.bundle / data.name)
        else:
            (self.bundle / data.name).unlink(missing_ok=True)
        os.replace(staged, self.bundle / file)
