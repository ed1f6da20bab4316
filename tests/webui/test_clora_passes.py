"""CLoRA with the host's other inputs and passes: textual-inversion embeddings (token positions),
inpainting (the host's mask blend) and the hires-fix pass, on the stand-in."""

from __future__ import annotations

import importlib
import types

import pytest
import torch

from lib_loraclr.clora.prompts import plan_composition
from lib_loraclr.clora.tokens import tokenizer_counter
from lib_loraclr.sd.tokenizer import load_clip_tokenizer
from tests.webui.conftest import load_script

PROMPT = "a <lora:blackcat:1> cat and a <lora:corgi:0.8> dog"
ARGS = {"enabled": True, "max_step": 2, "refine_steps": "0", "refine_iterations": 1}


def _txt2img(prompt, args=None, **kwargs):
    processing = importlib.import_module("modules.processing")
    script = load_script("loraclr_clora").CloraScript()
    runner = processing.ScriptRunner([(script, [args or ARGS])])
    options = {"negative_prompt": "blurry", "seed": 5, "steps": 3, "width": 64, "height": 64, **kwargs}
    p = processing.StableDiffusionProcessingTxt2Img(
        prompt=prompt, scripts=runner, script_args=runner.args, **options
    )
    return p, processing.process_images(p)


def test_an_embedding_before_a_subject_shifts_its_token_positions(host) -> None:
    """The host's embedding database says "my-style-emb" is 8 vectors: the subjects after it are
    bound at the positions the host's prompt encoder gives them (not at the name's 5 tokens)."""
    sd_hijack = importlib.import_module("modules.sd_hijack")
    db = sd_hijack.model_hijack.embedding_db
    db.register_embedding(sd_hijack.Embedding(torch.zeros(8, 64), "my-style-emb"))
    prompt = "by my-style-emb, a <lora:blackcat:1> cat and a <lora:corgi:0.8> dog"
    p, _ = _txt2img(prompt)
    (plan,) = p.loraclr_clora_state.plans
    counter = tokenizer_counter(load_clip_tokenizer())
    triggers = {"blackcat": "blackcat cat", "corgi": "corgi dog"}.get
    expected = plan_composition(prompt, counter, triggers, embeddings={"my-style-emb": 8})
    plain = plan_composition(prompt, counter, triggers)
    shift = 8 - len(counter.ids("my-style-emb"))
    assert plan.groups == expected.groups and plan.groups[0][0] == (plain.groups[0][0][0] + shift,)
    assert plan.mask_tokens == expected.mask_tokens


def _blend_recorder():
    """An always-on script of the host that records every on_mask_blend (soft inpainting uses
    that hook); it leaves the blend as it is."""
    scripts = importlib.import_module("modules.scripts")

    class BlendRecorder(scripts.Script):
        def __init__(self):
            self.calls = []
            self.args_from = self.args_to = 0

        def on_mask_blend(self, p, mba, *args):  # as they are now (the sampler's latent moves on)
            self.calls.append(
                types.SimpleNamespace(
                    **{k: v.clone() if torch.is_tensor(v) else v for k, v in vars(mba).items()}
                )
            )

    return BlendRecorder()


@pytest.mark.parametrize("sampler", ["Euler", "Heun", "DDIM"])
def test_inpainting_blends_around_the_update_as_the_host_does(host, monkeypatch, sampler) -> None:
    """img2img with a mask (right half inpainted): every denoiser call goes through the host's blend
    (and the scripts' on_mask_blend), the latent update changes the sampler's latent only inside
    the mask, and outside the mask the image is the original, as the host keeps it."""
    processing = importlib.import_module("modules.processing")
    sd_samplers = importlib.import_module("modules.sd_samplers")
    init = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    inpaint = torch.zeros(8, 8)
    inpaint[:, 4:] = 1.0
    changes = []
    create = sd_samplers.create_sampler

    def create_sampler(name, model):  # measure what each denoiser call does to the sampler's latent
        sampler = create(name, model)
        seen = {}
        sampler.model_wrap_cfg.register_forward_pre_hook(lambda m, a: seen.update(x=a[0].clone()))
        sampler.model_wrap_cfg.register_forward_hook(lambda m, a, out: changes.append(a[0] - seen["x"]))
        return sampler

    monkeypatch.setattr(sd_samplers, "create_sampler", create_sampler)

    def run(args):
        changes.clear()
        recorder = _blend_recorder()
        script = load_script("loraclr_clora").CloraScript()
        runner = processing.ScriptRunner([(script, [args])])
        runner.alwayson_scripts.append(recorder)
        p = processing.StableDiffusionProcessingImg2Img(
            init_latent=init,
            denoising_strength=0.6,
            image_mask=inpaint,
            prompt=PROMPT,
            sampler_name=sampler,
            negative_prompt="blurry",
            seed=5,
            steps=5,
            width=64,
            height=64,
            scripts=runner,
            script_args=runner.args,
        )
        return p, processing.process_images(p), recorder.calls, list(changes)

    p, _, blends, moved = run(ARGS)
    ((_, core),) = p.loraclr_clora_state.cores
    assert core.state.losses and core.state.fused_calls == len(moved)
    during = [b for b in blends if not b.is_final_blend]
    assert len(during) == len(moved) and all(b.denoiser is p.sampler.model_wrap_cfg for b in during)
    assert [b.is_final_blend for b in blends][-1] and sum(b.is_final_blend for b in blends) == 1
    for b in during:  # the host's formula
        torch.testing.assert_close(b.blended_latent, b.current_latent * b.nmask + b.init_latent * b.mask)
    updated = [m for m in moved if m.abs().sum() > 0]
    assert updated and all(m[..., :4].abs().max() == 0 for m in moved)  # the update stays inside
    assert all(m[..., 4:].abs().sum() > 0 for m in updated)
    final = blends[-1].blended_latent  # the samples the host decodes
    assert torch.equal(final[..., :4], init[..., :4])  # outside the mask: the original
    _, _, still, _ = run({**ARGS, "step_size": 0.0})
    assert not torch.equal(final[..., 4:], still[-1].blended_latent[..., 4:])  # inside: the update
    if sampler != "DDIM":  # k-diffusion blends the prediction: outside the mask it is the original
        assert all(torch.equal(b.blended_latent[..., :4], b.init_latent[..., :4]) for b in during)


@pytest.mark.parametrize("hr_sampler", [None, "Heun"])
def test_hires_fix_composes_its_second_pass(host, hr_sampler) -> None:
    """The hires fix creates a second sampler on the upscaled latent: it runs CLoRA too (every
    call fused, masks from its own attention at its resolution, no contrastive update), the
    built-in never applies the bound LoRAs (also not from the hires prompts), and nothing of the
    host's model stays patched."""
    before = {k: v.clone() for k, v in host.view.state_dict().items()}
    prompt = PROMPT + ", <lora:ghibli:0.5>"
    activated = []
    extra_networks = importlib.import_module("modules.extra_networks")
    activate = extra_networks.activate

    def spy(p, data):
        activate(p, data)
        activated.append([n.name for n in importlib.import_module("networks").loaded_networks])

    extra_networks.activate = spy
    try:
        p, processed = _txt2img(
            prompt, enable_hr=True, hr_scale=2.0, denoising_strength=0.6, hr_sampler_name=hr_sampler
        )
    finally:
        extra_networks.activate = activate
    state = p.loraclr_clora_state
    ((_, first),) = state.cores
    ((plan, second),) = state.hr_cores
    assert first.state.losses and first.state.map_hw == (8, 8)  # 64 px: an 8x8 latent, auto level W/8
    steps = 3  # the host's hires pass runs its steps (hr_second_pass_steps or steps)
    calls = steps * 2 - 1 if hr_sampler == "Heun" else steps
    assert second.state.fused_calls == calls and second.state.step == steps
    assert second.state.losses == [] and second.state.map_hw == (8, 8)  # own maps, 16x16 latent, W/16
    assert second.state.masks[1:].sum() > 0  # masks from the first step on
    assert [b.lora for b in plan.bindings] == ["blackcat", "corgi"]
    assert activated == [["ghibli"], ["ghibli"]]  # first pass, hires pass: styles only
    assert p.all_hr_prompts == [prompt]  # the job's hires prompts as the user wrote them
    assert processed.images[0].shape[-1] == 128 and torch.isfinite(processed.images[0]).all()
    sd_samplers = importlib.import_module("modules.sd_samplers")
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in host.view.modules())
    assert sd_samplers.create_sampler.__module__ == "modules.sd_samplers" and "sample" not in p.__dict__
    assert all(torch.equal(before[k], v) for k, v in host.view.state_dict().items())


def test_a_hires_prompt_without_bindings_runs_a_plain_second_pass(host) -> None:
    p, _ = _txt2img(PROMPT, enable_hr=True, denoising_strength=0.6, hr_prompt="a cat and a dog, detailed")
    assert p.loraclr_clora_state.cores and p.loraclr_clora_state.hr_cores == []
