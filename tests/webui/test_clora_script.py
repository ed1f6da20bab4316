"""The always-on CLoRA script in the host stand-in's real hook order: images, masks, infotext, bound
tags taken from the built-in, and nothing left patched (also when sampling fails)."""

from __future__ import annotations

import importlib

import pytest
import torch

from lib_loraclr.clora_config import CloraSettings
from lib_loraclr.errors import LoraClrError
from tests.webui.conftest import load_script

PROMPT = "a <lora:blackcat:1> cat and a <lora:corgi:0.8> dog, <lora:ghibli:0.5>"
ARGS = {"enabled": True, "max_step": 2, "refine_steps": "0", "refine_iterations": 2, "show_masks": True}


def _generate(host, prompt=PROMPT, sampler="Euler", args=None, **kwargs):
    processing = importlib.import_module("modules.processing")
    script = load_script("loraclr_clora").CloraScript()
    runner = processing.ScriptRunner([(script, [args or ARGS])])
    p = processing.StableDiffusionProcessingTxt2Img(prompt=prompt, negative_prompt="blurry", seed=5, steps=3, width=64, height=64,
                                                    sampler_name=sampler, scripts=runner, script_args=runner.args, **kwargs)  # fmt: skip
    return p, processing.process_images(p)


def _clean(host):
    sd_samplers = importlib.import_module("modules.sd_samplers")
    modules = list(host.view.modules())
    return (
        all(not m._forward_hooks and not m._forward_pre_hooks for m in modules)
        and sd_samplers.create_sampler.__module__ == "modules.sd_samplers"
    )


def test_generation_with_masks_infotext_and_builtin_keeps_styles(host) -> None:
    before = {k: v.clone() for k, v in host.view.state_dict().items()}
    p, processed = _generate(host)
    assert len(processed.images) == 1 + 3  # the image, then masks of base, blackcat, corgi
    assert torch.isfinite(processed.images[0]).all()
    networks = importlib.import_module("networks")
    assert [n.name for n in networks.loaded_networks] == ["ghibli"]
    info = p.extra_generation_params["CLoRA"]
    assert '"lora":"blackcat"' in info and '"trigger":"blackcat cat"' in info
    assert CloraSettings.from_infotext(info).refine_iterations == 2
    assert _clean(host) and "sample" not in p.__dict__
    assert all(torch.equal(before[k], v) for k, v in host.view.state_dict().items())
    # reproducible: the same settings give the same image
    _, again = _generate(host)
    assert torch.equal(processed.images[0], again.images[0])


def test_failure_mid_sampling_leaves_nothing_patched(host, monkeypatch) -> None:
    calls = []
    original = host.view.apply_model

    def failing(x, t, cond):
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("GPU fell over")
        return original(x, t, cond)

    monkeypatch.setattr(host.view, "apply_model", failing)
    with pytest.raises(RuntimeError, match="fell over"):
        _generate(host)
    assert _clean(host)


def test_disabled_is_a_plain_generation(host) -> None:
    _, plain = _generate(host, prompt="a cat and a dog", args={"enabled": False})
    assert len(plain.images) == 1 and _clean(host)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"sampler": "DDIM"}, "sampler 'DDIM' is not supported"),
        ({"prompt": "a <lora:nosuch:1> cat and a <lora:corgi> dog"}, "LoRA 'nosuch' not found"),
        ({"prompt": "a <lora:blackcat> cat AND a dog"}, "AND prompts"),
        ({"prompt": "a <lora:blackcat> cat and a <lora:corgi> cat"}, "bound to two LoRAs"),
    ],
)
def test_bad_input_messages(host, kwargs, message) -> None:
    with pytest.raises(LoraClrError, match=message):
        _generate(host, **kwargs)
    assert _clean(host)
