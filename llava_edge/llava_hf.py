"""The llava-hf checkpoint layout, made one way: its config and the files beside the weights.

The toy models, the conversion of an original LLaVA checkpoint and training's fresh
assembly of a CLIP tower with a causal language model all write this layout through
these two functions, so what transformers and llava-edge read back is the same
whichever made it. transformers is imported inside the functions (export and
training have it; the runtime never calls them).
"""

from __future__ import annotations

from pathlib import Path

from . import towers


def llava_config(vision_config, text_config, image_token_id: int, *, projector_act: str = "gelu",
                 feature_layer: int = -2, strategy: str = "default", family=None, **extra):
    """The family's config (``LlavaConfig`` by default) for a CLIP tower and a language model (``strategy``
    ``full`` keeps CLIP's class token); ``extra`` adds the family's own keys (``Family.config_extra``)."""
    import transformers

    from .families import DEFAULT, FAMILIES

    family = family or FAMILIES[DEFAULT]
    tower = towers.for_config(vision_config.to_dict())
    return getattr(transformers, family.hf_config_class_name)(
        vision_config=vision_config, text_config=text_config, image_token_index=image_token_id,
        projector_hidden_act=projector_act, vision_feature_layer=feature_layer,
        vision_feature_select_strategy=strategy,
        image_seq_length=tower.tokens(vision_config.image_size, vision_config.patch_size, strategy), **extra,
    )


def write_side_files(folder: str | Path, tokenizer, image_processor, *, patch_size: int, strategy: str,
                     conv_mode: str, image_pad: str, legacy: bool, add_bos: bool = True, add_eos: bool = False,
                     toy: bool = False, family=None, class_token: bool = True) -> None:
    """The processor (tokenizer and image processor), the tokenizer settings LLaVA's code reads, and the recipe.

    transformers 5 saves neither ``legacy`` nor ``add_bos_token``; they are written into
    ``tokenizer_config.json`` (``tokenizer.pin_tokenizer_config``) so that every reader takes the same ids.
    """
    from .checkpoint import write_recipe
    from .families import DEFAULT, FAMILIES
    from .tokenizer import pin_tokenizer_config

    family = family or FAMILIES[DEFAULT]
    family.write_hf_processor(folder, image_processor, tokenizer, patch_size=patch_size, strategy=strategy,
                              class_token=class_token)
    pin_tokenizer_config(folder, legacy=legacy, add_bos=add_bos, add_eos=add_eos)
    write_recipe(folder, template=conv_mode, image_pad=image_pad, toy=toy)
