"""Network configs from a checkpoint's tensor shapes, for the parts both families share: a
CLIP text tower (transformers' layout), an OpenCLIP text tower, and the VAE.

Widths, depths and vocabulary sizes show in shapes; head counts and norm groups do not, so they
are the shipped config's (a text head is 64 wide in every CLIP that Stable Diffusion uses) unless
the checkpoint carries the configs we recorded.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from lib_loraclr.errors import LoraFileError

Shapes = Mapping[str, tuple[int, ...]]
Shape = Callable[[str], tuple[int, ...]]
VAE = "first_stage_model."
TEXT_HEAD_WIDTH = 64


def shape_reader(shapes: Shapes, title: str, source: str) -> Shape:
    """``shape(key)``, refusing a checkpoint without that key as an incomplete one of ``title``."""

    def shape(key: str) -> tuple[int, ...]:
        if key not in shapes:
            raise LoraFileError(source, f"missing key {key!r}; not a complete {title} checkpoint")
        return shapes[key]

    return shape


def _indices(shapes: Shapes, pattern: str) -> list[int]:
    """The sorted distinct values of the number group in ``pattern`` over the keys."""
    return sorted({int(m[1]) for k in shapes if (m := re.match(pattern, k))})


def _tower_config(
    shapes: Shapes, shape: Shape, shipped: dict[str, Any], keys: dict[str, str], projection: int | None
) -> dict[str, Any]:
    """``shipped`` with a text tower's widths read from its ``keys`` (token and position
    embeddings, a layer-number pattern, the first MLP's weight) in one layout."""
    tok = shape(keys["token"])
    return {
        **shipped,
        "vocab_size": tok[0],
        "hidden_size": tok[1],
        "max_position_embeddings": shape(keys["position"])[0],
        "num_hidden_layers": len(_indices(shapes, keys["layers"])),
        "intermediate_size": shape(keys["mlp"])[0],
        "num_attention_heads": max(1, tok[1] // TEXT_HEAD_WIDTH),
        "projection_dim": projection or tok[1],
    }


def clip_text_config(shapes: Shapes, shape: Shape, root: str, shipped: dict[str, Any]) -> dict[str, Any]:
    """``shipped`` with the widths of the transformers-layout CLIP tower under ``root``."""
    text = f"{root}text_model."
    keys = {
        "token": f"{text}embeddings.token_embedding.weight",
        "position": f"{text}embeddings.position_embedding.weight",
        "layers": rf"{re.escape(text)}encoder\.layers\.(\d+)\.",
        "mlp": f"{text}encoder.layers.0.mlp.fc1.weight",
    }
    return _tower_config(shapes, shape, shipped, keys, None)


def openclip_text_config(shapes: Shapes, shape: Shape, root: str, shipped: dict[str, Any]) -> dict[str, Any]:
    """``shipped`` with the widths of the OpenCLIP-layout tower under ``root`` (its projection's
    output is the pooled vector's width)."""
    keys = {
        "token": f"{root}token_embedding.weight",
        "position": f"{root}positional_embedding",
        "layers": rf"{re.escape(root)}transformer\.resblocks\.(\d+)\.",
        "mlp": f"{root}transformer.resblocks.0.mlp.c_fc.weight",
    }
    return _tower_config(shapes, shape, shipped, keys, shape(f"{root}text_projection")[1])


def vae_config(shapes: Shapes, shape: Shape, shipped: dict[str, Any]) -> dict[str, Any] | None:
    """``shipped`` with the VAE's levels and widths, or ``None`` for a checkpoint without a VAE."""
    if not any(k.startswith(VAE) for k in shapes):
        return None
    levels = _indices(shapes, rf"{VAE}encoder\.down\.(\d+)\.")
    blocks = _indices(shapes, rf"{VAE}encoder\.down\.0\.block\.(\d+)\.")
    return {
        **shipped,
        "block_out_channels": [shape(f"{VAE}encoder.down.{i}.block.0.conv1.weight")[0] for i in levels],
        "layers_per_block": len(blocks),
        "latent_channels": shape(f"{VAE}post_quant_conv.weight")[0],
        "in_channels": shape(f"{VAE}encoder.conv_in.weight")[1],
        "out_channels": shape(f"{VAE}decoder.conv_out.weight")[0],
        "down_block_types": ["DownEncoderBlock2D"] * len(levels),
        "up_block_types": ["UpDecoderBlock2D"] * len(levels),
    }
