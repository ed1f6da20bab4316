"""CLoRA prompt binding: ``<lora:NAME:W>`` right before a subject binds that LoRA to it.

``a <lora:blackcat:1> cat and a <lora:corgi:0.8> dog in the forest, <lora:ghibli:0.6>`` gives
the base prompt ``a cat and a dog in the forest,`` (no LoRA), one variant per bound LoRA with its
trigger before its subject (``a sks cat and a dog in the forest,``), and a style LoRA (``ghibli``:
not followed by a word) for every variant.

The plan's token positions come from :mod:`lib_loraclr.clora.tokens` (the context as the WebUI
builds it); the tag syntax from :mod:`lib_loraclr.lora.tags`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lib_loraclr.clora.tokens import TokenCounter, TokenizedPrompt, ids_from, phrase_units, tokenize_prompt
from lib_loraclr.errors import PromptError
from lib_loraclr.lora.tags import find_tags, has_unclosed_tag

# a subject starts with a letter or digit (a tag before punctuation binds nothing) and ends at a
# separator or at A1111's BREAK keyword
_SUBJECT = re.compile(r"(?=\w)(?:(?!\bBREAK\b)[^\s,;.!?()\[\]{}:<>|\\])+")
# words that cannot be a subject: a tag before one of them was meant for another word
_NOT_SUBJECTS = frozenset(
    "a an the and or but nor with without of in on at to for by from into onto over under near beside "
    "behind between is are was were be".split()
)
_MARK = "\x00"
_SEPARATORS = ",;.!?()[]{}:<>|\\" + _MARK  # characters that end a word (as in _SUBJECT)
_AND = re.compile(r"\bAND\b")  # A1111's prompt_parser splits composable prompts at this


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
        return [[b.lora, b.unet, b.subject, b.trigger] for b in self.bindings] + [
            [s.lora, s.unet, "(style: all)", ""] for s in self.styles
        ]


def is_and_prompt(prompt: str) -> bool:
    """Whether A1111 reads ``prompt`` as several prompts joined by ``AND`` (CLoRA takes one)."""
    return _AND.search(prompt) is not None


# -- <lora:...> tags -----------------------------------------------------------------------------
@dataclass(frozen=True)
class _Tagged:
    text: str  # the prompt without tags
    bindings: list[Binding]
    offsets: list[int]  # per binding: where its subject starts in ``text``
    styles: list[StyleLora]


def _ends_a_word(text: str) -> bool:
    return bool(text) and not text[-1].isspace() and text[-1] not in _SEPARATORS


def _refuse_inside_a_word(name: str, before: str, attached: str) -> None:
    """A tag with text glued to both sides sits inside a word: taking it out (as the host's Lora
    does) joins the two halves into one word, so the subject would not be a word of the prompt."""
    if attached and _ends_a_word(before):
        word = before.split()[-1].replace(_MARK, "") + attached
        raise PromptError(
            f"<lora:{name}> is inside the word {word!r}: without the tag it reads as one word; "
            f"put a space before the tag (e.g. '... <lora:{name}:1> {attached}')"
        )


def _strip_tags(prompt: str) -> _Tagged:
    if not isinstance(prompt, str):
        raise PromptError("the prompt must be text")
    prompt = prompt.replace(_MARK, "")
    bindings, styles, pieces, position = [], [], [], 0
    for tag in find_tags(prompt):
        pieces.append(prompt[position : tag.start])
        position = tag.end
        rest = prompt[position:]
        lead = re.match(r"\s*[(\[]*\s*", rest)
        subject = _SUBJECT.match(rest, lead.end())
        if subject and subject.group(0).lower() in _NOT_SUBJECTS:
            raise PromptError(
                f"<lora:{tag.name}> is followed by {subject.group(0)!r}, which is not a subject: put the tag "
                f"directly before the word it binds (e.g. 'a <lora:{tag.name}:1> dog'), or after a comma or at "
                "the end of the prompt for a style LoRA"
            )
        if subject:
            before = "".join(pieces)
            _refuse_inside_a_word(tag.name, before, subject.group(0) if not lead.end() else "")
            bindings.append(Binding(tag.name, subject.group(0), tag.te, tag.unet))
            if rest[:1].isspace() and _ends_a_word(before):  # "a cat<lora:x> dog": keep the space
                pieces.append(" ")
            pieces.append(_MARK)  # where the search for its subject starts
        else:
            styles.append(StyleLora(tag.name, tag.te, tag.unet))
    pieces.append(prompt[position:])
    text = "".join(pieces)
    if has_unclosed_tag(text):
        raise PromptError("unclosed <lora: tag; close it with '>'")
    text = re.sub(_MARK + r"\s+", _MARK, text)
    text = re.sub(r"[ \t]{2,}", " ", text).strip()
    offsets = [m.start() - k for k, m in enumerate(re.finditer(_MARK, text))]
    return _Tagged(text.replace(_MARK, ""), bindings, offsets, styles)


def split_bindings(prompt: str) -> tuple[str, list[Binding], list[StyleLora]]:
    """The prompt without tags, the bound LoRAs (tag directly before a word) and the style LoRAs."""
    tagged = _strip_tags(prompt)
    return tagged.text, tagged.bindings, tagged.styles


def _match_at(tok: TokenizedPrompt, phrase: str, offset: int | None) -> list[int] | None:
    """Positions of ``phrase``'s tokens: the occurrence starting at text ``offset``, or the first."""
    want = phrase_units(phrase)
    if not want:
        return None
    texts = [u.lower() for u, _ in tok.units]
    by_unit = tok.unit_positions()
    for i in range(len(texts) - len(want) + 1):
        if texts[i : i + len(want)] == want and (offset is None or tok.units[i][1] == offset):
            return [p for u in range(i, i + len(want)) for p in by_unit.get(u, [])]
    return None


def _trigger_words_to_insert(trigger: str, subject: str) -> str:
    """The trigger less what the subject already says: activation text "sks cat" before the subject
    "cat" inserts "sks" (not "sks cat cat"); compared word by word, case-insensitively."""
    words, said = trigger.split(), subject.lower().split()
    for k in range(min(len(words), len(said)), 0, -1):
        if [w.lower() for w in words[-k:]] == said[:k]:
            return " ".join(words[:-k])
    return trigger


# -- the plan -------------------------------------------------------------------------------------
def plan_composition(
    prompt: str,
    count_tokens: Callable[[str], int],
    resolve_trigger: Callable[[str], str | None] | None = None,
    bindings: Sequence[Binding] | None = None,
    *,
    lora_exists: Callable[[str], bool] | None = None,
    comma_backtrack: int = 20,
    embeddings: Mapping[str, int] | None = None,
) -> ComposePlan:
    """Base prompt, variants and token groups from a prompt with ``<lora>`` tags, or from an
    explicit ``bindings`` list (then every tag left in ``prompt`` is a style LoRA, except tags of
    LoRAs the list binds, which are dropped). ``count_tokens`` is :func:`tokenizer_counter`'s
    result (or any ``unit -> token count``); ``lora_exists`` makes unknown names a PromptError;
    ``embeddings`` (textual-inversion name -> vectors) shifts token positions as the WebUI does."""
    tagged = _strip_tags(prompt)
    text, found, offsets, styles = (
        tagged.text,
        list(tagged.bindings),
        list(tagged.offsets),
        list(tagged.styles),
    )
    if bindings is not None:
        explicit = {b.lora for b in bindings}
        styles = [
            s for s in styles + [StyleLora(b.lora, b.te, b.unet) for b in found] if s.lora not in explicit
        ]
        found, offsets = list(bindings), [None] * len(bindings)
    if not found:
        raise PromptError(
            "no LoRA is bound to a subject; put <lora:NAME:WEIGHT> directly before a word, e.g. 'a <lora:corgi:1> dog'"
        )
    if is_and_prompt(text):
        raise PromptError("AND prompts are not supported by CLoRA composition; write one prompt")
    if lora_exists is not None:
        missing = sorted({x.lora for x in [*found, *styles] if not lora_exists(x.lora)})
        if missing:
            raise PromptError(
                f"LoRA not found: {', '.join(missing)}; check the name (file stem) or refresh the LoRA list"
            )
    if embeddings and not isinstance(count_tokens, TokenCounter):
        raise TypeError("embeddings are found by their token ids: pass tokenizer_counter(tokenizer)")
    ids = ids_from(count_tokens)
    resolved = []
    for b in found:
        if not isinstance(b.subject, str) or not phrase_units(b.subject):
            raise PromptError(f"<lora:{b.lora}>: the subject {b.subject!r} has no word")
        trigger = b.trigger if b.trigger or resolve_trigger is None else (resolve_trigger(b.lora) or "")
        resolved.append(Binding(b.lora, b.subject, b.te, b.unet, " ".join(str(trigger).split())))
    subjects = [" ".join(phrase_units(b.subject)) for b in resolved]
    for s in subjects:
        if subjects.count(s) > 1:
            raise PromptError(f"the subject {s!r} is bound to two LoRAs; bind each LoRA to a different word")
    base = tokenize_prompt(text, ids, comma_backtrack, embeddings)
    starts = []
    for b, offset in zip(resolved, offsets, strict=True):
        start = _unit_start(base, b.subject, offset)
        if start is None:
            raise PromptError(f"subject {b.subject!r} of <lora:{b.lora}> is not in the prompt {text!r}")
        starts.append(start)
    prompts, inserted, added = [text], [], []
    for b, start in zip(resolved, starts, strict=True):
        words = _trigger_words_to_insert(b.trigger, b.subject)
        addition = f"{words} " if words else ""
        added.append(words)
        prompts.append(text[:start] + addition + text[start:])
        inserted.append((start, len(addition)))
    tokenized = [base] + [tokenize_prompt(p, ids, comma_backtrack, embeddings) for p in prompts[1:]]
    groups = []
    for g, b in enumerate(resolved):
        members = []
        for v, tok in enumerate(tokenized):
            shift = inserted[v - 1][1] if v > 0 and starts[g] >= inserted[v - 1][0] else 0
            positions = _match_at(tok, b.subject, starts[g] + shift) or []
            if v == g + 1 and added[g]:
                positions = (_match_at(tok, added[g], starts[g]) or []) + positions
            members.append(tuple(positions))
        groups.append(tuple(members))
    masks = ((), *(groups[g][g + 1] for g in range(len(resolved))))
    return ComposePlan(
        text, tuple(prompts[1:]), tuple(resolved), tuple(styles), tuple(groups), masks, tuple(prompts)
    )


def _unit_start(tok: TokenizedPrompt, subject: str, offset: int | None) -> int | None:
    """Text offset where the bound occurrence of ``subject`` starts (the tag's, else the first)."""
    want = phrase_units(subject)
    texts = [u.lower() for u, _ in tok.units]
    for i in range(len(texts) - len(want) + 1):
        if texts[i : i + len(want)] == want and (offset is None or tok.units[i][1] >= offset):
            return tok.units[i][1]
    return None
