"""The merge's fixed vocabulary, owned here once: methods, layer groups, output precisions, and
which group a layer belongs to. Front ends (tab, API, CLI, settings) validate against these."""

from __future__ import annotations

METHODS = ("loraclr", "lsq", "sum", "average")
GROUPS = ("te", "cross_kv", "spatial")
DTYPES = ("fp16", "fp32")


def layer_group(name: str) -> str | None:
    """Which merge group a canonical (kohya) layer name belongs to; ``None``: no merge group.

    ``te``: CLIP text-encoder layers; ``cross_kv``: the UNet's cross-attention key/value (their input
    is the text context); ``spatial``: every other layer inside the UNet's attention blocks.
    """
    if name.startswith("lora_te"):
        return "te"
    if name.endswith(("attn2_to_k", "attn2_to_v")):
        return "cross_kv"
    if "_attentions_" in name:
        return "spatial"
    return None


def latent_downscale(name: str) -> int:
    """How many times smaller than the latent a UNet layer's feature map is (SD1.x layout).

    ``down_blocks_i`` run at 1/2^i, the middle block at 1/8, ``up_blocks_i`` at 1/2^(3-i).
    """
    parts = name.removeprefix("lora_unet_").split("_")
    if parts[0] == "mid":
        return 8
    level = int(parts[2])
    return 2**level if parts[0] == "down" else 2 ** (3 - level)
