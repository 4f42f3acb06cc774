"""What the text-only LLM is told about each picture: its captions and its objects' boxes.

Two inputs: COCO's ``captions_*.json`` and ``instances_*.json`` as published (boxes
``[x, y, w, h]`` in pixels become ``[x1, y1, x2, y2]`` in 0-1 with 3 decimals, as
LLaVA's data generation wrote them), or one JSONL file of
``{"image": ..., "captions": [...], "boxes": [{"label": ..., "box": [x1, y1, x2, y2]}]}``
with boxes already normalised.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError


@dataclass
class Picture:
    key: str  # stable id (COCO's image id, or the JSONL's image name)
    image: str  # file name, relative to --images
    captions: list[str] = field(default_factory=list)
    boxes: list[tuple[str, list[float]]] = field(default_factory=list)  # (label, [x1, y1, x2, y2] in 0-1)

    def context(self) -> str:
        """The symbolic context: captions, then one line per object."""
        lines = ["Captions:", *[c.strip() for c in self.captions if c.strip()]]
        if self.boxes:
            lines += ["", "Objects:"]
            lines += [f"{label}: [{', '.join(f'{v:.3f}' for v in box)}]" for label, box in self.boxes]
        return "\n".join(lines)


def _read_json(path: Path, what: str):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{what} not found: {path}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{what} {path} is not valid JSON ({e})") from None


def read_coco(captions: Path | None, instances: Path | None) -> list[Picture]:
    """COCO's captions and/or instances files -> pictures, in image-id order."""
    if captions is None and instances is None:
        raise UserError("give --captions and/or --instances (COCO's JSON), or --input (JSONL)")
    pics: dict[int, Picture] = {}

    def images_of(doc: dict, what: str) -> dict:
        if not isinstance(doc, dict) or not isinstance(doc.get("images"), list) or \
                not isinstance(doc.get("annotations"), list):
            raise UserError(f"{what} is not a COCO annotation file (needs 'images' and 'annotations' lists)")
        out = {}
        for im in doc["images"]:
            try:
                out[int(im["id"])] = im
                pics.setdefault(int(im["id"]), Picture(str(im["id"]), str(im["file_name"])))
            except (KeyError, TypeError, ValueError):
                raise UserError(f"{what}: an image entry lacks id or file_name: {str(im)[:100]}") from None
        return out

    if captions is not None:
        doc = _read_json(captions, "the captions file")
        images_of(doc, f"the captions file {captions}")
        for a in doc["annotations"]:
            pid = a.get("image_id") if isinstance(a, dict) else None
            if pid in pics and isinstance(a.get("caption"), str):
                pics[pid].captions.append(a["caption"])
    if instances is not None:
        doc = _read_json(instances, "the instances file")
        images = images_of(doc, f"the instances file {instances}")
        names = {c["id"]: c["name"] for c in doc.get("categories", []) if isinstance(c, dict) and "id" in c}
        for a in doc["annotations"]:
            if not isinstance(a, dict) or a.get("image_id") not in images:
                continue
            im = images[a["image_id"]]
            try:
                x, y, w, h = (float(v) for v in a["bbox"])
                W, H = float(im["width"]), float(im["height"])
            except (KeyError, TypeError, ValueError):
                continue
            box = [round(min(max(v, 0.0), 1.0), 3) for v in (x / W, y / H, (x + w) / W, (y + h) / H)]
            pics[a["image_id"]].boxes.append((names.get(a.get("category_id"), "object"), box))
    return [pics[k] for k in sorted(pics)]


def read_jsonl(path: Path) -> list[Picture]:
    out = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UserError(f"input not found: {path}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            caps = d.get("captions") or ([d["caption"]] if "caption" in d else [])
            boxes = [(str(b["label"]), [float(v) for v in b["box"]]) for b in d.get("boxes") or []]
            if not all(len(b) == 4 for _, b in boxes):
                raise ValueError("a box must have 4 numbers")
            out.append(Picture(str(d.get("id", d["image"])), str(d["image"]), [str(c) for c in caps], boxes))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise UserError(f"{path} line {n}: not a picture record ({e}); expected "
                            '{"image": ..., "captions": [...], "boxes": [{"label": ..., "box": [x1, y1, x2, y2]}]}') \
                from None
    return out
