"""A tiny SDXL-architecture model for tests: SDXL's layout from its shipped configs, small widths.

Every block type, block count and layer kind is SDXL base's: three UNet levels with no attention
at the top one and transformer depths 2 and 10 below (10 in the middle block), the ``text_time``
addition embedding fed by the second tower's pooled projection and six size embeddings, a context
that is both towers' hidden states side by side, CLIP-L (``CLIPTextModel``) and OpenCLIP-G's
stand-in (``CLIPTextModelWithProjection``) with SDXL's 12 and 32 layers. So every kohya SDXL module
name exists on it; only the widths are small. Weights are seeded as the SD1 tiny model's
(:func:`~lib_loraclr.testing.tiny.init_weights`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lib_loraclr.families import SDXL
from lib_loraclr.lora.keymap import layer_map_diffusers
from lib_loraclr.sd.configs import family_config
from lib_loraclr.testing.tiny import init_weights

TINY_TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "projection_dim": 32}
TINY_TEXT_2 = {"hidden_size": 48, "intermediate_size": 96, "num_attention_heads": 2, "projection_dim": 48}
TIME_EMBED = 8  # each of the six size numbers' sinusoidal width (SDXL: 256)
TINY_UNET = {
    "block_out_channels": [16, 32, 64],  # SDXL: c, 2c, 4c
    "attention_head_dim": [1, 2, 4],  # diffusers' name for heads per level (SDXL: 5, 10, 20)
    "cross_attention_dim": TINY_TEXT["hidden_size"] + TINY_TEXT_2["hidden_size"],
    "addition_time_embed_dim": TIME_EMBED,
    # pooled projection of tower 2 + 6 size embeddings, as SDXL's 1280 + 6 x 256 = 2816
    "projection_class_embeddings_input_dim": TINY_TEXT_2["projection_dim"] + 6 * TIME_EMBED,
    "norm_num_groups": 8,
    "sample_size": 8,
}


def tiny_sdxl_configs() -> dict[str, dict[str, Any]]:
    """SDXL's shipped configs with the widths of ``TINY_*`` replaced."""
    return {
        "unet": {**family_config(SDXL, "unet"), **TINY_UNET},
        "text_encoder": {**family_config(SDXL, "text_encoder"), **TINY_TEXT},
        "text_encoder_2": {**family_config(SDXL, "text_encoder_2"), **TINY_TEXT_2},
        "scheduler": family_config(SDXL, "scheduler"),
    }


@dataclass(eq=False)
class TinySDXL:
    """The networks of a tiny SDXL and its family; the runtime's SDXL model is later work."""

    unet: nn.Module
    text_encoder: nn.Module
    text_encoder_2: nn.Module
    configs: dict[str, dict[str, Any]]
    family: Any = SDXL

    def layer_map(self) -> dict[str, nn.Module]:
        return layer_map_diffusers(self.unet, self.text_encoder, self.text_encoder_2, family=self.family)

    def eps(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        pooled: torch.Tensor,
        sizes: torch.Tensor,
    ) -> torch.Tensor:
        """The UNet's output with SDXL's conditioning: the context, and the vector made from the
        pooled text and the (original size, crop, target size) numbers."""
        added = {"text_embeds": pooled, "time_ids": sizes}
        return self.unet(x, t, encoder_hidden_states=context, added_cond_kwargs=added).sample


def build_tiny_sdxl(seed: int = 0, configs: dict[str, dict[str, Any]] | None = None) -> TinySDXL:
    """A seeded tiny SDXL (UNet and both towers, no VAE) in eval mode with frozen weights; the same
    seed gives bit-identical weights. ``configs``: other widths (SDXL's own: full size)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = configs or tiny_sdxl_configs()
    unet = UNet2DConditionModel(**cfg["unet"])
    text_encoder = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder_2"]))
    for i, module in enumerate((unet, text_encoder, text_encoder_2)):
        init_weights(module, seed * 3 + i)
        module.eval().requires_grad_(False)
    return TinySDXL(unet, text_encoder, text_encoder_2, cfg)
