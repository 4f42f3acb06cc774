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
from typing import NamedTuple

from . import atomic, manifest
from .errors import UserError
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


# -- pairs of a vision and a language-model variant (``--variants`` of drift and bench) ------------------------------
class Pair(NamedTuple):
    vision: str
    llm: str

    @property
    def label(self) -> str:
        return f"{self.vision}:{self.llm}"


def every_pair(m: Manifest) -> list[Pair]:
    """Every portable vision variant with every language model (drift's default)."""
    vis, llm = _portable(m)
    return [Pair(v, x) for x in llm for v in vis]


def each_variant_once(m: Manifest) -> list[Pair]:
    """Each portable vision variant with the default language model, then each other language model with the default
    vision variant: every variant measured once without the full cross product (bench's default)."""
    vis, llm = _portable(m)
    return [Pair(v, llm[0]) for v in vis] + [Pair(vis[0], x) for x in llm[1:]]


def _portable(m: Manifest) -> tuple[list[str], list[str]]:
    vis = [v.name for v in m.find("vision", portable=True)]
    llm = [v.name for v in m.find("llm")]
    if not vis or not llm:
        raise UserError("the bundle needs a vision and a language-model variant: export with --target all")
    return vis, llm


def parse_pairs(text: str | None, m: Manifest, default: Callable[[Manifest], list[Pair]] = every_pair) -> list[Pair]:
    """``--variants``: ``VISION:LLM`` entries, comma-separated, repeats dropped.

    ``*`` is every portable variant of that kind (``*:q4_k_m``); an empty side is that kind's default variant
    (``:q4_k_m``); a bare name is that variant with the default of the other kind. Nothing given: ``default(m)``.
    A name the bundle lacks is a one-line error listing what it has.
    """
    if text is None or not text.strip():
        return default(m)
    vis, llm = _portable(m)
    out: list[Pair] = []
    for item in (p.strip() for p in text.split(",")):
        if not item:
            continue
        if item.count(":") > 1:
            raise UserError(f"--variants entry {item!r} is not VISION:LLM (e.g. int8:q8_0, *:q4_k_m)")
        if ":" in item:
            v, x = (p.strip() for p in item.split(":"))
        else:
            kinds = {k for k in ("vision", "llm") if m.find(k, name=item)}
            if not kinds:
                names = ", ".join(sorted({v.name for v in m.variants if v.kind in ("vision", "llm")}))
                raise UserError(f"no vision or llm variant {item!r} in the bundle; it has: {names}")
            if len(kinds) > 1:
                raise UserError(f"{item!r} names both a vision and an llm variant: write VISION:LLM")
            v, x = (item, "") if "vision" in kinds else ("", item)
        vs = vis if v == "*" else [m.variant("vision", v or None).name]
        xs = llm if x == "*" else [m.variant("llm", x or None).name]
        for xn in xs:
            for vn in vs:
                if Pair(vn, xn) not in out:
                    out.append(Pair(vn, xn))
    if not out:
        raise UserError("--variants names no pair; write e.g. fp32:f16,int8:q4_k_m")
    return out
