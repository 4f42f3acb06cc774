"""Synthetic scenes: one to four copies of a coloured shape on a 2x2 grid, with their ground truth.

The pictures of the toy world (``llava_edge.toy``), and the stand-in pictures of
export's parity check and the benchmarks (nothing may download an image). Not a
calibration set for a real model: quantize asks for ``--calib-images`` there.

The vocabulary is small on purpose: a model of a few million parameters can
learn to see it, and every question about a scene has one exact answer. All
objects of a scene share shape, colour and size: a scene is "three small red
circles at ...". Scenes whose objects differ (a red circle here, a blue square
there) ask the language model to bind each attribute to its place, which a
4-layer, 128-wide model did not learn within the 10-minute CPU budget (about 55%
of such questions answered, whatever the data mix, step count or width;
docs/TRAINING.md has the measurements).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
SIZES = ("small", "large")
CELLS = ("top left", "top right", "bottom left", "bottom right")
NUMBER_WORDS = ("zero", "one", "two", "three", "four")
BACKGROUND = (245, 245, 240)


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    size: str
    cell: str

    def phrase(self) -> str:
        return f"a {self.size} {self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]

    def at(self, cell: str) -> Obj | None:
        return next((o for o in self.objects if o.cell == cell), None)

    def count(self, shape: str | None = None, color: str | None = None) -> int:
        return sum(
            1 for o in self.objects if (shape is None or o.shape == shape) and (color is None or o.color == color)
        )

    def to_dict(self) -> dict:
        return {"objects": [o.__dict__ for o in self.objects]}

    @classmethod
    def from_dict(cls, d: dict) -> "Scene":
        return cls(tuple(Obj(**o) for o in d["objects"]))


def random_scene(rng: random.Random) -> Scene:
    n = rng.randint(1, 4)
    cells = sorted(rng.sample(CELLS, n), key=CELLS.index)
    shape, color, size = rng.choice(SHAPES), rng.choice(list(COLORS)), rng.choice(SIZES)
    return Scene(tuple(Obj(shape, color, size, cell) for cell in cells))


def render(scene: Scene, size: int = 128, rng: random.Random | None = None) -> Image.Image:
    """Draw ``scene``; ``rng`` jitters positions a little so no two images are identical."""
    im = Image.new("RGB", (size, size), BACKGROUND)
    d = ImageDraw.Draw(im)
    half = size // 2
    for o in scene.objects:
        col, row = CELLS.index(o.cell) % 2, CELLS.index(o.cell) // 2
        r = half * (0.38 if o.size == "large" else 0.2)
        jitter = (half / 2 - r) * 0.5
        cx = col * half + half / 2 + (rng.uniform(-jitter, jitter) if rng else 0)
        cy = row * half + half / 2 + (rng.uniform(-jitter, jitter) if rng else 0)
        fill = COLORS[o.color]
        if o.shape == "circle":
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif o.shape == "square":
            d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return im
