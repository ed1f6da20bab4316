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

from collections.abc import Callable, Mapping
from typing import Any

from lib_loraclr.errors import LoraFileError
from lib_loraclr.families.family import LDM_UNET, ModelFamily
from lib_loraclr.families.layout import TextTower, UNetLayout
from lib_loraclr.families.shapes import (
    clip_text_config,
    openclip_text_config,
    shape_reader,
    vae_config,
)

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

HEAD_WIDTH = 64  # sgm's num_head_channels: a level's heads are its width / 64
SIZE_NUMBERS = 6  # original (h, w), crop (top, left), target (h, w), each embedded on its own


def infer_configs(
    shapes: Mapping[str, tuple[int, ...]], shipped: Callable[[str], dict[str, Any]], source: str
) -> dict[str, dict[str, Any]]:
    """Configs for the four networks from sgm tensor shapes, over the ``shipped`` SDXL configs:
    the UNet's level widths, context and vector widths, both towers' widths and depths, the VAE's.
    The transformer depths are the family's (a model with others has other LoRA names)."""
    shape = shape_reader(shapes, SDXL.title, source)
    first = [1 + level * (SDXL.unet.layers_per_block + 1) for level in range(SDXL.unet.levels)]
    widths = [shape(f"{LDM_UNET}input_blocks.{b}.0.out_layers.3.weight")[0] for b in first]
    text_2 = openclip_text_config(shapes, shape, CLIP_G.ldm, shipped("text_encoder_2"))
    vector = shape(f"{LDM_UNET}label_emb.0.0.weight")[1]
    size_width, rest = divmod(vector - text_2["projection_dim"], SIZE_NUMBERS)
    if rest or size_width <= 0:
        raise LoraFileError(
            source,
            f"its UNet's vector is {vector} wide, which is not the second tower's pooled output "
            f"({text_2['projection_dim']}) and {SIZE_NUMBERS} size embeddings: not {SDXL.title}",
        )
    attention = next(b for b, depth in zip(first, SDXL.unet.depths, strict=True) if depth)
    unet = {
        **shipped("unet"),
        "in_channels": shape(f"{LDM_UNET}input_blocks.0.0.weight")[1],
        "out_channels": shape(f"{LDM_UNET}out.2.weight")[0],
        "block_out_channels": widths,
        "attention_head_dim": [max(1, w // HEAD_WIDTH) for w in widths],
        "cross_attention_dim": shape(
            f"{LDM_UNET}input_blocks.{attention}.1.transformer_blocks.0.attn2.to_k.weight"
        )[1],
        "projection_class_embeddings_input_dim": vector,
        "addition_time_embed_dim": size_width,
        "use_linear_projection": len(shape(f"{LDM_UNET}input_blocks.{attention}.1.proj_in.weight")) == 2,
    }
    return {
        "unet": unet,
        "text_encoder": clip_text_config(shapes, shape, CLIP_L.ldm, shipped("text_encoder")),
        "text_encoder_2": text_2,
        "vae": vae_config(shapes, shape, shipped("vae")),
        "scheduler": shipped("scheduler"),
    }


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
    infer_configs=infer_configs,
    schedule_buffers=False,
    zero_empty_negative=True,  # A1111's get_learned_conditioning for sgm models
    host_text_roots=(
        (
            "conditioner.embedders.0.transformer.text_model.",
            "conditioner.embedders.0.wrapped.transformer.text_model.",
        ),
        (),  # OpenCLIP's fused attention is no Linear per q/k/v: routed through the family's rows later
    ),
)
