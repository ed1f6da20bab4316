"""``python -m lib_loraclr lab``: build (or reuse) the world, measure both tables, write the results."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from lib_loraclr.clora.settings import CloraSettings
from lib_loraclr.errors import LoraClrError
from lib_loraclr.lab import build, tables
from lib_loraclr.lab import generate as gn
from lib_loraclr.lab import report as rp
from lib_loraclr.lab import train as tr
from lib_loraclr.lab.model import load_lab_model
from lib_loraclr.lora.file import load_lora


@dataclass(frozen=True)
class Plan:
    """What one lab run measures."""

    merge_ks: tuple[int, ...] = (2, 4, 8)
    combos: tuple[tuple[tuple[int, ...], ...], ...] = (
        ((0, 1), (2, 3), (4, 5)),
        ((0, 1, 2), (3, 4, 5)),
        ((0, 1, 2, 3), (2, 3, 4, 5)),
    )
    seeds: int = 8
    sampling: gn.Sampling = gn.Sampling()
    merge_steps: int = 20
    merge_iterations: int = 50
    clora: CloraSettings = CloraSettings(enabled=True)


SMOKE_PLAN = Plan(
    merge_ks=(2,),
    combos=(((0, 1),),),
    seeds=1,
    sampling=gn.Sampling(steps=3),
    merge_steps=2,
    merge_iterations=2,
    clora=CloraSettings(enabled=True, max_step=2, refine_steps=(0,), refine_iterations=1),
)


def load_setup(world: Path, plan: Plan) -> tables.LabSetup:
    if not build.world_complete(world):
        raise LoraClrError(
            f"{world} holds no complete lab world (checkpoint, LoRAs, judge, manifest); "
            "train one with `python -m lib_loraclr lab --train --world DIR`"
        )
    model = load_lab_model(world / build.CHECKPOINT)
    loras = {p.stem: load_lora(p) for p in sorted((world / build.LORA_DIR).glob("*.safetensors"))}
    return tables.LabSetup(
        model,
        loras,
        build.load_judge(world),
        plan.sampling,
        plan.seeds,
        plan.merge_steps,
        plan.merge_iterations,
        plan.clora,
    )


def measure(world: Path, out: Path, plan: Plan, report: Callable[[str], None] = print) -> dict:
    """Both tables and their grids into ``out`` (``results.json``, ``tables.md``, PNGs)."""
    torch.manual_seed(0)
    started = time.perf_counter()
    setup = load_setup(world, plan)
    manifest = json.loads((world / build.MANIFEST).read_text())
    results: dict = {"plan": repr(plan), "judge": manifest.get("judge"), "merge": [], "composition": []}
    md = ["## Merge (LoRACLR's table)", ""]
    out.mkdir(parents=True, exist_ok=True)
    for k in plan.merge_ks:
        table, pictures = tables.merge_table(setup, list(range(k)), report)
        results["merge"].append(table)
        md += [rp.merge_markdown(table), "", f"![merge K={k}](merge_K{k}.png)", ""]
        rp.grid(pictures, table["columns"], out / f"merge_K{k}.png")
    md += ["## Composition (CLoRA's table)", ""]
    for combos in plan.combos:
        table, pictures = tables.composition_table(setup, combos, report)
        results["composition"].append(table)
        k = table["K"]
        md += [rp.composition_markdown(table), "", f"![composition K={k}](compose_K{k}.png)", ""]
        rp.grid(pictures, table["columns"], out / f"compose_K{k}.png")
    results["seconds"] = time.perf_counter() - started
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "tables.md").write_text("\n".join(md))
    report(f"lab: measured in {results['seconds']:.0f} s; results in {out}")
    return results


def run(
    world: Path | None,
    out: Path,
    train: bool = False,
    smoke: bool = False,
    seeds: int | None = None,
    report: Callable[[str], None] = print,
) -> dict:
    """Smoke: every stage on a toy budget into ``out/world`` (checks the pipeline, not quality)."""
    plan = SMOKE_PLAN if smoke else Plan()
    if seeds:
        plan = Plan(**{**plan.__dict__, "seeds": seeds})
    if smoke:
        world = world or out / "world"
        train = True
    world = world or build.COMMITTED
    if train:
        build.build_world(world, tr.SMOKE if smoke else tr.FULL, seed=0, report=report)
    return measure(world, out, plan, report)
