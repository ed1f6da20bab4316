"""A batch in the WebUI stand-in: every image's variants are rows of ONE UNet call per pass, and
each image comes out as it does generated alone (its own prompt, plan, masks and loss); an image
whose prompt has more 75-token chunks gets a pass of its own."""

from __future__ import annotations

import importlib

import pytest
import torch

from tests.webui.conftest import load_script

ARGS = {"enabled": True, "max_step": 2, "refine_steps": "0", "refine_iterations": 1}
FIRST = "a <lora:blackcat:1> cat and a <lora:corgi:0.8> dog"
SECOND = "a <lora:corgi:1> dog on a hill"
LONG = SECOND + ", " + ", ".join(["in a green field with tall grass"] * 12)  # past 75 tokens


def _generate(host, prompts, seed, sampler="Euler"):
    """The images, and the rows of each UNet call the generation made."""
    processing = importlib.import_module("modules.processing")
    script = load_script("loraclr_clora").CloraScript()
    runner = processing.ScriptRunner([(script, [ARGS])])
    p = processing.StableDiffusionProcessingTxt2Img(
        prompt=list(prompts),
        sampler_name=sampler,
        scripts=runner,
        script_args=runner.args,
        negative_prompt="blurry",
        seed=seed,
        steps=3,
        width=64,
        height=64,
        batch_size=len(prompts),
    )
    calls: list[int] = []
    original = host.view.apply_model

    def counted(x, t, cond):
        calls.append(x.shape[0])
        return original(x, t, cond)

    host.view.apply_model = counted
    try:
        processed = processing.process_images(p)
    finally:
        del host.view.apply_model  # the instance attribute: back to the class's method
    return processed.images[: len(prompts)], calls


@pytest.mark.parametrize("sampler", ["Euler", "DDIM"])
def test_batch_is_one_pass_and_each_image_as_alone(host, sampler) -> None:
    together, calls = _generate(host, [FIRST, SECOND], 5, sampler)
    first, first_calls = _generate(host, [FIRST], 5, sampler)
    second, second_calls = _generate(host, [SECOND], 6, sampler)  # the batch's second seed
    assert len(calls) == len(first_calls) == len(second_calls)  # one UNet call per pass, not one per image
    assert calls[-1] == first_calls[-1] + second_calls[-1] == 2 * 3 + 2 * 2  # (half, variant) rows of both
    torch.testing.assert_close(together[0], first[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(together[1], second[0], rtol=1e-4, atol=1e-4)


def test_a_longer_prompt_gets_a_pass_of_its_own(host, monkeypatch) -> None:
    """The host encodes a prompt past 75 tokens as two chunks (the stand-in's encoder truncates,
    so it is given A1111's second chunk here): that image's contexts are longer than the other's,
    and padding would change its attention, so each length gets its own pass."""
    encode = host.view.get_learned_conditioning

    def chunked(prompts):
        cond = encode(prompts)
        if any("field" in text for text in prompts):
            cond = torch.cat([cond, encode([""] * len(prompts))], dim=1)
        return cond

    monkeypatch.setattr(host.view, "get_learned_conditioning", chunked)
    together, calls = _generate(host, [FIRST, LONG], 5)
    first, first_calls = _generate(host, [FIRST], 5)
    second, second_calls = _generate(host, [LONG], 6)
    assert len(calls) == len(first_calls) + len(second_calls) and sorted(set(calls)) == [4, 6]
    torch.testing.assert_close(together[0], first[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(together[1], second[0], rtol=1e-4, atol=1e-4)


def test_same_context_groups() -> None:
    from lib_loraclr.sd.cond import Cond
    from lib_loraclr.webui.clora_sampling import same_context_groups

    shapes = [(6, 77, 8), (4, 154, 8), (4, 77, 8), (2, 154, 8)]
    contexts = [Cond(torch.zeros(shape)) for shape in shapes]
    assert same_context_groups(contexts) == [[0, 2], [1, 3]]
