"""What a bundle holds, as ``llava-edge info`` shows it, and its files checked against the manifest."""

from __future__ import annotations

from pathlib import Path

from . import integrity, manifest
from .errors import UserError
from .manifest import Manifest


def print_info(bundle: Path, m: Manifest) -> None:
    """The manifest's fields, the variants table and, where there are engines, their TensorRT records."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    fields = Table(title=str(bundle), show_header=False, box=None)
    fields.add_column(style="bold")
    fields.add_column(overflow="fold")
    for key, value in manifest_fields(m):
        fields.add_row(key, value)
    console.print(fields)
    t = Table(title="variants")
    for col in ("variant", "kind", "precision", "size", "file", "sha256"):
        t.add_column(col, justify="right" if col == "size" else "left")
    for v in m.variants:
        t.add_row(v.name, v.kind, v.precision, manifest.human_size(v.size), v.file, v.sha256[:12])
    console.print(t)
    engines = [v for v in m.variants if v.device_specific]
    if engines:
        e = Table(title="TensorRT engines (run only with this TensorRT on this GPU)")
        for col in ("variant", "TensorRT", "GPU", "compute capability", "batch (min/opt/max)", "image size"):
            e.add_column(col)
        for v in engines:
            x = v.extra
            e.add_row(v.name, str(x.get("tensorrt_version", "?")), str(x.get("gpu", "?")),
                      str(x.get("compute_capability", "?")),
                      f"{x.get('min_batch', '?')}/{x.get('opt_batch', '?')}/{x.get('max_batch', '?')}",
                      str(x.get("image_size", "?")))
        console.print(e)


def verify_files(bundle: Path, m: Manifest) -> list[str]:
    """Every file the manifest records a sha256 for, hashed afresh: what differs, each as 'NAME: why'."""
    recorded = {v.file: v.sha256 for v in m.variants}
    recorded.update(m.tokenizer.get("sha256") or {})
    bad = []
    for name, sha in recorded.items():
        try:
            path = manifest.bundle_file(bundle, name)
            if not path.is_file():
                bad.append(f"{name}: missing")
                continue
            integrity.verify(path, sha, name, remember=False)
        except UserError as e:
            bad.append(f"{name}: {'damaged or replaced' if 'sha256' in str(e) else e}")
    return bad


def manifest_fields(m: Manifest) -> list[tuple[str, str]]:
    """The manifest's sections as (name, text) rows for `info`."""
    s, im, vi, llm, tok = m.source, m.image, m.vision, m.llm, m.tokenizer
    rows = [
        ("schema", f"{m.schema_version} ({m.created_by})"),
        ("source", str(s.get("model", "?"))),
        ("fingerprint", str(s.get("fingerprint", "?"))),
    ]
    if s.get("converted"):
        rows.append(("converted copy", str(s["converted"])))
    rows += [
        ("model family", m.family),
        ("conversation mode", m.conv_mode),
        ("image", f"{vi.get('image_size', im.get('crop'))} px; resize {im.get('resize')}, crop {im.get('crop')}, "
                  f"pad mode {im.get('pad')}"),
        ("mean / std", f"{_floats(im.get('mean'))} / {_floats(im.get('std'))}"),
        *([("tiles", _anyres(im["anyres"]))] if isinstance(im.get("anyres"), dict) else []),
        ("vision", f"feature layer {vi.get('feature_layer')} ({vi.get('select_strategy')}), "
                   f"{vi.get('num_image_tokens')} image tokens x {vi.get('embed_dim')}, opset {vi.get('opset')}"),
    ]
    for name, p in (vi.get("parity") or {}).items():
        rows.append((f"parity {name}", f"vs Hugging Face on {p.get('images', '?')} images: min cosine "
                                       f"{p.get('min_cosine', float('nan')):.8f}, max abs {p.get('max_abs', '?')}"))
    if llm:
        dims = ", ".join(f"{k} {llm[k]}" for k in ("n_embd", "n_layer", "n_head", "n_head_kv", "n_vocab",
                                                   "n_ctx_train") if k in llm)
        ids = ", ".join(f"{k} {llm[k]}" for k in ("bos_id", "eos_id", "image_token_id") if k in llm)
        rows.append(("language model", f"{llm.get('arch', '?')}: {dims}"))
        rows.append(("token ids", ids))
    rows.append(("tokenizer", f"{tok.get('file')}: {tok.get('kind')}, "
                              f"{'legacy' if tok.get('legacy') else 'non-legacy'} word starts, "
                              f"adds BOS: {'yes' if tok.get('add_bos') else 'no'}"))
    return rows


def _anyres(a: dict) -> str:
    """A tiled family's grid settings in one line."""
    grids = ", ".join(f"{p[0]}x{p[1]}" for p in a.get("pinpoints") or [] if isinstance(p, (list, tuple)) and len(p) == 2)
    read = {"hw": "height x width (transformers)", "wh": "width x height (LLaVA's code)"}.get(a.get("orientation"), "?")
    bound = f", at most {a['max_tiles']} grid tiles" if a.get("max_tiles") else ""
    return (f"{a.get('tile')} px tiles, pinpoints {grids} read as {read}, unpad rounding {a.get('rounding')}"
            f"{bound}")


def _floats(xs) -> str:
    return "(" + ", ".join(f"{float(x):.4g}" for x in xs or ()) + ")"
