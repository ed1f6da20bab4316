"""CLoRA on the samplers that call the model more than once per step (and the SDE samplers): the
latent update runs once per sampler STEP (on its first call), every call is fused with that
step's masks, and the schedule counts steps, not calls (the stand-in mirrors each sampler's call
pattern: k-diffusion's functions and A1111's Restart)."""

from __future__ import annotations

import importlib

import pytest
import torch

from lib_loraclr.webui import clora_sampling, samplers
from tests.webui.conftest import ORACLE_ATOL, composed_image, load_script

PROMPT = "a <lora:blackcat:1> cat and a <lora:corgi:0.8> dog"
# updates at steps 0 and 1 (max_step 2), two more at the refinement step 1
ARGS = {"enabled": True, "max_step": 2, "refine_steps": "1", "refine_iterations": 2}


def _generate(sampler, steps, args=None, **kwargs):
    processing = importlib.import_module("modules.processing")
    script = load_script("loraclr_clora").CloraScript()
    runner = processing.ScriptRunner([(script, [args or ARGS])])
    p = processing.StableDiffusionProcessingTxt2Img(
        prompt=PROMPT,
        sampler_name=sampler,
        scripts=runner,
        script_args=runner.args,
        negative_prompt="blurry",
        seed=5,
        steps=steps,
        width=64,
        height=64,
        **kwargs,
    )
    return p, processing.process_images(p)


class _Calls(list):
    skipped: list


@pytest.fixture()
def record(monkeypatch):
    """Per batch call (one image): (step passed, latent updates it made, fused predictions it returned)."""
    calls, skipped = _Calls(), []

    class Recorded(clora_sampling.CloraBatch):
        def denoise(self, x, sigma, step=None, update_mask=None, cond_only=False):
            (core,) = self.cores
            before, fused = core.state.updates, core.state.fused_calls
            out = super().denoise(x, sigma, step, update_mask, cond_only)
            calls.append((step, core.state.updates - before, core.state.fused_calls - fused))
            skipped.append(cond_only)
            return out

    monkeypatch.setattr(clora_sampling, "CloraBatch", Recorded)
    calls.skipped = skipped
    return calls


@pytest.mark.parametrize(
    "sampler, steps",
    [
        ("Heun", 4),
        ("DPM++ SDE", 4),
        ("DPM2", 4),
        ("DPM2 a", 3),
        ("DPM++ 2S a", 3),
        ("DPM++ 2M SDE", 4),
        ("DPM++ 2M SDE Heun", 3),
        ("DPM++ 3M SDE", 4),
        ("Restart", 3),
    ],
)
def test_updates_once_per_step_and_fuses_every_call(host, record, sampler, steps) -> None:
    before = {k: v.clone() for k, v in host.view.state_dict().items()}
    p, processed = _generate(sampler, steps)
    ((plan, core),) = p.loraclr_clora_state.cores
    per_step = samplers.CALLS_PER_STEP[sampler]
    assert p.sampler.model_wrap_cfg.total_steps == per_step * steps  # the host's expected calls
    # each step's calls, the last step to sigma 0 makes one
    expected_calls = per_step * steps - (per_step - 1)
    assert len(record) == expected_calls == core.state.fused_calls
    assert [s for s, _, _ in record] == sorted(s for s in range(steps) for _ in range(per_step))[
        :expected_calls
    ]
    assert all(fused == 1 for _, _, fused in record)  # every call fused
    # the latent updates: on each step's first call only, as many as the schedule gives that step
    updates = {}
    for s, n, _ in record:
        updates.setdefault(s, []).append(n)
    assert {s: sum(n) for s, n in updates.items() if sum(n)} == {0: 1, 1: 3}
    assert all(n[1:] == [0] * (len(n) - 1) for n in updates.values())
    assert [s for s, _, _ in core.state.losses] == [0, 1, 1, 1] and core.state.step == steps
    assert torch.isfinite(processed.images[0]).all()
    assert all(torch.equal(before[k], v) for k, v in host.view.state_dict().items())


@pytest.mark.parametrize("sampler", ["Heun", "DPM++ SDE"])
def test_the_update_reaches_the_image(host, sampler) -> None:
    p, processed = _generate(sampler, 3)
    ((_, core),) = p.loraclr_clora_state.cores
    assert core.state.masks[1:].sum() > 0
    _, still = _generate(sampler, 3, args={**ARGS, "step_size": 0.0})
    assert not torch.equal(processed.images[0], still.images[0])


def test_restart_counts_its_own_steps_with_restart_segments(host, record) -> None:
    """From 20 steps on, Restart walks a restart segment again (20 Heun steps: 11 of a shorter
    Karras schedule and 9 of the segment); CLoRA's schedule counts those steps (its progress)."""
    p, _ = _generate("Restart", 20, args={**ARGS, "max_step": 1, "refine_steps": "", "refine_iterations": 0})
    ((_, core),) = p.loraclr_clora_state.cores
    assert len(record) == core.state.fused_calls == 2 * 20 - 1
    assert [s for s, _, _ in core.state.losses] == [0] and core.state.step == 20


@pytest.mark.parametrize(
    "options, kwargs, skipped, info",
    [
        ({}, {"s_min_uncond": 100.0}, [False, True, False, True], {"NGMS": 100.0}),  # 1.8.0 and 1.10
        ({"s_min_uncond_all": True}, {"s_min_uncond": 100.0}, [True] * 4, {"NGMS all steps": True}),
        ({"skip_early_cond": 0.5}, {}, [True, True, True, False], {"Skip Early CFG": 0.5}),  # 1.10
    ],
)
def test_ngms_and_skip_early_cfg_skip_guidance_on_the_hosts_calls(
    host, record, options, kwargs, skipped, info
):
    """Where the host's denoiser would skip the unconditional half (NGMS every other call below
    its sigma, or on every call; 1.10's "Skip Early CFG" on the first share of calls), CLoRA's
    call returns the fused prompt prediction alone, and the infotext says so as the host's does."""
    for name, value in options.items():
        setattr(host.shared.opts, name, value)
    p, processed = _generate("Euler", 4, **kwargs)
    assert record.skipped == skipped
    assert info.items() <= p.extra_generation_params.items()
    for name in options:  # back to the defaults
        setattr(host.shared.opts, name, {"skip_early_cond": 0.0, "s_min_uncond_all": False}[name])
    guided, _ = _generate("Euler", 4)
    assert (
        "NGMS" not in guided.extra_generation_params
        and "Skip Early CFG" not in guided.extra_generation_params
    )
    assert not torch.equal(processed.images[0], _generate("Euler", 4)[1].images[0])


def test_guidance_skipped_on_every_call_is_the_composition_at_scale_one(host, tiny_model) -> None:
    """ "Skip Early CFG" over all calls: each call is the fused prompt prediction alone, so the
    picture is the core's own composition at CFG scale 1 (its loss on both halves, as here)."""
    host.shared.opts.skip_early_cond = 1.0
    _, processed = _generate("Euler", 4)
    host.shared.opts.skip_early_cond = 0.0
    want = composed_image(tiny_model, host.lora_dir, PROMPT, ARGS, "euler", 4, cfg_scale=1.0)
    torch.testing.assert_close(processed.images[0], want, rtol=0, atol=ORACLE_ATOL)


def test_ddim_cfgpp_reads_clora_s_unconditional_prediction(host, monkeypatch) -> None:
    """1.10's DDIM CFG++ divides the scale by 12.5 and steps along the unconditional eps the
    denoiser records: CLoRA's call records its fused unconditional eps there."""
    recorded = []
    original = clora_sampling.CloraBatch.denoise

    def denoise(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        (core,) = self.cores
        recorded.append((core.cfg_scale, core.state.last_uncond.clone()))
        return out

    monkeypatch.setattr(clora_sampling.CloraBatch, "denoise", denoise)
    p, processed = _generate("DDIM CFG++", 4)
    denoiser = p.sampler.model_wrap_cfg
    ((_, core),) = p.loraclr_clora_state.cores
    assert core.state.losses and core.state.fused_calls == 3  # the host's DDIM: steps - 1 calls
    assert all(scale == pytest.approx(7.0 / 12.5) for scale, _ in recorded)
    assert torch.equal(denoiser.last_noise_uncond, recorded[-1][1])
    assert torch.isfinite(processed.images[0]).all()
    _, ddim = _generate("DDIM", 4)
    assert not torch.equal(processed.images[0], ddim.images[0])
