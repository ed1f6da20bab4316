"""CLoRA in a real WebUI on the samplers that call the model more than once per step, the hires
fix, NGMS and DDIM CFG++ (opt-in, as test_webui_real.py: needs SD_WEBUI_ROOT)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from .conftest import decode_pixels

TAGGED = "a <lora:tinyA:1> cat and a <lora:tinyB:1> dog"
PLAIN = "a photo of a cat and a dog"
SEED = 4242


def _clora(**params) -> dict:
    return {
        "CLoRA composition": {"args": [{"enabled": True, "max_step": 3, "refine_iterations": 2, **params}]}
    }


def _pixels(result: dict) -> np.ndarray:
    return decode_pixels(result["images"][0])


def _logged(webui, since: int, what: str) -> list[str]:
    """The server log's lines after offset ``since`` that contain ``what`` (the extension logs
    each plan's token groups and each sampling pass's fused calls and latent updates at INFO)."""
    text = webui.log_path.read_text(errors="replace")[since:]
    return [line[line.index(what) :] for line in text.splitlines() if what in line]


def _log_size(webui) -> int:
    return len(webui.log_path.read_text(errors="replace"))


SECOND_ORDER = {"Heun", "DPM2 a", "DPM++ 2S a", "DPM++ SDE", "Restart"}


@pytest.mark.parametrize(
    "sampler", ["Heun", "DPM2 a", "DPM++ 2S a", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 3M SDE", "Restart"]
)
def test_multi_call_and_sde_samplers_compose(webui, sampler):
    """Each runs through CLoRA (its entry in the infotext), the latent update reaches the image
    (step size 0 gives another), the same settings give the same image, and nothing stays
    patched (a plain generation before and after is identical)."""
    plain = _pixels(webui.txt2img(prompt=PLAIN, seed=SEED, sampler_name=sampler))
    since = _log_size(webui)
    result = webui.txt2img(prompt=TAGGED, seed=SEED, sampler_name=sampler, alwayson_scripts=_clora())
    assert "CLoRA" in json.loads(result["info"])["extra_generation_params"], result["info"][:2000]
    # 4 steps: two calls per step but the last for second-order samplers, every call fused; the
    # latent updates on the schedule's steps (max_step 3, 1 + 2 refinements at step 0), not calls
    calls = 2 * 4 - 1 if sampler in SECOND_ORDER else 4
    assert _logged(webui, since, "CLoRA first pass") == [
        f"CLoRA first pass, image 1: {calls} denoiser calls fused, latent updates per step {{0: 3, 1: 1, 2: 1}}"
    ], webui.log_tail()
    still = webui.txt2img(
        prompt=TAGGED, seed=SEED, sampler_name=sampler, alwayson_scripts=_clora(step_size=0)
    )
    assert not np.array_equal(_pixels(result), _pixels(still))
    again = webui.txt2img(prompt=TAGGED, seed=SEED, sampler_name=sampler, alwayson_scripts=_clora())
    np.testing.assert_array_equal(_pixels(result), _pixels(again))
    np.testing.assert_array_equal(
        _pixels(webui.txt2img(prompt=PLAIN, seed=SEED, sampler_name=sampler)), plain
    )


def test_hires_fix_second_pass_composes(webui):
    body = {
        "prompt": TAGGED,
        "seed": SEED,
        "enable_hr": True,
        "hr_scale": 2,
        "hr_upscaler": "Latent",
        "denoising_strength": 0.6,
        "hr_second_pass_steps": 3,
    }
    plain = _pixels(webui.txt2img(prompt=PLAIN, seed=SEED))
    builtin = webui.txt2img(**body)  # both LoRAs global through the built-in, both passes
    since = _log_size(webui)
    composed = webui.txt2img(**body, alwayson_scripts=_clora())
    # the second pass runs its 3 steps fused, without latent updates
    assert _logged(webui, since, "CLoRA hires pass") == [
        "CLoRA hires pass, image 1: 3 denoiser calls fused, latent updates per step {}"
    ], webui.log_tail()
    assert _pixels(composed).shape == (128, 128, 3)
    assert "CLoRA" in json.loads(composed["info"])["extra_generation_params"]
    assert not np.array_equal(_pixels(composed), _pixels(builtin))
    np.testing.assert_array_equal(_pixels(webui.txt2img(prompt=PLAIN, seed=SEED)), plain)
    np.testing.assert_array_equal(_pixels(webui.txt2img(**body)), _pixels(builtin))


def test_ngms_is_honoured_and_recorded(webui):
    result = webui.txt2img(prompt=TAGGED, seed=SEED, s_min_uncond=100.0, alwayson_scripts=_clora())
    params = json.loads(result["info"])["extra_generation_params"]
    assert params.get("NGMS") == 100.0 and "CLoRA" in params, params
    guided = webui.txt2img(prompt=TAGGED, seed=SEED, alwayson_scripts=_clora())
    assert not np.array_equal(_pixels(result), _pixels(guided))


def test_ddim_cfgpp_composes_where_the_host_has_it(webui):
    names = {s["name"] for s in json.loads(webui.get("/sdapi/v1/samplers").text)}
    if "DDIM CFG++" not in names:
        pytest.skip("this WebUI has no DDIM CFG++ (A1111 1.10 added it)")
    result = webui.txt2img(prompt=TAGGED, seed=SEED, sampler_name="DDIM CFG++", alwayson_scripts=_clora())
    assert "CLoRA" in json.loads(result["info"])["extra_generation_params"]
    ddim = webui.txt2img(prompt=TAGGED, seed=SEED, sampler_name="DDIM", alwayson_scripts=_clora())
    assert not np.array_equal(_pixels(result), _pixels(ddim))


def test_an_embedding_shifts_the_subjects_token_positions(webui):
    """The fixture's embedding "tiny-style-emb" has 8 vectors: the WebUI puts them where the name's
    tokens were, so "cat" after it is at 1 (by) + 8 + 1 (,) + 1 (a) + 1 = 12, its trigger after it."""
    since = _log_size(webui)
    prompt = "by tiny-style-emb, a <lora:tinyA:1> cat and a <lora:tinyB:1> dog"
    webui.txt2img(prompt=prompt, seed=SEED, alwayson_scripts=_clora())
    (line,) = _logged(webui, since, "CLoRA plan for")
    assert "token groups (((12,), (12, 13), (12,))," in line, line
