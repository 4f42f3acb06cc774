"""The model families llava-edge knows, one registered description each (see :mod:`.base`).

Every stage asks the family of the checkpoint or bundle at hand; none branches on a
family's name. A new family is a module with a :class:`Family` subclass registered here,
and its tests.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from .base import Family, ImagePath, PreparedImage, pixels_key
from .llava15 import Llava15
from .llava_next import LlavaNext
from .llava_onevision import LlavaOnevision

DEFAULT = "llava-1.5"  # the family of a manifest that names none (bundles from before families were recorded)
FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    if family.name in FAMILIES:
        raise ValueError(f"family {family.name!r} is registered twice")
    FAMILIES[family.name] = family
    return family


for _f in (Llava15(), LlavaNext(), LlavaOnevision()):
    register(_f)


def read_array(path: Path, name: str):
    """A side array a bundle stores (``array.NAME.npy``): float32 numbers only, never pickled objects."""
    import numpy as np

    try:
        a = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise UserError(f"unreadable {path.name} in the bundle ({type(e).__name__}): export it again") from None
    if a.dtype != np.float32 or not np.isfinite(a).all():
        raise UserError(f"{path.name} in the bundle is not finite float32 numbers: export it again")
    return a


def supported() -> str:
    """Every family's phrase, for "unsupported model" errors."""
    return "; ".join(f.supported for f in FAMILIES.values())


def for_config(config: dict, path: Path) -> Family:
    """The family whose llava-hf layout ``config`` is, checked; a one-line error naming what it is otherwise."""
    found = [f for f in FAMILIES.values() if f.detects(config)]
    if not found:
        mtype = config.get("model_type")
        arch = (config.get("architectures") or [None])[0]
        what = f"{arch!r} (model_type {mtype!r})" if arch else f"model_type {mtype!r}"
        raise UserError(f"unsupported model {path}: {what}; supported: {supported()}")
    found[0].check(config, path)
    return found[0]


def for_model(model) -> Family:
    """The family whose Hugging Face class ``model`` is an instance of."""
    for f in FAMILIES.values():
        if type(model).__name__ == f.hf_class_name:
            return f
    raise UserError(f"no llava-edge model family defines {type(model).__name__}")


def by_name(name: object) -> Family:
    """A bundle's family by the name its manifest records (none recorded: LLaVA-1.5)."""
    if name is None:
        name = DEFAULT
    if not isinstance(name, str) or name not in FAMILIES:
        raise UserError(f"the bundle names an unknown model family {name!r} (this llava-edge knows "
                        f"{', '.join(FAMILIES)}): upgrade llava-edge, or export the bundle again")
    return FAMILIES[name]


__all__ = ["FAMILIES", "Family", "ImagePath", "PreparedImage", "by_name", "for_config", "for_model", "read_array", "pixels_key", "register",
           "supported"]
