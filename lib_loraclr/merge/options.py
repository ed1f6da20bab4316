"""The merge's fixed vocabulary, owned here once: methods, layer groups, output precisions, and
which group a layer belongs to. Front ends (tab, API, CLI, settings) validate against these."""

from __future__ import annotations

from lib_loraclr import families

METHODS = ("loraclr", "lsq", "sum", "average")
GROUPS = ("te", "cross_kv", "spatial")
DTYPES = ("fp16", "fp32")


def layer_group(name: str) -> str | None:
    """Which merge group a canonical layer name belongs to; ``None``: no merge group.

    ``te``: text-encoder layers; ``cross_kv``: the UNet's cross-attention key/value (their input is
    the text context); ``spatial``: every other layer inside the UNet's attention blocks. The
    layer's family knows which it is.
    """
    layer = families.find_layer(name)
    return layer.group if layer is not None else None


def latent_downscale(name: str) -> int:
    """How many times smaller than the latent a UNet layer's feature map is (its family's layout:
    e.g. SD1's ``down_blocks_i`` run at 1/2^i)."""
    layer = families.find_layer(name)
    if layer is None:
        raise KeyError(f"not a layer of any model family: {name}")
    return layer.downscale
