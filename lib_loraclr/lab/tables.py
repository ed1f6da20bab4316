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
from lib_loraclr.merge.engine import MergeConfig, merge_loras

log = logging.getLogger(__name__)
MERGE_METHODS = ("LoRA alone", "base", "sum", "average", "least squares", "LoRACLR from W", "LoRACLR from LS")
COMPOSE_METHODS = ("base", "WebUI default (all LoRAs)", "LoRACLR merge", "CLoRA")


@dataclass
class Cell:
    """One table cell: per-picture outcomes (0/1 or a fraction), shown as mean +- SE."""

    values: list[float] = field(default_factory=list)

    def add(self, values: Sequence[float]) -> None:
        self.values.extend(float(v) for v in values)

    def as_json(self) -> dict[str, float]:
        mean, se = gn.mean_se(self.values)
        return {"mean": mean, "se": se, "n": len(self.values)}


@dataclass(frozen=True)
class LabSetup:
    model: Any
    loras: dict  # identity name -> LoraFile
    judge: Any
    sampling: gn.Sampling
    seeds: int  # pictures per prompt
    merge_steps: int = 20  # feature-recording steps of the merge (the paper's 20)
    merge_iterations: int = 50  # the paper's optimiser iterations
    clora: CloraSettings = CloraSettings(enabled=True)


def _identities(ks: Sequence[int]) -> list[w.Identity]:
    return [w.IDENTITIES[k] for k in ks]


def _plain_prompt(ks: Sequence[int]) -> str:
    return "a photo of " + " and ".join(i.phrase for i in _identities(ks))


def merges(setup: LabSetup, ks: Sequence[int], only_ours: bool = False) -> dict[str, dict]:
    """Merge offsets for identities ``ks``: every method (one feature run for four methods, one
    more for LoRACLR started from W, the paper's initialisation), or only our default."""
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
        return {"LoRACLR from LS": merge_loras(setup.model, loras, config)["loraclr"].offsets}
    ours = merge_loras(setup.model, loras, config, methods=["loraclr", "lsq", "sum", "average"])
    paper = merge_loras(setup.model, loras, dataclasses.replace(config, lsq_init=False), methods=["loraclr"])
    return {
        "sum": ours["sum"].offsets,
        "average": ours["average"].offsets,
        "least squares": ours["lsq"].offsets,
        "LoRACLR from W": paper["loraclr"].offsets,
        "LoRACLR from LS": ours["loraclr"].offsets,
    }


def merge_table(
    setup: LabSetup, ks: Sequence[int], report: Callable[[str], None] = print
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Rows = methods; columns: identity and class accuracy, single-concept and pair prompts.
    Returns the table and, per method, the first seed's picture of every prompt (for the grid)."""
    offsets = merges(setup, ks)
    singles = [[k] for k in ks]
    pairs = [[ks[i], ks[i + 1]] for i in range(0, len(ks) - 1, 2)]
    table: dict[str, Any] = {}
    pictures: dict[str, torch.Tensor] = {}
    blank = torch.zeros(3, w.CANVAS, w.CANVAS)
    for method in MERGE_METHODS:
        cells = {c: Cell() for c in ("identity", "class", "pair identity", "pair class")}
        if method == "LoRA alone":  # each concept with its own LoRA: one call per concept
            groups = [
                ([s], gn.lora_offsets(setup.model, [setup.loras[w.IDENTITIES[s[0]].name]])) for s in singles
            ]
        else:  # every prompt of the method in one batched call
            groups = [(singles + pairs, offsets.get(method))]
        firsts = {}
        for subject_lists, delta in groups:
            asked = [s for s in subject_lists for _ in range(setup.seeds)]
            seeds = [seed for _ in subject_lists for seed in range(setup.seeds)]
            images = gn.sample(setup.model, [_plain_prompt(s) for s in asked], seeds, setup.sampling, delta)
            for subjects, seed, image, verdict in zip(
                asked, seeds, images, gn.judge_pictures(setup.judge, images, asked), strict=True
            ):
                prefix = "" if len(subjects) == 1 else "pair "
                cells[prefix + "identity"].add([verdict.all_identities])
                cells[prefix + "class"].add([verdict.all_classes])
                if seed == 0:
                    firsts[tuple(subjects)] = image
        table[method] = {c: cell.as_json() for c, cell in cells.items() if cell.values}
        pictures[method] = torch.stack([firsts.get(tuple(s), blank) for s in singles + pairs])
        report(f"merge K={len(ks)}: {method}: " + _brief(table[method]))
    columns = [_plain_prompt(s).removeprefix("a photo of ") for s in singles + pairs]
    return {
        "K": len(ks),
        "identities": [i.phrase for i in _identities(ks)],
        "rows": table,
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


def composition_table(
    setup: LabSetup, combos: Sequence[Sequence[int]], report: Callable[[str], None] = print
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Rows = methods; every combination of ``combos`` (same K) with ``setup.seeds`` pictures."""
    columns = ("all identities", "subject identity", "bleeding", "class")
    rows = {m: {c: Cell() for c in columns} for m in COMPOSE_METHODS}
    iou = Cell()
    pictures: dict[str, list[torch.Tensor]] = {m: [] for m in COMPOSE_METHODS}
    for ks in combos:
        loras = [setup.loras[i.name] for i in _identities(ks)]
        merged = merges(setup, ks, only_ours=True)["LoRACLR from LS"]
        seeds = list(range(setup.seeds))
        prompts = [_plain_prompt(ks)] * setup.seeds
        for method in COMPOSE_METHODS:
            if method == "CLoRA":
                images, ious = _clora_pictures(setup, ks, seeds)
                iou.add(ious)
            else:
                delta = {
                    "base": None,
                    "WebUI default (all LoRAs)": gn.lora_offsets(setup.model, loras),
                    "LoRACLR merge": merged,
                }[method]
                images = gn.sample(setup.model, prompts, seeds, setup.sampling, delta)
            verdicts = gn.judge_pictures(setup.judge, images, [ks] * setup.seeds)
            rows[method]["all identities"].add([v.all_identities for v in verdicts])
            rows[method]["subject identity"].add([float(np.mean(v.identities)) for v in verdicts])
            rows[method]["bleeding"].add([float(np.mean(v.bleeding)) for v in verdicts])
            rows[method]["class"].add([v.all_classes for v in verdicts])
            pictures[method].append(images[0])
    table = {m: {c: cell.as_json() for c, cell in cells.items()} for m, cells in rows.items()}
    table["CLoRA"]["mask IoU"] = iou.as_json()
    for m in COMPOSE_METHODS:
        report(f"compose K={len(combos[0])}: {m}: " + _brief(table[m]))
    columns = [_plain_prompt(ks).removeprefix("a photo of ") for ks in combos]
    return {"K": len(combos[0]), "rows": table, "columns": columns}, {
        m: torch.stack(p) for m, p in pictures.items()
    }


def _clora_pictures(
    setup: LabSetup, ks: Sequence[int], seeds: Sequence[int]
) -> tuple[torch.Tensor, list[float]]:
    """One CLoRA generation per seed (the reference composes one picture at a time: its masks
    are per picture), judged, with the mask IoU per subject."""
    model, images, ious = setup.model, [], []
    names = {i.name: setup.loras[i.name] for i in _identities(ks)}
    for seed in seeds:
        result = compose(
            model,
            _clora_prompt(ks),
            names,
            setup.clora,
            steps=setup.sampling.steps,
            cfg_scale=setup.sampling.cfg_scale,
            sampler=setup.sampling.sampler,
            width=w.CANVAS,
            height=w.CANVAS,
            latents=gn.noise(seed),
            seed=seed,
        )
        with torch.no_grad():
            picture = model.decode(result.latents)
        images.append(picture)
        class_map = gn.class_cells(setup.judge, picture)[0]
        ious += _mask_iou(result.core.state.masks.cpu(), class_map, ks, result.core.state.map_hw)
    return torch.cat(images), ious
