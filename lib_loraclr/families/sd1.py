"""SD1.x (SD1.5 and its fine-tunes): one CLIP-L text tower, four UNet levels with attention on
the first three, depth-1 transformers, a 768-wide context, 512 px pictures.

kohya writes SD1 LoRAs with diffusers module paths (``lora_unet_down_blocks_0_attentions_0_proj_in``,
``lora_te_text_model_encoder_layers_0_mlp_fc1``); those are the canonical names.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from lib_loraclr.errors import LoraFileError
from lib_loraclr.families.family import LDM_UNET, ModelFamily
from lib_loraclr.families.layout import TextTower, UNetLayout

TEXT = "cond_stage_model.transformer."
VAE = "first_stage_model."

TOWER = TextTower("lora_te_", "text_encoder.", TEXT, layers=12, width=768, name_layers=24)


def infer_configs(
    shapes: Mapping[str, tuple[int, ...]], shipped: Callable[[str], dict[str, Any]], source: str
) -> dict[str, dict[str, Any]]:
    """Configs for the three networks from ldm tensor shapes, over the ``shipped`` SD1.5 configs.
    Heads and norm groups are not visible in shapes: SD1's values (8 heads, 32 groups, 64-dim text
    heads) are assumed unless the checkpoint carries our recorded configs."""

    def shape(key: str) -> tuple[int, ...]:
        if key not in shapes:
            raise LoraFileError(source, f"missing key {key!r}; not a complete {SD1.title} checkpoint")
        return shapes[key]

    unet = shipped("unet")
    mc = shape(f"{LDM_UNET}input_blocks.0.0.weight")
    widths = [shape(f"{LDM_UNET}input_blocks.{b}.0.out_layers.3.weight")[0] for b in (1, 4, 7, 10)]
    proj_in = shape(f"{LDM_UNET}input_blocks.1.1.proj_in.weight")
    unet.update(
        in_channels=mc[1],
        block_out_channels=widths,
        cross_attention_dim=shape(f"{LDM_UNET}input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")[1],
        out_channels=shape(f"{LDM_UNET}out.2.weight")[0],
        use_linear_projection=len(proj_in) == 2,
    )
    if mc[0] != widths[0]:
        raise LoraFileError(
            source, f"input conv has {mc[0]} channels but the first level {widths[0]}: not {SD1.title}"
        )
    text = shipped("text_encoder")
    tok = shape(f"{TEXT}text_model.embeddings.token_embedding.weight")
    layers = {
        int(m[1])
        for k in shapes
        if (m := re.match(rf"{re.escape(TEXT)}text_model\.encoder\.layers\.(\d+)\.", k))
    }
    text.update(
        vocab_size=tok[0],
        hidden_size=tok[1],
        max_position_embeddings=shape(f"{TEXT}text_model.embeddings.position_embedding.weight")[0],
        num_hidden_layers=len(layers),
        intermediate_size=shape(f"{TEXT}text_model.encoder.layers.0.mlp.fc1.weight")[0],
        num_attention_heads=max(1, tok[1] // 64),
        projection_dim=tok[1],
    )
    return {
        "unet": unet,
        "text_encoder": text,
        "vae": _vae_config(shapes, shipped, shape),
        "scheduler": shipped("scheduler"),
    }


def _vae_config(
    shapes: Mapping[str, tuple[int, ...]], shipped: Callable[[str], dict[str, Any]], shape: Callable
) -> dict[str, Any] | None:
    if not any(k.startswith(VAE) for k in shapes):
        return None
    vae = shipped("vae")
    levels = sorted({int(m[1]) for k in shapes if (m := re.match(rf"{VAE}encoder\.down\.(\d+)\.", k))})
    blocks = {int(m[1]) for k in shapes if (m := re.match(rf"{VAE}encoder\.down\.0\.block\.(\d+)\.", k))}
    vae.update(
        block_out_channels=[shape(f"{VAE}encoder.down.{i}.block.0.conv1.weight")[0] for i in levels],
        layers_per_block=len(blocks),
        latent_channels=shape(f"{VAE}post_quant_conv.weight")[0],
        in_channels=shape(f"{VAE}encoder.conv_in.weight")[1],
        out_channels=shape(f"{VAE}decoder.conv_out.weight")[0],
    )
    vae["down_block_types"] = ["DownEncoderBlock2D"] * len(levels)
    vae["up_block_types"] = ["UpDecoderBlock2D"] * len(levels)
    return vae


SD1 = ModelFamily(
    id="sd1",
    title="SD1.x",
    example="SD1.5",
    context_width=768,
    tower_width=768,
    host_flag="is_sd1",
    unet=UNetLayout(depths=(1, 1, 1, 0), mid_depth=1),
    towers=(TOWER,),
    kohya_style="diffusers",
    native_resolution=512,
    unet_width=320,
    config_stem="sd15",
    # A1111's prompt hijack wraps the embedder (``wrapped``), and transformers 5 drops ``text_model.``
    host_text_roots=(
        (
            "cond_stage_model.transformer.text_model.",
            "cond_stage_model.transformer.",
            "cond_stage_model.wrapped.transformer.text_model.",
            "cond_stage_model.wrapped.transformer.",
        ),
    ),
    infer_configs=infer_configs,
)
