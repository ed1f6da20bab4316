"""VAE key names: original ldm (``first_stage_model.*``, what the WebUI loads) <-> diffusers ``AutoencoderKL``.

LoRAs never touch the VAE, but writing a full checkpoint in the WebUI's layout and loading one
into our runtime needs every VAE key. The mapping is structural (one rule per block kind); the one
reversal is the decoder: ldm numbers ``up.i`` from the lowest resolution upwards in storage order
but runs them reversed, so ``decoder.up.{i}`` is diffusers' ``up_blocks.{levels - 1 - i}``.
The mid-block attention is 1x1 convs in ldm and Linear layers in diffusers (same numbers,
different shape), see :func:`to_ldm_shape`.
"""

from __future__ import annotations

import re

import torch

# (ldm piece, diffusers piece) for names inside one resnet/attention block.
_RESNET = {"nin_shortcut": "conv_shortcut"}
_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_TOP = {"norm_out": "conv_norm_out"}


def _swap(name: str, table: dict[str, str]) -> str:
    head, _, leaf = name.rpartition(".")
    return f"{table.get(head, head)}.{leaf}" if head else name


def vae_ldm_to_diffusers(key: str, levels: int = 4) -> str:
    """``encoder.down.1.block.0.nin_shortcut.weight`` -> ``encoder.down_blocks.1.resnets.0.conv_shortcut.weight``.

    ``key`` is relative to ``first_stage_model.``; ``levels`` = ``len(block_out_channels)``.
    Raises ``KeyError`` for a key that is not part of an SD VAE.
    """
    m = re.fullmatch(r"(encoder|decoder)\.(.+)", key)
    if not m:
        if re.fullmatch(r"(post_)?quant_conv\.(weight|bias)", key):
            return key
        raise KeyError(key)
    side, rest = m.groups()
    if mm := re.fullmatch(r"down\.(\d+)\.block\.(\d+)\.(.+)", rest):
        i, j, tail = mm.groups()
        return f"{side}.down_blocks.{i}.resnets.{j}.{_swap(tail, _RESNET)}"
    if mm := re.fullmatch(r"down\.(\d+)\.downsample\.conv\.(.+)", rest):
        return f"{side}.down_blocks.{mm[1]}.downsamplers.0.conv.{mm[2]}"
    if mm := re.fullmatch(r"up\.(\d+)\.block\.(\d+)\.(.+)", rest):
        i, j, tail = mm.groups()
        return f"{side}.up_blocks.{levels - 1 - int(i)}.resnets.{j}.{_swap(tail, _RESNET)}"
    if mm := re.fullmatch(r"up\.(\d+)\.upsample\.conv\.(.+)", rest):
        return f"{side}.up_blocks.{levels - 1 - int(mm[1])}.upsamplers.0.conv.{mm[2]}"
    if mm := re.fullmatch(r"mid\.block_([12])\.(.+)", rest):
        return f"{side}.mid_block.resnets.{int(mm[1]) - 1}.{_swap(mm[2], _RESNET)}"
    if mm := re.fullmatch(r"mid\.attn_1\.(.+)", rest):
        return f"{side}.mid_block.attentions.0.{_swap(mm[1], _ATTN)}"
    if re.fullmatch(r"(conv_in|conv_out|norm_out)\.(weight|bias)", rest):
        return f"{side}.{_swap(rest, _TOP)}"
    raise KeyError(key)


_INV_RESNET = {v: k for k, v in _RESNET.items()}
_INV_ATTN = {v: k for k, v in _ATTN.items()}
_INV_TOP = {v: k for k, v in _TOP.items()}


def vae_diffusers_to_ldm(key: str, levels: int = 4) -> str:
    """Inverse of :func:`vae_ldm_to_diffusers` (result relative to ``first_stage_model.``)."""
    m = re.fullmatch(r"(encoder|decoder)\.(.+)", key)
    if not m:
        if re.fullmatch(r"(post_)?quant_conv\.(weight|bias)", key):
            return key
        raise KeyError(key)
    side, rest = m.groups()
    if mm := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", rest):
        return f"{side}.down.{mm[1]}.block.{mm[2]}.{_swap(mm[3], _INV_RESNET)}"
    if mm := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", rest):
        return f"{side}.down.{mm[1]}.downsample.conv.{mm[2]}"
    if mm := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", rest):
        return f"{side}.up.{levels - 1 - int(mm[1])}.block.{mm[2]}.{_swap(mm[3], _INV_RESNET)}"
    if mm := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", rest):
        return f"{side}.up.{levels - 1 - int(mm[1])}.upsample.conv.{mm[2]}"
    if mm := re.fullmatch(r"mid_block\.resnets\.([01])\.(.+)", rest):
        return f"{side}.mid.block_{int(mm[1]) + 1}.{_swap(mm[2], _INV_RESNET)}"
    if mm := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", rest):
        return f"{side}.mid.attn_1.{_swap(mm[1], _INV_ATTN)}"
    if re.fullmatch(r"(conv_in|conv_out|conv_norm_out)\.(weight|bias)", rest):
        return f"{side}.{_swap(rest, _INV_TOP)}"
    raise KeyError(key)


def _is_attn_weight(ldm_key: str) -> bool:
    return bool(re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$", ldm_key))


def to_ldm_shape(ldm_key: str, tensor: torch.Tensor) -> torch.Tensor:
    """diffusers Linear attention weight ``(C, C)`` -> ldm 1x1 conv ``(C, C, 1, 1)``; others unchanged."""
    return tensor.reshape(*tensor.shape, 1, 1) if _is_attn_weight(ldm_key) and tensor.ndim == 2 else tensor


def to_diffusers_shape(ldm_key: str, tensor: torch.Tensor) -> torch.Tensor:
    """ldm 1x1 conv attention weight ``(C, C, 1, 1)`` -> diffusers Linear ``(C, C)``; others unchanged."""
    return tensor.reshape(tensor.shape[:2]) if _is_attn_weight(ldm_key) and tensor.ndim == 4 else tensor
