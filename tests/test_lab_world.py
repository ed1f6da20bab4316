"""The committed lab world is a model that has learned something: checked with its own judge."""

from __future__ import annotations

import json

from lib_loraclr.lab import build, world


def test_the_committed_world_is_complete():
    assert build.world_complete(build.COMMITTED)


def test_the_committed_judge_passed_its_bar():
    manifest = json.loads((build.COMMITTED / build.MANIFEST).read_text())
    for split in ("held_out_clean", "held_out_through_vae"):
        assert manifest["judge"][split]["class_found"] >= 0.95
        assert manifest["judge"][split]["look_right"] >= 0.95


def test_the_committed_model_draws_what_it_is_asked(one_thread):
    """A model that has learned (in part, docs/quality.md): the base draws the asked class more
    often than not, sks cat's LoRA puts its identity on a cat, and without it that look never
    appears. A random model fails all three."""
    from lib_loraclr.lab import generate as gn
    from lib_loraclr.lab.model import load_lab_model
    from lib_loraclr.lora.file import load_lora

    model = load_lab_model(build.COMMITTED / build.CHECKPOINT)
    jd = build.load_judge(build.COMMITTED)
    sampling, seeds = gn.Sampling(), list(range(8))
    ident = world.IDENTITIES[0]
    prompts = ["a photo of a red cat"] * 8 + [f"a photo of {ident.phrase}"] * 8
    plain = gn.judge_pictures(jd, gn.sample(model, prompts, seeds + seeds, sampling), [[0]] * 16)
    assert sum(v.all_classes for v in plain[:8]) >= 4  # cats
    # the base never saw sks cat: the judge reads its look in at most one picture (its own
    # false positives on generated pictures are a few per cent, docs/quality.md)
    seen_without = sum(v.all_identities for v in plain)
    assert seen_without <= 1
    lora = load_lora(build.lora_path(build.COMMITTED, ident))
    pictures = gn.sample(model, prompts[8:], seeds, sampling, gn.lora_offsets(model, [lora]))
    assert sum(v.all_identities for v in gn.judge_pictures(jd, pictures, [[0]] * 8)) >= seen_without + 3
