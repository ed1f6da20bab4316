"""The two tables of the papers, in miniature, measured in the lab's world.

Merge (LoRACLR's table): K identities merged into one model; each concept alone ("a photo of sks
cat") and in pairs ("a photo of sks cat and zwx dog"); identity and class accuracy per method.
Composition (CLoRA's table): K subjects in one prompt; every subject with its own identity,
the share of subjects with theirs, bleeding, class accuracy, and the IoU of CLoRA's masks with the judge's object regions.
Every figure is a mean over pictures (one seed each) with its standard error.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lib_loraclr.clora.compose import compose
from lib_loraclr.clora.settings import CloraSettings
from lib_loraclr.lab import generate as gn
from lib_loraclr.lab import world as w
from lib_loraclr.lab.gates import TABLE_SEED
from lib_loraclr.merge.engine import MergeConfig, merge_loras

log = logging.getLogger(__name__)
MERGE_METHODS = (
    "LoRA alone",
    "base",
    "sum",
    "average",
    "least squares",
    "LoRACLR from W",
    "LoRACLR from LS",
    "LoRACLR per-element margin",
)
MERGE_BASELINE = "sum"  # what stacking the LoRAs' deltas gives: the naive merge
COMPOSE_FIXED = ("base", "WebUI default (all LoRAs)", "LoRACLR merge")
COMPOSE_BASELINE = "WebUI default (all LoRAs)"
# CLoRA's rows: the paper's settings, and the two options beyond it (docs/methods.md)
CLORA_VARIANTS = (
    ("CLoRA (paper)", CloraSettings(enabled=True)),
    ("CLoRA relative step", CloraSettings(enabled=True, step_mode="relative")),
    ("CLoRA masks only", CloraSettings(enabled=True, step_mode="masks-only")),
)
PER_ELEMENT_MARGIN = 0.5  # RMS per element of P_i - Y_j: the margin_scale="per-element" row's


@dataclass
class Cell:
    """One table cell: per-picture outcomes (0/1 or a fraction), in a fixed order of (prompt,
    seed), the same for every method, so cells of two methods can be compared picture by picture."""

    values: list[float] = field(default_factory=list)

    def add(self, values: Sequence[float]) -> None:
        self.values.extend(float(v) for v in values)

    def as_json(self) -> dict[str, float]:
        mean, se = gn.mean_se(self.values)
        return {"mean": mean, "se": se, "n": len(self.values)}

    def paired(self, baseline: Cell) -> dict[str, float]:
        """Mean and standard error of this cell minus ``baseline``, picture by picture."""
        if len(self.values) != len(baseline.values):
            raise ValueError("paired cells need the same pictures")
        mean, se = gn.mean_se([a - b for a, b in zip(self.values, baseline.values, strict=True)])
        return {"mean": mean, "se": se, "n": len(self.values)}


@dataclass(frozen=True)
class LabSetup:
    model: Any
    loras: dict  # identity name -> LoraFile
    judge: Any
    sampling: gn.Sampling
    pictures: int = 64  # per table cell, held-out seeds from TABLE_SEED on
    merge_steps: int = 20  # feature-recording steps of the merge (the paper's 20)
    merge_iterations: int = 50  # the paper's optimiser iterations
    clora_variants: tuple[tuple[str, CloraSettings], ...] = CLORA_VARIANTS

    def seeds(self, prompts: int) -> list[int]:
        """Seeds of each of ``prompts`` prompts that together fill a cell (at least ``pictures``)."""
        return [TABLE_SEED + i for i in range(-(-self.pictures // prompts))]


def _identities(ks: Sequence[int]) -> list[w.Identity]:
    return [w.IDENTITIES[k] for k in ks]


def _plain_prompt(ks: Sequence[int]) -> str:
    return "a photo of " + " and ".join(i.phrase for i in _identities(ks))


def merges(setup: LabSetup, ks: Sequence[int], only_ours: bool = False) -> tuple[dict[str, dict], dict]:
    """Merge offsets for identities ``ks`` by every method (one feature run for four methods, one
    for LoRACLR from W, the paper's initialisation, one with the per-element margin), or only our
    default; and each LoRACLR run's diagnostics (``margin_active``, ``moved_from_init`` per group)."""
    loras = [setup.loras[i.name] for i in _identities(ks)]
    config = MergeConfig(
        concepts=tuple(i.phrase for i in _identities(ks)),
        steps=setup.merge_steps,
        resolution=w.CANVAS,
        iterations=setup.merge_iterations,
        seed=0,
        model_level=False,
    )
    if only_ours:
        return {"LoRACLR from LS": merge_loras(setup.model, loras, config)["loraclr"].offsets}, {}
    ours = merge_loras(setup.model, loras, config, methods=["loraclr", "lsq", "sum", "average"])
    paper = merge_loras(setup.model, loras, dataclasses.replace(config, lsq_init=False), methods=["loraclr"])
    scaled = dataclasses.replace(config, margin=PER_ELEMENT_MARGIN, margin_scale="per-element")
    per_element = merge_loras(setup.model, loras, scaled, methods=["loraclr"])
    runs = {"LoRACLR from W": paper, "LoRACLR from LS": ours, "LoRACLR per-element margin": per_element}
    return {
        "sum": ours["sum"].offsets,
        "average": ours["average"].offsets,
        "least squares": ours["lsq"].offsets,
        **{name: run["loraclr"].offsets for name, run in runs.items()},
    }, {name: run["loraclr"].report.get("diagnostics", {}) for name, run in runs.items()}


def _with_differences(rows: dict[str, dict[str, Cell]], baseline: str) -> dict[str, dict]:
    """Cells as JSON, each with its paired difference from the baseline's cell of that column."""
    table = {}
    for method, cells in rows.items():
        table[method] = {}
        for column, cell in cells.items():
            if not cell.values:
                continue
            entry = cell.as_json()
            base = rows[baseline].get(column)
            if method != baseline and base is not None and len(base.values) == len(cell.values):
                entry["vs_baseline"] = cell.paired(base)
            table[method][column] = entry
    return table


def merge_table(
    setup: LabSetup, ks: Sequence[int], report: Callable[[str], None] = print
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Rows = methods; columns: identity and class accuracy, single-concept and pair prompts, each
    cell ``setup.pictures`` pictures on held-out seeds, the same for every method. Returns the
    table and, per method, the first seed's picture of every prompt (for the grid)."""
    offsets, diagnostics = merges(setup, ks)
    singles = [[k] for k in ks]
    pairs = [[ks[i], ks[i + 1]] for i in range(0, len(ks) - 1, 2)]
    single_seeds, pair_seeds = setup.seeds(len(singles)), setup.seeds(len(pairs))
    rows: dict[str, dict[str, Cell]] = {}
    pictures: dict[str, torch.Tensor] = {}
    blank = torch.zeros(3, w.CANVAS, w.CANVAS)
    for method in MERGE_METHODS:
        cells = rows[method] = {c: Cell() for c in ("identity", "class", "pair identity", "pair class")}
        if method == "LoRA alone":  # each concept with its own LoRA: one call per concept
            groups = [
                ([s], single_seeds, gn.lora_offsets(setup.model, [setup.loras[w.IDENTITIES[s[0]].name]]))
                for s in singles
            ]
        else:
            delta = offsets.get(method)
            groups = [(singles, single_seeds, delta), (pairs, pair_seeds, delta)]
        firsts = {}
        for subject_lists, seeds, delta in groups:
            asked = [s for s in subject_lists for _ in seeds]
            seed_list = [seed for _ in subject_lists for seed in seeds]
            images = gn.sample(
                setup.model, [_plain_prompt(s) for s in asked], seed_list, setup.sampling, delta
            )
            for subjects, seed, image, verdict in zip(
                asked, seed_list, images, gn.judge_pictures(setup.judge, images, asked), strict=True
            ):
                prefix = "" if len(subjects) == 1 else "pair "
                cells[prefix + "identity"].add([verdict.all_identities])
                cells[prefix + "class"].add([verdict.all_classes])
                if seed == seeds[0]:
                    firsts[tuple(subjects)] = image
        pictures[method] = torch.stack([firsts.get(tuple(s), blank) for s in singles + pairs])
    table = _with_differences(rows, MERGE_BASELINE)
    for method in MERGE_METHODS:
        report(f"merge K={len(ks)}: {method}: " + _brief(table[method]))
    columns = [_plain_prompt(s).removeprefix("a photo of ") for s in singles + pairs]
    return {
        "K": len(ks),
        "identities": [i.phrase for i in _identities(ks)],
        "baseline": MERGE_BASELINE,
        "rows": table,
        "diagnostics": diagnostics,
        "columns": columns,
    }, pictures


def _brief(row: dict[str, dict]) -> str:
    return ", ".join(f"{k} {v['mean']:.2f}" for k, v in row.items())


def _clora_prompt(ks: Sequence[int]) -> str:
    return "a photo of " + " and ".join(f"<lora:{i.name}:1> {i.cls}" for i in _identities(ks))


def _mask_iou(masks: torch.Tensor, class_map: np.ndarray, ks: Sequence[int], map_hw) -> list[float]:
    """IoU of each bound variant's final mask with the judge's region of that subject's class
    (both at the attention map's resolution; the judge's 16 x 16 cells are max-pooled down)."""
    h, w_ = map_hw or (int(masks.shape[1] ** 0.5),) * 2
    out = []
    for v, k in enumerate(ks, start=1):
        region = torch.from_numpy(class_map == 1 + w.CLASSES.index(w.IDENTITIES[k].cls)).float()[None, None]
        region = F.adaptive_max_pool2d(region, (h, w_))[0, 0] > 0
        mask = masks[v].reshape(h, w_) > 0
        union = (region | mask).sum()
        out.append(float((region & mask).sum() / union) if union else 0.0)
    return out


def saturation(images: torch.Tensor) -> list[float]:
    """Per picture, the share of pixels black or white in every channel (a latent pushed out of
    the model's range decodes to them; the world's pictures have almost none)."""
    flat = images.clamp(0, 1).flatten(2)
    return (((flat <= 0.02) | (flat >= 0.98)).all(dim=1).float().mean(dim=1)).tolist()


COMPOSE_COLUMNS = ("all identities", "subject identity", "bleeding", "class", "saturated")


def composition_table(
    setup: LabSetup, combos: Sequence[Sequence[int]], report: Callable[[str], None] = print
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Rows = methods; every combination of ``combos`` (same K), together ``setup.pictures``
    pictures per method on held-out seeds, picture i of every method from the same seed."""
    methods = [*COMPOSE_FIXED, *(name for name, _ in setup.clora_variants)]
    rows = {m: {c: Cell() for c in COMPOSE_COLUMNS} for m in methods}
    ious = {name: Cell() for name, _ in setup.clora_variants}
    pictures: dict[str, list[torch.Tensor]] = {m: [] for m in methods}
    seeds = setup.seeds(len(combos))
    for ks in combos:
        loras = [setup.loras[i.name] for i in _identities(ks)]
        merged = merges(setup, ks, only_ours=True)[0]["LoRACLR from LS"]
        prompts = [_plain_prompt(ks)] * len(seeds)
        fixed = {
            "base": None,
            "WebUI default (all LoRAs)": gn.lora_offsets(setup.model, loras),
            "LoRACLR merge": merged,
        }
        for method in methods:
            if method in fixed:
                images = gn.sample(setup.model, prompts, seeds, setup.sampling, fixed[method])
            else:
                settings = dict(setup.clora_variants)[method]
                images, iou = _clora_pictures(setup, ks, seeds, settings)
                ious[method].add(iou)
            verdicts = gn.judge_pictures(setup.judge, images, [ks] * len(seeds))
            rows[method]["all identities"].add([v.all_identities for v in verdicts])
            rows[method]["subject identity"].add([float(np.mean(v.identities)) for v in verdicts])
            rows[method]["bleeding"].add([float(np.mean(v.bleeding)) for v in verdicts])
            rows[method]["class"].add([v.all_classes for v in verdicts])
            rows[method]["saturated"].add(saturation(images))
            pictures[method].append(images[0])
    table = _with_differences(rows, COMPOSE_BASELINE)
    for name, cell in ious.items():
        table[name]["mask IoU"] = cell.as_json()
    for m in methods:
        report(f"compose K={len(combos[0])}: {m}: " + _brief(table[m]))
    columns = [_plain_prompt(ks).removeprefix("a photo of ") for ks in combos]
    return {"K": len(combos[0]), "baseline": COMPOSE_BASELINE, "rows": table, "columns": columns}, {
        m: torch.stack(p) for m, p in pictures.items()
    }


def _clora_pictures(
    setup: LabSetup, ks: Sequence[int], seeds: Sequence[int], settings: CloraSettings
) -> tuple[torch.Tensor, list[float]]:
    """The CLoRA pictures of one combination, every seed's in one batched generation (each image
    its own masks and loss, equal to generating it alone), with the mask IoU per subject."""
    model = setup.model
    names = {i.name: setup.loras[i.name] for i in _identities(ks)}
    result = compose(
        model,
        _clora_prompt(ks),
        names,
        settings,
        steps=setup.sampling.steps,
        cfg_scale=setup.sampling.cfg_scale,
        sampler=setup.sampling.sampler,
        width=w.CANVAS,
        height=w.CANVAS,
        images=len(seeds),
        latents=torch.cat([gn.noise(seed) for seed in seeds]),
        seed=seeds[0],
    )
    with torch.no_grad():
        images = model.decode(result.latents)
    class_maps = gn.class_cells(setup.judge, images)
    ious: list[float] = []
    for core, class_map in zip(result.cores, class_maps, strict=True):
        ious += _mask_iou(core.state.masks.cpu(), class_map, ks, core.state.map_hw)
    return images, ious
