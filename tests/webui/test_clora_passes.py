"""CLoRA with the host's other inputs and passes: textual-inversion embeddings (token positions),
inpainting (the host's mask blend) and the hires-fix pass, on the stand-in."""

from __future__ import annotations

import importlib

import torch

from lib_loraclr.clora.prompts import plan_composition
from lib_loraclr.clora.tokens import tokenizer_counter
from lib_loraclr.sd.tokenizer import load_clip_tokenizer
from tests.webui.conftest import load_script

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
