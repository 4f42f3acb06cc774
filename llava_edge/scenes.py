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

The detail world (``random_detail_scene``, opt-in) also gives the objects a fill
pattern: plain, striped or checked in one-pixel lines of the object's colour and
a darker shade. The three have the same mean colour, so once a picture is
shrunk by two or more (LLaVA-1.5's one tile) they look alike, and only a view
at the picture's own pixels (LLaVA-NeXT's tiles) tells them apart.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
SIZES = ("small", "large")
CELLS = ("top left", "top right", "bottom left", "bottom right")
NUMBER_WORDS = ("zero", "one", "two", "three", "four")
BACKGROUND = (245, 245, 240)
PATTERNS = ("plain", "striped", "checked")
SHADE = 1 / 3  # the darker lines of a pattern: the object's colour times this


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    size: str
    cell: str
    pattern: str = ""  # "": the default world's solid fill; else one of PATTERNS (the detail world)

    def phrase(self) -> str:
        return f"a {self.size} {self.look()} {self.shape}"

    def look(self) -> str:
        """The words before the shape's name: its colour, after its pattern where it has one."""
        return f"{self.pattern} {self.color}" if self.pattern else self.color


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]

    def at(self, cell: str) -> Obj | None:
        return next((o for o in self.objects if o.cell == cell), None)

    def count(self, shape: str | None = None, color: str | None = None) -> int:
        return sum(
            1 for o in self.objects if (shape is None or o.shape == shape) and (color is None or o.color == color)
        )

    @property
    def pattern(self) -> str:
        return self.objects[0].pattern

    def to_dict(self) -> dict:  # a default-world object is written without its empty pattern, as it always was
        return {"objects": [{k: v for k, v in o.__dict__.items() if k != "pattern" or v} for o in self.objects]}

    @classmethod
    def from_dict(cls, d: dict) -> "Scene":
        return cls(tuple(Obj(**o) for o in d["objects"]))


def random_scene(rng: random.Random) -> Scene:
    n = rng.randint(1, 4)
    cells = sorted(rng.sample(CELLS, n), key=CELLS.index)
    shape, color, size = rng.choice(SHAPES), rng.choice(list(COLORS)), rng.choice(SIZES)
    return Scene(tuple(Obj(shape, color, size, cell) for cell in cells))


def random_detail_scene(rng: random.Random) -> Scene:
    """A scene of the detail world: :func:`random_scene`, its objects filled with one of ``PATTERNS``."""
    scene = random_scene(rng)
    pattern = rng.choice(PATTERNS)
    return Scene(tuple(replace(o, pattern=pattern) for o in scene.objects))


def pattern_colors(color: str) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """The two colours of a pattern's lines: the object's colour and its darker shade."""
    c = COLORS[color]
    return c, tuple(round(x * SHADE) for x in c)


def pattern_fill(pattern: str, color: str, size: int) -> np.ndarray:
    """(size, size, 3) uint8: ``pattern`` over the whole picture, its lines on the picture's own pixels (even rows,
    or even squares, in the object's colour); "plain" is the lines' mean, so every pattern has the same mean."""
    bright, dark = (np.array(c, np.float64) for c in pattern_colors(color))
    y, x = np.mgrid[0:size, 0:size]
    on = {"striped": y % 2 == 0, "checked": (x + y) % 2 == 0}.get(pattern)
    if on is None:
        return np.broadcast_to(np.round((bright + dark) / 2), (size, size, 3)).astype(np.uint8)
    return np.where(on[..., None], bright, dark).astype(np.uint8)


def render(scene: Scene, size: int = 128, rng: random.Random | None = None) -> Image.Image:
    """Draw ``scene``; ``rng`` jitters positions a little so no two images are identical."""
    im = Image.new("RGB", (size, size), BACKGROUND)
    patterned = bool(scene.objects) and bool(scene.pattern)
    # a patterned scene draws its shapes into a mask, then takes the pattern's pixels inside it
    mask = Image.new("L", (size, size), 0) if patterned else None
    d = ImageDraw.Draw(mask if patterned else im)
    half = size // 2
    for o in scene.objects:
        col, row = CELLS.index(o.cell) % 2, CELLS.index(o.cell) // 2
        r = half * (0.38 if o.size == "large" else 0.2)
        jitter = (half / 2 - r) * 0.5
        cx = col * half + half / 2 + (rng.uniform(-jitter, jitter) if rng else 0)
        cy = row * half + half / 2 + (rng.uniform(-jitter, jitter) if rng else 0)
        fill = 255 if patterned else COLORS[o.color]
        if o.shape == "circle":
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif o.shape == "square":
            d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    if patterned:
        o = scene.objects[0]
        a = np.where(np.asarray(mask)[..., None] > 0, pattern_fill(o.pattern, o.color, size), np.asarray(im))
        im = Image.fromarray(a.astype(np.uint8), "RGB")
    return im
