"""The bundle manifest: the one module that reads and writes ``manifest.json``.

A bundle is a directory of exported files plus this manifest. Export creates
it, quantize adds variants, the runtime and the drift tools read it. The
manifest is always written last and atomically, so a bundle whose manifest
lists a file has that file complete.

While an export runs, its state so far (the same schema) is kept in
``manifest.incomplete.json`` instead: it marks the directory as a bundle being
written (so a re-run continues there instead of refusing an "unrelated"
directory) and lists the files already finished, but nothing reads it as a
bundle. When the export is done it writes ``manifest.json`` and deletes this file.

Schema version 2: ``conv_mode`` (one of LLaVA's conversation modes, or
``chat_template`` with the checkpoint's Jinja text in ``chat_template``) and the
``tokenizer`` section ``llava_edge.tokenizer.Settings`` writes (how LLaVA's
code tokenizes for this checkpoint). Schema 1 bundles prompted differently; they
are refused with a message that says to export again, as is a manifest with a
higher schema version (upgrade). Optional keys (variant kinds ``mmproj``,
``format``, ``options``, the vision section's ``parity``) keep older readers of a
schema working.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from . import __version__, atomic
from .errors import UserError

SCHEMA_VERSION = 2
MANIFEST = "manifest.json"
IN_PROGRESS = "manifest.incomplete.json"  # an export's state until it finishes
KINDS = ("vision", "llm", "mmproj")
# The files export and quantize make in a bundle: the only ones they ever delete or replace. A manifest names
# files; a damaged or hostile one must not make llava-edge delete or load anything else.
OWN_FILE = re.compile(r"(vision|llm|mmproj)\.[A-Za-z0-9_+-][A-Za-z0-9_.+-]*\.(onnx|gguf|engine)(\.data)?"
                      r"|tokenizer\.(json|model)|tokenizer_config\.json|special_tokens_map\.json"
                      r"|tensorrt\.int8\.calib(\.json)?|array\.[a-z_]+\.npy")


# numbers the runtime reads from the manifest: present ones must be whole numbers in these ranges
NUMBERS = {
    "vision": {"num_image_tokens": (1, 1 << 20), "embed_dim": (1, 1 << 20), "image_size": (1, 16384),
               "patch_size": (1, 16384), "feature_layer": (-1024, 1024)},
    "llm": {"image_token_id": (0, 1 << 31), "eos_id": (0, 1 << 31), "bos_id": (0, 1 << 31),
            "n_ctx_train": (1, 1 << 31), "n_embd": (1, 1 << 20), "n_layer": (1, 1 << 16), "n_vocab": (1, 1 << 31)},
}


def _check_numbers(d: dict) -> None:
    for section, keys in NUMBERS.items():
        for key, (lo, hi) in keys.items():
            if key not in d[section]:
                continue
            x = d[section][key]
            if x is None and key == "bos_id":
                continue
            if isinstance(x, bool) or not isinstance(x, int) or not lo <= x < hi:
                raise UserError(f"{MANIFEST}: {section}.{key} is {x!r}, not a whole number from {lo} to {hi - 1}")


def check_name(name: object, what: str = "file") -> str:
    """A file name a manifest may hold: relative, inside the bundle, no "..", no backslash or NUL."""
    if not isinstance(name, str) or not name:
        raise UserError(f"{MANIFEST} names a {what} that is not a file name: {name!r}")
    p = PurePosixPath(name)
    if p.is_absolute() or ".." in p.parts or "\\" in name or "\x00" in name or name.startswith("~"):
        raise UserError(f"{MANIFEST} names a {what} outside the bundle: {name!r}")
    return name


def bundle_file(bundle: str | Path, name: str, what: str = "file") -> Path:
    """The path of a file the manifest names, checked to stay inside the bundle (symlinks resolved)."""
    bundle = Path(bundle)
    path = bundle / check_name(name, what)
    root, real = bundle.resolve(), path.resolve()
    if real != root and root not in real.parents:
        raise UserError(f"bundle {bundle}: {name} leads outside the bundle (a symbolic link to {real})")
    return path


def own_file(bundle: str | Path, name: str) -> Path | None:
    """The path of ``name`` when it is a file export or quantize makes, inside the bundle; else None.

    What a manifest lists but llava-edge did not make (``notes.txt``, ``../x``) is never deleted.
    """
    try:
        path = bundle_file(bundle, name)
    except UserError:
        return None
    return path if OWN_FILE.fullmatch(name) and path.parent.resolve() == Path(bundle).resolve() else None


def human_size(n: int) -> str:
    """Bytes as people read them in a table: 812 B, 1.23 MB, 4.07 GB (decimal units)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


@dataclass
class Variant:
    name: str  # what users pass: --vision-variant fp32, --llm-variant f32
    kind: str  # one of KINDS: "vision" (ONNX graph or TensorRT engine), "llm" (GGUF), "mmproj" (llama.cpp's CLIP GGUF)
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
        if not isinstance(d, dict):
            raise UserError(f"{MANIFEST} has a variant that is not an object: {d!r}"[:200])
        base = {k: d[k] for k in ("name", "kind", "precision", "file", "size", "sha256")}
        check_name(base["file"], f"{base['kind']} variant file")
        if not (isinstance(base["name"], str) and isinstance(base["size"], int) and isinstance(base["sha256"], str)):
            raise UserError(f"{MANIFEST} has a malformed variant record for {base['file']!r}")
        return cls(**base, extra={k: v for k, v in d.items() if k not in base})

    @property
    def token_reduction(self):
        """How this vision variant reduces the patch grid (``image_tokens.TokenReduction``); None: every patch."""
        d = self.extra.get("token_reduction")
        if d is None:
            return None
        from .image_tokens import TokenReduction

        if not isinstance(d, dict):
            raise UserError(f"{MANIFEST}: vision variant {self.name} has a token_reduction that is not an object")
        return TokenReduction.from_dict(d)

    @property
    def device_specific(self) -> bool:
        """A TensorRT engine: runs only where it was built, so never picked without being named."""
        return self.extra.get("format") == "tensorrt" or self.file.endswith(".engine")


class OlderSchema(UserError):
    """A manifest of an older schema: ``files`` are its variants' files (for an export that starts clean)."""

    def __init__(self, files: list[str], message: str):
        super().__init__(message)
        self.files = files


@dataclass
class Manifest:
    source: dict
    conv_mode: str  # a name in llava_edge.templates.MODES
    image: dict  # ImageSpec.to_dict()
    vision: dict
    llm: dict
    tokenizer: dict  # llava_edge.tokenizer.Settings.to_dict()
    variants: list[Variant] = field(default_factory=list)
    chat_template: str | None = None  # the checkpoint's Jinja template, for conv_mode "chat_template"
    family: str = "llava-1.5"  # the model family (``llava_edge.families``) whose image path the runtime takes
    # learned vectors the family's packing needs besides the graph: name -> {"file", "size", "sha256"}
    arrays: dict = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    created_by: str = f"llava-edge {__version__}"

    def find(self, kind: str, *, name: str | None = None, precisions: tuple[str, ...] | None = None,
             fmt: str | None = None, portable: bool | None = None) -> list[Variant]:
        """The variants of ``kind``, in manifest order, by name (any case), precision, format and portability
        (``portable``: not a device-specific TensorRT engine)."""
        return [v for v in self.variants if v.kind == kind
                and (name is None or v.name.lower() == name.strip().lower())
                and (precisions is None or v.precision in precisions)
                and (fmt is None or v.extra.get("format", Path(v.file).suffix.lstrip(".")) == fmt)
                and (portable is None or portable != v.device_specific)]

    def image_tokens(self, v: Variant) -> int:
        """How many positions the vision variant ``v`` gives the language model."""
        r = v.token_reduction
        return r.tokens if r is not None else int(self.vision["num_image_tokens"])

    def drift_records(self, v: Variant) -> dict[str, dict]:
        """What ``drift --record`` measured for ``v``, by the other variant of each pair, where both files measured
        are still the bundle's (by sha256)."""
        kind = "llm" if v.kind == "vision" else "vision"
        out = {}
        for other, rec in (v.extra.get("drift") or {}).items() if isinstance(v.extra.get("drift"), dict) else ():
            sha = rec.get("sha256") if isinstance(rec, dict) else None
            found = self.find(kind, name=other) if isinstance(sha, dict) else []
            if found and sha.get(v.kind) == v.sha256 and sha.get(kind) == found[0].sha256:
                out[other] = rec
        return out

    def variant(self, kind: str, name: str | None = None) -> Variant:
        """The variant ``name`` of ``kind``; without a name the first registered one that is not device-specific."""
        options = [v for v in self.variants if v.kind == kind]
        if not options:
            raise UserError(f"the bundle has no {kind} variant; export one first")
        if name is None:
            portable = [v for v in options if not v.device_specific]
            return (portable or options)[0]
        for v in options:
            if v.name == name:
                return v
        raise UserError(f"no {kind} variant {name!r} in the bundle; it has: {', '.join(v.name for v in options)}")

    def add_variant(self, bundle: str | Path, name: str, kind: str, precision: str, file: str, **extra) -> Variant:
        """Register ``file`` (already complete in the bundle) as a variant, replacing one of the same name.

        A replaced variant keeps its place in the list, so the default variant of a kind
        (the first one) does not change when a later one is re-exported.
        """
        if kind not in KINDS:
            raise ValueError(f"unknown variant kind {kind!r}; known: {', '.join(KINDS)}")
        path = Path(bundle) / file
        v = Variant(name, kind, precision, file, path.stat().st_size, sha256_file(path), extra)
        self.remove_file(file, keep=(kind, name))
        for i, x in enumerate(self.variants):
            if x.kind == kind and x.name == name:
                self.variants[i] = v
                break
        else:
            self.variants.append(v)
        return v

    def remove_file(self, file: str, keep: tuple[str, str] | None = None) -> list[Variant]:
        """Unregister every variant stored in ``file`` (except the ``(kind, name)`` in ``keep``); return them."""
        gone = [v for v in self.variants if v.file == file and (v.kind, v.name) != keep]
        self.variants = [v for v in self.variants if v not in gone]
        return gone

    def to_dict(self) -> dict:
        return {
            "schema_version": self.schema_version,
            "created_by": self.created_by,
            "family": self.family,
            "source": self.source,
            "conv_mode": self.conv_mode,
            **({"chat_template": self.chat_template} if self.chat_template is not None else {}),
            "image": self.image,
            "vision": self.vision,
            "llm": self.llm,
            "tokenizer": self.tokenizer,
            **({"arrays": self.arrays} if self.arrays else {}),
            "variants": [v.to_dict() for v in self.variants],
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Manifest":
        if not isinstance(d, dict):
            raise UserError(f"{MANIFEST} is not a JSON object but a {type(d).__name__}")
        version = d.get("schema_version")
        if isinstance(version, int) and version > SCHEMA_VERSION:
            raise UserError(f"bundle manifest schema {version} was written by a newer llava-edge (this one reads "
                            f"schema {SCHEMA_VERSION}): upgrade llava-edge, or export the bundle again with this one")
        if version != SCHEMA_VERSION:
            raise OlderSchema([v.get("file") for v in d.get("variants", []) if isinstance(v, dict)
                               and isinstance(v.get("file"), str)],
                              f"bundle manifest schema {version!r} was written by an older llava-edge, which prompted "
                            f"differently (this one reads schema {SCHEMA_VERSION}): export the bundle again")
        for key in ("source", "image", "vision", "llm", "tokenizer"):
            if not isinstance(d[key], dict):
                raise UserError(f"{MANIFEST}: section {key!r} is not an object")
        if not isinstance(d["conv_mode"], str) or not isinstance(d.get("variants", []), list):
            raise UserError(f"{MANIFEST}: conv_mode is not a name or variants is not a list")
        if "file" in d["tokenizer"]:
            check_name(d["tokenizer"]["file"], "tokenizer file")
        arrays = d.get("arrays", {})
        if not isinstance(arrays, dict) or not all(isinstance(a, dict) and isinstance(a.get("sha256"), str)
                                                   for a in arrays.values()):
            raise UserError(f"{MANIFEST}: section 'arrays' is not a map of files with their sha256")
        for a in arrays.values():
            check_name(a.get("file"), "array file")
        if not isinstance(d.get("family", "llava-1.5"), str):
            raise UserError(f"{MANIFEST}: family is not a name")
        _check_numbers(d)
        return cls(
            source=d["source"], conv_mode=d["conv_mode"], image=d["image"], vision=d["vision"], llm=d["llm"],
            tokenizer=d["tokenizer"], variants=[Variant.from_dict(v) for v in d.get("variants", [])],
            chat_template=d.get("chat_template"), family=d.get("family", "llava-1.5"), arrays=arrays,
            schema_version=version, created_by=d.get("created_by", "?"),
        )


def is_bundle(path: str | Path) -> bool:
    """A finished bundle: it has ``manifest.json``."""
    return (Path(path) / MANIFEST).is_file()


def is_incomplete(path: str | Path) -> bool:
    """An export into ``path`` started and has not finished (it continues when run again)."""
    return (Path(path) / IN_PROGRESS).is_file()


def read(bundle: str | Path) -> Manifest:
    bundle = Path(bundle)
    f = bundle / MANIFEST
    if not bundle.is_dir():
        raise UserError(f"bundle not found: {bundle}")
    if not f.is_file():
        if is_incomplete(bundle):
            raise UserError(f"bundle {bundle} is incomplete (an export into it did not finish): "
                            "run the same `llava-edge export` again to finish it")
        raise UserError(f"not a bundle (no {MANIFEST}): {bundle}")
    return _parse(f, bundle)


def _parse(f: Path, bundle: Path) -> Manifest:
    try:
        return Manifest.from_dict(json.loads(f.read_text()))
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"corrupt {f.name} in {bundle} ({type(e).__name__}: {e})") from None


def write(bundle: str | Path, manifest: Manifest) -> None:
    atomic.write_json(Path(bundle) / MANIFEST, manifest.to_dict())


def read_incomplete(bundle: str | Path) -> Manifest | None:
    """The state an unfinished export left (see the module docstring), or None when there is none."""
    f = Path(bundle) / IN_PROGRESS
    return _parse(f, Path(bundle)) if f.is_file() else None


def write_incomplete(bundle: str | Path, manifest: Manifest) -> None:
    atomic.write_json(Path(bundle) / IN_PROGRESS, manifest.to_dict())


def finish(bundle: str | Path, manifest: Manifest) -> bool:
    """Write ``manifest.json`` (only when its content changes) and drop the unfinished-export state.

    Returns whether ``manifest.json`` was written. Skipping an identical write keeps
    a re-run that changed nothing from touching the bundle at all.
    """
    bundle = Path(bundle)
    f = bundle / MANIFEST
    changed = True
    if f.is_file():
        try:
            # through JSON on both sides: tuples in memory are lists on disk
            changed = json.loads(f.read_text()) != json.loads(json.dumps(manifest.to_dict()))
        except ValueError:
            pass
    if changed:
        write(bundle, manifest)
    (bundle / IN_PROGRESS).unlink(missing_ok=True)
    return changed


def check_files(bundle: str | Path, manifest: Manifest, files: list[str], verify_hash: bool = False) -> None:
    """Every named file is inside the bundle and present with its recorded size (and hash when asked)."""
    by_file = {v.file: v for v in manifest.variants}
    for name in files:
        p = bundle_file(bundle, name)
        if not p.is_file():
            raise UserError(f"bundle {bundle} is missing a file: {name}")
        v = by_file.get(name)
        if v is not None and p.stat().st_size != v.size:
            raise UserError(f"bundle file {name} has {p.stat().st_size} bytes, the manifest says {v.size}")
        if v is not None and verify_hash and sha256_file(p) != v.sha256:
            raise UserError(f"bundle file {name} does not match its sha256 in the manifest")
