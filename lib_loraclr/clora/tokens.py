"""Prompt text -> CLIP tokens at the positions the WebUI's text encoder sees them.

Emphasis (``(cat:1.2)``, ``[x]``, ``\\(``) is parsed A1111's way and kept in the prompts (the
encoder applies the weights, brackets are no tokens); each fragment is cut into CLIP's pre-token
units (the tokenizer's own regex; BPE never crosses them, so per-unit token counts add up to the
whole fragment's); tokens fill 75-token chunks, ``BREAK`` starts a new chunk and a full chunk moves
back to its last comma when that is at most ``comma_backtrack`` (A1111's default 20) tokens back.
Every chunk is framed by a start and an end token, so position = chunk * 77 + 1 + index within the
chunk.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

try:  # the tokenizer's own pre-token pattern (the `regex` package ships with transformers)
    import regex as _regex

    _UNIT = _regex.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+", _regex.IGNORECASE)
except ImportError:  # pragma: no cover - same classes with the standard library's approximations
    _UNIT = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|[^\s\w]+|_+", re.IGNORECASE)

_WEIGHT = re.compile(r":\s*([+-]?[.\d]+)\s*\)")
_BREAK = re.compile(r"\s*\bBREAK\b\s*")
CHUNK = 75
ROUND, SQUARE = 1.1, 1 / 1.1


@dataclass
class _Fragment:
    text: str
    weight: float
    source: list[int]  # offset of each character in the parsed text (-1: none)


def parse_emphasis(text: str) -> list[tuple[str, float]]:
    """A1111's attention syntax: ``(x)`` x1.1, ``[x]`` /1.1, ``(x:w)``, ``\\(`` literal; ``BREAK``
    gives ``("BREAK", -1.0)``. Unmatched brackets are literal (closers) or extend to the end (openers)."""
    return [(f.text, f.weight) for f in _fragments(text)]


def _fragments(text: str) -> list[_Fragment]:
    pieces: list[_Fragment] = []
    round_open: list[int] = []
    square_open: list[int] = []
    i = 0

    def literal(chunk: str, start: int) -> None:
        parts = _BREAK.split(chunk)
        spans = [m.span() for m in _BREAK.finditer(chunk)]
        offset = start
        for k, part in enumerate(parts):
            if k > 0:
                pieces.append(_Fragment("BREAK", -1.0, []))
                offset = start + spans[k - 1][1]
            pieces.append(_Fragment(part, 1.0, list(range(offset, offset + len(part)))))
            offset += len(part)

    def scale(start: int, factor: float) -> None:
        for f in pieces[start:]:
            if f.weight != -1.0:
                f.weight *= factor

    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text) and text[i + 1] in "()[]\\":
            pieces.append(_Fragment(text[i + 1], 1.0, [i + 1]))
            i += 2
        elif c == "(":
            round_open.append(len(pieces))
            i += 1
        elif c == "[":
            square_open.append(len(pieces))
            i += 1
        elif c == ":" and round_open and (m := _WEIGHT.match(text, i)):
            try:
                factor = float(m.group(1))
            except ValueError:
                factor = None
            if factor is None:
                literal(m.group(0), i)
            else:
                scale(round_open.pop(), factor)
            i = m.end()
        elif c == ")" and round_open:
            scale(round_open.pop(), ROUND)
            i += 1
        elif c == "]" and square_open:
            scale(square_open.pop(), SQUARE)
            i += 1
        else:
            j = i + 1
            while j < len(text) and text[j] not in "\\()[]:":
                j += 1
            literal(text[i:j], i)
            i = j
    for start in round_open:
        scale(start, ROUND)
    for start in square_open:
        scale(start, SQUARE)
    merged: list[_Fragment] = []
    for f in pieces:  # A1111 joins neighbours of equal weight before tokenising
        if merged and f.weight == merged[-1].weight and f.weight != -1.0:
            merged[-1].text += f.text
            merged[-1].source += f.source
        elif f.text or f.weight == -1.0:
            merged.append(_Fragment(f.text, f.weight, list(f.source)))
    return merged


@dataclass(frozen=True)
class Token:
    """One token of a tokenised prompt: its id, emphasis weight, context position and source text."""

    id: int
    weight: float
    position: int
    unit: int  # index of the pre-token unit it came from


@dataclass(frozen=True)
class TokenizedPrompt:
    """``chunks[c]`` holds ``(id, weight)`` of up to 75 tokens; ``units[u]`` = (text, start offset)."""

    tokens: tuple[Token, ...]
    chunks: tuple[tuple[tuple[int, float], ...], ...]
    units: tuple[tuple[str, int], ...]

    def unit_positions(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for t in self.tokens:
            out.setdefault(t.unit, []).append(t.position)
        return out


def tokenize_prompt(
    prompt: str, ids: Callable[[str], Sequence[int]], comma_backtrack: int = 20
) -> TokenizedPrompt:
    """Tokens, chunks and context positions of ``prompt`` as the WebUI builds its conditioning.

    ``ids(unit)`` tokenises one pre-token unit without start/end tokens (cached by the caller)."""
    chunks: list[list[tuple[int, float, int]]] = [[]]
    units: list[tuple[str, int]] = []
    last_comma = -1
    for fragment in _fragments(prompt):
        if fragment.weight == -1.0:  # BREAK
            chunks.append([])
            last_comma = -1
            continue
        for m in _UNIT.finditer(fragment.text):
            unit = len(units)
            units.append((m.group(0), fragment.source[m.start()] if fragment.source else -1))
            for token in ids(m.group(0)):
                chunk = chunks[-1]
                if m.group(0) == ",":
                    last_comma = len(chunk)
                elif (
                    comma_backtrack
                    and len(chunk) == CHUNK
                    and last_comma != -1
                    and len(chunk) - last_comma <= comma_backtrack
                ):
                    moved = chunk[last_comma + 1 :]
                    del chunk[last_comma + 1 :]
                    chunks.append(moved)
                    last_comma = -1
                if len(chunks[-1]) == CHUNK:
                    chunks.append([])
                    last_comma = -1
                chunks[-1].append((int(token), float(fragment.weight), unit))
    tokens = tuple(
        Token(i, w, c * (CHUNK + 2) + 1 + k, u)
        for c, chunk in enumerate(chunks)
        for k, (i, w, u) in enumerate(chunk)
    )
    return TokenizedPrompt(
        tokens, tuple(tuple((i, w) for i, w, _ in chunk) for chunk in chunks), tuple(units)
    )


def phrase_units(phrase: str) -> list[str]:
    """The lower-cased pre-token units of ``phrase`` (what a subject is matched by)."""
    return [m.group(0).lower() for m in _UNIT.finditer(phrase)]


class TokenCounter:
    """``unit -> token count`` (what :func:`plan_composition` takes) that also gives the ids."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[str, list[int]] = {}

    def ids(self, text: str) -> list[int]:
        if text not in self._cache:
            self._cache[text] = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return self._cache[text]

    def __call__(self, text: str) -> int:
        return len(self.ids(text))


def tokenizer_counter(tokenizer: Any) -> TokenCounter:
    """Token counts (and ids) of pre-token units with a Hugging Face CLIP tokenizer."""
    return TokenCounter(tokenizer)


def ids_from(count_tokens: Callable[[str], int]) -> Callable[[str], Sequence[int]]:
    if isinstance(count_tokens, TokenCounter):
        return count_tokens.ids
    return lambda unit: [0] * int(count_tokens(unit))
