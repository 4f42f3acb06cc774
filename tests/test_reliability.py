"""What llava-edge promises a careless user and an attacker (docs/RELIABILITY.md), case by case.

Every bad input ends in one error line and exit 2 (never a traceback, never exit 0); no file outside a bundle
is touched; a damaged file is refused before it answers; two writers of one bundle lose nothing.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from cli_run import assert_one_line_error, le

from llava_edge import manifest
from llava_edge.errors import UserError


@pytest.fixture()
def b(bundle, tmp_path) -> Path:
    """A copy of the session's toy bundle this test may damage."""
    return Path(shutil.copytree(bundle, tmp_path / "b"))


@pytest.fixture(scope="module")
def image(toy_data) -> Path:
    return sorted((toy_data / "images").glob("eval_*.png"))[0]


def _edit_manifest(b: Path, edit) -> None:
    """``edit`` changes the manifest's dict in place, or returns ("replace", new JSON value)."""
    d = json.loads((b / manifest.MANIFEST).read_text())
    r = edit(d)
    if isinstance(r, tuple) and r and r[0] == "replace":
        d = r[1]
    (b / manifest.MANIFEST).write_text(json.dumps(d))


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(width: int, height: int, pixels: bool = True) -> bytes:
    """A grey PNG declaring ``width`` x ``height``: valid and a few hundred bytes, or (``pixels=False``) a header
    whose pixels are never there (what a reader must refuse before decoding)."""
    raw = b"".join(b"\x00" + b"\x80" * width for _ in range(height)) if pixels else b"\x00"
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + _chunk(b"IDAT", zlib.compress(raw, 9)) + _chunk(b"IEND", b""))


# -- confinement ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["../../notes.txt", "ABSOLUTE"])
def test_a_manifest_naming_files_outside_the_bundle_is_refused_and_nothing_is_deleted(b, toy_model, image, name,
                                                                                     tmp_path):
    outside = tmp_path / "notes.txt"
    outside.write_text("the user's notes")
    name = str(outside) if name == "ABSOLUTE" else name
    _edit_manifest(b, lambda d: d["variants"][1].update(file=name))
    assert_one_line_error(le("chat", "--bundle", b, "--image", image, "Hi", block_torch=True), "outside the bundle")
    r = le("export", "--model", toy_model, "--out", b, "--target", "gguf")  # re-export: the old state is read first
    assert_one_line_error(r, "outside the bundle", progress=True)
    assert outside.read_text() == "the user's notes"


def test_a_symlink_out_of_the_bundle_is_never_loaded_or_deleted(b, toy_model, image, tmp_path):
    secret = tmp_path / "secret.gguf"
    shutil.copy(b / "llm.f32.gguf", secret)
    (b / "llm.f32.gguf").unlink()
    (b / "llm.f32.gguf").symlink_to(secret)
    assert_one_line_error(le("chat", "--bundle", b, "--image", image, "Hi", block_torch=True),
                          "leads outside the bundle")
    other = tmp_path / "other"  # another source: the export starts clean, deleting only what llava-edge made
    shutil.copytree(toy_model, other)
    (other / "generation_config.json").write_text("{}")
    cfg = json.loads((other / "config.json").read_text())
    cfg["text_config"]["rms_norm_eps"] = 2e-6  # another fingerprint
    (other / "config.json").write_text(json.dumps(cfg))
    (b / "notes.txt").write_text("mine")
    r = le("export", "--model", other, "--out", b, "--target", "gguf")
    assert r.returncode == 0, r.stderr
    assert secret.is_file() and (b / "notes.txt").read_text() == "mine"


def test_own_files_are_the_only_deletable_ones(tmp_path):
    (tmp_path / "llm.f32.gguf").write_text("x")
    assert manifest.own_file(tmp_path, "llm.f32.gguf") == tmp_path / "llm.f32.gguf"
    for name in ("notes.txt", "../llm.f32.gguf", "/etc/passwd", "sub/llm.f32.gguf", "manifest.json", ""):
        assert manifest.own_file(tmp_path, name) is None, name


# -- integrity ----------------------------------------------------------------------------------------------------
def test_a_damaged_file_is_refused_before_it_answers_and_a_verified_one_is_not_hashed_again(b, image, monkeypatch,
                                                                                            tmp_path):
    from llava_edge import EdgeLLaVA, integrity

    monkeypatch.setenv("LLAVA_EDGE_CACHE", str(tmp_path / "cache"))
    m = EdgeLLaVA.load(b, device="cpu", prefix_cache=False)  # verifies and remembers
    m.close()
    hashed = []
    monkeypatch.setattr(integrity, "sha256_file", lambda p: hashed.append(p) or manifest.sha256_file(p))
    EdgeLLaVA.load(b, device="cpu", prefix_cache=False).close()
    assert hashed == []  # the second load of unchanged files reads no byte of them
    gguf = b / "llm.f32.gguf"
    size = gguf.stat().st_size
    with open(gguf, "r+b") as f:  # 1 MB zeroed, same size: what a bad copy does
        f.seek(size // 2)
        f.write(b"\0" * min(1 << 20, size // 4))
    assert gguf.stat().st_size == size
    r = le("chat", "--bundle", b, "--image", image, "Hi", block_torch=True,
           env={**os.environ, "LLAVA_EDGE_CACHE": str(tmp_path / "cache")})
    assert_one_line_error(r, "llm.f32.gguf", "does not match its sha256")
    assert le("chat", "--bundle", b, "--image", image, "Hi", "--max-tokens", "2", "--no-verify",
              block_torch=True).returncode == 0  # documented way around it
    r = le("info", b, "--verify")
    assert r.returncode == 1 and "llm.f32.gguf: damaged or replaced" in r.stderr and "Traceback" not in r.stderr


def test_info_verify_passes_on_a_good_bundle(bundle):
    r = le("info", bundle, "--verify")
    assert r.returncode == 0, r.stderr
    assert "matches its sha256" in r.stderr


# -- one writer at a time -------------------------------------------------------------------------------------------
def _quantize(b, *args, stdout=subprocess.PIPE) -> subprocess.Popen:
    code = "import sys; from llava_edge.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.Popen([sys.executable, "-c", code, "quantize", str(b), *args], stdout=stdout,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("trial", range(3))
def test_two_quantizes_at_once_lose_no_registration(b, trial):
    p1 = _quantize(b, "--vision", "int8,fp16")
    p2 = _quantize(b, "--llm", "q8_0,q4_0,q5_0")
    for p in (p1, p2):
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    m = manifest.read(b)
    names = {(v.kind, v.name) for v in m.variants}
    assert {("vision", "int8"), ("vision", "fp16"), ("llm", "q8_0"), ("llm", "q4_0"), ("llm", "q5_0")} <= names
    for v in m.variants:
        assert manifest.sha256_file(b / v.file) == v.sha256, v.file
    assert not [p.name for p in b.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_a_second_writer_waits_or_with_no_wait_stops(b):
    from llava_edge import bundle_lock

    with bundle_lock.writing(b):
        assert_one_line_error(le("quantize", b, "--llm", "q8_0", "--no-wait"), "is writing", "--no-wait",
                              progress=True)
        p = _quantize(b, "--llm", "q8_0", stdout=subprocess.DEVNULL)
        err, waiting = [], threading.Event()

        def read_stderr():
            for line in p.stderr:
                err.append(line)
                if "waiting for another llava-edge" in line:
                    waiting.set()

        reader = threading.Thread(target=read_stderr, daemon=True)
        reader.start()
        # the lock is held until the second writer says it waits, however long its start-up takes on this
        # machine (released earlier, it would find the bundle free); the deadline only stops a hang
        deadline = time.monotonic() + 600
        while not waiting.wait(0.1):
            assert p.poll() is None, "".join(err)  # it ended instead of waiting
            assert time.monotonic() < deadline, "no 'waiting' message: " + "".join(err)
        assert p.poll() is None  # still waiting for the lock
    p.wait(timeout=600)
    reader.join(timeout=60)
    err = "".join(err)
    assert p.returncode == 0 and "waiting for another llava-edge" in err, err
    assert ("llm", "q8_0") in {(v.kind, v.name) for v in manifest.read(b).variants}


def test_quantize_during_an_export_of_the_same_bundle(b, toy_model):
    code = "import sys; from llava_edge.cli import main; sys.exit(main(sys.argv[1:]))"
    export = subprocess.Popen([sys.executable, "-c", code, "export", "--model", str(toy_model), "--out", str(b),
                               "--target", "gguf", "--llm-outtype", "f16"], stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    quant = _quantize(b, "--llm", "q8_0")
    for p in (export, quant):
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    names = {(v.kind, v.name) for v in manifest.read(b).variants}
    assert {("llm", "f32"), ("llm", "f16"), ("llm", "q8_0")} <= names


def test_chats_writing_the_prefix_cache_at_once(bundle, image, tmp_path):
    env = {**os.environ, "LLAVA_EDGE_CACHE": str(tmp_path / "cache")}
    code = "import sys; from llava_edge.cli import main; sys.exit(main(sys.argv[1:]))"
    ask = [sys.executable, "-c", code, "chat", "--bundle", str(bundle), "--image", str(image), "What is it?",
           "--max-tokens", "6"]
    procs = [subprocess.Popen(ask, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e for _, e in outs]
    later = subprocess.run(ask, capture_output=True, text=True, env=env, timeout=300)  # loads what they saved
    assert later.returncode == 0 and {o for o, _ in outs} == {later.stdout}
    assert not [p for p in (tmp_path / "cache" / "prefix-kv").iterdir() if p.suffix != ".kv"]


# -- bounded inputs ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(1, 60000), (60000, 1), (1, 20000), (12000, 9000)])
def test_a_tiny_file_declaring_a_huge_image_is_refused_from_its_header(b, image, tmp_path, size):
    from llava_edge.preprocess import ImageSpec, preprocess

    f = tmp_path / "strip.png"
    if size[0] * size[1] <= 60000:
        f.write_bytes(_png(*size))
        assert f.stat().st_size < 1000
    else:
        f.write_bytes(_png(*size, pixels=False))
    spec = ImageSpec.from_dict(manifest.read(b).image)
    with pytest.raises(UserError, match="limit|aspect ratio|too large"):
        preprocess(f, spec)
    assert_one_line_error(le("chat", "--bundle", b, "--image", f, "Hi", block_torch=True), "strip.png")


@pytest.mark.parametrize("args,words", [
    (["--threads", "100000"], ["--threads 100000", "out of range"]),
    (["--threads", "-3"], ["out of range"]),
    (["--temperature", "nan"], ["temperature"]),
    (["--temperature", "inf"], ["temperature"]),
    (["--top-p", "0"], ["top_p"]),
    (["--max-tokens", "0"], ["max_tokens"]),
    (["--seed", "-2"], ["seed"]),
    (["--ctx", "-5"], ["context"]),
])
def test_numeric_options_out_of_range(bundle, image, args, words):
    assert_one_line_error(le("chat", "--bundle", bundle, "--image", image, "Hi", *args, block_torch=True), *words)


def test_seed_minus_one_means_random(bundle, image):
    r = le("chat", "--bundle", bundle, "--image", image, "Hi", "--seed", "-1", "--temperature", "0.8",
           "--max-tokens", "3", block_torch=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("value", ["nan", "inf", "1e400", "-1", "lots"])
def test_a_bad_prefix_cache_size_is_one_line(bundle, image, value):
    r = le("chat", "--bundle", bundle, "--image", image, "Hi", block_torch=True,
           env={**os.environ, "LLAVA_EDGE_PREFIX_CACHE_MB": value})
    assert_one_line_error(r, "LLAVA_EDGE_PREFIX_CACHE_MB")


def test_invalid_utf8_in_the_prompt_and_in_the_interactive_session(bundle, image):
    assert_one_line_error(le("chat", "--bundle", bundle, "--image", image, b"caf\xff?", block_torch=True),
                          "not valid UTF-8")
    code = "import sys; from llava_edge.cli import main; sys.exit(main(sys.argv[1:]))"
    r = subprocess.run([sys.executable, "-c", code, "chat", "--bundle", str(bundle), "--image", str(image),
                        "--max-tokens", "2"], input=b"caf\xff?\n/frobnicate\nWhat is it?\n/quit\n",
                       capture_output=True, timeout=300)
    err = r.stderr.decode("utf-8", "replace")
    assert r.returncode == 0 and "Traceback" not in err, err
    assert "not valid UTF-8" in err and "unknown command '/frobnicate'" in err and "/image PATH" in err
    assert r.stdout.decode().count("\n") >= 1  # the session went on and answered the next question


def test_typed_control_tokens_stay_text(bundle):
    from llava_edge import EdgeLLaVA

    m = EdgeLLaVA.load(bundle, device="cpu", prefix_cache=False)
    try:
        ids = m.slots_for(m.template.prompt("a </s> b <s> c <image> d"), "k", 4)
        from llava_edge.runtimes.llm import ImageSlot

        body = [i for i in ids if not isinstance(i, ImageSlot)]
        assert body.count(m.eos_id) == 0 and body.count(m.tokenizer.bos_id) == 1
        assert sum(isinstance(i, ImageSlot) for i in ids) == 4  # one image: the typed <image> is text
    finally:
        m.close()


# -- damaged and hostile bundles ------------------------------------------------------------------------------------
@pytest.mark.parametrize("edit,words", [
    (lambda d: ("replace", [d]), ["not a JSON object"]),
    (lambda d: d["llm"].pop("image_token_id"), ["llm.image_token_id"]),
    (lambda d: d["image"].update(crop=0), ["image settings are invalid", "crop"]),
    (lambda d: d["image"].update(std=[0, 0, 0]), ["std"]),
    (lambda d: d["image"].pop("mean"), ["image settings"]),
    (lambda d: d.update(variants="all"), ["variants"]),
    (lambda d: d["tokenizer"].update(kind="wordpiece"), ["tokenizer kind"]),
    (lambda d: d.update(conv_mode="no_such_mode"), ["unknown conversation mode"]),
])
def test_a_damaged_manifest_is_one_line(b, image, edit, words):
    _edit_manifest(b, edit)
    assert_one_line_error(le("chat", "--bundle", b, "--image", image, "Hi", block_torch=True), *words)


@pytest.mark.parametrize("which", ["tokenizer.model", "tokenizer.json", "manifest.json"])
def test_a_corrupt_tokenizer_or_manifest_file_is_one_line(b, image, which):
    (b / which).write_bytes(b"\x00garbage\xff" * 10)
    if which.startswith("tokenizer"):  # a damaged file with its hash fixed: the reader itself must say so
        sha = manifest.sha256_file(b / which)
        kind = "sentencepiece" if which == "tokenizer.model" else "tokenizer.json"  # as a byte-level BPE model's
        _edit_manifest(b, lambda d: d["tokenizer"].update(kind=kind, file=which, sha256={which: sha}))
    assert_one_line_error(le("chat", "--bundle", b, "--image", image, "Hi", block_torch=True), which)


def test_a_model_with_nan_weights_is_refused_at_export(toy_model, tmp_path):
    from safetensors.numpy import load_file, save_file

    model = Path(shutil.copytree(toy_model, tmp_path / "m"))
    t = load_file(str(model / "model.safetensors"))
    key = next(k for k in t if k.endswith("layers.1.mlp.down_proj.weight"))
    t[key] = t[key].copy()
    t[key][0, 0] = np.nan
    save_file(t, str(model / "model.safetensors"), metadata={"format": "pt"})
    r = le("export", "--model", model, "--out", tmp_path / "b", "--target", "gguf")
    assert_one_line_error(r, "NaN or infinite", "blk.1.ffn_down.weight", progress=True)
    assert not list((tmp_path / "b").glob("*.gguf"))


def test_non_finite_logits_are_said(b, image):
    import gguf

    r = gguf.GGUFReader(str(b / "llm.f32.gguf"))
    t = next(t for t in r.tensors if t.name == "output_norm.weight")
    with open(b / "llm.f32.gguf", "r+b") as f:
        f.seek(t.data_offset)
        f.write(np.full(t.n_elements, np.nan, np.float32).tobytes())
    sha = manifest.sha256_file(b / "llm.f32.gguf")
    _edit_manifest(b, lambda d: [v.update(sha256=sha) for v in d["variants"] if v["file"] == "llm.f32.gguf"])
    assert_one_line_error(le("chat", "--bundle", b, "--image", image, "Hi", block_torch=True), "non-finite logits")


# -- messages that name the cause ---------------------------------------------------------------------------------
@pytest.mark.parametrize("what,words", [
    ("dir", ["is a directory"]), ("url", ["remote images are not supported", "https://example.com/cat.png"]),
    ("missing", ["image not found", "nope.png"]),
])
def test_image_arguments_that_are_not_image_files(bundle, tmp_path, what, words):
    arg = {"dir": tmp_path, "url": "https://example.com/cat.png", "missing": tmp_path / "nope.png"}[what]
    assert_one_line_error(le("chat", "--bundle", bundle, "--image", arg, "Hi", block_torch=True), *words)


def test_read_only_filesystem_is_named(b, toy_model, monkeypatch, capsys, tmp_path):
    import errno

    from llava_edge import atomic
    from llava_edge.cli import main

    def refuse(*a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(tmp_path / "b"))

    monkeypatch.setattr(atomic, "write_json", refuse)
    assert main(["quantize", str(b), "--llm", "q8_0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "read-only file system" in err[-1] and "disk full" not in err[-1]


# -- seeded fuzz, fixed budgets (LLAVA_EDGE_FUZZ_SECONDS multiplies them for a longer run by hand) ----------------
# A budget is a number of cases, not of seconds: a seed then gives the same cases, and the same outcome, on a
# fast machine and on a busy one (a time budget tried a fifth as many on a loaded 2-vCPU machine, so what was
# checked, and whether enough was, depended on the machine). Each is about 3 s at the idle rates that
# docs/RELIABILITY.md records.
FUZZ_SCALE = float(os.environ.get("LLAVA_EDGE_FUZZ_SECONDS", "1"))
FUZZ_IMAGES = round(5000 * FUZZ_SCALE)
FUZZ_MANIFESTS = round(300 * FUZZ_SCALE)  # each one loads the bundle


def test_fuzzed_image_bytes_give_an_image_or_one_line(b, image, tmp_path):
    from PIL import Image

    from llava_edge.preprocess import ImageSpec, preprocess

    spec = ImageSpec.from_dict(manifest.read(b).image)
    Image.open(image).convert("RGB").save(tmp_path / "seed.jpg", quality=90)
    seeds = [image.read_bytes(), (tmp_path / "seed.jpg").read_bytes()]
    rng = random.Random(int(os.environ.get("LLAVA_EDGE_FUZZ_SEED", "1234")))
    f = tmp_path / "fuzz.img"
    tried = ok = 0
    for _ in range(FUZZ_IMAGES):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        if rng.random() < 0.2:
            data = data[: rng.randrange(len(data))]
        f.write_bytes(bytes(data))
        tried += 1
        try:
            x = preprocess(f, spec)
        except UserError:
            continue
        assert x.shape == (3, spec.crop, spec.crop) and np.isfinite(x).all()
        ok += 1
    print(f"fuzzed image files: {tried} tried, {ok} decoded, {tried - ok} refused in one line")
    assert 0 < ok < tried


def test_fuzzed_manifest_fields_load_or_fail_in_one_line(b):
    from llava_edge import EdgeLLaVA

    original = json.loads((b / manifest.MANIFEST).read_text())
    values = [None, -1, 0, 2**70, "", "x", [], {}, [1, 2], math.pi, True, "../x", "/etc/passwd"]
    rng = random.Random(int(os.environ.get("LLAVA_EDGE_FUZZ_SEED", "4321")))
    tried = loaded = 0
    for _ in range(FUZZ_MANIFESTS):
        d = json.loads(json.dumps(original))
        section = rng.choice(["image", "vision", "llm", "tokenizer", "variants", "conv_mode", "source"])
        target = d[section]
        if isinstance(target, list):
            target = rng.choice(target)
        if isinstance(target, dict) and target:
            key = rng.choice(list(target))
            if rng.random() < 0.3:
                del target[key]
            else:
                target[key] = rng.choice(values)
        else:
            d[section] = rng.choice(values)
        (b / manifest.MANIFEST).write_text(json.dumps(d))
        tried += 1
        try:
            EdgeLLaVA.load(b, device="cpu", prefix_cache=False, verify=False).close()
            loaded += 1
        except UserError as e:
            assert "\n" not in str(e)
    print(f"fuzzed manifests: {tried} tried, {loaded} loaded, {tried - loaded} refused in one line")
    assert 0 < loaded < tried


@pytest.fixture()
def read_only_copy(bundle, tmp_path):
    """The toy bundle on a real read-only file system (a tmpfs mounted read-only; needs root)."""
    mnt = tmp_path / "ro"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root): the read-only case is covered by the simulated test above")
    try:
        shutil.copytree(bundle, mnt / "b")
        assert subprocess.run(["mount", "-o", "remount,ro", str(mnt)], capture_output=True).returncode == 0
        yield mnt / "b"
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_a_bundle_on_a_read_only_file_system(read_only_copy, toy_model, image):
    b = read_only_copy
    assert_one_line_error(le("quantize", b, "--llm", "q8_0"), "read-only file system", str(b))
    assert_one_line_error(le("export", "--model", toy_model, "--out", b, "--target", "gguf", "--llm-outtype", "f16"),
                          "read-only file system", progress=True)
    assert_one_line_error(le("export", "--model", toy_model, "--out", b / "new", "--target", "gguf"),
                          "read-only file system", progress=True)
    r = le("chat", "--bundle", b, "--image", image, "Hi", "--max-tokens", "2", block_torch=True)
    assert r.returncode == 0, r.stderr  # reading needs no write (the verification record lives in the cache)


def test_system_errors_are_said_by_their_cause():
    import errno

    import numpy as np

    from llava_edge.errors import describe_os_error

    assert describe_os_error(OSError(errno.ENOSPC, "No space left on device", "/b/x")) == \
        "no space left on device: /b/x"
    assert describe_os_error(OSError(errno.ENAMETOOLONG, "File name too long")) == "file name too long"
    # numpy's tofile, as gguf-py writes tensors, on a short write: no errno, the byte counts in the message
    with open("/dev/full", "wb") as f:
        with pytest.raises(OSError) as e:
            np.zeros(1 << 20, np.float32).tofile(f)
    assert describe_os_error(e.value) == "short write (1048576 requested and 0 written): is the disk full?"
    assert describe_os_error(OSError("something else")) == "something else"
