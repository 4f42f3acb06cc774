"""The issue's acceptance gate for the toy recipe: ~6 minutes on 2 cores, so marked slow (make test-slow)."""

import json

import pytest


@pytest.mark.slow
def test_toy_build_answers_90_percent_within_10_minutes(tmp_path):
    from llava_edge.toy.build import build

    result = build(tmp_path / "toy", log=lambda _: None)
    assert result["seconds"] <= 600
    assert result["accuracy"] >= 0.90, json.dumps(result["per_category"])
