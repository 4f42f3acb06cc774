"""The toy's detail world: patterned shapes and a pattern question that LLaVA-1.5's one tile cannot answer and
LLaVA-NeXT's anyres tiles can; the default world stays what it was."""

from __future__ import annotations

import hashlib
import importlib
import json
import random
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli_run import assert_one_line_error, le
from llava_edge.checkpoint import open_checkpoint
from llava_edge.scenes import (BACKGROUND, COLORS, PATTERNS, Scene, pattern_colors, pattern_fill, random_detail_scene,
                               random_scene, render)
from llava_edge.toy.data import (DETAIL_IMAGE_SIZE, DETAIL_KIND, FILES, TRAIN_KIND_WEIGHTS, caption, detail, short_qa,
                                 write_dataset)

REPO = Path(__file__).resolve().parents[1]
# The last commit before the detail world: its default world is the one every toy build and test was made with.
BEFORE_DETAIL = "a42596121874cb47062541f0b1ca0782ed9e1922"


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode() + p.read_bytes())
    return h.hexdigest()


def _world_before(tmp_path: Path):
    """``toy/data.py`` as it was before the detail world, with its scenes, imported as a package of its own."""
    def old(path: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(REPO), "show", f"{BEFORE_DETAIL}:{path}"], capture_output=True,
                                  text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            pytest.skip("the repository's history is not here")

    pkg = tmp_path / "before" / "llava_edge_before"
    (pkg / "toy").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "toy" / "__init__.py").write_text("")
    (pkg / "atomic.py").write_text(old("llava_edge/atomic.py"))
    (pkg / "scenes.py").write_text(old("llava_edge/scenes.py"))
    (pkg / "toy" / "data.py").write_text(old("llava_edge/toy/data.py"))
    sys.path.insert(0, str(pkg.parent))
    try:
        return importlib.import_module("llava_edge_before.toy.data")
    finally:
        sys.path.remove(str(pkg.parent))


def test_the_default_world_is_the_one_before_the_detail_world(tmp_path):
    before = _world_before(tmp_path)
    try:
        for seed in (0, 1):
            before.write_dataset(tmp_path / f"old{seed}", seed=seed, n_stage1=30, n_stage2=60, n_eval=40)
            write_dataset(tmp_path / f"new{seed}", seed=seed, n_stage1=30, n_stage2=60, n_eval=40)
            assert _digest(tmp_path / f"old{seed}") == _digest(tmp_path / f"new{seed}")
        # the scenes, their pictures and the questions of the pretraining and tokenizer text, from one generator
        old_rng, new_rng = random.Random(7), random.Random(7)
        for _ in range(300):
            old_scene, scene = before.random_scene(old_rng), random_scene(new_rng)
            assert old_scene.to_dict() == scene.to_dict()
            assert before.short_qa(old_scene, old_rng, before.TRAIN_KIND_WEIGHTS) == short_qa(scene, new_rng,
                                                                                           TRAIN_KIND_WEIGHTS)
            assert before.detail(old_scene) == detail(scene) and before.caption(old_scene) == caption(scene)
        assert old_rng.random() == new_rng.random()
        im_old = before.render(before.random_scene(random.Random(3)), 128, random.Random(4))
        im_new = render(random_scene(random.Random(3)), 128, random.Random(4))
        assert im_old.tobytes() == im_new.tobytes()
    finally:
        for name in [m for m in sys.modules if m.split(".")[0] == "llava_edge_before"]:
            del sys.modules[name]


@pytest.fixture(scope="module")
def detail_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("detail_data")
    write_dataset(out, seed=0, n_stage1=30, n_stage2=80, n_eval=120, image_size=DETAIL_IMAGE_SIZE, detail_world=True)
    return out


def test_pattern_answers_follow_from_the_scene(detail_data):
    records = json.loads((detail_data / FILES["eval"]).read_text())
    kinds = {r["category"] for r in records}
    assert DETAIL_KIND in kinds and {"shape", "color", "size", "count", "where", "exists"} <= kinds
    for r in records:
        objs = r["scene"]["objects"]
        assert len({o["pattern"] for o in objs}) == 1 and objs[0]["pattern"] in PATTERNS
        if r["category"] == DETAIL_KIND:
            q = r["conversations"][0]["value"]
            assert "What pattern" in q and r["answer"] == objs[0]["pattern"]
        elif r["category"] in ("shape", "color", "size"):
            assert r["answer"] == objs[0][r["category"]]
        elif r["category"] == "count":
            assert r["answer"] == str(len(objs))
    # every pattern is asked about; captions and descriptions name it, and stage 2 teaches the question
    assert {r["answer"] for r in records if r["category"] == DETAIL_KIND} == set(PATTERNS)
    captions = json.loads((detail_data / FILES["stage1"]).read_text())
    assert all(any(p in c["conversations"][1]["value"] for p in PATTERNS) for c in captions)
    stage2 = json.loads((detail_data / FILES["stage2"]).read_text())
    assert any("What pattern" in t["value"] for r in stage2 for t in r["conversations"])
    # the question only where the scene has a pattern
    rng = random.Random(0)
    assert all(short_qa(random_scene(rng), rng)[0] != DETAIL_KIND for _ in range(500))


def test_pictures_show_the_pattern(detail_data):
    # every pixel is the background's or the pattern's (its lines on the picture's own rows and columns), and every
    # pattern has the same mean colour
    for r in json.loads((detail_data / FILES["eval"]).read_text())[:30]:
        scene = Scene.from_dict(r["scene"])
        im = np.asarray(Image.open(detail_data / r["image"]).convert("RGB")).astype(int)
        assert im.shape == (DETAIL_IMAGE_SIZE, DETAIL_IMAGE_SIZE, 3)
        bright, dark = (np.array(c) for c in pattern_colors(scene.objects[0].color))
        y, x = np.mgrid[0:DETAIL_IMAGE_SIZE, 0:DETAIL_IMAGE_SIZE]
        on = {"striped": y % 2 == 0, "checked": (x + y) % 2 == 0}.get(scene.pattern)
        want = np.round((bright + dark) / 2) if on is None else np.where(on[..., None], bright, dark)
        drawn = (im != BACKGROUND).any(-1)
        assert drawn.mean() > 0.02 and (im[drawn] == np.broadcast_to(want, im.shape)[drawn]).all(), r["id"]
    for color in COLORS:
        means = [pattern_fill(p, color, 8).reshape(-1, 3).mean(0) for p in PATTERNS]
        assert all(np.abs(m - means[0]).max() <= 0.5 for m in means), (color, means)


@pytest.fixture(scope="module")
def next_toy(tmp_path_factory):
    from llava_edge.toy.model import write_toy_model

    return write_toy_model(tmp_path_factory.mktemp("toy_next") / "model", "toy-next", seed=0)


def _views(ckpt_dir, scene_of, seed: int) -> dict:
    """Each pattern's picture of one scene (same place, same jitter) as the checkpoint's family gives it to the
    tower: {pattern: (tiles, 3, S, S)}."""
    ckpt = open_checkpoint(ckpt_dir)
    images = ckpt.family.checkpoint_image_path(ckpt)
    return {p: images.prepare(render(scene_of(p), DETAIL_IMAGE_SIZE, random.Random(seed))).pixels for p in PATTERNS}


def test_one_tile_loses_the_pattern_that_anyres_tiles_keep(toy_model, next_toy):
    # How far apart the three patterns' pictures are, as the tower receives them (CLIP-normalised units),
    # averaged over the object: LLaVA-1.5's one tile and LLaVA-NeXT's base tile shrink the 224 px picture
    # (to 128 px then a 112 crop; to 112 px), below the one-pixel lines; NeXT's 2x2 grid tiles are the
    # picture's own pixels.
    rng = random.Random(5)
    one_tile, base_tile, grid_tiles, contrast = [], [], [], []
    for k in range(6):
        scene = random_detail_scene(rng)

        def scene_of(p, scene=scene):
            return Scene(tuple(replace(o, pattern=p) for o in scene.objects))

        mask = np.asarray(render(scene_of("plain"), DETAIL_IMAGE_SIZE, random.Random(k))).astype(int)
        inside = np.abs(mask - 245).max(-1) > 30  # the object's pixels at full size
        one, nxt = _views(toy_model, scene_of, k), _views(next_toy, scene_of, k)
        assert one["plain"].shape[0] == 1 and nxt["plain"].shape[0] == 5  # base tile + 2x2 grid

        def apart(views, tile, region):
            return max(np.abs(views[a][tile] - views[b][tile]).max(0)[region].mean()
                       for a in PATTERNS for b in PATTERNS if a < b)

        # the object's pixels at each view's scale: shrunk for the one-tile views, the grid's own for the tiles
        small = np.asarray(Image.fromarray(inside).resize((128, 128))).astype(bool)[8:120, 8:120]
        base = np.asarray(Image.fromarray(inside).resize((112, 112))).astype(bool)
        one_tile.append(apart(one, 0, small))
        base_tile.append(apart(nxt, 0, base))
        grid = [inside[r * 112:(r + 1) * 112, c * 112:(c + 1) * 112] for r in (0, 1) for c in (0, 1)]
        grid_tiles.append(max(apart(nxt, 1 + i, g) for i, g in enumerate(grid) if g.any()))
        # what the same views see of the object against the background: the tower does get the object
        empty = _views(toy_model, lambda p: Scene(()), k)["plain"]
        contrast.append(np.abs(one["plain"][0] - empty[0]).max(0)[small].mean())
    one_tile, base_tile, grid_tiles, contrast = map(np.array, (one_tile, base_tile, grid_tiles, contrast))
    assert (contrast > 0.5).all(), contrast
    assert (one_tile < 0.06).all() and (base_tile < 0.06).all(), (one_tile, base_tile)
    assert (grid_tiles > 0.5).all(), grid_tiles
    assert (grid_tiles > 10 * np.maximum(one_tile, base_tile)).all()


def test_pretraining_text_of_the_detail_world_asks_the_pattern():
    from llava_edge.toy.pretrain import language_examples

    def text(examples) -> str:
        return "\n".join(x if isinstance(x, str) else "\n".join(t.text for t in x) for x in examples)

    detail_text = text(language_examples(60, 0, detail=True))
    assert "What pattern" in detail_text and "striped" in detail_text and "checked" in detail_text
    assert "pattern" not in text(language_examples(60, 0))


def test_evaluation_prepares_pictures_as_the_family_does(toy_model, next_toy, tmp_path, detail_data):
    # one tile: the pixels and positions the evaluation used before it asked the family
    from llava_edge.preprocess import preprocess
    from llava_edge.toy.evaluate import evaluate_hf

    ckpt = open_checkpoint(toy_model)
    image = sorted((detail_data / "images").glob("eval_*.png"))[0]
    picture = ckpt.family.checkpoint_image_path(ckpt).prepare(image)
    assert np.array_equal(picture.pixels[0], preprocess(image, ckpt.image_spec()))
    assert picture.positions == ckpt.num_image_tokens()
    # LLaVA-NeXT: each picture's tiles and its own count of positions, through generate
    shutil.copytree(detail_data / "images", tmp_path / "images")
    records = json.loads((detail_data / FILES["eval"]).read_text())[:2]
    (tmp_path / "eval.json").write_text(json.dumps(records))
    result = evaluate_hf(next_toy, tmp_path / "eval.json", max_new_tokens=2)
    assert result["n"] == 2 and len(result["answers"]) == 2


def test_toy_data_detail_and_toy_build_presets_from_the_cli(tmp_path):
    r = le("toy", "data", "--out", tmp_path / "d", "--n-stage1", 2, "--n-stage2", 2, "--n-eval", 6, "--detail")
    assert r.returncode == 0, r.stderr
    records = json.loads((tmp_path / "d" / FILES["eval"]).read_text())
    assert all(o["pattern"] in PATTERNS for rec in records for o in rec["scene"]["objects"])
    assert Image.open(tmp_path / "d" / records[0]["image"]).size == (DETAIL_IMAGE_SIZE, DETAIL_IMAGE_SIZE)
    assert_one_line_error(le("toy", "build", "--out", tmp_path / "b", "--preset", "llava-1.5-7b"), "toy-next")
    assert_one_line_error(le("toy", "build", "--out", tmp_path / "b", "--preset", "nope"), "unknown preset")
    assert not (tmp_path / "b").exists()
