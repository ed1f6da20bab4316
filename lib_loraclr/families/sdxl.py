"""SDXL (and the families trained from it: Pony, Illustrious, NoobAI): two text towers (CLIP-L and
OpenCLIP ViT-bigG), three UNet levels with no attention at the top one and deeper transformers
lower (2 and 10 blocks), a 2048-wide context, a pooled-text and size vector, 1024 px pictures.

kohya writes SDXL LoRAs with the ldm module paths of sgm's UNet
(``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``) and ``lora_te1_`` / ``lora_te2_``
for the two towers; those are the canonical names. In a checkpoint the second tower is in
OpenCLIP's layout, whose attention fuses q, k and v into the three row blocks of one
``in_proj_weight`` (:meth:`~lib_loraclr.families.layout.TextTower.ldm_target`).
"""

from __future__ import annotations

from lib_loraclr.families.family import ModelFamily
from lib_loraclr.families.layout import TextTower, UNetLayout

# sgm's embedders: CLIP-L's hidden layer 11 of 12, OpenCLIP-G's penultimate layer and its pooled
# projection; OpenCLIP's tokenizer pads with id 0 where CLIP's repeats the end token.
CLIP_L = TextTower(
    "lora_te1_",
    "text_encoder.",
    "conditioner.embedders.0.transformer.",
    layers=12,
    width=768,
    penultimate=True,
)
CLIP_G = TextTower(
    "lora_te2_",
    "text_encoder_2.",
    "conditioner.embedders.1.model.",
    layers=32,
    width=1280,
    openclip=True,
    penultimate=True,
    pooled=True,
    pad_id=0,
)

SDXL = ModelFamily(
    id="sdxl",
    title="SDXL",
    example="SDXL 1.0",
    context_width=2048,
    tower_width=1280,
    checkpoint_markers=("conditioner.embedders.", "model.diffusion_model.label_emb."),
    lora_markers=(
        "lora_te1_",
        "lora_te2_",
        "lora_unet_input_blocks_",
        "lora_unet_output_blocks_",
        "lora_unet_middle_block_",
        "text_encoder_2.",
    ),
    host_flag="is_sdxl",
    unet=UNetLayout(depths=(0, 2, 10), mid_depth=10, add_embedding=True),
    towers=(CLIP_L, CLIP_G),
    kohya_style="ldm",
    native_resolution=1024,
    size_conditioning=True,
    unet_width=320,
    config_stem="sdxl",
    config_parts=("unet", "vae", "text_encoder", "text_encoder_2", "scheduler"),
    host_text_roots=(
        (
            "conditioner.embedders.0.transformer.text_model.",
            "conditioner.embedders.0.wrapped.transformer.text_model.",
        ),
        (),  # OpenCLIP's fused attention is no Linear per q/k/v: routed through the family's rows later
    ),
)
