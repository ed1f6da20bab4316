"""The ``<lora:...>`` tag has one reader; the CLoRA planner, the merge tab and the script agree on it."""

from __future__ import annotations

import pytest

from lib_loraclr.clora.prompts import is_and_prompt, split_bindings
from lib_loraclr.errors import PromptError
from lib_loraclr.lora.tags import find_tags, parse_tag, remove_tags
from lib_loraclr.merge.request import LoraChoice, parse_lora_tags


@pytest.mark.parametrize(
    "body, expected",
    [
        ("a", ("a", 1.0, 1.0)),
        ("a:0.5", ("a", 0.5, 0.5)),  # one weight: both parts
        ("a:0.5:0.25", ("a", 0.5, 0.25)),  # A1111: TE then UNet
        ("a:0.5:0.25:8", ("a", 0.5, 0.25)),  # the third (dynamic rank) is not a weight
        ("a:unet=0.3", ("a", 1.0, 0.3)),
        ("a:te=0.2", ("a", 0.2, 0.2)),
        (" a : te=0.2 : unet=-1 : dyn=4", ("a", 0.2, -1.0)),
    ],
)
def test_tag_forms(body, expected) -> None:
    assert parse_tag(body) == expected


@pytest.mark.parametrize(
    "body, message",
    [
        (":1", "has no name"),
        ("a:x", "'x' is not a number"),
        ("a:11", "outside"),
        ("a:nan", "outside"),
        ("a:k=1", "unknown argument"),
    ],
)
def test_malformed_tags(body, message) -> None:
    with pytest.raises(PromptError, match=message):
        parse_tag(body)


def test_planner_and_merge_read_a_tag_alike() -> None:
    prompt = "a <LORA:cat:0.5:0.25> cat, <lora:style:te=0.7>"
    _, bindings, styles = split_bindings(prompt)
    assert [(b.lora, b.te, b.unet) for b in bindings] == [("cat", 0.5, 0.25)]
    assert [(s.lora, s.te, s.unet) for s in styles] == [("style", 0.7, 0.7)]
    assert parse_lora_tags(prompt) == [LoraChoice("cat", 0.5), LoraChoice("style", 0.7)]
    assert [t.name for t in find_tags(prompt)] == ["cat", "style"]


def test_remove_tags_keeps_the_others_as_written() -> None:
    prompt = "a <lora:cat:1> cat and a <lora: dog :0.5> dog, <lora:style:0.6:te=1>"
    assert remove_tags(prompt, {"cat", "dog"}) == "a  cat and a  dog, <lora:style:0.6:te=1>"


@pytest.mark.parametrize(
    "prompt, expected",
    [("a cat AND a dog", True), ("a cat\nAND a dog", True), ("ANDROID", False), ("sand and", False)],
)
def test_and_prompts(prompt, expected) -> None:
    assert is_and_prompt(prompt) is expected
