"""CLoRA settings sent through `/sdapi/v1/txt2img` in a real WebUI (opt-in: needs SD_WEBUI_ROOT).

A1111 catches exceptions of script hooks, logs them and generates on: a bad setting that the script
refused in `process` would give HTTP 200 and a plain picture with the built-in Lora, which a client
cannot tell from a composition. Every bad value here must answer 400 with its message in `detail`
(once, not repeated), and leave the server as it was: the plain picture without the script is the
same before and after. Valid spellings (a string boolean, refinement steps as text, the positional
form) still compose, so the checks cannot pass by refusing everything.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from .conftest import decode_pixels

TAGGED = "a <lora:tinyA:1> cat and a <lora:tinyB:1> dog"
PLAIN = "a photo of a cat and a dog"
SEED = 4242
SCRIPT = "CLoRA composition"
FAST = {"max_step": 2, "refine_iterations": 1}  # a short composition: the wiring is tested, not quality


def _body(script_args) -> dict:
    """A small txt2img request whose CLoRA ``args`` field is ``script_args`` exactly as given."""
    return {
        "prompt": TAGGED,
        "seed": SEED,
        "steps": 4,
        "width": 64,
        "height": 64,
        "sampler_name": "Euler",
        "cfg_scale": 7,
        "alwayson_scripts": {SCRIPT: {"args": script_args}},
    }


def _detail(r) -> str:
    try:
        data = r.json()
    except ValueError:
        return ""
    return str(data.get("detail") or "") if isinstance(data, dict) else ""


def _repeated_parts(detail: str) -> list[str]:
    """Pieces of ``detail`` (split at ' | ' and line breaks) that occur more than once."""
    parts = [part.strip() for part in re.split(r"\s\|\s|\n", detail) if part.strip()]
    return sorted({part for part in parts if parts.count(part) > 1})


@pytest.fixture(scope="module")
def plain_picture(webui) -> np.ndarray:
    """The plain picture (no script) before any request of this module; every test compares to it."""
    return decode_pixels(webui.txt2img(prompt=PLAIN, seed=SEED)["images"][0])


def _assert_unchanged(webui, plain_picture: np.ndarray) -> None:
    after = decode_pixels(webui.txt2img(prompt=PLAIN, seed=SEED)["images"][0])
    np.testing.assert_array_equal(after, plain_picture, err_msg="a plain txt2img changed after the request")


# args, what the detail must name (each entry: one of these words), the value that appears once
BAD = {
    "step_size-not-a-number": ([{"enabled": True, "step_size": "big"}], ["step_size", "big"], "big"),
    "unknown-key": ([{"enabled": True, "stepsize": 3}], ["stepsize"], "stepsize"),
    "mask_threshold-out-of-range": ([{"enabled": True, "mask_threshold": 1.5}], ["mask", "1.5"], "1.5"),
    "refine_steps-not-numbers": ([{"enabled": True, "refine_steps": "a,b"}], ["refine_steps", "a,b"], "a,b"),
    "positional-wrong-type": ([True, "x", 25], ["step_size"], None),
    "enabled-not-a-boolean": ([{"enabled": "nope"}], ["enabled", "nope"], "nope"),
    # the host slices a string into its letters: the script gets enabled='e', 'n', 'a', ...
    "args-a-string": ("enabled", [("enabled", "list")], None),
}


@pytest.mark.parametrize("script_args, words, once", list(BAD.values()), ids=list(BAD))
def test_bad_clora_setting_is_a_400_with_its_message(webui, plain_picture, script_args, words, once):
    r = webui.post("/sdapi/v1/txt2img", _body(script_args))
    status, detail, sent = r.status, _detail(r), json.dumps(script_args)
    if status == 200:  # what the client got instead: a picture, and these generation parameters
        detail = f"(none; extra_generation_params {json.loads(r.json()['info'])['extra_generation_params']})"
    assert status == 400, f"args {sent} -> HTTP {status}, detail {detail}"
    print(f"\n[api] args {sent} -> 400: {detail}")
    wanted = [(word,) if isinstance(word, str) else word for word in words]
    missing = [w for w in wanted if not any(each.lower() in detail.lower() for each in w)]
    assert not missing, f"args {sent}: detail {detail!r} does not name {missing}"
    assert not _repeated_parts(detail), f"args {sent}: detail repeats itself: {detail!r}"
    if once is not None:
        assert detail.count(once) == 1, f"args {sent}: {once!r} not exactly once in {detail!r}"
    _assert_unchanged(webui, plain_picture)


def test_args_as_a_dict_is_refused_not_generated(webui, plain_picture):
    """``args`` must be a list: A1111 indexes it by position (``args[0]``) before any script runs,
    so a dict fails inside the host (1.8.0 and 1.10.1: HTTP 500, a KeyError). The request must not
    generate; if the answer is a 4xx, its detail says that args is a list."""
    r = webui.post("/sdapi/v1/txt2img", _body({"enabled": True}))
    status, detail = r.status, _detail(r)
    assert status >= 400, f"args as a dict -> HTTP {status}: {r.text[:600]}"
    if status < 500:
        assert "list" in detail.lower(), f"args as a dict -> {status}, detail {detail!r}"
    print(f"\n[api] args as a dict -> HTTP {status}: {r.text[:300]}")
    _assert_unchanged(webui, plain_picture)


# valid spellings that must keep composing (the refusals above must not catch them)
GOOD = {
    "string-boolean-and-text-steps": [{"enabled": "true", "refine_steps": "0,1", **FAST}],
    "positional": [True, 20.0, 2, "0", 1],
}


@pytest.mark.parametrize("script_args", list(GOOD.values()), ids=list(GOOD))
def test_valid_spellings_still_compose(webui, plain_picture, script_args):
    r = webui.post("/sdapi/v1/txt2img", _body(script_args))
    status = r.status
    assert status == 200, f"args {json.dumps(script_args)} -> {status}: {r.text[:1000]}"
    params = json.loads(r.json()["info"])["extra_generation_params"]
    assert "CLoRA" in params, f"args {json.dumps(script_args)}: no CLoRA entry in {params}"
    _assert_unchanged(webui, plain_picture)


def test_enabled_false_as_text_is_the_builtin(webui):
    """``"false"`` is a boolean too: off, the built-in Lora's picture, no CLoRA entry."""
    builtin = webui.txt2img(prompt=TAGGED, seed=SEED)
    r = webui.post("/sdapi/v1/txt2img", _body([{"enabled": "false"}]))
    status = r.status
    assert status == 200, r.text[:1000]
    assert "CLoRA" not in json.loads(r.json()["info"])["extra_generation_params"]
    np.testing.assert_array_equal(decode_pixels(r.json()["images"][0]), decode_pixels(builtin["images"][0]))
