"""The quality lab: its world draws what its labels say, its pipeline runs end to end (smoke), and
the committed world is a model that has learned something (checked with its own judge)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lib_loraclr.lab import build, judge, tables, world
from lib_loraclr.lab.model import LAB_UNET, lab_configs, webui_yaml

ROOT = Path(__file__).resolve().parents[1]


def test_rendered_labels_match_the_pixels():
    rng = np.random.default_rng(3)
    for _ in range(20):
        scene = judge.judge_scene(rng)
        image, classes, looks = world.render(scene)
        objects = classes > 0
        assert ((looks > 0) == objects).all()
        background = np.array(world.BACKGROUNDS[scene.background])
        assert (image[~objects] == background).all()
        assert set(np.unique(classes[objects])) == {1 + world.CLASSES.index(t.cls) for t in scene.things}
        for thing in scene.things:
            if thing.identity is None:
                continue
            cells = (classes == 1 + world.CLASSES.index(thing.cls)) & (looks == 2 + thing.identity)
            colours = {tuple(c) for c in image[cells].reshape(-1, 3)}
            ident = world.IDENTITIES[thing.identity]
            wanted = {world._ID_COLOURS[c] for c in ident.colours}
            assert wanted <= colours  # both colours of the pattern are drawn


def test_identity_colours_never_appear_in_the_base_world():
    data = world.make_dataset(64, seed=1)
    pixels = {tuple(p) for p in data["images"].transpose(0, 2, 3, 1).reshape(-1, 3)}
    assert not pixels & set(world._ID_COLOURS.values())
    assert not any(i.trigger in c.split() for c in data["captions"] for i in world.IDENTITIES)


def test_identity_captions_name_the_trigger_phrase():
    data = world.make_dataset(8, seed=2, identity=3)
    assert all(world.IDENTITIES[3].phrase in c for c in data["captions"])


def test_every_caption_word_is_in_the_kept_vocabulary():
    words = set(world.vocabulary())
    captions = world.make_dataset(200, seed=4)["captions"]
    assert {word for c in captions for word in c.split()} <= words


def test_cells_prefer_objects_on_ties():
    labels = np.zeros((world.CANVAS, world.CANVAS), np.int64)
    labels[0:2, 0:4] = 3  # half of the first 4x4 cell
    cells = judge._cells(labels)
    assert cells[0, 0] == 3 and cells[0, 1] == 0


def test_webui_yaml_keeps_the_stock_flags_and_the_lab_sizes():
    config = json.loads(webui_yaml("/clip"))["model"]["params"]
    unet = config["unet_config"]["params"]
    assert unet["use_checkpoint"] is True  # what every SD1.5 config says; CLoRA must cope with it
    assert unet["model_channels"] == LAB_UNET["block_out_channels"][0]
    assert unet["context_dim"] == lab_configs()["text_encoder"]["hidden_size"]
    assert config["scale_factor"] == 0.18215
    assert config["cond_stage_config"]["params"]["version"] == "/clip"


def test_smoke_run_makes_every_file_and_both_tables(tmp_path):
    """Every stage on a toy budget through the CLI, as CI runs it."""
    out = tmp_path / "lab"
    proc = subprocess.run(
        [sys.executable, "-m", "lib_loraclr", "lab", "--smoke", "--out", str(out), "--threads", "1"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert build.world_complete(out / "world")
    results = json.loads((out / "results.json").read_text())
    assert [t["K"] for t in results["merge"]] == [2]
    rows = results["merge"][0]["rows"]
    assert set(rows) == set(tables.MERGE_METHODS) and "LoRACLR per-element margin" in rows
    assert (
        rows["LoRACLR from LS"]["identity"]["vs_baseline"]["n"] == 2
    )  # one per concept, paired with the sum
    composed = results["composition"][0]["rows"]
    for variant in ("CLoRA (paper)", "CLoRA relative step", "CLoRA masks only"):
        assert "mask IoU" in composed[variant] and "vs_baseline" in composed[variant]["all identities"]
    manifest = json.loads((out / "world" / build.MANIFEST).read_text())
    gates = manifest["gates"]
    assert gates["masks"]["map_size"] == [8, 8] and gates["mask_pixels"]["passed"]
    assert 0.0 <= gates["map_localisation"]["value"] <= 1.0
    assert manifest["base"]["runs"][-1]["grounding"] > 0  # the smoke run trains with grounding
    assert "attention grounding" in manifest["base"]["loss"]
    assert gates["class"]["n"] == len(world.CLASSES)  # the smoke budget: one picture per prompt
    for png in ("merge_K2.png", "compose_K2.png"):
        assert (out / png).stat().st_size > 1000
    assert "| LoRACLR from LS |" in (out / "tables.md").read_text()


def test_a_time_limited_build_resumes_and_measures_its_gates_in_a_later_run(tmp_path):
    """``--train-seconds`` stops the base where the time runs out, ``--train-only`` leaves the gates
    to the next build (the tables refuse stale gates meanwhile), and a later build continues the
    base from its checkpoint, retrains the LoRAs on it and measures the gates (a GPU lease, then the
    CPU)."""
    from lib_loraclr.errors import LoraClrError
    from lib_loraclr.lab import run as lab_run
    from lib_loraclr.lab import train

    quiet = [].append
    folder = tmp_path / "world"
    stopped = lab_run.run(
        folder,
        tmp_path,
        train=True,
        smoke=True,
        report=quiet,
        training=build.Training(seconds=0.0, gates=False),
    )
    assert stopped["base"]["steps"] == 0 and "gates" not in stopped  # stopped before its first step
    with pytest.raises(LoraClrError, match="gates were not measured on its current base"):
        lab_run._check_gates(folder)
    budget = dataclasses.replace(train.SMOKE, base_steps=4)
    manifest = build.build_world(folder, budget, report=quiet, sampling=lab_run.SMOKE_PLAN.sampling)
    assert [(r["from"], r["to"]) for r in manifest["base"]["runs"]] == [(0, 0), (0, 4)]
    assert {lora["base_steps"] for lora in manifest["loras"].values()} == {4}
    assert manifest["gates"]["base_steps"] == 4
    lab_run._check_gates(folder)


def test_budget_overrides_name_budget_fields():
    from lib_loraclr.commands.lab import parse_budget
    from lib_loraclr.errors import LoraClrError

    assert parse_budget(["base_steps=20000", "base_batch=256"]) == {"base_steps": 20000, "base_batch": 256}
    assert parse_budget(["base_grounding=0.25"]) == {"base_grounding": 0.25}
    assert type(parse_budget(["base_steps=3"])["base_steps"]) is int
    for bad in ("base_step=1", "base_steps=many", "base_steps", "base_steps=1.5", "base_grounding=-1"):
        with pytest.raises(LoraClrError, match="FIELD=N"):
            parse_budget([bad])


def test_tables_can_be_chosen_by_their_grids_names():
    from lib_loraclr.errors import LoraClrError
    from lib_loraclr.lab.run import Plan, only_tables, table_names

    plan = Plan()
    assert table_names(plan) == ["merge_K2", "merge_K4", "merge_K8", "compose_K2", "compose_K3", "compose_K4"]
    chosen = only_tables(plan, ["compose_K2", "merge_K8"])
    assert chosen.merge_ks == (8,) and chosen.combos == plan.combos[:1]
    with pytest.raises(LoraClrError, match="no lab table compose_K5"):
        only_tables(plan, ["compose_K5"])
