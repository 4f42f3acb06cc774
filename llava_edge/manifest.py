"""The bundle manifest: the one module that reads and writes ``manifest.json``.

A bundle is a directory of exported files plus this manifest. Export creates
it, quantize adds variants, the runtime and the drift tools read it. The
manifest is always written last and atomically, so a bundle whose manifest
lists a file has that file complete.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__, atomic
from .errors import UserError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


@dataclass
class Variant:
    name: str  # what users pass: --vision-variant fp32, --llm-variant f32
    kind: str  # "vision" or "llm"
    precision: str
    file: str
    size: int
    sha256: str
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("name", "kind", "precision", "file", "size", "sha256")}
        d.update(self.extra)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Variant":
        base = {k: d[k] for k in ("name", "kind", "precision", "file", "size", "sha256")}
        return cls(**base, extra={k: v for k, v in d.items() if k not in base})


@dataclass
class Manifest:
    source: dict
    template: str
    image: dict  # ImageSpec.to_dict()
    vision: dict
    llm: dict
    tokenizer: dict
    variants: list[Variant] = field(default_factory=list)
    schema_version: int = SCHEMA_VERSION
    created_by: str = f"llava-edge {__version__}"

    def variant(self, kind: str, name: str | None = None) -> Variant:
        options = [v for v in self.variants if v.kind == kind]
        if not options:
            raise UserError(f"the bundle has no {kind} variant; export one first")
        if name is None:
            return options[0]
        for v in options:
            if v.name == name:
                return v
        raise UserError(f"no {kind} variant {name!r} in the bundle; it has: {', '.join(v.name for v in options)}")

    def add_variant(self, bundle: str | Path, name: str, kind: str, precision: str, file: str, **extra) -> Variant:
        """Register ``file`` (already complete in the bundle) as a variant, replacing one of the same name."""
        path = Path(bundle) / file
        v = Variant(name, kind, precision, file, path.stat().st_size, sha256_file(path), extra)
        self.variants = [x for x in self.variants if not (x.kind == kind and x.name == name)] + [v]
        return v

    def to_dict(self) -> dict:
        return {
            "schema_version": self.schema_version,
            "created_by": self.created_by,
            "source": self.source,
            "template": self.template,
            "image": self.image,
            "vision": self.vision,
            "llm": self.llm,
            "tokenizer": self.tokenizer,
            "variants": [v.to_dict() for v in self.variants],
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Manifest":
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise UserError(f"bundle manifest schema {version!r} is not supported (this llava-edge reads {SCHEMA_VERSION})")
        return cls(
            source=d["source"], template=d["template"], image=d["image"], vision=d["vision"], llm=d["llm"],
            tokenizer=d["tokenizer"], variants=[Variant.from_dict(v) for v in d.get("variants", [])],
            schema_version=version, created_by=d.get("created_by", "?"),
        )


def is_bundle(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def read(bundle: str | Path) -> Manifest:
    bundle = Path(bundle)
    f = bundle / MANIFEST
    if not bundle.is_dir():
        raise UserError(f"bundle not found: {bundle}")
    if not f.is_file():
        raise UserError(f"not a bundle (no {MANIFEST}): {bundle}")
    try:
        return Manifest.from_dict(json.loads(f.read_text()))
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"corrupt {MANIFEST} in {bundle} ({type(e).__name__}: {e})") from None


def write(bundle: str | Path, manifest: Manifest) -> None:
    atomic.write_json(Path(bundle) / MANIFEST, manifest.to_dict())


def check_files(bundle: str | Path, manifest: Manifest, files: list[str], verify_hash: bool = False) -> None:
    """Every named file is present with its recorded size (and hash when asked)."""
    by_file = {v.file: v for v in manifest.variants}
    for name in files:
        p = Path(bundle) / name
        if not p.is_file():
            raise UserError(f"bundle {bundle} is missing a file: {name}")
        v = by_file.get(name)
        if v is not None and p.stat().st_size != v.size:
            raise UserError(f"bundle file {name} has {p.stat().st_size} bytes, the manifest says {v.size}")
        if v is not None and verify_hash and sha256_file(p) != v.sha256:
            raise UserError(f"bundle file {name} does not match its sha256 in the manifest")
