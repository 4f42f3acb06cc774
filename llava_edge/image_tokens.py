"""Fewer image tokens: reducing the CLIP patch grid before the projector.

LLaVA-1.5 feeds the language model every patch of the feature layer (576 for
CLIP-L/336). On a CPU or a Jetson the prefill of those positions is most of the
time to the first token, and published work shows they are redundant (VisionZip,
arXiv 2412.04467, keeps most of LLaVA-1.5's scores with 64 of them). Two
methods, both applied to the feature layer's patch tokens (after the class token
is dropped, before the projector, as VisionZip does, so a projector-only
fine-tune can adapt to them):

- ``pool``: average pooling of the patch grid into an ``h x w`` grid (``h * w``
  = K, each dividing the grid side; the most nearly square such shape), tokens
  in row-major order.
- ``dominant``: dominant-plus-contextual selection. The K_d patches the class
  token attends to most at the feature layer (attention probabilities averaged
  over heads) are kept in their spatial order; the remaining patches are merged
  into K_c contextual tokens: K_c of them, evenly spaced in spatial order, are
  targets, every other remaining patch joins the target its features are most
  similar to (cosine), and each contextual token is the mean of its target and
  the patches that joined it. K_c is about a sixth of K (VisionZip's 54 + 10 for
  64 tokens on LLaVA-1.5).

One torch implementation serves every consumer: ``quantize --image-tokens``
exports :func:`reducer_module` to ONNX and splices it into the bundle's vision graph
(``quantize/image_tokens.py``), training's recovery fine-tune and the reference
use :func:`image_features`. torch is imported inside functions: the runtime
reads :class:`TokenReduction` from the manifest without it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UserError

METHODS = ("pool", "dominant")
CONTEXTUAL_SHARE = 10 / 64  # VisionZip's contextual tokens for LLaVA-1.5: 10 of 64, 20 of 128, 30 of 192


def pool_shape(tokens: int, grid: int) -> tuple[int, int] | None:
    """The most nearly square ``(h, w)`` with ``h * w == tokens`` and both dividing ``grid``; None if none."""
    best = None
    for h in range(1, grid + 1):
        if tokens % h or grid % h:
            continue
        w = tokens // h
        if w > grid or grid % w:
            continue
        if best is None or abs(h - w) < abs(best[0] - best[1]):
            best = (h, w)
    return best


@dataclass(frozen=True)
class TokenReduction:
    """How a vision variant reduces the ``grid x grid`` patches to ``tokens`` image tokens."""

    method: str
    tokens: int
    grid: int

    @property
    def full(self) -> int:
        return self.grid * self.grid

    @property
    def pool(self) -> tuple[int, int]:
        shape = pool_shape(self.tokens, self.grid)
        assert shape is not None, "checked by plan()"
        return shape

    @property
    def contextual(self) -> int:
        """K_c: merged contextual tokens (``dominant`` only)."""
        if self.method != "dominant":
            return 0
        return min(max(1, round(self.tokens * CONTEXTUAL_SHARE)), self.tokens - 1, self.full - self.tokens)

    @property
    def dominant(self) -> int:
        """K_d: the patches kept as they are (``dominant`` only)."""
        return self.tokens - self.contextual if self.method == "dominant" else 0

    @property
    def label(self) -> str:
        """What variant names carry: ``pool144``, ``dominant64``."""
        return f"{self.method}{self.tokens}"

    def to_dict(self) -> dict:
        d = {"method": self.method, "tokens": self.tokens, "grid": self.grid}
        if self.method == "pool":
            d["pool"] = list(self.pool)
        else:
            d["dominant"], d["contextual"] = self.dominant, self.contextual
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TokenReduction":
        try:
            return plan(str(d["method"]), int(d["tokens"]), int(d["grid"]))
        except (KeyError, TypeError, ValueError):
            raise UserError(f"a vision variant's token_reduction is not readable: {d!r}") from None


def plan(method: str, tokens: int, grid: int) -> TokenReduction:
    """Check that ``method`` can reduce a ``grid x grid`` patch grid to ``tokens`` tokens; one-line errors."""
    if method not in METHODS:
        raise UserError(f"unknown token reduction method {method!r}; valid: {', '.join(METHODS)}")
    full = grid * grid
    if not 1 <= tokens < full:
        raise UserError(f"--image-tokens {tokens}: the vision tower gives {full} patch tokens ({grid}x{grid}); "
                        f"a reduced variant has from 1 to {full - 1}")
    if method == "pool" and pool_shape(tokens, grid) is None:
        valid = [k for k in range(1, full) if pool_shape(k, grid)]
        raise UserError(f"--image-tokens {tokens} cannot pool a {grid}x{grid} grid (h x w with h and w dividing "
                        f"{grid}); pool takes: {', '.join(map(str, valid))}")
    if method == "dominant" and tokens < 2:
        raise UserError("dominant-plus-contextual selection needs at least 2 tokens (one of each)")
    return TokenReduction(method, tokens, grid)


def parse_tokens(text: str) -> list[int]:
    """``"144, 64"`` -> ``[144, 64]`` (order kept, repeats dropped)."""
    out: list[int] = []
    for raw in text.split(","):
        if not raw.strip():
            continue
        try:
            k = int(raw)
        except ValueError:
            raise UserError(f"--image-tokens takes whole numbers, comma-separated; not {raw.strip()!r}") from None
        if k not in out:
            out.append(k)
    if not out:
        raise UserError("--image-tokens names no token count")
    return out


def parse_methods(text: str) -> list[str]:
    out = [m.strip().lower() for m in text.split(",") if m.strip()]
    for m in out:
        if m not in METHODS:
            raise UserError(f"unknown --token-method {m!r}; valid: {', '.join(METHODS)}")
    return list(dict.fromkeys(out)) or list(METHODS[:1])


# -- torch ------------------------------------------------------------------------------------------------------------
def reduce_tokens(feats, cls_attention, r: TokenReduction):
    """``feats`` (B, N, C) patch tokens, ``cls_attention`` (B, N) -> (B, K, C): the reduction ``r``.

    Written with ops torch.onnx exports to standard ONNX (TopK, Gather, MatMul, AveragePool), static sizes
    from ``r`` and a dynamic batch.
    """
    import torch

    b, n, c = feats.shape
    if r.method == "pool":
        h, w = r.pool
        grid = feats.transpose(1, 2).reshape(b, c, r.grid, r.grid)
        pooled = torch.nn.functional.avg_pool2d(grid, kernel_size=(r.grid // h, r.grid // w))
        return pooled.flatten(2).transpose(1, 2)
    kd, kc = r.dominant, r.contextual
    # dominant: the top K_d by class-token attention, put back in spatial order
    top = torch.topk(cls_attention, kd, dim=1).indices
    top = torch.sort(top, dim=1).values
    dominant = torch.gather(feats, 1, top.unsqueeze(-1).expand(b, kd, c))
    # the rest, in spatial order: the N - K_d lowest, sorted by position
    rest = torch.sort(torch.topk(cls_attention, n - kd, dim=1, largest=False).indices, dim=1).values
    others = torch.gather(feats, 1, rest.unsqueeze(-1).expand(b, n - kd, c))
    m = n - kd
    step = max(1, m // kc)
    target_pos = list(range(0, m, step))[:kc]
    target_set = set(target_pos)
    source_pos = [i for i in range(m) if i not in target_set]
    targets = others[:, target_pos]
    sources = others[:, source_pos]
    # sums, not norm/mean: their ONNX ops took new forms in opset 18 and the vision graphs are opset 17
    unit = lambda x: x / (x * x).sum(dim=-1, keepdim=True).sqrt().clamp_min(1e-6)  # noqa: E731
    similarity = unit(sources) @ unit(targets).transpose(1, 2)  # (B, sources, K_c)
    assign = torch.nn.functional.one_hot(similarity.argmax(dim=-1), kc).to(feats.dtype)  # (B, sources, K_c)
    merged = (targets + assign.transpose(1, 2) @ sources) / (1 + assign.sum(dim=1)).unsqueeze(-1)
    return torch.cat([dominant, merged], dim=1)


def reducer_module(r: TokenReduction):
    """A ``torch.nn.Module``: (patch tokens, the feature layer's attention probabilities) -> K tokens.

    ``probs``: (B, heads, 1 + N, 1 + N), the softmax of the feature layer's self-attention, class token first.
    The ``pool`` method ignores it. Exported to ONNX by ``quantize/image_tokens.py``.
    """
    import torch

    class Reducer(torch.nn.Module):
        def forward(self, feats, probs):
            return reduce_tokens(feats, probs[:, :, 0, 1:].sum(dim=1) / probs.shape[1], r)  # the mean

    return Reducer().eval()


def feature_layer_index(config) -> int:
    """hidden_states index of the feature layer counted upward (0: the embeddings); one layer only."""
    layer = config.vision_feature_layer
    if isinstance(layer, (list, tuple)):
        if len(layer) != 1:
            raise UserError("token reduction needs one vision feature layer; this model concatenates "
                            f"{len(layer)} ({list(layer)})")
        layer = layer[0]
    n = config.vision_config.num_hidden_layers
    return int(layer) if layer >= 0 else n + 1 + int(layer)


def cls_attention(tower, hidden_states, index: int):
    """(B, N): the feature layer's attention from the class token to each patch, averaged over heads.

    The feature layer ``hidden_states[index]`` is the output of encoder layer ``index - 1``, whose
    attention reads ``hidden_states[index - 1]``: recomputed here from its query/key projections, so that
    any attention implementation (sdpa in training) gives the probabilities the ONNX graph's softmax does.
    """
    import torch

    layer = getattr(tower, "vision_model", tower).encoder.layers[index - 1]  # transformers 5 flattened it
    attn = layer.self_attn
    x = layer.layer_norm1(hidden_states[index - 1])
    b, t, _ = x.shape
    heads = attn.num_heads
    q = attn.q_proj(x[:, :1]).reshape(b, 1, heads, -1).transpose(1, 2)
    k = attn.k_proj(x).reshape(b, t, heads, -1).transpose(1, 2)
    probs = torch.softmax((q @ k.transpose(-1, -2)) * attn.scale, dim=-1)  # (B, heads, 1, T)
    return probs[:, :, 0, 1:].mean(dim=1)


def reduced_patch_features(model, pixel_values, r: TokenReduction | None):
    """(B, K, vision width): the feature layer's patch tokens for ``pixel_values`` with ``r`` applied, what the
    projector reads (``r`` None: every patch, LLaVA's own). ``model``: a ``LlavaForConditionalGeneration``."""
    cfg = model.config
    if cfg.vision_feature_select_strategy != "default":
        raise UserError("token reduction needs LLaVA's 'default' feature selection (class token dropped); this "
                        f"model uses {cfg.vision_feature_select_strategy!r}")
    index = feature_layer_index(cfg)
    tower = model.model.vision_tower
    hidden = tower(pixel_values.to(next(tower.parameters()).dtype), output_hidden_states=True).hidden_states
    feats = hidden[index][:, 1:]
    if r is not None:
        attention = cls_attention(tower, hidden, index) if r.method == "dominant" else None
        feats = reduce_tokens(feats, attention, r)
    return feats


def image_features(model, pixel_values, r: TokenReduction | None):
    """(B, K, LM width): what the language model reads for ``pixel_values``, with ``r`` applied before the
    projector (``r`` None: LLaVA's own features, all patches). ``model``: a ``LlavaForConditionalGeneration``."""
    return model.model.multi_modal_projector(reduced_patch_features(model, pixel_values, r))


def install(model, r: TokenReduction) -> None:
    """Make ``model`` (a ``LlavaForConditionalGeneration``) feed its language model ``r``'s reduced image tokens.

    transformers' ``LlavaModel.forward`` asks ``get_image_features`` for what replaces the image token positions;
    this instance's one returns :func:`image_features` with ``r`` (the input ids then hold ``r.tokens`` image
    positions per image). Used by training's recovery fine-tune.
    """
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    outer = model

    def get_image_features(pixel_values, *args, **kwargs):
        return BaseModelOutputWithPooling(pooler_output=list(image_features(outer, pixel_values, r)))

    outer.model.get_image_features = get_image_features


def read_projector(path, r: TokenReduction) -> tuple[dict, str]:
    """(weights by name within the projector, as float32 numpy arrays; sha256 of the file) of a projector fine-tuned
    for ``r`` (``train stage2 --image-tokens K --tune projector``: ``path`` is its output folder or the
    ``mm_projector.safetensors`` in it), checked to be tuned for ``r``."""
    import json
    from pathlib import Path

    import numpy as np
    from safetensors.numpy import load_file

    from .manifest import sha256_file

    path = Path(path)
    if path.is_dir():
        path = path / "mm_projector.safetensors"
    if not path.is_file():
        raise UserError(f"projector file not found: {path}")
    meta = path.with_name("mm_projector.json")
    tuned = json.loads(meta.read_text()).get("token_reduction") if meta.is_file() else None
    if tuned is None:
        raise UserError(f"{path} was not tuned for reduced image tokens (its mm_projector.json records none); "
                        "make one with: llava-edge train stage2 --image-tokens K --tune projector")
    want = {k: v for k, v in r.to_dict().items() if k in ("method", "tokens")}
    got = {k: tuned.get(k) for k in want}
    if got != want:
        raise UserError(f"{path} was tuned for {got['method']} {got['tokens']} tokens, not {r.method} {r.tokens}")
    try:
        raw = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise UserError(f"{path} is not a readable safetensors file ({str(e).splitlines()[0]})") from None
    weights = {k.split("multi_modal_projector.", 1)[1]: v.astype(np.float32) for k, v in raw.items()
               if "multi_modal_projector." in k}
    return weights, sha256_file(path)
