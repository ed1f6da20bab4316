"""Load a LoRA file into per-layer modules keyed by canonical (kohya) layer names.

Every key is accounted for: used by a module, or reported as unused with a warning (users need
to know when part of a LoRA is ignored). Problems that make the file unusable raise
:class:`LoraFileError` naming the file, the problem and the fix.
"""

from __future__ import annotations

import logging
import math
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from lib_loraclr import families
from lib_loraclr.errors import LoraFileError
from lib_loraclr.families import ModelFamily
from lib_loraclr.lora import keymap
from lib_loraclr.lora.formats import FORMATS_TRIED, LayerEntries, parse_layer, split_key
from lib_loraclr.lora.metadata import (
    FAMILY_NAMES,
    checkpoint_family,
    lora_family,
    peft_alpha_note,
    require_family,
    trigger_words,
)
from lib_loraclr.lora.modules import LoraModule
from lib_loraclr.lora.safetensors_io import file_sha256, load_tensors, read_header

log = logging.getLogger(__name__)

__all__ = ["FAMILY_NAMES", "LoraFile", "check_base_model", "inspect_lora", "load_lora"]
# diffusers/PEFT prefixes; old ``save_attn_procs`` files and raw PEFT state dicts carry none.
_DIFFUSERS_PREFIXES = ("unet.", "text_encoder.", "text_encoder_2.", "base_model.model.", "")
_UNET_ROOTS = ("down_blocks.", "up_blocks.", "mid_block.", "conv_in", "conv_out", "time_embedding.")
_TEXT_ROOTS = ("text_model.", "encoder.layers.")


@dataclass(eq=False)
class LoraFile:
    """A parsed LoRA: its modules by canonical layer name, and what the file says about itself."""

    path: Path
    name: str
    format: str
    base_model: str
    modules: dict[str, LoraModule]
    unused_keys: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    rank: int | None = None
    alpha: float | None = None
    trigger_words: list[str] = field(default_factory=list)

    @cached_property
    def sha256(self) -> str:
        return file_sha256(self.path)

    @property
    def short_hash(self) -> str:
        """A1111's short hash: the first 10 hex digits of the file's sha256."""
        return self.sha256[:10]

    def text_encoder_modules(self) -> dict[str, LoraModule]:
        return {n: m for n, m in self.modules.items() if keymap.is_text_layer(n)}

    def unet_modules(self) -> dict[str, LoraModule]:
        return {n: m for n, m in self.modules.items() if not keymap.is_text_layer(n)}


def canonical_module_name(part: str, family: ModelFamily = families.DEFAULT) -> tuple[str | None, str]:
    """Canonical layer name of a key's module part on ``family``'s model, and the naming style it
    used (``None``: the family has no such layer)."""
    if part.startswith("lora_"):  # kohya: lora_unet_*, lora_te_*, lora_te1_*, ...
        return family.canonical(part), "kohya"
    for prefix in _DIFFUSERS_PREFIXES:
        if not part.startswith(prefix):
            continue
        path = part[len(prefix) :]
        if prefix.startswith("text_encoder"):
            tower = family.tower_of_prefix(prefix)
            if tower is None:  # a tower this family does not have
                continue
        elif path.startswith(_TEXT_ROOTS):
            tower = 0
        elif prefix == "unet." or path.startswith(_UNET_ROOTS):
            tower = -1
        else:
            continue
        return family.from_diffusers(tower, path), "diffusers"
    return None, "unknown"


def group_keys(
    keys: list[str], family: ModelFamily = families.DEFAULT
) -> tuple[dict[str, dict[str, str]], list[str], Counter[str]]:
    """Group file keys by canonical layer of ``family``: ``{layer: {suffix: key}}``, unused keys,
    naming styles."""
    groups: dict[str, dict[str, str]] = {}
    unused: list[str] = []
    styles: Counter[str] = Counter()
    for key in keys:
        split = split_key(key)
        if split is None:
            unused.append(key)
            continue
        part, suffix = split
        name, style = canonical_module_name(part, family)
        styles[style] += 1
        if name is None:
            unused.append(key)
            continue
        groups.setdefault(name, {})[suffix] = key
    return groups, unused, styles


def parse_layers(
    groups: Mapping[str, Mapping[str, str]],
    tensors: Mapping[str, torch.Tensor],
    style: str,
    target_shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> tuple[dict[str, LoraModule], list[str]]:
    """Every grouped layer through the parsers: the modules, and the keys no module used."""
    modules: dict[str, LoraModule] = {}
    unused: list[str] = []
    for name, suffix_keys in groups.items():
        layer = LayerEntries(
            name,
            {s: tensors[k] for s, k in suffix_keys.items()},
            dict(suffix_keys),
            style,
            (target_shapes or {}).get(name),
        )
        module = parse_layer(layer)
        if module is not None:
            modules[name] = module
        used = set(module.keys) if module is not None else set()
        unused.extend(k for k in suffix_keys.values() if k not in used)
    return modules, unused


def file_format(formats: Counter[str]) -> str:
    """The file's format: its modules' most common one, LoCon if any layer is a LoCon layer."""
    if not formats:
        return "unknown"
    if formats.get("locon") and formats.most_common(1)[0][0] == "lora":
        return "locon"
    return formats.most_common(1)[0][0]


def _drop_host_skipped(path: Path, modules: dict[str, LoraModule], family: ModelFamily) -> list[str]:
    """Remove the layers the WebUI's built-in Lora would skip (so a merge or composition matches
    what the host renders), warn, and return their keys."""
    skipped = family.incomplete_fused(modules)
    if not skipped:
        return []
    log.warning(
        "%s: %d fused text-attention layer(s) lack some of q, k, v and out (e.g. %s); the WebUI skips "
        "such layers, so they are left out here too",
        path.name,
        len(skipped),
        skipped[0],
    )
    return [key for name in skipped for key in modules.pop(name).keys]


def check_base_model(lora: LoraFile, model_family: str) -> None:
    """Refuse a LoRA made for another model family than the loaded model, naming both."""
    require_family(lora.base_model, model_family, lora.path.name)


def load_lora(
    path: str | os.PathLike[str],
    *,
    allow_pickle: bool = False,
    target_shapes: Mapping[str, tuple[int, ...]] | None = None,
    model_family: str | None = None,
    device: str | torch.device = "cpu",
) -> LoraFile:
    """Parse a LoRA file.

    ``target_shapes`` (canonical name -> the model's weight shape) checks that every layer fits;
    ``model_family`` (a family id) names the model the LoRA is for: its layer names are that
    family's, and a LoRA of another family is refused first, with a message naming both (a shape
    check alone would only say "does not fit"). Without it (or with target shapes alone) the model
    is the default family's.
    """
    path = Path(path)
    tensors, metadata = load_tensors(path, allow_pickle=allow_pickle, device=device)
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise LoraFileError(
                path,
                f"tensor {key!r} contains NaN or Inf values; the LoRA is broken (re-train or re-download it)",
            )
    family = families.or_default(model_family or families.DEFAULT.id)
    groups, unused, styles = group_keys(list(tensors), family)
    style = styles.most_common(1)[0][0] if styles else "unknown"
    modules, not_parsed = parse_layers(groups, tensors, style, target_shapes)
    unused += not_parsed + _drop_host_skipped(path, modules, family)
    base_model = lora_family({k: tuple(t.shape) for k, t in tensors.items()}, metadata)
    if model_family is not None or target_shapes is not None or not modules:
        require_family(base_model, model_family or families.DEFAULT.id, path.name)
    if not modules:
        example = ", ".join(sorted(tensors)[:3]) or "(no tensors)"
        raise LoraFileError(
            path,
            f"no known LoRA keys (tried {', '.join(FORMATS_TRIED)}); found e.g. {example}. "
            f"Is this a LoRA for {family.title}?",
        )
    if target_shapes is not None:
        _check_shapes(path, modules, target_shapes)
    if unused:
        log.warning("%s: %d key(s) not used, e.g. %s", path.name, len(unused), ", ".join(sorted(unused)[:3]))
    note = peft_alpha_note(metadata, path.stem)
    if note:
        log.warning(note)
    ranks = Counter(m.rank for m in modules.values() if m.rank)
    alphas = [float(tensors[k]) for g in groups.values() for s, k in g.items() if s == "alpha"]
    return LoraFile(
        path=path,
        name=path.stem,
        format=file_format(Counter(m.format for m in modules.values())),
        base_model=base_model,
        modules=modules,
        unused_keys=sorted(unused),
        metadata=metadata,
        rank=ranks.most_common(1)[0][0] if ranks else None,
        alpha=Counter(alphas).most_common(1)[0][0] if alphas else None,
        trigger_words=trigger_words(path, metadata),
    )


def _check_shapes(
    path: Path, modules: dict[str, LoraModule], target_shapes: Mapping[str, tuple[int, ...]]
) -> None:
    misfits = []
    for name, module in modules.items():
        shape = target_shapes.get(name)
        if shape is None:
            continue
        got = module.shape
        if tuple(got) != tuple(shape) and math.prod(got) != math.prod(shape):
            misfits.append(f"{name} gives {tuple(got)} for a {tuple(shape)} weight")
    if misfits:
        raise LoraFileError(
            path,
            f"{len(misfits)} of {len(modules)} layers do not fit the model (e.g. {misfits[0]}); "
            "the LoRA was made for a different base model",
        )


def inspect_lora(path: str | os.PathLike[str], base: str | os.PathLike[str] | None = None) -> dict:
    """Header-only summary of a LoRA (and how it resolves onto ``base``'s keys): no tensor is read."""
    path = Path(path)
    header = read_header(path)
    shapes = header.shapes()
    base_shapes = read_header(base).shapes() if base is not None else None
    family_id = (
        families.of_checkpoint(base_shapes)
        if base_shapes is not None
        else lora_family(shapes, header.metadata)
    )
    family = families.or_default(family_id)
    groups, unused, styles = group_keys(list(header.tensors), family)
    style = styles.most_common(1)[0][0] if styles else "unknown"
    on_meta = {k: torch.empty(shape, device="meta") for k, shape in shapes.items()}  # shapes, no values
    modules, not_parsed = parse_layers(groups, on_meta, style)
    ranks = Counter(m.rank for m in modules.values() if m.rank)
    result = {
        "file": str(path),
        "format": file_format(Counter(m.format for m in modules.values())),
        "base_model": lora_family(shapes, header.metadata),
        "rank": ranks.most_common(1)[0][0] if ranks else None,
        "modules": len(modules),
        "text_encoder_modules": sum(1 for n in modules if keymap.is_text_layer(n)),
        "unused_keys": len(unused) + len(not_parsed),
        "trigger_words": trigger_words(path, header.metadata),
    }
    if base_shapes is not None:
        resolved, unresolved = keymap.resolve_against_keys(sorted(modules), base_shapes, family)
        result.update(
            base=str(base),
            base_model_of_base=checkpoint_family(base_shapes),
            resolved=len(resolved),
            unresolved=unresolved,
        )
    else:
        result.update(resolved=None, unresolved=[])
    return result
