"""Hyperparameter presets. ``llava-1.5-*`` carry LLaVA-1.5's published recipe
(scripts/v1_5/pretrain.sh, finetune.sh, finetune_lora.sh); ``llava-next`` LLaVA-NeXT's
(anyres, vision tower trained at its own rate); ``toy`` is sized for the toy world on
2 CPU cores."""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class StageConfig:
    lr: float
    global_batch: int
    per_device_batch: int
    epochs: float = 1.0
    max_steps: int = 0  # 0: from epochs
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_length: int = 2048  # counting the image tokens
    bf16: bool = True
    tf32: bool = True
    gradient_checkpointing: bool = True
    group_by_modality: bool = True
    lora: bool = False
    lora_r: int = 128
    lora_alpha: int = 256
    lora_dropout: float = 0.05
    projector_lr: float | None = None  # LoRA runs: the projector's own rate
    vision_lr: float | None = None  # the vision tower learns at this rate (mm_vision_tower_lr); None: frozen
    # a video record's frames, as LLaVA-NeXT's training samples them: about video_fps a second, at most
    # frames_upbound (its --frames_upbound: 32 in finetune_ov.sh)
    frames_upbound: int = 32
    video_fps: float = 1.0
    save_steps: int = 500
    seed: int = 42
    dataloader_workers: int = 4

    def with_(self, **kw) -> "StageConfig":
        return replace(self, **{k: v for k, v in kw.items() if v is not None})


@dataclass(frozen=True)
class Preset:
    stage1: StageConfig
    stage2: StageConfig
    notes: str = ""
    conv_mode: str = "vicuna_v1"  # stage 2's conversation mode (LLaVA's --version)
    stage1_mode: str = "plain"  # stage 1's (LLaVA's pretraining: plain)


_S1 = StageConfig(lr=1e-3, global_batch=256, per_device_batch=32)
_S2 = StageConfig(lr=2e-5, global_batch=128, per_device_batch=16)

PRESETS: dict[str, Preset] = {
    "llava-1.5-7b": Preset(_S1, _S2, "8xA100: stage 1 ~3.5 h, stage 2 ~10 h"),
    "llava-1.5-13b": Preset(_S1, _S2.with_(per_device_batch=16), "8xA100 (80G)"),
    "llava-1.5-7b-lora": Preset(
        _S1, _S2.with_(lr=2e-4, lora=True, projector_lr=2e-5), "LoRA r=128 alpha=256 on the language model"
    ),
    # LLaVA-NeXT (github.com/LLaVA-VL/LLaVA-NeXT): stage 1 trains the projector alone at lr 1e-3, one epoch of
    # blip558k, as LLaVA-1.5 (scripts/train/pretrain_clip.sh: --mm_tunable_parts mm_mlp_adapter). Stage 2 trains
    # the whole model: lr 1e-5 for the language model and the projector, 2e-6 for the vision tower
    # (--mm_vision_tower_lr), 1 epoch, warm-up 0.03, cosine (scripts/train/direct_finetune_clip.sh, the anyres
    # CLIP recipe; finetune_si.sh says "lr=1e-5, warmup=0.03"); max length 4096
    # (scripts/archived/finetune_mixtral_1.6_336px_anyres.sh, the LLaVA-1.6-era anyres script); global batch 128,
    # LLaVA-1.5's stage-2 batch (the scripts set only per-device sizes, 4 in direct_finetune_clip.sh).
    "llava-next": Preset(
        _S1, _S2.with_(lr=1e-5, vision_lr=2e-6, per_device_batch=4, max_length=4096),
        "LLaVA-NeXT stage 2, vision tower at 2e-6; LLaVA-NeXT runs it under ZeRO-3 (train/configs/zero3.yaml)",
    ),
    # LLaVA-OneVision (LLaVA-NeXT's scripts/train): stage 1 as pretrain_siglip.sh (SigLIP-so400m + Qwen2, the
    # projector alone at 1e-3, plain, blip558k, 1 epoch, per-device batch 16, max length 8192); stage 2 as
    # finetune_si.sh / finetune_ov.sh (mode qwen_1_5, the whole model at 1e-5, the tower at 2e-6, 1 epoch,
    # warm-up 0.03, cosine, per-device batch 1, max length 32768, anyres_max_9 on the 1x1..6x6 grids the checkpoint
    # carries). The scripts leave the global batch to the GPU count: LLaVA-1.5's 256 and 128 are kept.
    "llava-onevision-0.5b": Preset(
        _S1.with_(per_device_batch=16, max_length=8192),
        _S2.with_(lr=1e-5, vision_lr=2e-6, per_device_batch=1, max_length=32768),
        "LLaVA-OneVision's scripts; run under ZeRO-3 as they do (train/configs/zero3.yaml)", conv_mode="qwen_1_5",
    ),
    # LLaVA-Interleave (a SigLIP LlavaForConditionalGeneration, one tile a picture): LLaVA-NeXT publishes no
    # training script for it; these are OneVision's scripts' numbers above, with its Qwen mode.
    "llava-interleave-0.5b": Preset(
        _S1.with_(per_device_batch=16, max_length=8192),
        _S2.with_(lr=1e-5, vision_lr=2e-6, per_device_batch=1, max_length=32768),
        "LLaVA-OneVision's scripts' numbers (no Interleave script is published)", conv_mode="qwen_1_5",
    ),
    # xtuner's llava-phi-3-mini and llava-llama-3-8b (xtuner/configs/llava/phi3_mini_4k_instruct_clip_vit_large_p14_336
    # and llama3_8b_instruct_clip_vit_large_p14_336): both stages in the language model's own format (xtuner's
    # phi3_chat, llama3_chat), its pretraining included, where LLaVA's is plain. Stage 1: the projector alone at
    # 1e-3, 32 a GPU on 8 (256); stage 2: the language model too at 2e-5, 8 a GPU with 2 accumulated on 8 (128);
    # 1 epoch, warm-up 0.03, no weight decay; max length 2048 with the picture's 576 positions (xtuner counts
    # 2048 - 576 text ids before the picture goes in).
    "llava-phi-3-mini": Preset(_S1, _S2.with_(per_device_batch=8), "xtuner's recipe for llava-phi-3-mini",
                               conv_mode="phi3_chat", stage1_mode="phi3_chat"),
    "llava-llama-3-8b": Preset(_S1, _S2.with_(per_device_batch=8), "xtuner's recipe for llava-llama-3-8b",
                               conv_mode="llama3_chat", stage1_mode="llama3_chat"),
    "toy": Preset(
        # Stage 1: LLaVA-1.5's 1e-3 at batch 256, scaled to the toy's batch of 32 by the square-root
        # rule (1e-3 / sqrt(8)). Faster, the projector inflates what the frozen toy language model can
        # read (where, how many, how big) and crushes colour, which stage 2 then misses (docs/TRAINING.md).
        StageConfig(lr=3.5e-4, global_batch=32, per_device_batch=16, bf16=False, tf32=False,
                    gradient_checkpointing=False, save_steps=200, dataloader_workers=0),
        StageConfig(lr=1e-3, global_batch=32, per_device_batch=16, epochs=2.0, bf16=False, tf32=False,
                    gradient_checkpointing=False, save_steps=200, dataloader_workers=0),
        "2 CPU cores, minutes",
    ),
}


def get_preset(name: str) -> Preset:
    from llava_edge.errors import UserError

    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]
