"""Accuracy drift of a bundle's variants against the Hugging Face model (``llava-edge drift``; docs/DRIFT.md).

- ``formats``: evaluation sets in LLaVA's formats (toy, ScienceQA, POPE) and LLaVA's scoring,
- ``reference``: the Hugging Face model's answers, logits and image features (torch),
- ``metrics``: KL, top-1, delta p, cosine (numpy),
- ``run``: every variant pair through the runtime, ``drift_bundle`` (the command),
- ``gates``: the limits and ``--fail-on``; ``diagnose``: which tensors a failing pair's quantization moved,
- ``report``: drift.json, drift.md, drift.png.
"""
