"""The committed lab world passes a sample of its gates (lib_loraclr/lab/gates.py), checked with
its own judge on fixed held-out seeds, so a regression in the world (or in the sampler, the LoRA
loader or the judge it relies on) fails CI. The full gates are in its manifest (n >= 64 each)."""

from __future__ import annotations

import json

import pytest

from lib_loraclr.lab import build, gates, world

MANIFEST = json.loads((build.COMMITTED / build.MANIFEST).read_text())


def test_the_committed_world_is_complete():
    assert build.world_complete(build.COMMITTED)


def test_the_committed_judge_passed_its_bar():
    for split in ("held_out_clean", "held_out_through_vae"):
        assert MANIFEST["judge"][split]["class_found"] >= 0.95
        assert MANIFEST["judge"][split]["look_right"] >= 0.95


def test_the_manifest_holds_every_gate_for_this_base():
    assert set(MANIFEST["gates"]) >= {g.key for g in gates.GATES} | {"masks"}
    assert MANIFEST["gates"]["base_steps"] == MANIFEST["base"]["steps"]
    for gate in gates.GATES:
        assert MANIFEST["gates"][gate.key]["n"] >= 64, gate.key


@pytest.fixture(scope="module")
def lab():
    from lib_loraclr.lab import generate as gn
    from lib_loraclr.lab.model import load_lab_model

    return load_lab_model(build.COMMITTED / build.CHECKPOINT), build.load_judge(build.COMMITTED), gn


# What the committed world does on these fixed seeds, with a margin below it: a regression guard.
# The world does not pass its gates yet (docs/quality.md, "The gates"): the bars there are 90 % for
# the class and 80 % for a LoRA's identity; these floors rise with the world.
CLASS_FLOOR, IDENTITY_FLOOR = 14, 18  # measured: 21 of 32 and 28 of 64 (the base alone: 3 of 64)


def test_the_base_draws_the_asked_class(lab, one_thread):
    model, jd, gn = lab
    seeds = [gates.GATE_SEED + 900 + i for i in range(8)]
    prompts = [f"a photo of a {c}" for c in world.CLASSES for _ in seeds]
    asked = [[world.CLASSES.index(c)] for c in world.CLASSES for _ in seeds]  # identity k has class k
    verdicts = gn.judge_pictures(jd, gn.sample(model, prompts, seeds * 4, gn.Sampling()), asked)
    assert sum(v.all_classes for v in verdicts) >= CLASS_FLOOR  # of 32


def test_the_loras_draw_their_identities_and_the_base_does_not(lab, one_thread):
    from lib_loraclr.lora.file import load_lora

    model, jd, gn = lab
    with_lora = without = 0
    for k, ident in enumerate(world.IDENTITIES):  # the noise sets the layout: seeds of its own per LoRA
        seeds = [gates.GATE_SEED + 2000 + 8 * k + i for i in range(8)]
        prompts = [f"a photo of {ident.phrase}"] * len(seeds)
        offsets = gn.lora_offsets(model, [load_lora(build.lora_path(build.COMMITTED, ident))])
        pictures = gn.sample(model, prompts, seeds, gn.Sampling(), offsets)
        with_lora += sum(v.all_identities for v in gn.judge_pictures(jd, pictures, [[k]] * len(seeds)))
        plain = gn.sample(model, prompts, seeds, gn.Sampling())
        without += sum(v.all_identities for v in gn.judge_pictures(jd, plain, [[k]] * len(seeds)))
    assert with_lora >= IDENTITY_FLOOR  # of 64
    assert without <= with_lora // 4  # the look comes from the LoRA, not from the base


def test_the_maps_localise_as_the_manifest_says(lab, one_thread):
    """CLoRA's masks are cut from these maps: the share of an object word's attention on its own
    object (one pass over held-out scenes) stays where the manifest's gate measured it."""
    model, _, _ = lab
    shares = gates.map_localisation(model, scenes=16)
    recorded = MANIFEST["gates"]["map_localisation"]["value"]
    assert abs(sum(shares) / len(shares) - recorded) < 0.05
