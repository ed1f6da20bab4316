"""``python -m lib_loraclr lab``: build (or reuse) the world, measure both tables, write the results."""

from __future__ import annotations

import dataclasses
import itertools
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from lib_loraclr.clora.settings import CloraSettings
from lib_loraclr.errors import LoraClrError
from lib_loraclr.lab import build, gates, tables
from lib_loraclr.lab import generate as gn
from lib_loraclr.lab import report as rp
from lib_loraclr.lab import train as tr
from lib_loraclr.lab.model import load_lab_model
from lib_loraclr.lora.file import load_lora


@dataclass(frozen=True)
class Plan:
    """What one lab run measures: K = 2, 4, 8 merged; K = 2, 3, 4 composed (identities 0-3 are
    one per class, 4-7 the second of each class); ``pictures`` per cell."""

    merge_ks: tuple[int, ...] = (2, 4, 8)
    combos: tuple[tuple[tuple[int, ...], ...], ...] = (
        ((0, 1), (2, 3), (4, 5), (6, 7)),
        ((0, 1, 2), (1, 2, 3), (4, 5, 6), (5, 6, 7)),
        ((0, 1, 2, 3), (4, 5, 6, 7)),
    )
    pictures: int = 64
    sampling: gn.Sampling = gn.Sampling()
    merge_steps: int = 20
    merge_iterations: int = 50
    clora_variants: tuple[tuple[str, CloraSettings], ...] = tables.CLORA_VARIANTS


_SMOKE_CLORA = CloraSettings(enabled=True, max_step=2, refine_steps=(0,), refine_iterations=1)
SMOKE_PLAN = Plan(
    merge_ks=(2,),
    combos=(((0, 1),),),
    pictures=1,
    sampling=gn.Sampling(steps=3),
    merge_steps=2,
    merge_iterations=2,
    clora_variants=tuple(
        (name, dataclasses.replace(_SMOKE_CLORA, step_mode=s.step_mode)) for name, s in tables.CLORA_VARIANTS
    ),
)


def table_names(plan: Plan) -> list[str]:
    """The plan's tables by the names of their grids: ``merge_K2``, ``compose_K2``, ..."""
    return [f"merge_K{k}" for k in plan.merge_ks] + [f"compose_K{len(c[0])}" for c in plan.combos]


def only_tables(plan: Plan, names: Sequence[str]) -> Plan:
    """``plan`` measuring only the tables ``names`` (:func:`table_names`); an unknown name is refused."""
    unknown = sorted(set(names) - set(table_names(plan)))
    if unknown:
        raise LoraClrError(
            f"no lab table {', '.join(unknown)}; the tables are {', '.join(table_names(plan))}"
        )
    return dataclasses.replace(
        plan,
        merge_ks=tuple(k for k in plan.merge_ks if f"merge_K{k}" in names),
        combos=tuple(c for c in plan.combos if f"compose_K{len(c[0])}" in names),
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
        plan.pictures,
        plan.merge_steps,
        plan.merge_iterations,
        plan.clora_variants,
    )


def measure(world: Path, out: Path, plan: Plan, report: Callable[[str], None] = print) -> dict:
    """Both tables and their grids into ``out`` (``results.json``, ``tables.md``, PNGs)."""
    torch.manual_seed(0)
    started = time.perf_counter()
    setup = load_setup(world, plan)
    manifest = json.loads((world / build.MANIFEST).read_text())
    results: dict = {
        "plan": repr(plan),
        "judge": manifest.get("judge"),
        "gates": manifest.get("gates"),
        "merge": [],
        "composition": [],
    }
    md = ["## Gates", "", *(f"- {line}" for line in gates.gates_lines(manifest.get("gates") or {})), ""]
    for line in gates.gates_lines(manifest.get("gates") or {}):
        report(line)
    out.mkdir(parents=True, exist_ok=True)
    sheet_setup = gates.GateSetup(setup.model, setup.loras, setup.judge, setup.sampling)
    md += [f"![{p.stem}]({p.name})" for p in gates.sample_sheets(sheet_setup, out)] + [""]
    merge_md, compose_md = ["## Merge (LoRACLR's table)", ""], ["## Composition (CLoRA's table)", ""]

    def write() -> None:  # after every table, so an interrupted run keeps what it measured
        results["seconds"] = time.perf_counter() - started
        (out / "results.json").write_text(json.dumps(results, indent=2))
        (out / "tables.md").write_text("\n".join(md + merge_md + compose_md))

    # the two tables alternate, smallest K first: the cheap, telling cells are in early
    for k, combos in itertools.zip_longest(plan.merge_ks, plan.combos):
        if k is not None:
            table, pictures = tables.merge_table(setup, list(range(k)), report)
            results["merge"].append(table)
            merge_md += [rp.merge_markdown(table), "", f"![merge K={k}](merge_K{k}.png)", ""]
            rp.grid(pictures, table["columns"], out / f"merge_K{k}.png")
            write()
        if combos is not None:
            table, pictures = tables.composition_table(setup, combos, report)
            results["composition"].append(table)
            n = table["K"]
            compose_md += [rp.composition_markdown(table), "", f"![composition K={n}](compose_K{n}.png)", ""]
            rp.grid(pictures, table["columns"], out / f"compose_K{n}.png")
            write()
    report(f"lab: measured in {results['seconds']:.0f} s; results in {out}")
    return results


def run(
    world: Path | None,
    out: Path,
    train: bool = False,
    smoke: bool = False,
    pictures: int | None = None,
    report: Callable[[str], None] = print,
    training: build.Training | None = None,
    budget: dict[str, int] | None = None,
    only: Sequence[str] = (),
) -> dict:
    """Smoke: every stage on a toy budget into ``out/world`` (checks the pipeline, not quality).
    ``only``: measure just these tables (``merge_K2``, ``compose_K2``, ...).
    ``budget`` overrides fields of the training budget; without ``training.gates`` the run stops
    after training and returns the manifest."""
    plan = SMOKE_PLAN if smoke else Plan()
    training = training or build.Training()
    if pictures:
        plan = dataclasses.replace(plan, pictures=pictures)
    if only:
        plan = only_tables(plan, only)
    if smoke:
        world = world or out / "world"
        train = True
    world = world or build.COMMITTED
    if train:
        chosen = dataclasses.replace(tr.SMOKE if smoke else tr.FULL, **(budget or {}))
        manifest = build.build_world(world, chosen, 0, report, plan.sampling, training)
        if not training.gates:
            return manifest
    _check_gates(world)
    return measure(world, out, plan, report)


def _check_gates(world: Path) -> None:
    """Tables on a world whose gates are not those of its base would print stale gates."""
    if not build.world_complete(world):
        return  # load_setup says what is missing
    manifest = json.loads((world / build.MANIFEST).read_text())
    if manifest.get("gates", {}).get("base_steps") != manifest.get("base", {}).get("steps"):
        raise LoraClrError(
            f"{world}'s gates were not measured on its current base; "
            f"measure them with `python -m lib_loraclr lab --train --world {world}`"
        )
