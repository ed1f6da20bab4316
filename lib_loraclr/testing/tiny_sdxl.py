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

from typing import Any

from lib_loraclr.families import SDXL
from lib_loraclr.sd.configs import build_networks, family_config, sd_alphas_cumprod
from lib_loraclr.sd.model import SDModel
from lib_loraclr.testing.tiny import TINY_VAE, init_weights

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
        "vae": {**family_config(SDXL, "vae"), **TINY_VAE},
        "scheduler": family_config(SDXL, "scheduler"),
    }


def build_tiny_sdxl(
    seed: int = 0,
    configs: dict[str, dict[str, Any]] | None = None,
    tokenizer: Any = None,
    with_vae: bool = False,
) -> SDModel:
    """A seeded tiny SDXL :class:`SDModel` (UNet, both towers, SDXL's schedule; the VAE, SDXL's
    with tiny widths, ``with_vae``) in eval mode with frozen weights; the same seed gives
    bit-identical weights, with or without the VAE. ``configs``: other widths (SDXL's own: full
    size). ``tokenizer``: default the CLIP tokenizer both towers share."""
    if tokenizer is None:
        from lib_loraclr.sd.tokenizer import load_clip_tokenizer

        tokenizer = load_clip_tokenizer()
    cfg = configs or tiny_sdxl_configs()
    if not with_vae:
        cfg = {part: c for part, c in cfg.items() if part != "vae"}
    nets = build_networks(cfg)
    unet, text_encoder, text_encoder_2 = nets["unet"], nets["text_encoder"], nets["text_encoder_2"]
    for i, module in enumerate((unet, text_encoder, text_encoder_2)):
        init_weights(module, seed * 3 + i)
    vae = nets.get("vae")
    if vae is not None:
        init_weights(vae, 10_000 + seed)  # its own stream: the other parts match a model without it
    model = SDModel(
        unet=unet,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        vae=vae,
        alphas_cumprod=sd_alphas_cumprod(cfg["scheduler"]),
        configs=cfg,
        vae_scaling_factor=float(family_config(SDXL, "vae")["scaling_factor"]),
        text_encoder_2=text_encoder_2,
        family=SDXL,
    )
    return model.eval().requires_grad_(False)
