"""Prompt binding with the real CLIP tokenizer, and hostile input that must only raise PromptError."""

from __future__ import annotations

import pytest

from lib_loraclr.errors import PromptError
from lib_loraclr.prompts import Binding, plan_composition, split_bindings, tokenizer_counter


@pytest.fixture(scope="module")
def count():
    from lib_loraclr.tokenizer import load_clip_tokenizer

    return tokenizer_counter(load_clip_tokenizer())


def test_issue_example(count) -> None:
    plan = plan_composition(
        "a <lora:blackcat:1> cat and a <lora:corgi:0.8> dog in the forest, <lora:ghibli:0.6>",
        count, {"blackcat": "sks", "corgi": "zwx"}.get,
    )  # fmt: skip
    assert plan.base_prompt == "a cat and a dog in the forest,"
    assert plan.variants == ("a sks cat and a dog in the forest,", "a cat and a zwx dog in the forest,")
    assert [(b.lora, b.subject, b.unet) for b in plan.bindings] == [("blackcat", "cat", 1.0), ("corgi", "dog", 0.8)]
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
    plan = plan_composition("a woman with an umbrella", count, bindings=[Binding("w", "woman", trigger="ohwx"), Binding("u", "umbrella")])
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


@pytest.mark.parametrize(
    "prompt",
    ["", "<lora:", "<lora:a", "((((<lora:a:1>", "<lora:a:1><lora:b:1>", "\u2603 <lora:\u00e9:1> \u732b", "<lora:a:1e309> x",
     ")" * 50 + "<lora:a:1> x", "<LORA:a:1> x", "<lora:a:-0.5> x <lora:b:nan> y", "BREAK <lora:a> BREAK", "<lora:a:1:2:3:4> x"],
)
def test_hostile_input_only_prompt_errors(count, prompt) -> None:
    for attempt in (lambda: plan_composition(prompt, count), lambda: split_bindings(prompt)):
        try:
            attempt()
        except PromptError:
            pass
