"""Vision tower + projector -> ONNX, with LLaVA's feature selection inside the graph.

The graph maps ``pixel_values`` (batch, 3, S, S) to ``image_embeds`` (batch,
image tokens, LM hidden): the hidden state of ``vision_feature_layer`` (-2 for
LLaVA), the CLS token dropped for the ``default`` strategy, then the projector.
Tower layers after the selected one are left out of the traced module, so the
graph neither carries nor computes them.
"""

from __future__ import annotations

import copy
from pathlib import Path

OPSET = 17


def _positive_layer(layer: int, n_layers: int) -> int:
    """hidden_states index -> the same index counted from the embeddings (0) upward."""
    return layer if layer >= 0 else n_layers + 1 + layer


def truncated_tower(tower, keep: int):
    """A copy of a CLIP vision tower with only its first ``keep`` encoder layers.

    A fresh module of the same class, so that nothing about the original (its
    output-capturing hooks in transformers 5 included) is changed.
    """
    cfg = copy.deepcopy(tower.config)
    cfg.num_hidden_layers = keep
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

    class VisionProjector(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.tower = truncated_tower(model.model.vision_tower, max(index))
            self.projector = model.model.multi_modal_projector

        def forward(self, pixel_values):
            if len(index) == 1:  # the selected layer is the truncated tower's last one
                h = self.tower(pixel_values).last_hidden_state
            else:
                hidden = self.tower(pixel_values, output_hidden_states=True).hidden_states
                h = torch.cat([hidden[i] for i in index], dim=-1)
            if strategy == "default":
                h = h[:, 1:]
            return self.projector(h)

    return VisionProjector().eval()


def export_vision_onnx(model, out_file: str | Path, image_size: int) -> None:
    """Write the fp32 graph of ``model`` (a ``LlavaForConditionalGeneration``) to ``out_file``."""
    import torch

    module = vision_module(model)
    dummy = torch.zeros(1, 3, image_size, image_size, dtype=torch.float32)
    with torch.no_grad():
        torch.onnx.export(
            module,
            (dummy,),
            str(out_file),
            input_names=["pixel_values"],
            output_names=["image_embeds"],
            dynamic_axes={"pixel_values": {0: "batch"}, "image_embeds": {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
        )
