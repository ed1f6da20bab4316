"""Prompt binding with the real CLIP tokenizer, and hostile input that must only raise PromptError."""

from __future__ import annotations

import re

import pytest

from lib_loraclr.clora.prompts import Binding, is_and_prompt, plan_composition, split_bindings
from lib_loraclr.clora.tokens import parse_emphasis, tokenize_prompt, tokenizer_counter
from lib_loraclr.errors import PromptError


@pytest.fixture(scope="module")
def count():
    from lib_loraclr.sd.tokenizer import load_clip_tokenizer

    return tokenizer_counter(load_clip_tokenizer())


def test_issue_example(count) -> None:
    plan = plan_composition(
        "a <lora:blackcat:1> cat and a <lora:corgi:0.8> dog in the forest, <lora:ghibli:0.6>",
        count,
        {"blackcat": "sks", "corgi": "zwx"}.get,
    )
    assert plan.base_prompt == "a cat and a dog in the forest,"
    assert plan.variants == ("a sks cat and a dog in the forest,", "a cat and a zwx dog in the forest,")
    assert [(b.lora, b.subject, b.unet) for b in plan.bindings] == [
        ("blackcat", "cat", 1.0),
        ("corgi", "dog", 0.8),
    ]
    assert [(s.lora, s.unet) for s in plan.styles] == [("ghibli", 0.6)]
    # cat: token 2 in base, "sks cat" = 2,3 in variant 1; dog shifts by one in variant 1;
    # "zwx" is two BPE tokens (z, wx), so "zwx dog" = 5,6,7 in variant 2
    assert plan.groups == (((2,), (2, 3), (2,)), ((5,), (6,), (5, 6, 7)))
    assert plan.mask_tokens == ((), (2, 3), (5, 6, 7))


def test_multi_token_words_weights_break_and_long_prompts(count) -> None:
    plan = plan_composition("a (<lora:x:1> hippopotamus:1.2) and a <lora:y:0.5:0.7> dog", count)
    assert plan.groups[0][0] == (2, 3, 4)  # hippopotamus is three BPE tokens
    assert (plan.bindings[1].te, plan.bindings[1].unet) == (0.5, 0.7)
    plan = plan_composition("a <lora:x> cat BREAK a <lora:y> dog", count)
    assert plan.groups[1][0] == (77 + 1 + 1,)  # second chunk: 77 positions per chunk, after its start token
    long = " ".join(["red"] * 80) + " <lora:x> cat and a <lora:y> dog"
    plan = plan_composition(long, count)
    assert plan.groups[0][0] == (77 + 1 + 5,)  # 80 words: 75 in chunk 0, 5 more, then "cat"


def test_explicit_binding_list(count) -> None:
    plan = plan_composition(
        "a woman with an umbrella",
        count,
        bindings=[Binding("w", "woman", trigger="ohwx"), Binding("u", "umbrella")],
    )
    assert plan.variants == ("a ohwx woman with an umbrella", "a woman with an umbrella")


@pytest.mark.parametrize(
    "prompt, message",
    [
        ("a cat and a dog", "no LoRA is bound"),
        ("a <lora:a> cat and a <lora:b> cat", "bound to two LoRAs"),
        ("a <lora::1> cat", "has no name"),
        ("a <lora:a:lots> cat", "not a number"),
        ("a <lora:a:99> cat", "outside"),
        ("a <lora:a> cat AND a dog", "AND prompts"),
        ("a <lora:a:te=1:foo=2> cat", "unknown argument"),
    ],
)
def test_clear_errors(count, prompt, message) -> None:
    with pytest.raises(PromptError, match=message):
        plan_composition(prompt, count)


def test_subject_not_found(count) -> None:
    with pytest.raises(PromptError, match="subject 'unicorn'"):
        plan_composition("a cat", count, bindings=[Binding("a", "unicorn")])


UNBOUND = "no LoRA is bound"
UNCLOSED = "unclosed <lora: tag"


@pytest.mark.parametrize(
    ("prompt", "refusal", "bound"),
    [
        # refused: a PromptError whose message names the problem (None: the prompt is accepted)
        ("", UNBOUND, None),
        ("<lora:", UNCLOSED, None),
        ("<lora:a", UNCLOSED, None),
        ("((((<lora:a:1>", UNBOUND, None),  # a tag before nothing is a style, so nothing binds
        ("<lora:a:1><lora:b:1>", UNBOUND, None),
        ("<lora:a:1e309> x", "weight inf is outside", None),
        ("<lora:a:-0.5> x <lora:b:nan> y", "weight nan is outside", None),
        ("BREAK <lora:a> BREAK", UNBOUND, None),  # BREAK is the chunk separator, not a subject
        ("a cat<lora:a>dog", "inside the word 'catdog'", None),  # without the tag: one word
        ("<lora:a> -dog", UNBOUND, None),  # a subject starts with a letter or digit
        # accepted, with the binding the host's syntax gives
        ("\u2603 <lora:\u00e9:1> \u732b", None, [("\u00e9", "\u732b", 1.0, 1.0)]),
        (")" * 50 + "<lora:a:1> x", None, [("a", "x", 1.0, 1.0)]),
        ("<LORA:a:1> x", None, [("a", "x", 1.0, 1.0)]),  # the host's tag syntax ignores case
        ("<lora:a:1:2:3:4> x", None, [("a", "x", 1.0, 2.0)]),  # te, unet, dyn; the host ignores more
        ("a cat<lora:a> dog", None, [("a", "dog", 1.0, 1.0)]),  # the base keeps "cat dog" apart
        ("a <lora:a>\ndog", None, [("a", "dog", 1.0, 1.0)]),
        ("a <lora:a> catBREAK dog", None, [("a", "catBREAK", 1.0, 1.0)]),  # BREAK only as a word
    ],
)
def test_hostile_input(count, prompt, refusal, bound) -> None:
    """Each hostile prompt has one right answer: refused with its reason, or bound as the host's
    tag syntax reads it; the planner and the splitter agree on the bindings."""
    if refusal is None:
        plan = plan_composition(prompt, count)
        assert [(b.lora, b.subject, b.te, b.unet) for b in plan.bindings] == bound
        assert [(b.lora, b.subject, b.te, b.unet) for b in split_bindings(prompt)[1]] == bound
        assert "<lora:" not in plan.base_prompt.lower() and "catdog" not in plan.base_prompt
        return
    with pytest.raises(PromptError, match=re.escape(refusal)):
        plan_composition(prompt, count)
    if refusal is not UNBOUND:  # the splitter has no binding to require: only syntax errors
        with pytest.raises(PromptError, match=re.escape(refusal)):
            split_bindings(prompt)


@pytest.fixture(scope="module")
def tokenizer():
    from lib_loraclr.sd.tokenizer import load_clip_tokenizer

    return load_clip_tokenizer()


@pytest.mark.parametrize(
    "text",
    [
        "a cat... and a dog!!",
        "cat,,dog",
        "don't stop abc123",
        "hippopotamus (red:1.2) \\(hat\\)",
        "\u732b \u00e9 caf\u00e9",
        "a  b\tc",
    ],
)
def test_positions_agree_with_the_whole_prompt_tokenised(tokenizer, text) -> None:
    """Per-unit tokens add up to what the tokenizer gives the whole (emphasis-free) fragment text."""
    counter = tokenizer_counter(tokenizer)
    plain = "".join(t for t, _ in parse_emphasis(text))
    tok = tokenize_prompt(text, counter.ids)
    assert [t.id for t in tok.tokens] == tokenizer(plain, add_special_tokens=False)["input_ids"]
    assert [t.position for t in tok.tokens] == list(range(1, len(tok.tokens) + 1))


def test_emphasis_like_a1111() -> None:
    assert parse_emphasis("a (cat) [dog] (hat:1.5) \\(x\\)") == [
        ("a ", 1.0),
        ("cat", pytest.approx(1.1)),
        (" ", 1.0),
        ("dog", pytest.approx(1 / 1.1)),
        (" ", 1.0),
        ("hat", 1.5),
        (" (x)", 1.0),
    ]
    assert parse_emphasis("((a") == [("a", pytest.approx(1.21))]  # unclosed: to the end
    assert parse_emphasis("a) b]") == [("a) b]", 1.0)]  # unmatched closers are text
    assert parse_emphasis("a BREAK b") == [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]


def test_ellipsis_and_emphasis_do_not_shift_positions(count) -> None:
    plan = plan_composition("a ((cat))... and a <lora:x:1> (dog:1.3)", count, {"x": "sks"}.get)
    # a=1 cat=2 ...=3 and=4 a=5 dog=6; brackets are no tokens; "..." is one token
    assert plan.groups == (((6,), (6, 7)),)
    assert plan.variants == ("a ((cat))... and a (sks dog:1.3)",)


def test_bound_occurrence_is_the_one_after_the_tag(count) -> None:
    plan = plan_composition("a cat next to a <lora:x> cat and a <lora:y> dog", count, {"x": "sks"}.get)
    assert plan.variants[0] == "a cat next to a sks cat and a dog"
    assert plan.groups[0] == ((6,), (6, 7), (6,)) and plan.groups[1] == ((9,), (10,), (9,))


def test_comma_backtrack_moves_the_tail_to_the_next_chunk(count) -> None:
    head = (
        " ".join(["red"] * 70) + ", a big <lora:x> cat"
    )  # 70 + "," + "a big cat": cat is token 74 of chunk 0
    assert plan_composition(head, count).groups[0][0] == (1 + 73,)
    # "sitting" fills chunk 0 (75 tokens); "here" overflows it; the last comma is 5 tokens back (<= 20),
    # so A1111 moves "a big cat sitting" to chunk 1: cat becomes its third token
    assert plan_composition(head + " sitting here", count).groups[0][0] == (77 + 1 + 2,)
    assert plan_composition(head + " sitting here", count, comma_backtrack=0).groups[0][0] == (1 + 73,)


def test_unknown_lora_and_bad_subjects(count) -> None:
    with pytest.raises(PromptError, match="LoRA not found: ghost"):
        plan_composition("a <lora:ghost:1> cat, <lora:real:1>", count, lora_exists={"real"}.__contains__)
    with pytest.raises(PromptError, match="has no word"):
        plan_composition("a cat", count, bindings=[Binding("a", "   ")])
    plan = plan_composition("a cat, <lora:style:0.5>", count, bindings=[Binding.of("c", 0.8, "cat", "sks")])
    assert [s.lora for s in plan.styles] == ["style"] and plan.bindings[0].unet == 0.8


@pytest.mark.parametrize("seed", range(60))
def test_fuzz_only_prompt_errors(count, seed) -> None:
    import random

    rng = random.Random(seed)
    alphabet = [
        "<lora:",
        ">",
        ":",
        "(",
        ")",
        "[",
        "]",
        "\\",
        "BREAK",
        " ",
        ",",
        "cat",
        "dog",
        "x",
        "1.5",
        "=",
        "te",
        "\u00e9",
        "\u732b",
        "...",
        "AND",
        "\x00",
        "\n",
        "-",
        "9e99",
        "nan",
    ]
    prompt = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
    _check_against_the_splitter(prompt, count)


def _check_against_the_splitter(prompt: str, count) -> None:
    """The planner's answer follows from the tag splitter's: the same syntax error; no binding,
    an AND prompt or one subject bound twice refused with that reason; otherwise a plan whose
    bindings are the splitter's, with one variant per binding that differs from the base only by
    the trigger (LoRA ``x`` has the trigger ``sks``, the others none), and the subjects' tokens
    placed apart."""
    trigger = {"x": "sks"}.get
    try:
        text, bindings, _styles = split_bindings(prompt)
    except PromptError as error:
        with pytest.raises(PromptError, match=re.escape(str(error))):
            plan_composition(prompt, count, trigger)
        return
    subjects = [" ".join(b.subject.lower().split()) for b in bindings]
    refusal = (
        UNBOUND
        if not bindings
        else "AND prompts"
        if is_and_prompt(text)
        else "bound to two LoRAs"
        if len(set(subjects)) < len(subjects)
        else None
    )
    if refusal is not None:
        with pytest.raises(PromptError, match=re.escape(refusal)):
            plan_composition(prompt, count, trigger)
        return
    plan = plan_composition(prompt, count, trigger)
    assert plan.base_prompt == text
    assert [(b.lora, b.subject, b.te, b.unet) for b in plan.bindings] == [
        (b.lora, b.subject, b.te, b.unet) for b in bindings
    ]
    assert plan.prompts == (text, *plan.variants) and len(plan.variants) == len(bindings)
    for b, variant in zip(bindings, plan.variants, strict=True):
        extra = variant.split()
        for word in text.split():
            extra.remove(word)
        assert extra == (["sks"] if b.lora == "x" else [])
    base_positions = [set(group[0]) for group in plan.groups]
    assert all(base_positions) and sum(map(len, base_positions)) == len(set().union(*base_positions))


def test_the_trigger_is_not_doubled_before_its_own_subject(count) -> None:
    plan = plan_composition(
        "a <lora:blackcat:1> cat and a <lora:corgi:1> dog", count, {"blackcat": "sks cat", "corgi": "zwx"}.get
    )
    assert plan.prompts[1] == "a sks cat and a dog" and plan.prompts[2] == "a cat and a zwx dog"
    assert plan.bindings[0].trigger == "sks cat"  # the table shows the activation text as written
    # the mask tokens of the variant: the inserted word and the subject, each once
    assert len(plan.mask_tokens[1]) == len(set(plan.mask_tokens[1])) == 2


@pytest.mark.parametrize("follower", ["and", "The", "with", "of"])
def test_a_tag_before_a_word_that_is_no_subject_is_refused(count, follower) -> None:
    with pytest.raises(PromptError, match=f"followed by '{follower}', which is not a subject"):
        plan_composition(f"a cat <lora:corgi:1> {follower} a dog", count)


def test_an_embedding_takes_its_vectors_positions(tokenizer) -> None:
    """A textual-inversion name is N vectors where its tokens were (A1111's tokenize_line):
    "by my-style-emb, a <lora:x> cat": the name's 5 tokens become 8 vectors, so cat moves by 3."""
    counter = tokenizer_counter(tokenizer)
    prompt = "by my-style-emb, a <lora:x> cat"
    name_tokens = len(counter.ids("my-style-emb"))
    plain = plan_composition(prompt, counter, {"x": "sks"}.get)
    cat = 1 + 1 + name_tokens + 2  # by, the name, ",", "a"
    assert plain.groups == (((cat,), (cat, cat + 1)),)
    plan = plan_composition(prompt, counter, {"x": "sks"}.get, embeddings={"my-style-emb": 8})
    assert plan.groups == (((cat + 8 - name_tokens,), (cat + 8 - name_tokens, cat + 9 - name_tokens)),)
    # the longest name wins, and a name that does not fit in the chunk starts the next one
    tok = tokenize_prompt(
        "my-style-emb-v2 cat", counter.ids, embeddings={"my-style": 2, "my-style-emb-v2": 3}
    )
    assert [t.id for t in tok.tokens][:3] == [0, 0, 0] and tok.tokens[3].position == 4
    long = " ".join(["red"] * 73) + " my-style cat"
    tok = tokenize_prompt(long, counter.ids, embeddings={"my-style": 4})
    assert [t.position for t in tok.tokens[73:]] == [78, 79, 80, 81, 82]
    # the subject may be the embedding itself: all its vectors are its tokens
    plan = plan_composition("a <lora:x> sksdog in snow", counter, {"x": ""}.get, embeddings={"sksdog": 3})
    assert plan.groups[0][0] == (2, 3, 4)
    with pytest.raises(TypeError, match="tokenizer_counter"):
        plan_composition(prompt, lambda unit: 1, embeddings={"my-style-emb": 8})
