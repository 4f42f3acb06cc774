"""The training issue's acceptance gate: the toy recipe's model answers at least 90% of the held-out questions.

The build trains for about 6.5 minutes on 2 quiet cores, once per session (the ``trained_toy``
fixture), and the accuracy-drift gates of tests/test_drift.py use the same build.

The build (the session's ``trained_toy``) also records how long it took in ``eval.json``;
the 10-minute budget on 2 cores is measured and documented (docs/TRAINING.md), not
asserted here: a wall-clock limit in a unit test fails on a busy machine, not on a slow recipe.
"""

import json


def test_toy_build_answers_90_percent_of_held_out_questions(trained_toy):
    out, result = trained_toy
    assert result["n"] == 200
    assert result["accuracy"] >= 0.90, json.dumps(result["per_category"])
    assert json.loads((out / "eval.json").read_text())["accuracy"] == result["accuracy"]
    for stage in ("stage1", "stage2"):
        assert (out / stage / "loss.csv").is_file() and (out / stage / "loss.png").is_file()
