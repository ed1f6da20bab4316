"""What a user asks the merge tab or the API for, validated at the boundary.

The WebUI tab, the API route and the CLI all turn their inputs into one :class:`MergeRequest`;
every message names the value at fault and the fix, so the three front ends report alike.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lib_loraclr.errors import LoraClrError, PromptError
from lib_loraclr.lora.safetensors_io import PICKLE_SUFFIXES
from lib_loraclr.lora.tags import MAX_WEIGHT, find_tags
from lib_loraclr.merge.gram import MARGIN_SCALES
from lib_loraclr.merge.options import DTYPES, GROUPS, METHODS
from lib_loraclr.merge.precision import PRECISIONS
from lib_loraclr.merge.sizes import parse_size

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._()\[\]+-]*$")

# Advanced parameters, their paper/reference defaults and allowed ranges (validated here once).
PARAM_RANGES: dict[str, tuple[float, float]] = {
    "iterations": (0, 10_000),
    "lr": (0.0, 1.0),
    "margin": (0.0, 1e6),
    "lambda_delta": (0.0, 1e6),
    "lambda_mse": (0.0, 1e6),
    "seed": (0, 2**31 - 1),
    "steps": (1, 200),
    "resolution": (64, 2048),
    "weight_decay": (0.0, 1.0),
    "lambda_con": (0.0, 1e6),
    "ridge": (0.0, 1e3),
    "cfg_scale": (1.0, 30.0),
}
_INT_PARAMS = ("iterations", "seed", "steps", "resolution")
_BOOL_PARAMS = ("lsq_init", "model_level")
_CHOICE_PARAMS = {"precision": PRECISIONS, "margin_scale": MARGIN_SCALES}


class MergeRequestError(LoraClrError, ValueError):
    """Bad merge input (name, weight, option); the message says which and how to fix it.

    ``status`` is the HTTP status the API answers with: 400 bad value, 404 unknown LoRA or
    checkpoint, 409 the output exists and overwrite is off.
    """

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class LoraChoice:
    name: str
    weight: float = 1.0
    concept: str | None = None


@dataclass(frozen=True)
class MergeRequest:
    loras: tuple[LoraChoice, ...]
    output_name: str
    base: str | None = None
    method: str = "loraclr"
    overwrite: bool = False
    dtype: str = "fp16"
    lora_rank: int = 0
    params: Mapping[str, Any] = field(default_factory=dict)
    max_memory: int | None = (
        None  # bytes the merge may add on its device; None: its free memory less a margin
    )
    estimate: bool = False  # only plan the memory, merge nothing


def parse_lora_tags(text: str) -> list[LoraChoice]:
    """``<lora:NAME:WEIGHT>`` entries pasted from a prompt; a tag's text-encoder weight (its first)
    is the LoRA's weight in the merge."""
    try:
        return [LoraChoice(tag.name, tag.te) for tag in find_tags(text or "")]
    except PromptError as error:
        raise MergeRequestError(str(error)) from None


def sanitise_output_name(name: str) -> str:
    """A bare ``.safetensors`` file name: no folders, no traversal, no other extension."""
    name = (name or "").strip()
    if not name:
        raise MergeRequestError("output name is empty; type a name such as 'cat_and_dog_merge'")
    if any(sep in name for sep in ("/", "\\", "\0")) or name in (".", "..") or ".." in name:
        raise MergeRequestError(f"output name {name!r} must be a plain file name without folders or '..'")
    stem = name[: -len(".safetensors")] if name.lower().endswith(".safetensors") else name
    if Path(stem).suffix.lower() in PICKLE_SUFFIXES:
        raise MergeRequestError(f"output name {name!r}: merges are saved as .safetensors only")
    if not _SAFE_NAME.match(stem) or len(stem) > 150:
        raise MergeRequestError(
            f"output name {name!r} may use letters, digits, spaces and . _ - ( ) [ ] + (at most 150 characters)"
        )
    return stem + ".safetensors"


def build_request(
    loras: Sequence[LoraChoice | Mapping[str, Any]],
    output_name: str,
    *,
    base: str | None = None,
    method: str = "loraclr",
    overwrite: bool = False,
    dtype: str = "fp16",
    lora_rank: int = 0,
    params: Mapping[str, Any] | None = None,
    max_memory: str | int | None = None,
    estimate: bool = False,
) -> MergeRequest:
    """Validate everything that can be checked without touching files."""
    budget = None
    if max_memory not in (None, "", 0):
        try:
            budget = parse_size(max_memory)
        except ValueError as error:
            raise MergeRequestError(f"max_memory: {error}") from None
    choices = []
    for entry in loras:
        if isinstance(entry, Mapping):
            if not entry.get("name"):
                raise MergeRequestError("every LoRA entry needs a 'name'")
            weight = entry.get("weight", 1.0)
            try:
                weight = 1.0 if weight is None else float(weight)
            except (TypeError, ValueError):
                raise MergeRequestError(f"{entry['name']}: weight {weight!r} is not a number") from None
            entry = LoraChoice(str(entry["name"]), weight, entry.get("concept") or None)
        if not entry.name.strip():
            raise MergeRequestError("a LoRA row has no name; pick a LoRA or delete the row")
        if not (-MAX_WEIGHT <= entry.weight <= MAX_WEIGHT):
            raise MergeRequestError(
                f"{entry.name}: weight {entry.weight} is outside -{MAX_WEIGHT:g}..{MAX_WEIGHT:g}"
            )
        choices.append(entry)
    if not choices:
        raise MergeRequestError("no LoRAs chosen; add at least one <lora:NAME:WEIGHT> entry")
    names = [c.name for c in choices]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise MergeRequestError(f"LoRA {duplicates[0]!r} is listed twice; each concept needs its own LoRA")
    if method not in METHODS:
        raise MergeRequestError(f"method {method!r} is not one of {', '.join(METHODS)}")
    if dtype not in DTYPES:
        raise MergeRequestError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    try:
        lora_rank = int(lora_rank or 0)
    except (TypeError, ValueError):
        raise MergeRequestError(
            f"LoRA export rank {lora_rank!r} is not a whole number (0 = no LoRA export)"
        ) from None
    if not (0 <= lora_rank <= 1024):
        raise MergeRequestError(f"LoRA export rank {lora_rank} is outside 0..1024 (0 = no LoRA export)")
    clean_params: dict[str, Any] = {}
    for key, value in dict(params or {}).items():
        if key == "groups":
            clean_params[key] = _groups(value)
            continue
        if key in _CHOICE_PARAMS:
            if value not in _CHOICE_PARAMS[key]:
                raise MergeRequestError(
                    f"parameter {key}={value!r}: use one of {', '.join(_CHOICE_PARAMS[key])}"
                )
            clean_params[key] = value
            continue
        if key in _BOOL_PARAMS:
            if not isinstance(value, bool):
                raise MergeRequestError(f"parameter {key}={value!r} must be true or false")
            clean_params[key] = value
            continue
        if key not in PARAM_RANGES:
            known = ", ".join([*sorted(PARAM_RANGES), *_BOOL_PARAMS, "groups", *_CHOICE_PARAMS])
            raise MergeRequestError(f"unknown parameter {key!r}; known: {known}")
        low, high = PARAM_RANGES[key]
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise MergeRequestError(f"parameter {key}={value!r} is not a number") from None
        if key == "resolution" and number == 0:  # 0: the model's own (as leaving it out)
            continue
        if not (low <= number <= high):
            raise MergeRequestError(f"parameter {key}={value} is outside {low}..{high}")
        if key in _INT_PARAMS and number != int(number):
            raise MergeRequestError(f"parameter {key}={value!r} must be a whole number")
        if key == "resolution" and int(number) % 64:
            raise MergeRequestError(f"parameter resolution={value!r} must be a multiple of 64 (e.g. 512)")
        clean_params[key] = int(number) if key in _INT_PARAMS else number
    return MergeRequest(
        loras=tuple(choices),
        output_name=sanitise_output_name(output_name) if output_name or not estimate else "",
        base=base or None,
        method=method,
        overwrite=bool(overwrite),
        dtype=dtype,
        lora_rank=int(lora_rank),
        params=clean_params,
        max_memory=budget,
        estimate=bool(estimate),
    )


def _groups(value: Any) -> tuple[str, ...]:
    """Layer groups as a tuple of known names (a list, or one comma-separated string)."""
    items = [v.strip() for v in value.split(",")] if isinstance(value, str) else list(value or [])
    unknown = [g for g in items if g not in GROUPS]
    if unknown or not items:
        raise MergeRequestError(f"groups {value!r}: choose one or more of {', '.join(GROUPS)}")
    return tuple(dict.fromkeys(items))


def output_path(request: MergeRequest, folder: str | Path) -> Path:
    """Where the merge goes; refuses to replace an existing file unless asked to."""
    path = Path(folder) / request.output_name
    if path.exists() and not request.overwrite:
        raise MergeRequestError(
            f"{path.name} already exists in {path.parent}; tick 'overwrite' or choose another name", 409
        )
    return path


def resolve_loras(
    request: MergeRequest, find_file: Callable[[str], str | None]
) -> list[tuple[LoraChoice, Path]]:
    """LoRA names -> files through the host's list; unknown names listed together."""
    found, missing = [], []
    for choice in request.loras:
        filename = find_file(choice.name)
        if filename is None:
            missing.append(choice.name)
        else:
            found.append((choice, Path(filename)))
    if missing:
        raise MergeRequestError(
            f"LoRA not found: {', '.join(missing)}; check the name in the Lora tab (click refresh after adding files)",
            404,
        )
    return found


def find_lora_file(networks: Any, name: str) -> str | None:
    """A LoRA's file through the built-in Lora extension's list (by name, then alias)."""
    entry = networks.available_networks.get(name) or networks.available_network_aliases.get(name)
    return entry.filename if entry is not None else None
