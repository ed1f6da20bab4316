"""The world's gates: what the base model, its LoRAs and CLoRA's maps must do before a table means
anything (issue 16). Each gate is measured by the judge on pictures from held-out seeds
(``GATE_SEED`` on: neither training nor the tables use them), at least 64 per line, and lands in
the world's manifest; ``lab`` prints them before its tables.

A table made in a world that fails a gate measures the world, not the methods: a base that draws
the asked class in half its pictures cannot show whether a merge kept an identity.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lib_loraclr.clora.attention import capture_maps, heads_by_projection, map_size
from lib_loraclr.lab import generate as gn
from lib_loraclr.lab import grounding as gr
from lib_loraclr.lab import judge as jg
from lib_loraclr.lab import report as rp
from lib_loraclr.lab import world as w

GATE_SEED = 7000
TABLE_SEED = 9000  # the tables' pictures start here (held out from training and from the gates)
MIN_MAP_SIDE, MIN_MASK_PIXELS = 8, 9


@dataclass(frozen=True)
class Gate:
    key: str
    label: str
    bar: float
    at_most: bool = False  # the bar is an upper bound (the base must NOT show identities)

    def passed(self, value: float) -> bool:
        return value <= self.bar if self.at_most else value >= self.bar


GATES = (
    Gate("class", '"a photo of a {class}": that class present', 0.90),
    Gate("one_object", "same: exactly one object", 0.80),
    Gate("colour_class", '"a photo of a {colour} {class}": class and colour right', 0.80),
    Gate("two_classes", '"a photo of a {class1} and a {class2}": both classes present', 0.80),
    Gate("lora_identity", 'each LoRA alone, "a photo of {trigger} {class}": identity', 0.80),
    Gate("lora_in_pair", "each LoRA alone in a two-subject prompt: its subject wears the identity", 0.60),
    Gate("base_identity", "the base alone shows an identity", 0.02, at_most=True),
    Gate("mask_pixels", "CLoRA's masks: each object covers at least 9 mask pixels (share of objects)", 1.0),
    Gate("map_localisation", "CLoRA's maps: share of an object word's attention on its object", 0.5),
)
LOCALISATION_T = 500  # the middle of the schedule, where CLoRA's updates act


@dataclass(frozen=True)
class GateSetup:
    model: Any
    loras: dict  # identity name -> LoraFile
    judge: jg.Judge
    sampling: gn.Sampling
    per_prompt: int = 16  # pictures per class prompt (4 classes: 64); the other lines scale with it


def _seeds(n: int, offset: int) -> list[int]:
    return [GATE_SEED + offset + i for i in range(n)]


def _base_pictures(setup: GateSetup) -> tuple[dict[str, list[float]], list[bool]]:
    """The base model's gates; also, per picture, whether it shows any identity."""
    out: dict[str, list[float]] = {"class": [], "one_object": [], "colour_class": [], "two_classes": []}
    shows_identity: list[bool] = []
    n = setup.per_prompt
    singles = [(c,) for c in w.CLASSES for _ in range(n)]
    coloured = [(c, k) for c in w.CLASSES for k in w.COLOURS for _ in range(max(1, n // len(w.COLOURS)))]
    pairs = list(itertools.permutations(w.CLASSES, 2))
    paired = [p for p in pairs for _ in range(-(-n * len(w.CLASSES) // len(pairs)))]
    prompts = (
        [f"a photo of a {c}" for (c,) in singles]
        + [f"a photo of {'an' if k[0] in 'aeiou' else 'a'} {k} {c}" for c, k in coloured]
        + [f"a photo of a {a} and a {b}" for a, b in paired]
    )
    seeds = _seeds(len(prompts), 0)
    images = gn.sample(setup.model, prompts, seeds, setup.sampling)
    class_maps, look_maps = jg.read_maps(setup.judge, images)
    for i, image in enumerate(images):
        seen = {s.cls: s for s in jg.read_objects(class_maps[i], look_maps[i])}
        shows_identity.append(any(s.identity is not None for s in seen.values()))
        if i < len(singles):
            out["class"].append(float(singles[i][0] in seen))
            out["one_object"].append(float(jg.count_objects(class_maps[i]) == 1))
        elif i < len(singles) + len(coloured):
            cls, colour = coloured[i - len(singles)]
            obj = seen.get(cls)
            out["colour_class"].append(float(obj is not None and jg.colour_of(image, obj.cells) == colour))
        else:
            a, b = paired[i - len(singles) - len(coloured)]
            out["two_classes"].append(float(a in seen and b in seen))
    return out, shows_identity


def _lora_pictures(setup: GateSetup) -> dict[str, list[float]]:
    """Each LoRA alone: its concept alone, and its concept beside a plain object of another class."""
    out: dict[str, list[float]] = {"lora_identity": [], "lora_in_pair": []}
    n = max(1, setup.per_prompt * len(w.CLASSES) // len(w.IDENTITIES))
    for k, ident in enumerate(w.IDENTITIES):
        other = w.CLASSES[(w.CLASSES.index(ident.cls) + 1) % len(w.CLASSES)]
        prompts = [f"a photo of {ident.phrase}"] * n + [f"a photo of {ident.phrase} and a {other}"] * n
        offsets = gn.lora_offsets(setup.model, [setup.loras[ident.name]])
        images = gn.sample(setup.model, prompts, _seeds(2 * n, 1000 + 100 * k), setup.sampling, offsets)
        for i, verdict in enumerate(gn.judge_pictures(setup.judge, images, [[k]] * len(prompts))):
            out["lora_identity" if i < n else "lora_in_pair"].append(float(verdict.all_identities))
    return out


def mask_coverage(latent_side: int, scenes: int = 256) -> tuple[tuple[int, int], list[int]]:
    """CLoRA's map size in this world (the automatic level) and, for every object of rendered
    multi-object scenes (2 to 4 objects, the world's own jitter), the map pixels it covers at
    least half of: what a mask at that resolution can resolve of it."""
    hw = map_size(latent_side, latent_side)
    rng = np.random.default_rng(GATE_SEED + 5000)
    cell = w.CANVAS // hw[0]
    counts = []
    for i in range(scenes):
        scene = w.random_scene(rng, count=2 + i % 3)
        _, classes, _ = w.render(scene)
        for thing in scene.things:
            region = classes == 1 + w.CLASSES.index(thing.cls)
            share = region.reshape(hw[0], cell, hw[1], cell).mean(axis=(1, 3))
            counts.append(int((share >= 0.5).sum()))
    return hw, counts


@torch.no_grad()
def map_localisation(model: Any, scenes: int = 64) -> list[float]:
    """Per held-out rendered scene (2 to 4 objects, their caption), the share of its object words'
    cross-attention at CLoRA's map level that falls on their own objects, with the latent noised to
    the middle of the schedule. CLoRA cuts its masks from these maps: where they are flat (a share
    near an object's area, about 0.2 here) its masks cover everything."""
    rng = np.random.default_rng(GATE_SEED + 6000)
    pictures, captions, classes = [], [], []
    for i in range(scenes):
        scene = w.random_scene(rng, count=2 + i % 3)
        image, cls, _ = w.render(scene)
        pictures.append(image.transpose(2, 0, 1))
        captions.append(w.random_caption(scene, rng))
        classes.append(cls)
    hw = map_size(w.CANVAS // 8, w.CANVAS // 8)
    targets = gr.grounding_for(model.tokenizer, captions, np.stack(classes), hw, 1.0).targets(
        torch.arange(scenes)
    )
    x0 = model.encode_image(torch.from_numpy(np.stack(pictures)).float() / 255).float()
    a = model.alphas_cumprod[LOCALISATION_T]
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(GATE_SEED + 6001))
    x = a.sqrt() * x0 + (1 - a).sqrt() * noise
    with capture_maps(model.layer_map(), heads_by_projection(model.unet), hw[0] * hw[1]) as maps:
        maps.reset()
        model.eps(x, torch.full((scenes,), LOCALISATION_T), model.encode_prompt(captions))
        attention = maps.mean()
    return [gr.inside_share(attention[i : i + 1], targets[i : i + 1]) for i in range(scenes)]


def measure_gates(setup: GateSetup, report: Callable[[str], None] = print) -> dict[str, Any]:
    """Every gate: ``{key: {"value", "n", "se", "bar", "passed", "label"}}`` plus the map details."""
    values, shows_identity = _base_pictures(setup)
    values.update(_lora_pictures(setup))
    values["base_identity"] = [float(v) for v in shows_identity]
    hw, counts = mask_coverage(w.CANVAS // 8)
    values["mask_pixels"] = [float(c >= MIN_MASK_PIXELS and min(hw) >= MIN_MAP_SIDE) for c in counts]
    values["map_localisation"] = map_localisation(setup.model, max(1, setup.per_prompt * len(w.CLASSES)))
    result: dict[str, Any] = {}
    for gate in GATES:
        mean, se = gn.mean_se(values[gate.key])
        result[gate.key] = {
            "label": gate.label,
            "value": mean,
            "se": se,
            "n": len(values[gate.key]),
            "bar": gate.bar,
            "at_most": gate.at_most,
            "passed": gate.passed(mean),
        }
    result["masks"] = {
        "map_size": list(hw),
        "min_pixels": min(counts),
        "median_pixels": float(np.median(counts)),
    }
    for line in gates_lines(result):
        report(line)
    return result


def gates_lines(gates: dict[str, Any]) -> list[str]:
    """The gates as printed lines (``lab`` shows them before its tables)."""
    lines = []
    for gate in GATES:
        g = gates.get(gate.key)
        if g is None:
            continue
        sign = "<=" if gate.at_most else ">="
        verdict = "pass" if g["passed"] else "FAIL"
        lines.append(
            f"gate {verdict}: {gate.label}: {100 * g['value']:.1f} ± {100 * g['se']:.1f} % "
            f"(n = {g['n']}; bar {sign} {100 * gate.bar:.0f} %)"
        )
    if "masks" in gates:
        m = gates["masks"]
        lines.append(
            f"masks: {m['map_size'][0]} x {m['map_size'][1]} maps, objects cover {m['min_pixels']} mask "
            f"pixels at least, {m['median_pixels']:.0f} in the median"
        )
    return lines


def all_passed(gates: dict[str, Any]) -> bool:
    return all(gates[g.key]["passed"] for g in GATES if g.key in gates)


def sample_sheets(setup: GateSetup, out: Path, seed: int = GATE_SEED + 3000) -> list[Path]:
    """What the gates count, to look at: the base on each class, colour and pair prompt, and each
    LoRA alone on its concept and beside a plain object (one held-out seed per row)."""
    base_prompts = [f"a photo of a {c}" for c in w.CLASSES] + [
        f"a photo of a {a} and a {b}" for a, b in zip(w.CLASSES, w.CLASSES[1:] + w.CLASSES[:1], strict=True)
    ]
    rows = {}
    for r in range(2):
        seeds = [seed + r] * len(base_prompts)
        rows[f"base, seed {r + 1}"] = gn.sample(setup.model, base_prompts, seeds, setup.sampling)
    base_sheet = rp.grid(rows, [p.removeprefix("a photo of ") for p in base_prompts], out / "world_base.png")
    alone, paired = [], []
    for k, ident in enumerate(w.IDENTITIES):
        other = w.CLASSES[(w.CLASSES.index(ident.cls) + 1) % len(w.CLASSES)]
        offsets = gn.lora_offsets(setup.model, [setup.loras[ident.name]])
        prompts = [f"a photo of {ident.phrase}", f"a photo of {ident.phrase} and a {other}"]
        pictures = gn.sample(setup.model, prompts, [seed + 10 + k] * 2, setup.sampling, offsets)
        alone.append(pictures[0])
        paired.append(pictures[1])
    lora_rows = {"its LoRA alone": torch.stack(alone), "its LoRA, with another object": torch.stack(paired)}
    lora_sheet = rp.grid(lora_rows, [i.phrase for i in w.IDENTITIES], out / "world_loras.png")
    return [base_sheet, lora_sheet]
