"""Vision tower + projector -> ONNX, with LLaVA's feature selection inside the graph.

The graph maps ``pixel_values`` (batch, 3, S, S) to ``image_embeds`` (batch,
image tokens, LM hidden): the hidden state of ``vision_feature_layer`` (-2 for
LLaVA), the CLS token dropped for the ``default`` strategy, then the projector.
Tower layers after the selected one are left out of the traced module, so the
graph neither carries nor computes them.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import tempfile
import warnings
from pathlib import Path

from llava_edge import atomic, towers
from llava_edge.quality import token_cosine

OPSET = 17
MAX_BATCH = 64
EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's limit is 2 GiB for the whole file


def _positive_layer(layer: int, n_layers: int) -> int:
    """hidden_states index -> the same index counted from the embeddings (0) upward."""
    return layer if layer >= 0 else n_layers + 1 + layer


def truncated_tower(tower, keep: int):
    """A copy of a vision tower with only its first ``keep`` encoder layers (and no pooling head, which LLaVA
    never reads: SigLIP's ``vision_use_head``).

    A fresh module of the same class, so that nothing about the original (its
    output-capturing hooks in transformers 5 included) is changed.
    """
    cfg = copy.deepcopy(tower.config)
    cfg.num_hidden_layers = keep
    if getattr(cfg, "vision_use_head", False):
        cfg.vision_use_head = False
    short = type(tower)(cfg).eval()
    missing, _ = short.load_state_dict(tower.state_dict(), strict=False)
    if missing:
        raise RuntimeError(f"truncated vision tower lacks weights: {missing[:3]}")
    return short.to(next(tower.parameters()).dtype)


def vision_module(model):
    """A ``torch.nn.Module``: pixel_values -> projected image tokens, as LLaVA computes them."""
    import torch

    cfg = model.config
    layers = cfg.vision_feature_layer
    layers = list(layers) if isinstance(layers, (list, tuple)) else [layers]
    strategy = cfg.vision_feature_select_strategy
    n = cfg.vision_config.num_hidden_layers
    index = [_positive_layer(int(i), n) for i in layers]
    # SigLIP's last_hidden_state is the last layer's output through post_layernorm; LLaVA reads the layer's own
    layer_output_is_last = not towers.for_config(cfg.vision_config.to_dict()).normed_last_hidden

    class VisionProjector(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.tower = truncated_tower(model.model.vision_tower, max(index))
            self.projector = model.model.multi_modal_projector

        def forward(self, pixel_values):
            if len(index) == 1 and layer_output_is_last:  # the selected layer is the truncated tower's last one
                h = self.tower(pixel_values).last_hidden_state
            elif len(index) == 1:
                h = self.tower(pixel_values, output_hidden_states=True).hidden_states[-1]
            else:
                hidden = self.tower(pixel_values, output_hidden_states=True).hidden_states
                h = torch.cat([hidden[i] for i in index], dim=-1)
            if strategy == "default":
                h = h[:, 1:]
            return self.projector(h)

    return VisionProjector().eval()


def export_vision_onnx(model, out_file: str | Path, image_size: int) -> None:
    """Write the fp32 graph of ``model`` (a ``LlavaForConditionalGeneration``) to ``out_file``.

    Weights are stored inside the file while it stays under protobuf's 2 GB limit,
    otherwise beside it as ``<name>.data``. Both are written under temporary names
    in the destination folder and renamed, data first, when complete.
    """
    import torch

    out_file = Path(out_file)
    module = vision_module(model)
    # batch 2, not 1: the exporter specializes a dimension traced at size 1
    dummy = torch.zeros(2, 3, image_size, image_size, dtype=torch.float32)
    n_bytes = sum(p.numel() * 4 for p in module.parameters())
    with torch.no_grad(), _quiet_exporter():
        program = torch.onnx.export(
            module,
            (dummy,),
            None,
            input_names=["pixel_values"],
            output_names=["image_embeds"],
            dynamic_shapes={"pixel_values": {0: torch.export.Dim("batch", min=1, max=MAX_BATCH)}},
            opset_version=OPSET,
            dynamo=True,
            optimize=True,
            verbose=False,
        )
    external = n_bytes > EXTERNAL_DATA_BYTES
    with tempfile.TemporaryDirectory(dir=out_file.parent, prefix=f".{out_file.name}.", suffix=atomic.TMP_SUFFIX) as tmp:
        staged = Path(tmp) / out_file.name
        program.save(str(staged), external_data=external)
        data = staged.with_name(staged.name + ".data")
        if data.exists():
            os.replace(data, out_file.with_name(data.name))
        os.replace(staged, out_file)


@contextlib.contextmanager
def _quiet_exporter():
    """torch.onnx and onnxscript log every step at WARNING and print to stdout; keep the CLI readable."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def parity_vs_hf(model, onnx_file: str | Path, pixel_values, family=None) -> dict:
    """Compare the graph in onnxruntime (CPU) with Hugging Face's features for the same tiles
    (``family.hf_tile_features``: its ``get_image_features``, before any packing).

    ``pixel_values``: (N, 3, S, S) float32 numpy. Returns ``min_cosine`` (over
    every image token of every image), ``max_abs`` (largest element-wise error)
    and ``max_ref`` (largest reference magnitude, to read ``max_abs`` against).
    The graph may be the fp32 or the fp16 variant: both take and return float32. ``family``: the model's
    (by default the one whose Hugging Face class ``model`` is).
    """
    import numpy as np
    import onnxruntime as ort
    import torch

    from llava_edge import families

    family = family or families.for_model(model)
    px = np.ascontiguousarray(pixel_values, dtype=np.float32)
    with torch.no_grad():
        ref = family.hf_tile_features(model, torch.from_numpy(px)).float().numpy()
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: px})[0].astype(np.float32)
    if got.shape != ref.shape:
        raise RuntimeError(f"ONNX output shape {got.shape} differs from Hugging Face's {ref.shape}")
    cos = token_cosine(got, ref)
    return {"min_cosine": float(cos.min()), "max_abs": float(np.abs(got - ref).max()),
            "max_ref": float(np.abs(ref).max())}
