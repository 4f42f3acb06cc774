"""LLaVA-NeXT's anyres path in LLaVA's own code: run with ``.venv-llava/bin/python`` (llava-torch 1.2.2.post1).

    anyres_side.py anyres REQUEST.json   ->   one JSON object on stdout (everything else goes to stderr)

Request: {"out": folder, "hidden": H, "towers": [{"name", "tile", "patch", "pinpoints", "mean", "std"}],
"cases": [{"id", "tower": name, "image": a .npy file of HxWx3 uint8, "seed"}]}.

Per tower, a tiny ``LlavaLlamaForCausalLM`` made with LLaVA's classes, configured as LLaVA-1.6 is
(``image_aspect_ratio: anyres``, ``mm_patch_merge_type: spatial_unpad``, the tower's pinpoints) on a
CLIP tower config of that tile and patch size, with a random ``image_newline``. Per case: the pixels from
``llava.mm_utils.process_anyres_image`` (with transformers 4.36's ``CLIPImageProcessor`` at the tower's
size, as LLaVA's builder loads it), random projected features for as many tiles as that gave, and the
image positions that the model's own ``prepare_inputs_labels_for_multimodal`` builds from them (its
``encode_images``, the tower and projector, replaced by the random features: the packing is what is
compared). Written to ``out``: ``<id>-pixels.npy``, ``<id>-features.npy``, ``<id>-packed.npy``,
``<tower>-newline.npy``. Result: {"configs": {tower: {"config" (the model's config.json), "tower" (the
tower's)}}, "cases": [{"id", "best" ([width, height], select_best_resolution),
"grid_shape" ([cols, rows], get_anyres_image_grid_shape), "unpadded" ([h, w], the shape unpad_image
gives for the tile grid), "positions"}]}.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")

_STDOUT = sys.stdout
sys.stdout = sys.stderr


def _tiny_model(tower: dict, hidden: int, folder: Path, seed: int):
    import torch
    from transformers import CLIPVisionConfig
    from llava.model import LlavaConfig, LlavaLlamaForCausalLM

    tower_dir = folder / f"clip-{tower['name']}"  # build_vision_tower reads only the config (delay_load)
    CLIPVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1, num_attention_heads=2,
                     image_size=tower["tile"], patch_size=tower["patch"]).save_pretrained(tower_dir)
    cfg = LlavaConfig(
        vocab_size=8, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, mm_vision_tower=str(tower_dir), mm_hidden_size=hidden,
        mm_projector_type="linear", mm_vision_select_layer=-2, mm_vision_select_feature="patch",
        mm_patch_merge_type="spatial_unpad", image_aspect_ratio="anyres", image_grid_pinpoints=tower["pinpoints"],
        mm_use_im_start_end=False, tokenizer_model_max_length=None)
    torch.manual_seed(seed)
    model = LlavaLlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.get_model().image_newline.copy_(torch.randn(hidden))
    return model


def cmd_anyres(req: dict) -> dict:
    import numpy as np
    import torch
    from PIL import Image
    from transformers import CLIPImageProcessor
    from llava.constants import IMAGE_TOKEN_INDEX
    from llava.mm_utils import get_anyres_image_grid_shape, process_anyres_image, select_best_resolution
    from llava.model.llava_arch import unpad_image

    out = Path(req["out"])
    hidden = int(req.get("hidden", 8))
    towers = {t["name"]: t for t in req["towers"]}
    models, processors, configs = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for k, t in enumerate(req["towers"]):
            models[t["name"]] = model = _tiny_model(t, hidden, Path(tmp), seed=k)
            configs[t["name"]] = {"config": json.loads(model.config.to_json_string()),
                                  "tower": json.loads(model.get_vision_tower().config.to_json_string())}
            np.save(out / f"{t['name']}-newline.npy", model.get_model().image_newline.detach().numpy())
            processors[t["name"]] = CLIPImageProcessor(
                size={"shortest_edge": t["tile"]}, crop_size={"height": t["tile"], "width": t["tile"]}, resample=3,
                image_mean=t["mean"], image_std=t["std"])
        results = []
        for case in req["cases"]:
            t, model = towers[case["tower"]], models[case["tower"]]
            image = Image.fromarray(np.load(case["image"]))
            pixels = process_anyres_image(image, processors[case["tower"]], t["pinpoints"]).numpy()
            side = t["tile"] // t["patch"]
            rng = np.random.default_rng(case["seed"])
            features = rng.standard_normal((pixels.shape[0], side * side, hidden)).astype(np.float32)
            # the tower and projector (encode_images) give these features; the packing is what is compared
            model.encode_images = lambda images, f=torch.from_numpy(features): f
            stand_in = [torch.zeros(len(features), 3, 1, 1)]  # one entry per tile, as process_images gives
            with torch.no_grad():  # one text token, then the image (a lone token would skip the image path)
                _, _, _, _, embeds, _ = model.prepare_inputs_labels_for_multimodal(
                    torch.tensor([[0, IMAGE_TOKEN_INDEX]]), None, None, None, None, stand_in, image_sizes=[image.size])
            packed = embeds[0, 1:].numpy()
            cols, rows = get_anyres_image_grid_shape(image.size, t["pinpoints"], t["tile"])
            unpadded = unpad_image(torch.zeros(1, rows * side, cols * side), image.size).shape[1:]
            for name, a in (("pixels", pixels), ("features", features), ("packed", packed)):
                np.save(out / f"{case['id']}-{name}.npy", a)
            results.append({"id": case["id"], "best": list(select_best_resolution(image.size, t["pinpoints"])),
                            "grid_shape": [cols, rows], "unpadded": list(unpadded), "positions": len(packed)})
    return {"cases": results, "configs": configs}


COMMANDS = {"anyres": cmd_anyres}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] not in COMMANDS:
        print(f"usage: anyres_side.py {{{','.join(COMMANDS)}}} REQUEST.json", file=sys.stderr)
        return 2
    result = COMMANDS[argv[0]](json.loads(Path(argv[1]).read_text(encoding="utf-8")))
    _STDOUT.write(json.dumps(result) + "\n")
    _STDOUT.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
