"""The vision towers LLaVA checkpoints use, each described once: CLIP (LLaVA-1.5, LLaVA-NeXT) and SigLIP
(LLaVA-Interleave, LLaVA-OneVision).

What differs between them, and what asks:

- a class token (CLIP: one before the patches; SigLIP: none): how many tokens a tile gives
  (``vision_feature_select_strategy``: ``default`` drops the first token, ``full`` keeps all, as
  transformers' LLaVA models do whatever the tower);
- whether ``last_hidden_state`` is a layer's output (CLIP) or that output through the tower's
  ``post_layernorm`` (SigLIP): LLaVA reads ``hidden_states[vision_feature_layer]``, so the export takes
  the hidden state for SigLIP;
- the image processor its checkpoints ship (CLIP: shortest edge and centre crop, CLIP's mean/std; SigLIP:
  resized to the tile as it is, mean/std 0.5) and the config class of a new tower (the toy).

For llama.cpp's mmproj (``export/mmproj_gguf.py``): a pre-layernorm (CLIP's ``pre_layrnorm``; SigLIP has
none), the weights LLaVA never reads (both towers' ``post_layernorm``, SigLIP's attention-pooling ``head``),
and whether llama.cpp's tiled path takes the tower (CLIP: its LLaVA-1.6 approximation; SigLIP tiles are
LLaVA-OneVision's packing, which llama.cpp lacks).

The runtime reads none of this: the manifest's image settings and the graph carry it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UserError


@dataclass(frozen=True)
class Tower:
    name: str
    model_types: tuple[str, ...]  # config.json's vision_config.model_type values
    config_class: str  # transformers' config class of the tower
    class_token: bool  # one token before the patches
    normed_last_hidden: bool  # last_hidden_state has been through post_layernorm (not a layer's output)
    act: str  # the activation of a new tower (the toy)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    pre_layernorm: bool = True  # a layer norm between the embeddings and the first encoder layer
    # module prefixes (under ``vision_model.``) that LLaVA never reads: it takes ``hidden_states[k]``, which no
    # final norm or pooling head has touched
    unused_modules: tuple[str, ...] = ("post_layernorm.",)
    # why llama.cpp cannot run this tower in a tiled (anyres) checkpoint; None: it can (approximately, see
    # docs/MMPROJ.md)
    llama_cpp_no_tiles: str | None = None
    # the PIL image processor its llava-hf checkpoints ship (transformers' default classes need torchvision and
    # fall back to these without it), and whether it resizes a picture to the tile as it is (no crop)
    processor_class: str = "CLIPImageProcessor"
    squash: bool = False
    new_tower_keys: tuple[tuple[str, object], ...] = ()  # a new tower's config keys besides its shape (the toy)

    @property
    def llama_cpp_strategy(self) -> str:
        """The ``vision_feature_select_strategy`` that selects what llama.cpp's LLaVA graph keeps: every patch
        and nothing else (clip.cpp skips the first token exactly when the file holds ``v.class_embd``)."""
        return "default" if self.class_token else "full"

    def tokens(self, image_size: int, patch_size: int, strategy: str) -> int:
        """Tokens a tile gives the projector: the patches (the convolution's stride drops any remainder), the
        class token if there is one, less the first token for ``default``."""
        n = (int(image_size) // int(patch_size)) ** 2 + int(self.class_token)
        return n - 1 if strategy == "default" else n

    def hf_config(self, **shape):
        import transformers

        return getattr(transformers, self.config_class)(hidden_act=self.act, **dict(self.new_tower_keys), **shape)

    def hf_image_processor(self, resize: int, crop: int):
        """The image processor a llava-hf checkpoint with this tower ships."""
        import transformers

        cls = getattr(transformers, self.processor_class)
        if self.squash:
            return cls(size={"height": crop, "width": crop}, image_mean=list(self.mean), image_std=list(self.std))
        return cls(size={"shortest_edge": resize}, crop_size={"height": crop, "width": crop})


CLIP = Tower("clip", ("clip_vision_model", "clip"), "CLIPVisionConfig", class_token=True, normed_last_hidden=False,
             act="quick_gelu", mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711))
SIGLIP = Tower("siglip", ("siglip_vision_model",), "SiglipVisionConfig", class_token=False,
               normed_last_hidden=True, act="gelu_pytorch_tanh", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
               pre_layernorm=False, unused_modules=("post_layernorm.", "head."),
               processor_class="SiglipImageProcessorPil", squash=True, new_tower_keys=(("vision_use_head", False),),
               llama_cpp_no_tiles="llama.cpp has no LLaVA-OneVision packing for SigLIP tiles (anyres_max downscale, "
                                  "unpad, a newline per row); its tiled 'mlp' path is LLaVA-1.6's CLIP approximation")
TOWERS = {t.name: t for t in (CLIP, SIGLIP)}


def for_config(vision_config: dict) -> Tower:
    """The tower of a checkpoint's ``vision_config`` (CLIP when it names none, as llava-hf's defaults)."""
    mt = (vision_config or {}).get("model_type", "clip_vision_model")
    for t in TOWERS.values():
        if mt in t.model_types:
            return t
    raise UserError(f"unsupported vision tower {mt!r} (supported: "
                    f"{', '.join(m for t in TOWERS.values() for m in t.model_types)})")


def by_name(name: str) -> Tower:
    if name not in TOWERS:
        raise UserError(f"unknown vision tower {name!r}; known: {', '.join(TOWERS)}")
    return TOWERS[name]
