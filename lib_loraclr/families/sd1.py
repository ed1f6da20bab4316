"""SD1.x (SD1.5 and its fine-tunes): one CLIP-L text tower, four UNet levels with attention on
the first three, depth-1 transformers, a 768-wide context, 512 px pictures.

kohya writes SD1 LoRAs with diffusers module paths (``lora_unet_down_blocks_0_attentions_0_proj_in``,
``lora_te_text_model_encoder_layers_0_mlp_fc1``); those are the canonical names.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from lib_loraclr.errors import LoraFileError
from lib_loraclr.families.family import LDM_UNET, ModelFamily
from lib_loraclr.families.layout import TextTower, UNetLayout
from lib_loraclr.families.shapes import clip_text_config, shape_reader, vae_config

TEXT = "cond_stage_model.transformer."

TOWER = TextTower("lora_te_", "text_encoder.", TEXT, layers=12, width=768, name_layers=24, position_ids=True)


def infer_configs(
    shapes: Mapping[str, tuple[int, ...]], shipped: Callable[[str], dict[str, Any]], source: str
) -> dict[str, dict[str, Any]]:
    """Configs for the three networks from ldm tensor shapes, over the ``shipped`` SD1.5 configs
    (SD1's 8 attention heads and 32 norm groups are assumed: shapes do not show them)."""
    shape = shape_reader(shapes, SD1.title, source)
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
    return {
        "unet": unet,
        "text_encoder": clip_text_config(shapes, shape, TEXT, shipped("text_encoder")),
        "vae": vae_config(shapes, shape, shipped("vae")),
        "scheduler": shipped("scheduler"),
    }


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
