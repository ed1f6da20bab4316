"""CLoRA prompt binding: ``<lora:NAME:W>`` right before a subject binds that LoRA to it.

``a <lora:blackcat:1> cat and a <lora:corgi:0.8> dog in the forest, <lora:ghibli:0.6>`` gives
the base prompt ``a cat and a dog in the forest,`` (no LoRA), one variant per bound LoRA with
its trigger before its subject (``a sks cat and a dog in the forest,``), and a style LoRA
(``ghibli``: not followed by a word) for every variant. Token positions are those of the model's
77-token context: SD1.x encodes 75-token chunks (``BREAK`` starts a new one), each framed by
start/end tokens, so position = chunk * 77 + 1 + index within the chunk. Emphasis such as
``(cat:1.2)`` is kept in the prompts (the encoder applies it) and ignored for positions.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from lib_loraclr.errors import PromptError

_TAG = re.compile(r"<lora:([^>]*)>", re.IGNORECASE)
_WORD = re.compile(r"[^\s,;.!?()\[\]{}:<>|]+")
_EMPHASIS = re.compile(r"\\[()\[\]]|:\s*-?[0-9.]+\s*\)|[()\[\]]")
CHUNK = 75
MAX_WEIGHT = 10.0


@dataclass(frozen=True)
class Binding:
    """One LoRA bound to one subject (``subject`` may be several words)."""

    lora: str
    subject: str
    te: float = 1.0
    unet: float = 1.0
    trigger: str = ""


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
    if positional:
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


def split_bindings(prompt: str) -> tuple[str, list[Binding], list[StyleLora]]:
    """The prompt without tags, the bound LoRAs (tag directly before a word) and the style LoRAs."""
    if not isinstance(prompt, str):
        raise PromptError("the prompt must be text")
    bindings: list[Binding] = []
    styles: list[StyleLora] = []
    pieces: list[str] = []
    position = 0
    for match in _TAG.finditer(prompt):
        pieces.append(prompt[position : match.start()])
        position = match.end()
        name, te, unet = _parse_tag(match.group(1))
        rest = prompt[position:]
        word = re.match(r"\s*([(\[]*)\s*(" + _WORD.pattern + r")", rest)
        if word and not rest.lstrip().startswith("<") and word.group(2) != "BREAK":
            bindings.append(Binding(name, word.group(2), te, unet))
        else:
            styles.append(StyleLora(name, te, unet))
    pieces.append(prompt[position:])
    text = "".join(pieces)
    if "<" in text and re.search(r"<lora:", text, re.IGNORECASE):
        raise PromptError("unclosed <lora: tag; close it with '>'")
    return re.sub(r"[ \t]{2,}", " ", text).strip(), bindings, styles


def _clean(prompt: str) -> str:
    return _EMPHASIS.sub(" ", prompt)


def token_positions(prompt: str, count_tokens: Callable[[str], int]) -> list[tuple[str, list[int]]]:
    """Each word of ``prompt`` with its context positions (chunks of 75, ``BREAK``, start tokens)."""
    words = []
    chunk, used = 0, 0
    for match in re.finditer(r"\S+", _clean(prompt)):
        raw = match.group(0)
        if raw == "BREAK":
            chunk, used = chunk + 1, 0
            continue
        for piece in re.findall(r"[^\s,;.!?]+|[,;.!?]", raw):
            n = count_tokens(piece)
            if used + n > CHUNK:
                chunk, used = chunk + 1, 0
            words.append((piece, [chunk * (CHUNK + 2) + 1 + used + i for i in range(n)]))
            used += n
    return words


def _find(words: list[tuple[str, list[int]]], phrase: str, start: int = 0) -> tuple[int, list[int]] | None:
    target = [w.lower() for w in re.findall(r"[^\s,;.!?]+|[,;.!?]", phrase)]
    for i in range(start, len(words) - len(target) + 1):
        if [w.lower() for w, _ in words[i : i + len(target)]] == target:
            return i, [p for _, pos in words[i : i + len(target)] for p in pos]
    return None


def plan_composition(
    prompt: str,
    count_tokens: Callable[[str], int],
    resolve_trigger: Callable[[str], str] | None = None,
    bindings: Sequence[Binding] | None = None,
) -> ComposePlan:
    """Base prompt, variants and token groups from a prompt with ``<lora>`` tags, or from an
    explicit ``bindings`` list (then tags in ``prompt`` are style LoRAs or must match)."""
    text, found, styles = split_bindings(prompt)
    if bindings is not None:
        found = list(bindings)
    if not found:
        raise PromptError("no LoRA is bound to a subject; put <lora:NAME:WEIGHT> directly before a word, e.g. 'a <lora:corgi:1> dog'")
    if " AND " in text:
        raise PromptError("AND prompts are not supported by CLoRA composition; write one prompt")
    resolved = []
    for b in found:
        trigger = b.trigger if b.trigger or resolve_trigger is None else (resolve_trigger(b.lora) or "")
        resolved.append(Binding(b.lora, b.subject, b.te, b.unet, trigger.strip()))
    subjects = [b.subject.lower() for b in resolved]
    for s in subjects:
        if subjects.count(s) > 1:
            raise PromptError(f"the subject {s!r} is bound to two LoRAs; bind each LoRA to a different word")
    base_words = token_positions(text, count_tokens)
    occurrences = []
    for b in resolved:
        hit = _find(base_words, b.subject)
        if hit is None:
            raise PromptError(f"subject {b.subject!r} of <lora:{b.lora}> is not in the prompt {text!r}")
        occurrences.append(hit[0])
    variants = []
    for k, b in enumerate(resolved):
        if b.trigger:
            words = [w for w, _ in base_words]
            # insert the trigger before the subject's word in the cleaned word list, then in the text
            variants.append(_insert_before(text, b.subject, b.trigger, occurrence_word=words[occurrences[k]]))
        else:
            variants.append(text)
    prompts = (text, *variants)
    per_variant = [token_positions(p, count_tokens) for p in prompts]
    groups = []
    masks: list[tuple[int, ...]] = [()]
    for g, b in enumerate(resolved):
        members = []
        for v, words in enumerate(per_variant):
            hit = _find(words, b.subject)
            positions = list(hit[1]) if hit else []
            if v == g + 1 and b.trigger:
                trig = _find(words, b.trigger)
                positions = (trig[1] if trig else []) + positions
            members.append(tuple(positions))
        groups.append(tuple(members))
        masks.append(members[g + 1])
    return ComposePlan(text, tuple(variants), tuple(resolved), tuple(styles), tuple(groups), tuple(masks), prompts)


def _insert_before(text: str, subject: str, trigger: str, occurrence_word: str) -> str:
    pattern = re.compile(r"(?<![^\s,(\[])" + re.escape(subject.split()[0]) + r"(?![^\s,;.!?:)\]])", re.IGNORECASE)
    match = pattern.search(text)
    if match is None:
        return f"{trigger} {text}"
    return f"{text[: match.start()]}{trigger} {text[match.start():]}"


def tokenizer_counter(tokenizer: Any) -> Callable[[str], int]:
    """Token count of a word with a Hugging Face CLIP tokenizer (no start/end tokens)."""
    cache: dict[str, int] = {}

    def count(word: str) -> int:
        if word not in cache:
            cache[word] = len(tokenizer(word, add_special_tokens=False)["input_ids"])
        return cache[word]

    return count
