"""One parser per LoRA format, one contract: ``parser(LayerEntries) -> module | None``.

Every parser reads one layer's tensors by suffix and builds its module (``modules.py``, where the
formulas are), or declines; the first that accepts names the format. Key suffixes are owned here.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from lib_loraclr.lora.modules import LohaModule, LokrModule, LoraModule, LowRankModule, lokr_rank

# -- parsers: one layer's tensors -> a module, or None ---------------------------------------------
LOW_RANK_SUFFIXES = {
    "lora_up.weight": "up",
    "lora_down.weight": "down",
    "lora_mid.weight": "mid",
    "lora_B.weight": "up",
    "lora_A.weight": "down",
    "lora.up.weight": "up",
    "lora.down.weight": "down",
    "lora_linear_layer.up.weight": "up",
    "lora_linear_layer.down.weight": "down",
}
LOHA_SUFFIXES = {
    "hada_w1_a": "w1a",
    "hada_w1_b": "w1b",
    "hada_w2_a": "w2a",
    "hada_w2_b": "w2b",
    "hada_t1": "t1",
    "hada_t2": "t2",
}
LOKR_SUFFIXES = {
    "lokr_w1": "w1",
    "lokr_w1_a": "w1a",
    "lokr_w1_b": "w1b",
    "lokr_w2": "w2",
    "lokr_w2_a": "w2a",
    "lokr_w2_b": "w2b",
    "lokr_t2": "t2",
}
SCALAR_SUFFIXES = ("alpha", "scale")
ALL_SUFFIXES = sorted(
    [*LOW_RANK_SUFFIXES, *LOHA_SUFFIXES, *LOKR_SUFFIXES, *SCALAR_SUFFIXES], key=len, reverse=True
)
# diffusers' old attention-processor names: ``attn1.processor.to_q_lora.down.weight`` is the
# ``attn1.to_q`` layer's ``lora.down.weight``.
_PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora\.")


def split_key(key: str) -> tuple[str, str] | None:
    """``(module part, suffix)`` of a file key, or ``None`` if no known suffix ends it."""
    key = _PROCESSOR.sub(lambda m: f".{m.group(1)}{'.0' if m.group(1) == 'to_out' else ''}.lora.", key)
    for suffix in ALL_SUFFIXES:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    return None


@dataclass(frozen=True)
class LayerEntries:
    """What every parser is given: one layer's entries of a LoRA file.

    ``tensors`` and ``keys`` are keyed by suffix (``lora_down.weight``, ``hada_w1_a``, ``alpha``);
    ``style`` is the file's naming style (``kohya`` or ``diffusers``); ``target_shape`` the model
    weight's shape when the caller knows it. A header-only read passes ``meta`` tensors: a parser
    reads shapes, never values, except the scalars (whose value is then unknown: nan).
    """

    name: str
    tensors: Mapping[str, torch.Tensor]
    keys: Mapping[str, str]
    style: str = "kohya"
    target_shape: tuple[int, ...] | None = None

    def fields(self, table: Mapping[str, str]) -> dict[str, torch.Tensor]:
        return {table[s]: t for s, t in self.tensors.items() if s in table}

    def used_keys(self, table: Mapping[str, str]) -> tuple[str, ...]:
        return tuple(k for s, k in self.keys.items() if s in table or s in SCALAR_SUFFIXES)

    def scale(self, rank: int | None) -> float:
        """``scale`` if given, else ``alpha / rank``, else 1 (alpha = rank)."""
        if "scale" in self.tensors:
            value, divisor = self.tensors["scale"], 1
        elif "alpha" in self.tensors and rank:
            value, divisor = self.tensors["alpha"], rank
        else:
            return 1.0
        return math.nan if value.is_meta else float(value) / divisor


Parser = Callable[[LayerEntries], "LoraModule | None"]


def parse_low_rank(layer: LayerEntries) -> LoraModule | None:
    """kohya LoRA/LoCon, diffusers and PEFT: ``up`` and ``down`` (and LoCon's CP ``mid``)."""
    fields = layer.fields(LOW_RANK_SUFFIXES)
    if "up" not in fields or "down" not in fields:
        return None
    up, down, mid = fields["up"], fields["down"], fields.get("mid")
    suffixes = layer.tensors.keys()
    if "lora_A.weight" in suffixes:
        fmt = "peft"
    elif layer.style == "diffusers" or any(s.startswith(("lora.", "lora_linear_layer.")) for s in suffixes):
        fmt = "diffusers"
    elif (
        mid is not None
        or (down.dim() == 4 and down.shape[-1] > 1)
        or "_resnets_" in layer.name
        or "samplers_" in layer.name
    ):
        fmt = "locon"
    else:
        fmt = "lora"
    rank = int(down.shape[0])
    return LowRankModule(
        layer.name, fmt, layer.used_keys(LOW_RANK_SUFFIXES), layer.scale(rank), up=up, down=down, mid=mid
    )


def parse_loha(layer: LayerEntries) -> LoraModule | None:
    """LyCORIS LoHa: ``hada_w{1,2}_{a,b}`` (and Tucker ``hada_t{1,2}``)."""
    fields = layer.fields(LOHA_SUFFIXES)
    if not {"w1a", "w1b", "w2a", "w2b"} <= fields.keys():
        return None
    scale = layer.scale(int(fields["w1b"].shape[0]))
    return LohaModule(layer.name, "loha", layer.used_keys(LOHA_SUFFIXES), scale, **fields)


def parse_lokr(layer: LayerEntries) -> LoraModule | None:
    """LyCORIS LoKr: ``lokr_w1`` or ``lokr_w1_{a,b}``, and ``lokr_w2`` or ``lokr_w2_{a,b}`` (``lokr_t2``)."""
    fields = layer.fields(LOKR_SUFFIXES)
    has_w1 = "w1" in fields or {"w1a", "w1b"} <= fields.keys()
    has_w2 = "w2" in fields or {"w2a", "w2b"} <= fields.keys()
    if not (has_w1 and has_w2):
        return None
    scale = layer.scale(lokr_rank(fields.get("w1b"), fields.get("w2b")))
    return LokrModule(
        layer.name, "lokr", layer.used_keys(LOKR_SUFFIXES), scale, target_shape=layer.target_shape, **fields
    )


PARSERS: tuple[Parser, ...] = (parse_low_rank, parse_loha, parse_lokr)
FORMATS_TRIED = ("kohya LoRA/LoCon", "diffusers/PEFT LoRA", "LyCORIS LoHa", "LyCORIS LoKr")


def parse_layer(layer: LayerEntries) -> LoraModule | None:
    """The first parser's module that accepts ``layer``, or ``None`` when none does."""
    for parser in PARSERS:
        module = parser(layer)
        if module is not None:
            return module
    return None


def input_features(shapes: Mapping[str, tuple[int, ...]]) -> int | None:
    """A layer's input features from its factor shapes (suffix -> shape), without parsing it."""
    for suffix, shape in shapes.items():
        if len(shape) >= 2 and (
            LOW_RANK_SUFFIXES.get(suffix) == "down" or LOHA_SUFFIXES.get(suffix) in ("w1b", "w2b")
        ):
            return int(shape[1])
    sides = {
        LOKR_SUFFIXES[s][:2]: int(shape[1])
        for s, shape in shapes.items()
        if LOKR_SUFFIXES.get(s) in ("w1", "w1b", "w2", "w2b") and len(shape) >= 2
    }
    if "w1" in sides and "w2" in sides:
        return sides["w1"] * sides["w2"]
    return None
