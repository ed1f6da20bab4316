"""Layer names: kohya module names (canonical) <-> diffusers/transformers paths <-> ldm (WebUI) paths.

Every LoRA format names its target layers differently: kohya files use a module path with
underscores, diffusers/PEFT files the dotted diffusers path, the WebUI's model the original ldm
path (``model.diffusion_model.input_blocks.1.1.proj_in``). We name every layer by its canonical
kohya name and convert at the edges, so routing, merging and attention capture never care which
runtime built the model.

The names themselves are the model family's (:mod:`lib_loraclr.families`): its tables, generated
from the architecture, hold every layer under all of its names. This module is the LoRA side's
view of them; each function takes the family (the default one when the caller has no model in
hand) and layer maps are built from the model's own module names.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from lib_loraclr.families import DEFAULT, FAMILIES, ModelFamily
from lib_loraclr.families.family import LDM_UNET, UNET_PREFIX

if TYPE_CHECKING:  # torch is imported only where a layer map is built: ``inspect`` reads headers only
    from torch import nn

__all__ = ["LDM_UNET", "UNET_PREFIX"]
TE_PREFIX = DEFAULT.towers[0].kohya
LDM_TEXT_ROOT = DEFAULT.towers[0].ldm
LDM_TEXT = LDM_TEXT_ROOT + "text_model."


def is_text_layer(name: str) -> bool:
    """Whether a canonical name is a text-encoder layer (A1111's ``te`` multiplier applies)."""
    return any(family.is_text_layer(name) for family in FAMILIES)


def _side(family: ModelFamily, tower: int) -> str:
    return "unet" if tower < 0 else ("te" if tower == 0 else f"te{tower + 1}")


def _tower(family: ModelFamily, side: str) -> int:
    if side == "unet":
        return -1
    index = 0 if side == "te" else int(side[2:]) - 1
    if not 0 <= index < len(family.towers):
        raise ValueError(f"{family.title} has no text tower {side!r}")
    return index


def peft_prefix(side: str, family: ModelFamily = DEFAULT) -> str:
    """The key prefix diffusers/PEFT files give a side's modules: ``unet.``, ``text_encoder.``, ..."""
    tower = _tower(family, side)
    return "unet." if tower < 0 else family.towers[tower].peft


def normalise_kohya_name(name: str, family: ModelFamily = DEFAULT) -> str:
    """The canonical spelling of a kohya name (unchanged when the family has no such layer)."""
    return family.canonical(name) or name


def kohya_to_diffusers(name: str, family: ModelFamily = DEFAULT) -> tuple[str, str] | None:
    """``(side, module path)`` of a kohya module name, or ``None`` if the family has no such layer.

    ``side`` is ``"unet"``, ``"te"`` (first text tower) or ``"te2"``; a text path carries
    ``text_model.`` (transformers 4 layout).
    """
    canonical = family.canonical(name)
    if canonical is None:
        return None
    layer = family.layers[canonical]
    tower = family.towers.index(layer.tower) if layer.tower is not None else -1
    return _side(family, tower), layer.diffusers


def diffusers_to_kohya(side: str, path: str, family: ModelFamily = DEFAULT) -> str | None:
    """Canonical name of a diffusers (``side`` ``"unet"``) or transformers module path, or ``None``."""
    return family.from_diffusers(_tower(family, side), path)


def kohya_to_ldm(name: str, family: ModelFamily = DEFAULT) -> str | None:
    """The WebUI (ldm) module path of a kohya module name, or ``None`` if unknown (or a fused
    q/k/v row block, which has no module of its own: see :func:`ldm_target`)."""
    canonical = family.canonical(name)
    if canonical is None or family.layers[canonical].rows is not None:
        return None
    return family.layers[canonical].ldm_key.removesuffix(".weight")


def ldm_target(name: str, family: ModelFamily = DEFAULT) -> tuple[str, tuple[int, int] | None] | None:
    """The checkpoint key of a layer's weight and, for a fused q/k/v layer, its row block."""
    canonical = family.canonical(name)
    if canonical is None:
        return None
    layer = family.layers[canonical]
    return layer.ldm_key, layer.rows


def sd1_layer_names(text_layers: int = 12, family: ModelFamily = DEFAULT) -> list[str]:
    """Every canonical name a LoRA/LoCon can target on the family's architecture (text towers of
    ``text_layers`` layers). Names that an actual model lacks (e.g. ``conv_shortcut`` where the
    widths do not change) are filtered by the caller's model."""
    return [
        name
        for name, layer in family.layers.items()
        if layer.tower is None or int(layer.diffusers.split(".")[3]) < text_layers
    ]


def _is_weight_layer(module: nn.Module) -> bool:
    from torch import nn

    return isinstance(module, (nn.Linear, nn.Conv2d))


def layer_map_ldm(root: nn.Module, family: ModelFamily = DEFAULT) -> dict[str, nn.Module]:
    """Canonical name -> live ``Linear``/``Conv2d`` of a WebUI-style (ldm-named) model, from the
    model's own module names. ``root`` is the WebUI's ``sd_model``; a text tower is found at any of
    the roots the family lists for it (A1111's prompt hijack wraps the embedder; transformers 5
    drops ``text_model.``)."""
    modules = dict(root.named_modules())
    found: dict[str, nn.Module] = {}
    for name, layer in family.layers.items():
        if layer.rows is not None:
            continue
        path = layer.ldm_key.removesuffix(".weight")
        candidates = [path]
        if layer.tower is not None:
            roots = family.host_text_roots[family.towers.index(layer.tower)]
            rest = path[len(layer.tower.ldm + "text_model.") :]
            candidates += [prefix + rest for prefix in roots]
        module = next((modules[c] for c in candidates if c in modules), None)
        if module is not None and _is_weight_layer(module):
            found[name] = module
    return found


def layer_map_diffusers(
    unet: nn.Module | None, *text_encoders: nn.Module | None, family: ModelFamily = DEFAULT
) -> dict[str, nn.Module]:
    """Canonical name -> live ``Linear``/``Conv2d`` of diffusers/transformers modules (the text
    encoders in the family's tower order)."""
    found: dict[str, nn.Module] = {}
    parts = [(-1, unet), *enumerate(text_encoders)]
    for tower, module_root in parts:
        if module_root is None:
            continue
        for path, module in module_root.named_modules():
            if path and _is_weight_layer(module) and (name := family.from_diffusers(tower, path)) is not None:
                found[name] = module
    return found


def resolve_against_keys(
    names: Iterable[str], ldm_shapes: Mapping[str, tuple[int, ...]], family: ModelFamily = DEFAULT
) -> tuple[list[str], list[str]]:
    """Split canonical names into those whose weight is in ``ldm_shapes`` and the rest."""
    resolved, unresolved = [], []
    for name in names:
        (resolved if family.weight_shape(name, ldm_shapes) is not None else unresolved).append(name)
    return resolved, unresolved


def ldm_weight_shape(
    name: str, ldm_shapes: Mapping[str, tuple[int, ...]], family: ModelFamily = DEFAULT
) -> tuple[int, ...] | None:
    """The base weight shape of a canonical layer in a checkpoint's key->shape table."""
    return family.weight_shape(name, ldm_shapes)


# -- full state-dict keys -------------------------------------------------------------------------
def unet_diffusers_to_ldm(key: str, family: ModelFamily = DEFAULT) -> str:
    """A diffusers ``UNet2DConditionModel`` state-dict key -> its ldm checkpoint key. Raises
    ``KeyError`` for a key the family does not have, so a converter never silently drops a tensor."""
    return family.unet_key_to_ldm(key)


def unet_ldm_to_diffusers(key: str, family: ModelFamily = DEFAULT) -> str:
    """Inverse of :func:`unet_diffusers_to_ldm`; ``key`` may carry ``model.diffusion_model.``."""
    return family.unet_key_from_ldm(key)


def transformers_text_prefix(text_encoder: object) -> str:
    """``"text_model."`` where ``CLIPTextModel`` nests its tower (transformers 4), else ``""`` (5)."""
    return "text_model." if hasattr(text_encoder, "text_model") else ""


_TEXT_PARTS = ("embeddings.", "encoder.layers.", "final_layer_norm.")


def te_ldm_to_transformers(key: str, prefix: str = "text_model.", family: ModelFamily = DEFAULT) -> str:
    """ldm key of the family's first (CLIP-L) tower -> ``CLIPTextModel`` state-dict key (``prefix``
    from :func:`transformers_text_prefix`). Old checkpoints without ``text_model.`` are accepted."""
    root = family.towers[0].ldm
    rest = key[len(root) :].removeprefix("text_model.") if key.startswith(root) else ""
    if not rest.startswith(_TEXT_PARTS):
        raise KeyError(f"not an {family.title} text-encoder key (ldm layout): {key}")
    return prefix + rest


def te_transformers_to_ldm(key: str, family: ModelFamily = DEFAULT) -> str:
    """``CLIPTextModel`` state-dict key (with or without ``text_model.``) -> ldm checkpoint key."""
    if not key.removeprefix("text_model.").startswith(_TEXT_PARTS):
        raise KeyError(f"not a CLIP text-encoder key: {key}")
    return family.towers[0].source(key).key
