"""Model families: every fact that differs between SD1.x and SDXL has its owner here.

``families`` sits below every other package (``lora -> families -> errors``): LoRA names, checkpoint
layouts and the engines all ask a family. Nothing outside this package names a family; it takes
the family of the model or file at hand (:func:`of_checkpoint`, :func:`of_host`, :func:`owner`).
Canonical layer names never collide between families (SD1's are kohya's diffusers-style names,
SDXL's kohya's ldm-style names and ``lora_te1_``/``lora_te2_``), so a layer name finds its family.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from lib_loraclr.families.family import LDM_UNET, KnownFamily, Layer, ModelFamily
from lib_loraclr.families.sd1 import SD1
from lib_loraclr.families.sdxl import SDXL

__all__ = ["DEFAULT", "FAMILIES", "KNOWN", "Layer", "ModelFamily", "TITLES", "get", "of_checkpoint", "owner"]

SD2 = KnownFamily(
    "sd2",
    "SD2.x",
    context_width=1024,
    tower_width=1024,
    checkpoint_markers=("cond_stage_model.model.",),
    host_flag="is_sd2",
)
SD3 = KnownFamily("sd3", "SD3", host_flag="is_sd3")
UNKNOWN = "unknown"

FAMILIES: tuple[ModelFamily, ...] = (SD1, SDXL)  # the families this project runs
DEFAULT = SD1  # what a model of no recognisable family is treated as (tiny test models, the lab's)
KNOWN: tuple[KnownFamily, ...] = (SD1, SD2, SDXL, SD3)
TITLES = {**{f.id: f.title for f in KNOWN}, UNKNOWN: "an unknown model"}


def get(family_id: str) -> ModelFamily:
    """The family with this id; ``KeyError`` naming the ones there are for any other."""
    for family in FAMILIES:
        if family.id == family_id:
            return family
    raise KeyError(f"no model family {family_id!r}; known: {', '.join(f.id for f in FAMILIES)}")


def or_default(family_id: str) -> ModelFamily:
    """The family with this id when this project runs it, else the default one (whose names an
    unknown or unsupported model is read with, so its files are refused by family, not by name)."""
    return next((f for f in FAMILIES if f.id == family_id), DEFAULT)


def owner(name: str) -> ModelFamily | None:
    """The family whose canonical layer names include ``name`` (they never collide); for another
    accepted spelling, the first family (default first) that accepts it."""
    exact = next((f for f in FAMILIES if name in f.layers), None)
    return exact or next((f for f in FAMILIES if f.canonical(name) is not None), None)


def find_layer(name: str) -> Layer | None:
    """The :class:`Layer` a canonical name (or an accepted spelling of one) names."""
    family = owner(name)
    return family.layers[family.canonical(name)] if family is not None else None


# -- detection -------------------------------------------------------------------------------------
def by_context_width(width: int) -> str:
    """The family whose UNet cross-attends to a context this wide (``unknown`` if none)."""
    return next((f.id for f in KNOWN if f.context_width == width), UNKNOWN)


def by_tower_width(width: int) -> str | None:
    return next((f.id for f in KNOWN if f.tower_width == width), None)


def by_text_depth(layers: int) -> str | None:
    """A one-tower text encoder deeper than SD1's is SD2's (23 layers, the same names)."""
    return SD2.id if layers > SD1.towers[0].layers else None


def of_lora_names(keys: Any) -> str | None:
    """The family whose LoRA files alone use one of these key prefixes, if any."""
    for family in KNOWN:
        if family.lora_markers and any(k.startswith(family.lora_markers) for k in keys):
            return family.id
    return None


def of_checkpoint(shapes: Mapping[str, tuple[int, ...]]) -> str:
    """The family id of an ldm/sgm checkpoint (or a WebUI model's state-dict keys)."""
    keys = shapes.keys()
    for family in KNOWN:
        if family.checkpoint_markers and any(k.startswith(family.checkpoint_markers) for k in keys):
            return family.id
    context = shapes.get(f"{LDM_UNET}input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
    if context is not None:
        return by_context_width(context[-1])
    return DEFAULT.id if any(k.startswith(LDM_UNET) for k in keys) else UNKNOWN


def of_training_metadata(text: str) -> str | None:
    """The family a trainer's architecture string names (kohya's ``ss_base_model_version``,
    ``modelspec.architecture``), e.g. ``sdxl_base_v1-0``, ``stable-diffusion-v1/lora``."""
    text = text.lower()
    if "xl" in text:
        return SDXL.id
    if re.search(r"(?:^|[^a-z0-9])(?:sd_?)?v2|diffusion-v2", text):
        return SD2.id
    if re.search(r"(?:^|[^a-z0-9])(?:sd_?)?v1|diffusion-v1", text):
        return SD1.id
    return None


def of_v2_flag(value: str) -> str | None:
    """kohya's ``ss_v2`` metadata: ``"True"`` for SD2, ``"False"`` for SD1."""
    value = value.lower()
    return {"true": SD2.id, "false": SD1.id}.get(value)


def of_host(sd_model: Any) -> str | None:
    """The title of the family the WebUI flags its loaded model with, when that is not the
    default's (A1111 1.8: ``is_sd1``/``is_sd2``/``is_sdxl``; 1.10 adds ``is_sd3``); ``None`` when
    the host flags it as the default family or flags nothing."""
    for family in reversed(KNOWN):  # the newest flag first: an SD3 model may carry older flags too
        if family is not DEFAULT and family.host_flag and getattr(sd_model, family.host_flag, False):
            return family.title
    if getattr(sd_model, DEFAULT.host_flag, True) is False:
        return f"not {DEFAULT.title}"
    return None
