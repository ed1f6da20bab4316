"""A model family: every fact that differs between SD1.x and SDXL, in one value.

The engines never ask "which family is this?"; they ask the family for the fact (a layer's names,
its merge group and feature scale, the context width, the native resolution, where the text towers
live). Each family's name tables are generated once from its architecture
(:mod:`~lib_loraclr.families.layout`), so every conversion is a lookup.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from lib_loraclr.families.layout import TEXT_LAYER_MODULES, TextTower, UNetLayout, UNetModule, unet_modules

LDM_UNET = "model.diffusion_model."
UNET_PREFIX = "lora_unet_"


@dataclass(frozen=True)
class Layer:
    """One layer a LoRA can target, under every name it has."""

    name: str  # canonical: the kohya module name this family's kohya LoRAs use
    tower: TextTower | None  # None for a UNet layer
    diffusers: str  # diffusers UNet path, or transformers path with ``text_model.``
    ldm_key: str  # its weight's checkpoint key (fused q/k/v: the fused weight)
    rows: tuple[int, int] | None  # the weight's row block when q, k and v are fused
    downscale: int  # feature map size relative to the latent (text layers: 1)
    group: str | None  # merge group: "te" | "cross_kv" | "spatial" | None (convs, top layers)
    kind: str  # "attention" | "resnet" | "sampler" | "top" | "text"


@dataclass(frozen=True)
class KnownFamily:
    """A family we recognise, supported or not: its id, how it is named to users, how to detect it."""

    id: str
    title: str  # "SD1.x"
    example: str = ""  # "SD1.5": what to load
    context_width: int | None = None  # cross-attention context of its UNet
    tower_width: int | None = None  # width of a text tower only this family has
    checkpoint_markers: tuple[str, ...] = ()  # checkpoint key prefixes only this family has
    lora_markers: tuple[str, ...] = ()  # LoRA key prefixes only this family's files use
    host_flag: str = ""  # the WebUI model's flag (``is_sdxl``)


@dataclass(frozen=True, eq=False)
class ModelFamily(KnownFamily):
    """A family this project runs: its architecture and names; see the module docstring."""

    unet: UNetLayout = field(default_factory=lambda: UNetLayout((1,), 1))
    towers: tuple[TextTower, ...] = ()
    kohya_style: str = "diffusers"  # canonical UNet names: "diffusers" or "ldm" paths underscored
    native_resolution: int = 512
    latent_scale: int = 8  # pixels per latent cell
    context_tokens: int = 77  # rows per prompt chunk
    unet_width: int = 320  # channels at the first level (the feature run's widest map)
    config_stem: str = ""  # shipped configs: ``<stem>_<part>.json``
    config_parts: tuple[str, ...] = ("unet", "vae", "text_encoder", "scheduler")
    host_text_roots: tuple[tuple[str, ...], ...] = ()  # per tower: where a host model may keep it
    infer_configs: Callable[..., dict[str, Any]] | None = None  # configs from checkpoint shapes
    size_conditioning: bool = False  # the UNet's vector carries (original, crop, target) sizes
    zero_empty_negative: bool = False  # an empty negative prompt's text parts are zeros (A1111)
    schedule_buffers: bool = True  # its checkpoints carry the noise schedule (ldm's do, sgm's not)

    # -- tables ------------------------------------------------------------------------------------
    @cached_property
    def unet_table(self) -> tuple[UNetModule, ...]:
        return tuple(unet_modules(self.unet))

    @cached_property
    def _unet_d2l(self) -> dict[str, str]:
        return {m.diffusers: m.ldm for m in self.unet_table}

    @cached_property
    def _unet_l2d(self) -> dict[str, str]:
        return {m.ldm: m.diffusers for m in self.unet_table}

    @cached_property
    def layers(self) -> dict[str, Layer]:
        """Canonical name -> :class:`Layer`, for every weight layer of the architecture."""
        out: dict[str, Layer] = {}
        for m in self.unet_table:
            if not m.weight_layer:
                continue
            path = m.diffusers if self.kohya_style == "diffusers" else m.ldm
            name = UNET_PREFIX + path.replace(".", "_")
            group = None
            if m.kind == "attention":
                group = "cross_kv" if m.diffusers.endswith(("attn2.to_k", "attn2.to_v")) else "spatial"
            key = f"{LDM_UNET}{m.ldm}.weight"
            out[name] = Layer(name, None, m.diffusers, key, None, m.downscale, group, m.kind)
        for tower in self.towers:
            for i in range(tower.name_layers or tower.layers):
                for module in TEXT_LAYER_MODULES:
                    name = f"{tower.kohya}text_model_encoder_layers_{i}_{module.replace('.', '_')}"
                    key, rows = tower.ldm_target(i, module)
                    path = f"text_model.encoder.layers.{i}.{module}"
                    out[name] = Layer(name, tower, path, key, rows, 1, "te", "text")
        return out

    @cached_property
    def _aliases(self) -> dict[str, str]:
        """Every accepted kohya spelling -> canonical name: both UNet path styles (kohya writes SD1
        LoRAs with diffusers paths, SDXL LoRAs with ldm paths; converters write the other), and text
        names without ``text_model_`` (older kohya)."""
        out: dict[str, str] = {}
        for name, layer in self.layers.items():
            out[name] = name
            if layer.tower is None:
                ldm = layer.ldm_key[len(LDM_UNET) : -len(".weight")]
                out[UNET_PREFIX + layer.diffusers.replace(".", "_")] = name
                out[UNET_PREFIX + ldm.replace(".", "_")] = name
            else:
                out[name.replace("_text_model_encoder_", "_encoder_", 1)] = name
        return out

    @cached_property
    def _by_diffusers(self) -> dict[tuple[int, str], str]:
        """(tower index or -1 for the UNet, diffusers path) -> canonical name."""
        return {
            (self.towers.index(layer.tower) if layer.tower else -1, layer.diffusers): name
            for name, layer in self.layers.items()
        }

    @cached_property
    def _positions(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.layers)}

    def position(self, name: str) -> int:
        """A canonical layer's place in the order the model runs its layers (UNet: down, middle,
        up, as ldm numbers its blocks); ``KeyError`` for a name the family lacks."""
        return self._positions[name]

    # -- names -------------------------------------------------------------------------------------
    def canonical(self, kohya_name: str) -> str | None:
        """The canonical name of a kohya module name in any accepted spelling, or ``None``."""
        return self._aliases.get(kohya_name)

    def from_diffusers(self, tower: int, path: str) -> str | None:
        """Canonical name of a diffusers (``tower`` -1) or transformers module path, or ``None``."""
        if tower >= 0 and not path.startswith("text_model."):
            path = "text_model." + path
        return self._by_diffusers.get((tower, path))

    def tower_of_prefix(self, prefix: str) -> int | None:
        """Which text tower a diffusers/PEFT file prefix (``text_encoder_2.``) names."""
        return next((i for i, t in enumerate(self.towers) if t.peft == prefix), None)

    def weight_shape(self, name: str, ldm_shapes: Mapping[str, tuple[int, ...]]) -> tuple[int, ...] | None:
        """The base weight shape of a canonical layer in a checkpoint's key -> shape table (a fused
        q/k/v layer: its row block's)."""
        canonical = self.canonical(name)
        if canonical is None:
            return None
        layer = self.layers[canonical]
        shape = ldm_shapes.get(layer.ldm_key)
        if shape is None and layer.tower is not None and not layer.tower.openclip:
            shape = ldm_shapes.get(layer.ldm_key.replace(".text_model.", ".", 1))  # checkpoints without it
        if shape is None:
            return None
        if layer.rows is not None:
            return (layer.rows[1] - layer.rows[0], *tuple(shape)[1:])
        return tuple(shape)

    # -- UNet state-dict keys --------------------------------------------------------------------
    def unet_key_to_ldm(self, key: str) -> str:
        """A diffusers UNet state-dict key -> its checkpoint key; ``KeyError`` if the family lacks it."""
        module, _, leaf = key.rpartition(".")
        if module in self._unet_d2l:
            return f"{LDM_UNET}{self._unet_d2l[module]}.{leaf}"
        raise KeyError(f"not an {self.title} UNet key (diffusers layout): {key}")

    def unet_key_from_ldm(self, key: str) -> str:
        """A checkpoint UNet key (with or without ``model.diffusion_model.``) -> the diffusers key."""
        module, _, leaf = key.removeprefix(LDM_UNET).rpartition(".")
        if module in self._unet_l2d:
            return f"{self._unet_l2d[module]}.{leaf}"
        raise KeyError(f"not an {self.title} UNet key (ldm layout): {key}")

    # -- data the engines read ---------------------------------------------------------------------
    @property
    def text_width(self) -> int:
        """The widest text tower's width (the text feature run's working set)."""
        return max(t.width for t in self.towers)

    @property
    def cross_attention_downscales(self) -> tuple[int, ...]:
        """Feature scales (relative to the latent) at which the UNet has cross-attention."""
        return tuple(sorted({m.downscale for m in self.unet_table if m.diffusers.endswith("attn2.to_k")}))

    def incomplete_fused(self, names: Iterable[str]) -> list[str]:
        """The fused-attention layers among ``names`` that the WebUI would not apply: A1111's
        built-in Lora changes OpenCLIP's ``in_proj_weight`` and ``out_proj`` only when a file has
        q, k, v and out for that layer, and skips the layer otherwise."""
        groups: dict[str, list[str]] = {}
        for name in names:
            layer = self.layers.get(name)
            if (
                layer is not None
                and layer.tower is not None
                and layer.tower.openclip
                and ".self_attn." in layer.diffusers
            ):
                groups.setdefault(layer.diffusers.rsplit(".", 1)[0], []).append(name)
        return sorted(n for group in groups.values() if len(group) < 4 for n in group)

    def is_text_layer(self, name: str) -> bool:
        return any(name.startswith(t.kohya) for t in self.towers)
