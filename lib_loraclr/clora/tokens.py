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
from collections.abc import Callable, Mapping, Sequence
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
    prompt: str,
    ids: Callable[[str], Sequence[int]],
    comma_backtrack: int = 20,
    embeddings: Mapping[str, int] | None = None,
) -> TokenizedPrompt:
    """Tokens, chunks and context positions of ``prompt`` as the WebUI builds its conditioning.

    ``ids(unit)`` tokenises one pre-token unit without start/end tokens (cached by the caller).
    ``embeddings`` maps each textual-inversion embedding's name to its number of vectors (the
    host's embedding database): where a name's tokens appear, the WebUI puts that many vectors
    instead (placeholder id 0, the unit of the name's first token), moving to a new chunk first
    when they do not fit in the current one, as its ``tokenize_line`` does."""
    lookup = _embedding_lookup(embeddings or {}, ids)
    chunks: list[list[tuple[int, float, int]]] = [[]]
    units: list[tuple[str, int]] = []
    last_comma = -1
    for fragment in _fragments(prompt):
        if fragment.weight == -1.0:  # BREAK
            chunks.append([])
            last_comma = -1
            continue
        flat: list[tuple[int, int, bool]] = []  # (token, unit, is a comma)
        for m in _UNIT.finditer(fragment.text):
            unit = len(units)
            units.append((m.group(0), fragment.source[m.start()] if fragment.source else -1))
            flat += [(int(token), unit, m.group(0) == ",") for token in ids(m.group(0))]
        position = 0
        while position < len(flat):
            token, unit, comma = flat[position]
            chunk = chunks[-1]
            if comma:
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
            name_length, vectors = _embedding_at(lookup, [t for t, _, _ in flat], position)
            if not name_length:
                chunks[-1].append((token, float(fragment.weight), unit))
                position += 1
                continue
            if len(chunks[-1]) + vectors > CHUNK:
                chunks.append([])
                last_comma = -1
            chunks[-1] += [(0, float(fragment.weight), unit)] * vectors
            position += name_length
    tokens = tuple(
        Token(i, w, c * (CHUNK + 2) + 1 + k, u)
        for c, chunk in enumerate(chunks)
        for k, (i, w, u) in enumerate(chunk)
    )
    return TokenizedPrompt(
        tokens, tuple(tuple((i, w) for i, w, _ in chunk) for chunk in chunks), tuple(units)
    )


def _embedding_lookup(
    embeddings: Mapping[str, int], ids: Callable[[str], Sequence[int]]
) -> dict[int, list[tuple[tuple[int, ...], int]]]:
    """First token id -> ``(the name's token ids, vectors)``, longest names first (the host's
    ``ids_lookup``: a longer name wins over its own prefix)."""
    lookup: dict[int, list[tuple[tuple[int, ...], int]]] = {}
    for name, vectors in embeddings.items():
        name_ids = tuple(int(t) for m in _UNIT.finditer(name) for t in ids(m.group(0)))
        if name_ids and int(vectors) > 0:
            lookup.setdefault(name_ids[0], []).append((name_ids, int(vectors)))
    for entries in lookup.values():
        entries.sort(key=lambda entry: len(entry[0]), reverse=True)
    return lookup


def _embedding_at(
    lookup: dict[int, list[tuple[tuple[int, ...], int]]], tokens: list[int], position: int
) -> tuple[int, int]:
    """``(tokens of the embedding name at position, its vectors)``, or ``(0, 0)``."""
    for name_ids, vectors in lookup.get(tokens[position], ()):
        if tuple(tokens[position : position + len(name_ids)]) == name_ids:
            return len(name_ids), vectors
    return 0, 0


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
