"""Shared fixtures: one toy checkpoint, dataset and bundle per test session, built here, never downloaded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory):
    """llava-edge's cache (saved prompt prefixes, converted checkpoints) in the session's folder, never ~/.cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("LLAVA_EDGE_CACHE", str(tmp_path_factory.mktemp("llava_edge_cache")))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory):
    from llava_edge.toy.data import write_dataset

    out = tmp_path_factory.mktemp("toy_data")
    write_dataset(out, seed=0, n_stage1=40, n_stage2=60, n_eval=20)
    return out


@pytest.fixture(scope="session")
def toy_model(tmp_path_factory):
    from llava_edge.toy.model import write_toy_model

    return write_toy_model(tmp_path_factory.mktemp("toy") / "model", seed=0)


@pytest.fixture(scope="session")
def bundle(toy_model, tmp_path_factory):
    from llava_edge.checkpoint import open_checkpoint
    from llava_edge.export.bundle import export_bundle

    out = tmp_path_factory.mktemp("bundle") / "b"
    export_bundle(open_checkpoint(toy_model), out, log=lambda _: None)
    return out


@pytest.fixture(scope="session")
def hf_model(toy_model):
    from llava_edge.checkpoint import load_hf_model, open_checkpoint

    return load_hf_model(open_checkpoint(toy_model))


@pytest.fixture(scope="session")
def runtime(bundle):
    """The CPU runtime in exact mode (f32 KV cache, no flash attention) for parity checks."""
    from llava_edge import EdgeLLaVA

    m = EdgeLLaVA.load(bundle, device="cpu", kv_cache="f32", threads=1)  # exact: no GPU offload; 1 thread on a busy CPU
    yield m
    m.close()


@pytest.fixture(scope="session")
def trained_toy(tmp_path_factory):
    """The toy recipe (`llava-edge toy build`) run once per session: a toy LLaVA that has learned.

    About 6-10 minutes on 2 cores; the toy-gate and accuracy-drift tests share it.
    ``LLAVA_EDGE_TRAINED_TOY=DIR`` keeps the build in DIR, so a second session reuses it
    (finished steps are not run again; the evaluation is).
    """
    from llava_edge.toy.build import build

    keep = os.environ.get("LLAVA_EDGE_TRAINED_TOY")
    out = Path(keep) if keep else tmp_path_factory.mktemp("trained") / "toy"
    result = build(out, seed=0, log=lambda _: None)
    return out, result


@pytest.fixture(scope="session")
def trained_bundle(trained_toy, tmp_path_factory):
    """(bundle, held-out images) of the trained toy, exported once (serve and data tests)."""
    from llava_edge.checkpoint import open_checkpoint
    from llava_edge.export.bundle import export_bundle

    root, _ = trained_toy
    b = tmp_path_factory.mktemp("trained_bundle") / "toy"
    export_bundle(open_checkpoint(root / "model"), b, log=lambda _: None)
    return b, sorted((root / "data" / "images").glob("eval_*.png"))[:6]
