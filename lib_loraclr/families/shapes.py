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


def clip_text_config(shapes: Shapes, shape: Shape, root: str, shipped: dict[str, Any]) -> dict[str, Any]:
    """``shipped`` with the widths of the transformers-layout CLIP tower under ``root``."""
    tok = shape(f"{root}text_model.embeddings.token_embedding.weight")
    layers = _indices(shapes, rf"{re.escape(root)}text_model\.encoder\.layers\.(\d+)\.")
    return {
        **shipped,
        "vocab_size": tok[0],
        "hidden_size": tok[1],
        "max_position_embeddings": shape(f"{root}text_model.embeddings.position_embedding.weight")[0],
        "num_hidden_layers": len(layers),
        "intermediate_size": shape(f"{root}text_model.encoder.layers.0.mlp.fc1.weight")[0],
        "num_attention_heads": max(1, tok[1] // TEXT_HEAD_WIDTH),
        "projection_dim": tok[1],
    }


def openclip_text_config(shapes: Shapes, shape: Shape, root: str, shipped: dict[str, Any]) -> dict[str, Any]:
    """``shipped`` with the widths of the OpenCLIP-layout tower under ``root`` (its projection's
    output is the pooled vector's width)."""
    tok = shape(f"{root}token_embedding.weight")
    layers = _indices(shapes, rf"{re.escape(root)}transformer\.resblocks\.(\d+)\.")
    return {
        **shipped,
        "vocab_size": tok[0],
        "hidden_size": tok[1],
        "max_position_embeddings": shape(f"{root}positional_embedding")[0],
        "num_hidden_layers": len(layers),
        "intermediate_size": shape(f"{root}transformer.resblocks.0.mlp.c_fc.weight")[0],
        "num_attention_heads": max(1, tok[1] // TEXT_HEAD_WIDTH),
        "projection_dim": shape(f"{root}text_projection")[1],
    }


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
