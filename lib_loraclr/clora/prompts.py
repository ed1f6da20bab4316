"""CLoRA prompt binding: ``<lora:NAME:W>`` right before a subject binds that LoRA to it.

``a <lora:blackcat:1> cat and a <lora:corgi:0.8> dog in the forest, <lora:ghibli:0.6>`` gives
the base prompt ``a cat and a dog in the forest,`` (no LoRA), one variant per bound LoRA with its
trigger before its subject (``a sks cat and a dog in the forest,``), and a style LoRA (``ghibli``:
not followed by a word) for every variant.

Token positions are positions in the text encoder's context exactly as the WebUI builds it, so
the attention maps of the right tokens are read: emphasis (``(cat:1.2)``, ``[x]``, ``\\(``) is
parsed A1111's way and kept in the prompts (the encoder applies the weights, brackets are no
tokens); each fragment is cut into CLIP's pre-token units (the tokenizer's own regex; BPE never
crosses them, so per-unit token counts add up to the whole fragment's); tokens fill 75-token
chunks, ``BREAK`` starts a new chunk and a full chunk moves back to its last comma when that is at
most ``comma_backtrack`` (A1111's default 20) tokens back. Every chunk is framed by a start and an
end token, so position = chunk * 77 + 1 + index within the chunk.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from lib_loraclr.errors import PromptError

try:  # the tokenizer's own pre-token pattern (the `regex` package ships with transformers)
    import regex as _regex

    _UNIT = _regex.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+", _regex.IGNORECASE)
except ImportError:  # pragma: no cover - same classes with the standard library's approximations
    _UNIT = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|[^\s\w]+|_+", re.IGNORECASE)

_TAG = re.compile(r"<lora:([^>]*)>", re.IGNORECASE)
_SUBJECT = re.compile(r"[^\s,;.!?()\[\]{}:<>|\\]+")
_WEIGHT = re.compile(r":\s*([+-]?[.\d]+)\s*\)")
_BREAK = re.compile(r"\s*\bBREAK\b\s*")
CHUNK = 75
_MARK = "\x00"
MAX_WEIGHT = 10.0
ROUND, SQUARE = 1.1, 1 / 1.1


@dataclass(frozen=True)
class Binding:
    """One LoRA bound to one subject (``subject`` may be several words; explicit lists only)."""

    lora: str
    subject: str
    te: float = 1.0
    unet: float = 1.0
    trigger: str = ""

    @classmethod
    def of(cls, lora: str, weight: float, subject: str, trigger: str = "") -> Binding:
        """The UI/API form: one weight for text encoder and UNet."""
        return cls(lora, subject, float(weight), float(weight), trigger)


@dataclass(frozen=True)
class StyleLora:
    lora: str
    te: float = 1.0
    unet: float = 1.0


@dataclass(frozen=True)
class ComposePlan:
    """Variant 0 is the base prompt; variant ``k`` (1..K) belongs to ``bindings[k-1]``."""

    base_prompt: str
    variants: tuple[str, ...]
    bindings: tuple[Binding, ...]
    styles: tuple[StyleLora, ...]
    groups: tuple[tuple[tuple[int, ...], ...], ...]  # groups[g][v]: token positions of concept g in variant v
    mask_tokens: tuple[tuple[int, ...], ...]  # per variant (empty for the base)
    prompts: tuple[str, ...] = field(default=())  # all variant prompts, base first

    def table(self) -> list[list[Any]]:
        """Rows for a UI: LoRA, weight, subject, trigger."""
        return [[b.lora, b.unet, b.subject, b.trigger] for b in self.bindings] + [[s.lora, s.unet, "(style: all)", ""] for s in self.styles]


# -- <lora:...> tags -----------------------------------------------------------------------------
def _parse_tag(body: str) -> tuple[str, float, float]:
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
            if key not in ("te", "unet", "dyn"):
                raise PromptError(f"<lora:{body}>: unknown argument {key!r} (use te=, unet=, dyn=)")
            if key == "te":
                te = _number(value, body)
            elif key == "unet":
                unet = _number(value, body)
        elif part:
            positional.append(_number(part, body))
    if positional:  # A1111: <lora:NAME:TE:UNET:DYN>; UNET defaults to TE
        te = positional[0] if te is None else te
        unet = (positional[1] if len(positional) > 1 else positional[0]) if unet is None else unet
    te = 1.0 if te is None else te
    unet = te if unet is None else unet
    return name, te, unet


def _number(text: str, body: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise PromptError(f"<lora:{body}>: {text!r} is not a number") from None
    if not -MAX_WEIGHT <= value <= MAX_WEIGHT:
        raise PromptError(f"<lora:{body}>: weight {value} is outside -{MAX_WEIGHT}..{MAX_WEIGHT}")
    return value


@dataclass(frozen=True)
class _Tagged:
    text: str  # the prompt without tags
    bindings: list[Binding]
    offsets: list[int]  # per binding: where its subject starts in ``text``
    styles: list[StyleLora]


def _strip_tags(prompt: str) -> _Tagged:
    if not isinstance(prompt, str):
        raise PromptError("the prompt must be text")
    prompt = prompt.replace(_MARK, "")
    bindings, styles, pieces, position = [], [], [], 0
    for match in _TAG.finditer(prompt):
        pieces.append(prompt[position : match.start()])
        position = match.end()
        name, te, unet = _parse_tag(match.group(1))
        rest = prompt[position:]
        lead = re.match(r"\s*[(\[]*\s*", rest)
        subject = _SUBJECT.match(rest, lead.end())
        if subject and subject.group(0) != "BREAK":
            bindings.append(Binding(name, subject.group(0), te, unet))
            pieces.append(_MARK)  # where the search for its subject starts
        else:
            styles.append(StyleLora(name, te, unet))
    pieces.append(prompt[position:])
    text = "".join(pieces)
    if re.search(r"<lora:", text, re.IGNORECASE):
        raise PromptError("unclosed <lora: tag; close it with '>'")
    text = re.sub(_MARK + r"[ \t]+", _MARK, text)
    text = re.sub(r"[ \t]{2,}", " ", text).strip()
    offsets = [m.start() - k for k, m in enumerate(re.finditer(_MARK, text))]
    return _Tagged(text.replace(_MARK, ""), bindings, offsets, styles)


def split_bindings(prompt: str) -> tuple[str, list[Binding], list[StyleLora]]:
    """The prompt without tags, the bound LoRAs (tag directly before a word) and the style LoRAs."""
    tagged = _strip_tags(prompt)
    return tagged.text, tagged.bindings, tagged.styles


# -- emphasis and tokens --------------------------------------------------------------------------
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


def tokenize_prompt(prompt: str, ids: Callable[[str], Sequence[int]], comma_backtrack: int = 20) -> TokenizedPrompt:
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
                elif comma_backtrack and len(chunk) == CHUNK and last_comma != -1 and len(chunk) - last_comma <= comma_backtrack:
                    moved = chunk[last_comma + 1 :]
                    del chunk[last_comma + 1 :]
                    chunks.append(moved)
                    last_comma = -1
                if len(chunks[-1]) == CHUNK:
                    chunks.append([])
                    last_comma = -1
                chunks[-1].append((int(token), float(fragment.weight), unit))
    tokens = tuple(Token(i, w, c * (CHUNK + 2) + 1 + k, u) for c, chunk in enumerate(chunks) for k, (i, w, u) in enumerate(chunk))
    return TokenizedPrompt(tokens, tuple(tuple((i, w) for i, w, _ in chunk) for chunk in chunks), tuple(units))


def _phrase_units(phrase: str) -> list[str]:
    return [m.group(0).lower() for m in _UNIT.finditer(phrase)]


def _match_at(tok: TokenizedPrompt, phrase: str, offset: int | None) -> list[int] | None:
    """Positions of ``phrase``'s tokens: the occurrence starting at text ``offset``, or the first."""
    want = _phrase_units(phrase)
    if not want:
        return None
    texts = [u.lower() for u, _ in tok.units]
    by_unit = tok.unit_positions()
    for i in range(len(texts) - len(want) + 1):
        if texts[i : i + len(want)] == want and (offset is None or tok.units[i][1] == offset):
            return [p for u in range(i, i + len(want)) for p in by_unit.get(u, [])]
    return None


# -- the plan -------------------------------------------------------------------------------------
def plan_composition(
    prompt: str,
    count_tokens: Callable[[str], int],
    resolve_trigger: Callable[[str], str | None] | None = None,
    bindings: Sequence[Binding] | None = None,
    *,
    lora_exists: Callable[[str], bool] | None = None,
    comma_backtrack: int = 20,
) -> ComposePlan:
    """Base prompt, variants and token groups from a prompt with ``<lora>`` tags, or from an
    explicit ``bindings`` list (then every tag left in ``prompt`` is a style LoRA, except tags of
    LoRAs the list binds, which are dropped). ``count_tokens`` is :func:`tokenizer_counter`'s
    result (or any ``unit -> token count``); ``lora_exists`` makes unknown names a PromptError."""
    tagged = _strip_tags(prompt)
    text, found, offsets, styles = tagged.text, list(tagged.bindings), list(tagged.offsets), list(tagged.styles)
    if bindings is not None:
        explicit = {b.lora for b in bindings}
        styles = [s for s in styles + [StyleLora(b.lora, b.te, b.unet) for b in found] if s.lora not in explicit]
        found, offsets = list(bindings), [None] * len(bindings)
    if not found:
        raise PromptError("no LoRA is bound to a subject; put <lora:NAME:WEIGHT> directly before a word, e.g. 'a <lora:corgi:1> dog'")
    if re.search(r"\bAND\b", text):
        raise PromptError("AND prompts are not supported by CLoRA composition; write one prompt")
    if lora_exists is not None:
        missing = sorted({x.lora for x in [*found, *styles] if not lora_exists(x.lora)})
        if missing:
            raise PromptError(f"LoRA not found: {', '.join(missing)}; check the name (file stem) or refresh the LoRA list")
    ids = _ids_from(count_tokens)
    resolved = []
    for b in found:
        if not isinstance(b.subject, str) or not _phrase_units(b.subject):
            raise PromptError(f"<lora:{b.lora}>: the subject {b.subject!r} has no word")
        trigger = b.trigger if b.trigger or resolve_trigger is None else (resolve_trigger(b.lora) or "")
        resolved.append(Binding(b.lora, b.subject, b.te, b.unet, " ".join(str(trigger).split())))
    subjects = [" ".join(_phrase_units(b.subject)) for b in resolved]
    for s in subjects:
        if subjects.count(s) > 1:
            raise PromptError(f"the subject {s!r} is bound to two LoRAs; bind each LoRA to a different word")
    base = tokenize_prompt(text, ids, comma_backtrack)
    starts = []
    for b, offset in zip(resolved, offsets, strict=True):
        start = _unit_start(base, b.subject, offset)
        if start is None:
            raise PromptError(f"subject {b.subject!r} of <lora:{b.lora}> is not in the prompt {text!r}")
        starts.append(start)
    prompts, inserted = [text], []
    for b, start in zip(resolved, starts, strict=True):
        addition = f"{b.trigger} " if b.trigger else ""
        prompts.append(text[:start] + addition + text[start:])
        inserted.append((start, len(addition)))
    tokenized = [base] + [tokenize_prompt(p, ids, comma_backtrack) for p in prompts[1:]]
    groups = []
    for g, b in enumerate(resolved):
        members = []
        for v, tok in enumerate(tokenized):
            shift = inserted[v - 1][1] if v > 0 and starts[g] >= inserted[v - 1][0] else 0
            positions = _match_at(tok, b.subject, starts[g] + shift) or []
            if v == g + 1 and b.trigger:
                positions = (_match_at(tok, b.trigger, starts[g]) or []) + positions
            members.append(tuple(positions))
        groups.append(tuple(members))
    masks = ((), *(groups[g][g + 1] for g in range(len(resolved))))
    return ComposePlan(text, tuple(prompts[1:]), tuple(resolved), tuple(styles), tuple(groups), masks, tuple(prompts))


def _unit_start(tok: TokenizedPrompt, subject: str, offset: int | None) -> int | None:
    """Text offset where the bound occurrence of ``subject`` starts (the tag's, else the first)."""
    want = _phrase_units(subject)
    texts = [u.lower() for u, _ in tok.units]
    for i in range(len(texts) - len(want) + 1):
        if texts[i : i + len(want)] == want and (offset is None or tok.units[i][1] >= offset):
            return tok.units[i][1]
    return None


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


def _ids_from(count_tokens: Callable[[str], int]) -> Callable[[str], Sequence[int]]:
    if isinstance(count_tokens, TokenCounter):
        return count_tokens.ids
    return lambda unit: [0] * int(count_tokens(unit))
