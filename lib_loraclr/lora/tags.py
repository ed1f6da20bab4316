"""The ``<lora:NAME:...>`` prompt tag, as A1111's built-in Lora reads it; the one place that knows it.

``<lora:NAME>``, ``<lora:NAME:W>`` (text encoder and UNet), ``<lora:NAME:TE:UNET>`` and the
keyword forms ``te=``, ``unet=``, ``dyn=`` (``dyn`` is accepted and ignored: no dynamic rank
here). The UNet weight defaults to the text encoder's, both default to 1. ``<LORA:`` is the same
tag (the built-in's pattern ignores case). Weights outside ``-MAX_WEIGHT..MAX_WEIGHT`` are refused.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterator
from dataclasses import dataclass

from lib_loraclr.errors import PromptError

TAG = re.compile(r"<lora:([^>]*)>", re.IGNORECASE)
_OPEN = re.compile(r"<lora:", re.IGNORECASE)
MAX_WEIGHT = 10.0
KEYWORDS = ("te", "unet", "dyn")


@dataclass(frozen=True)
class LoraTag:
    """One tag: the LoRA's name, its two weights and where the tag sits in the text."""

    name: str
    te: float
    unet: float
    start: int
    end: int


def tag_name(body: str) -> str:
    """The LoRA name of a tag's body (the text between ``<lora:`` and ``>``), without parsing weights."""
    return body.split(":", 1)[0].strip()


def parse_tag(body: str) -> tuple[str, float, float]:
    """``(name, te, unet)`` of a tag's body; :class:`PromptError` naming the tag if it is malformed."""
    parts = [p.strip() for p in body.split(":")]
    name = parts[0]
    if not name:
        raise PromptError("a <lora:...> tag has no name; write it as <lora:NAME:WEIGHT>")
    te = unet = None
    positional = []
    for part in parts[1:]:
        if "=" in part:
            key, _, value = part.partition("=")
            key = key.strip().lower()
            if key not in KEYWORDS:
                raise PromptError(f"<lora:{body}>: unknown argument {key!r} (use te=, unet=, dyn=)")
            if key == "te":
                te = _weight(value.strip(), body)
            elif key == "unet":
                unet = _weight(value.strip(), body)
        elif part:
            positional.append(_weight(part, body))
    if positional:  # A1111: <lora:NAME:TE:UNET:DYN>; UNET defaults to TE
        te = positional[0] if te is None else te
        unet = (positional[1] if len(positional) > 1 else positional[0]) if unet is None else unet
    te = 1.0 if te is None else te
    unet = te if unet is None else unet
    return name, te, unet


def _weight(text: str, body: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise PromptError(f"<lora:{body}>: the weight {text!r} is not a number") from None
    if not -MAX_WEIGHT <= value <= MAX_WEIGHT:  # also refuses nan
        raise PromptError(f"<lora:{body}>: weight {value} is outside -{MAX_WEIGHT}..{MAX_WEIGHT}")
    return value


def find_tags(text: str) -> Iterator[LoraTag]:
    """Every tag of ``text`` in order, parsed (the first malformed one raises)."""
    for match in TAG.finditer(text):
        name, te, unet = parse_tag(match.group(1))
        yield LoraTag(name, te, unet, match.start(), match.end())


def has_unclosed_tag(text: str) -> bool:
    """Whether ``text`` (with its closed tags already removed) still opens a tag."""
    return _OPEN.search(text) is not None


def remove_tags(text: str, names: Collection[str]) -> str:
    """``text`` without the tags of the LoRAs in ``names``; other tags stay as written."""
    return TAG.sub(lambda m: "" if tag_name(m.group(1)) in names else m.group(0), text)
