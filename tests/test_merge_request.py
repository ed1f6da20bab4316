"""Merge inputs are validated at the boundary with messages that name the value and the fix."""

from __future__ import annotations

import pytest

from lib_loraclr.merge import request as mr


def test_tags_pasted_from_a_prompt() -> None:
    got = mr.parse_lora_tags("a <lora:blackcat:0.8> cat and <lora:corgi> dog, <lora:ghibli:0.6:0.5>")
    assert got == [mr.LoraChoice("blackcat", 0.8), mr.LoraChoice("corgi", 1.0), mr.LoraChoice("ghibli", 0.6)]
    with pytest.raises(mr.MergeRequestError, match="weight 'x' is not a number"):
        mr.parse_lora_tags("<lora:a:x>")


@pytest.mark.parametrize(
    "name, expected",
    [("merge", "merge.safetensors"), ("My merge (v2).safetensors", "My merge (v2).safetensors")],
)
def test_output_names_accepted(name, expected) -> None:
    assert mr.sanitise_output_name(name) == expected


@pytest.mark.parametrize(
    "name", ["", "../evil", "a/b", "a\\b", "..", "x.ckpt", "bad\0name", "-rf", "x" * 200]
)
def test_output_names_refused(name) -> None:
    with pytest.raises(mr.MergeRequestError):
        mr.sanitise_output_name(name)


def test_build_request_validates_everything() -> None:
    req = mr.build_request(
        [{"name": "a", "weight": 0.5, "concept": "sks cat"}, mr.LoraChoice("b")],
        "out",
        params={"iterations": "30", "precision": "float32", "resolution": 0},
    )
    assert req.output_name == "out.safetensors"
    assert req.params == {"iterations": 30, "precision": "float32"}  # resolution 0: the model's own
    cases = [
        (([], "o"), {}, "no LoRAs chosen"),
        (([mr.LoraChoice("a"), mr.LoraChoice("a")], "o"), {}, "listed twice"),
        (([mr.LoraChoice("a")], "o"), {"method": "magic"}, "method 'magic' is not one of"),
        (([mr.LoraChoice("a")], "o"), {"dtype": "int8"}, "dtype 'int8'"),
        (([mr.LoraChoice("a", 99)], "o"), {}, "outside -10..10"),
        (([mr.LoraChoice("a")], "o"), {"params": {"lr": -1}}, "lr=-1 is outside"),
        (([mr.LoraChoice("a")], "o"), {"params": {"bogus": 1}}, "unknown parameter 'bogus'"),
        (([mr.LoraChoice("a")], "o"), {"lora_rank": 5000}, "rank 5000"),
        (([mr.LoraChoice("a")], "o"), {"params": {"precision": "half"}}, "precision='half': use one of auto"),
        (([mr.LoraChoice("a")], "o"), {"params": {"resolution": 32}}, "resolution=32 is outside"),
    ]
    for args, kwargs, message in cases:
        with pytest.raises(mr.MergeRequestError, match=message):
            mr.build_request(*args, **kwargs)


def test_existing_output_and_unknown_loras(tmp_path) -> None:
    req = mr.build_request([mr.LoraChoice("a"), mr.LoraChoice("zzz")], "out")
    (tmp_path / "out.safetensors").write_bytes(b"x")
    with pytest.raises(mr.MergeRequestError, match="already exists .* tick 'overwrite'"):
        mr.output_path(req, tmp_path)
    assert (
        mr.output_path(mr.build_request([mr.LoraChoice("a")], "out", overwrite=True), tmp_path).name
        == "out.safetensors"
    )
    with pytest.raises(mr.MergeRequestError, match="LoRA not found: zzz"):
        mr.resolve_loras(req, {"a": "/x/a.safetensors"}.get)
