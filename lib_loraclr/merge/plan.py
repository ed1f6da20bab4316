"""The merge's memory plan, made from shapes alone before any work starts.

Every merged layer gets its statistics form (:mod:`~lib_loraclr.merge.stats`) and its bytes;
the layers of each stage are then packed into as few feature passes as fit the budget (a pass
is one text-encoder run or one sampling run; the run is deterministic for a seed, so statistics
collected over several passes equal one pass's). What the merge holds on its device:

- ``model``: the model's weights when the merge loads them (CLI); the WebUI's model is already
  resident, so its free memory is the budget;
- ``loras``: every LoRA's factors in float32; ``offsets``: the merged offsets of every method
  (host memory; counted on the device when the device is the CPU);
- per pass: the statistics of its layers, float32 copies of their base weights, and the larger of
  the forward pass's activations (a working-set estimate) and one layer's solve
  (``K^2 in out`` float32 for ``R`` plus its Gram blocks and AdamW state).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lib_loraclr import families
from lib_loraclr.families import ModelFamily
from lib_loraclr.merge.expansion import rows_cheaper
from lib_loraclr.merge.options import GROUPS, latent_downscale
from lib_loraclr.merge.sizes import format_size
from lib_loraclr.merge.stats import choose_form, form_sizes
from lib_loraclr.sd.checkpoint import CONFIG_METADATA_KEY
from lib_loraclr.sd.configs import native_resolution

STAGES = ("te", "cross_kv", "spatial")


@dataclass(frozen=True)
class LayerPlan:
    name: str
    stage: str
    d_out: int
    d_in: int
    rows: int  # rows per concept
    form: str
    stats_bytes: int
    solve_bytes: int


@dataclass(frozen=True)
class MergePlan:
    device: str
    concepts: int
    budget_bytes: int | None
    peak_bytes: int
    fits: bool
    layers: dict[str, LayerPlan]
    passes: dict[str, list[list[str]]]  # stage -> layer names per feature pass
    breakdown: dict[str, int]
    message: str = ""
    methods: int = 1
    notes: list[str] = field(default_factory=list)
    working_sets: dict[str, int] = field(default_factory=dict)  # stage -> the forward pass's estimate
    spatial_groups: int = 0  # groups of K rows per UNet call of the sampling run (0: all at once)

    @property
    def feature_passes(self) -> int:
        """Feature runs the merge makes (the cross-K/V stage runs once per method)."""
        return sum(len(p) * (self.methods if s == "cross_kv" else 1) for s, p in self.passes.items())

    def solve_room(self, stage_pass: Sequence[str]) -> int:
        """Bytes a chunk of ``stage_pass``'s layers may use while being solved: what the plan counted
        for that pass (the larger of the forward pass's working set and its largest layer's solve),
        so the merge stays at the plan's peak instead of filling the budget."""
        stage = self.layers[stage_pass[0]].stage
        return max(self.working_sets.get(stage, 0), max(self.layers[n].solve_bytes for n in stage_pass))

    def as_json(self) -> dict[str, Any]:
        stages = {}
        for stage, passes in self.passes.items():
            names = [n for p in passes for n in p]
            forms: dict[str, int] = {}
            for n in names:
                forms[self.layers[n].form] = forms.get(self.layers[n].form, 0) + 1
            stages[stage] = {
                "layers": len(names),
                "passes": len(passes),
                "forms": forms,
                "statistics_bytes": sum(self.layers[n].stats_bytes for n in names),
            }
        return {
            "peak_bytes": self.peak_bytes,
            "peak": format_size(self.peak_bytes),
            "passes": self.feature_passes,
            "device": self.device,
            "fits": self.fits,
            "budget_bytes": self.budget_bytes,
            "budget": format_size(self.budget_bytes) if self.budget_bytes is not None else "unlimited",
            "concepts": self.concepts,
            "breakdown": dict(self.breakdown),
            "stages": stages,
            "message": self.message,
            "notes": list(self.notes),
            "spatial_batch": self.concepts * self.spatial_groups,
        }


def _family_of(names: Sequence[str]) -> ModelFamily:
    """The family whose layers these are (canonical names never collide), else the default."""
    return next((f for n in names if (f := families.owner(n)) is not None), families.DEFAULT)


def layer_rows(name: str, stage: str, templates: int, steps: int, resolution: int) -> int:
    """Rows per concept a layer records: padded prompt tokens, or pixels x steps x CFG halves."""
    family = _family_of([name])
    if stage in ("te", "cross_kv"):
        return templates * family.context_tokens
    side = max(1, resolution // family.latent_scale // latent_downscale(name))
    return steps * 2 * templates * side * side


def solve_bytes(concepts: int, d_in: int, d_out: int, form: str = "gram") -> int:
    """One layer's solve (:mod:`~lib_loraclr.merge.expansion`), at float64 for the exact pieces:
    R (K^2 in out, float32), G (float32 + float64; the cross form adds a row of input cross-Grams
    and its difference, float64), three ``(K, in, out)`` pieces of a row of R (float64), the
    LoRAs' dense deltas (float64), the offset's AdamW state and copies (float32), and the
    least-squares system (summed Gram, ridge matrix, its Cholesky factor; right-hand side and
    solution: float64), which does not shrink with K. The raw form's row expansion holds less:
    its pieces have N <= in rows where these have ``in``."""
    K = concepts
    grams = 28 if form == "cross" else 12
    return (
        4 * K * K * d_in * d_out
        + grams * K * d_in * d_in
        + 24 * K * d_in * d_out
        + 8 * K * d_out * d_in
        + 24 * d_out * d_in
        + 4 * d_in * d_in
        + 24 * d_in * d_in
        + 24 * d_in * d_out
    )


def row_solve_bytes(concepts: int, rows: int, d_in: int, d_out: int) -> int:
    """One raw layer's solve through its rows (:class:`~lib_loraclr.merge.expansion.RowExpansion`):
    the residual rows Z (K^2 N out) and X (float32), the build's row pieces (float64), the
    iteration's products, the offset's AdamW state, and the least-squares system in row space
    (``(K N)^2``) or, with more rows than inputs, in input space."""
    K, N = concepts, rows
    lsq = (
        8 * K * N * (d_in + d_out) + 24 * (K * N) ** 2
        if K * N < d_in
        else (8 * K + 28) * d_in * d_in + 24 * d_in * d_out
    )
    return 4 * K * K * N * d_out + 28 * K * N * d_in + 64 * K * N * d_out + 24 * d_out * d_in + lsq


def activation_bytes(
    stage: str,
    concepts: int,
    templates: int,
    resolution: int,
    unet_width: int,
    text_width: int,
    family: ModelFamily = families.DEFAULT,
    groups: int | None = None,
) -> int:
    """Working set of one forward pass of the feature run (an estimate; measured in bench_merge);
    the sampling run's UNet sees ``groups`` groups of K rows per call (default: all its
    ``2 x templates``, both CFG halves of every prompt)."""
    if stage == "spatial":
        batch = concepts * (groups or templates * 2)
        return batch * (resolution // family.latent_scale) ** 2 * unet_width * 4 * 24
    return concepts * templates * family.context_tokens * text_width * 4 * 24


def plan_merge(
    shapes: Mapping[str, tuple[int, int]],
    concepts: int,
    *,
    groups: Sequence[str] = GROUPS,
    templates: int = 2,
    steps: int = 20,
    resolution: int = 512,
    budget: int | None = None,
    device: str = "cpu",
    lora_bytes: int = 0,
    model_bytes: int = 0,
    methods: int = 1,
    unet_width: int | None = None,
    text_width: int | None = None,
    iterations: int = 50,
) -> MergePlan:
    """Pack the merged layers (``shapes``: canonical name -> (out, in), already filtered to the
    layers the merge solves) into feature passes that fit ``budget`` bytes on ``device``."""
    from lib_loraclr.merge.options import layer_group

    K = concepts
    layers: dict[str, LayerPlan] = {}
    for name, (d_out, d_in) in sorted(shapes.items()):
        stage = layer_group(name)
        if stage not in groups:
            continue
        rows = layer_rows(name, stage, templates, steps, resolution)
        form = choose_form(K, rows, d_in, d_out)
        layers[name] = LayerPlan(
            name,
            stage,
            d_out,
            d_in,
            rows,
            form,
            form_sizes(K, rows, d_in, d_out)[form],
            row_solve_bytes(K, rows, d_in, d_out)
            if form == "raw" and rows_cheaper(K, rows, d_in, d_out, iterations)
            else solve_bytes(K, d_in, d_out, form),
        )
    family = _family_of(list(shapes))
    # the widest feature map's channels: an attention block's input at the latent's own size where
    # the family has one there (the model may be narrower than the family's full size), else its own
    unet_width = unet_width or max(
        [p.d_in for p in layers.values() if p.name.endswith("_proj_in") and latent_downscale(p.name) == 1]
        or [family.unet_width]
    )
    text_width = text_width or max(
        [p.d_in for p in layers.values() if p.stage == "te"] or [family.text_width]
    )
    offsets = 4 * methods * sum(p.d_out * p.d_in for p in layers.values())
    fixed = {
        "model": model_bytes,
        "loras": lora_bytes,
        "offsets_on_device": offsets if device == "cpu" else 0,
    }
    base = sum(fixed.values())
    spatial_groups = 2 * templates
    passes: dict[str, list[list[str]]] = {}
    working_sets: dict[str, int] = {}
    peak, worst, notes = base, {}, []
    fits = True
    message = ""
    for stage in STAGES:
        names = [n for n, p in layers.items() if p.stage == stage]
        if not names:
            continue
        if stage == "spatial":
            spatial_groups = _spatial_groups(
                budget,
                base,
                [layers[n] for n in names],
                templates,
                lambda g: activation_bytes(
                    "spatial", K, templates, resolution, unet_width, text_width, family, g
                ),
            )
        groups = spatial_groups if stage == "spatial" else None
        act = activation_bytes(stage, K, templates, resolution, unet_width, text_width, family, groups)
        working_sets[stage] = act

        def need(group: list[str], act: int = act) -> int:
            held = sum(layers[n].stats_bytes + 4 * layers[n].d_out * layers[n].d_in for n in group)
            return held + max(act, max(layers[n].solve_bytes for n in group))

        stage_passes: list[list[str]] = [[]]
        for name in names:
            trial = [*stage_passes[-1], name]
            if budget is not None and stage_passes[-1] and base + need(trial) > budget:
                stage_passes.append([name])
            else:
                stage_passes[-1] = trial
        passes[stage] = stage_passes
        for group in stage_passes:
            cost = base + need(group)
            if cost > peak:
                peak, worst = cost, {"stage": stage, "layers": group}
            if budget is not None and cost > budget and fits:
                fits = False
                big = max(group, key=lambda n: layers[n].stats_bytes + layers[n].solve_bytes)
                p = layers[big]
                message = (
                    f"the merge needs {format_size(cost)} on {device} but the budget is {format_size(budget)}: "
                    f"layer {big} alone ({p.form} statistics {format_size(p.stats_bytes)}, solve "
                    f"{format_size(p.solve_bytes)}) with {format_size(base)} held for model, LoRAs and offsets. "
                    "Raise the memory limit (--max-memory / max_memory), merge fewer LoRAs at once, or leave "
                    "this layer group out (groups)"
                )
    if budget is not None and base > budget and fits:
        fits = False
        message = f"model, LoRAs and offsets alone need {format_size(base)}, more than the budget of {format_size(budget)}"
    if any(len(p) > 1 for p in passes.values()):
        notes.append(
            "statistics are collected over several feature passes to stay within the budget; "
            "the result equals one pass's"
        )
    breakdown = dict(fixed)
    breakdown.update(
        statistics=sum(layers[n].stats_bytes for n in worst.get("layers", [])),
        base_copies=sum(4 * layers[n].d_out * layers[n].d_in for n in worst.get("layers", [])),
        working_set=peak
        - base
        - sum(layers[n].stats_bytes + 4 * layers[n].d_out * layers[n].d_in for n in worst.get("layers", [])),
    )
    return MergePlan(
        device,
        K,
        budget,
        peak,
        fits,
        layers,
        passes,
        breakdown,
        message,
        methods,
        notes,
        working_sets,
        spatial_groups,
    )


def _spatial_groups(budget: int | None, base: int, stage: list[LayerPlan], templates: int, act: Any) -> int:
    """How many groups of K rows (a prompt template's CFG half each) the sampling run's UNet takes
    per call: all ``2 x templates`` when the working set fits beside the stage's largest layer,
    else the largest divisor that fits (at least one). Statistics do not depend on it: every call
    holds whole groups, each of all K concepts, in the run's row order."""
    total = 2 * templates
    if budget is None:
        return total
    largest = max(p.stats_bytes + 4 * p.d_out * p.d_in for p in stage)
    for groups in sorted((g for g in range(1, total + 1) if total % g == 0), reverse=True):
        if base + largest + act(groups) <= budget:
            return groups
    return 1


def _recorded_unet_config(metadata: dict[str, str]) -> dict:
    """The UNet config a checkpoint written by this project records (empty for any other)."""
    try:
        return dict(json.loads(metadata.get(CONFIG_METADATA_KEY, "{}")).get("unet") or {})
    except (ValueError, AttributeError):
        return {}


def plan_from_files(
    base: str | os.PathLike[str],
    lora_paths: Sequence[str | os.PathLike[str]],
    *,
    device: str,
    budget: int | None,
    groups: Sequence[str] = GROUPS,
    templates: int = 2,
    steps: int = 20,
    resolution: int | None = None,
    methods: int = 1,
) -> MergePlan:
    """The plan from file headers alone (no tensor is read): the base's shapes, the layers the LoRAs
    touch and their sizes. The model's own weights count (the CLI loads them: fp16 on CUDA, fp32 on
    the CPU), so ``budget`` is everything the device may hold."""
    from lib_loraclr.lora.file import group_keys
    from lib_loraclr.lora.keymap import ldm_weight_shape
    from lib_loraclr.lora.safetensors_io import read_header

    base_header = read_header(base)
    base_shapes = base_header.shapes()
    family = families.or_default(families.of_checkpoint(base_shapes))
    if resolution is None:  # the model's own: the latent size our configs record, else its family's
        resolution = native_resolution(_recorded_unet_config(base_header.metadata).get("sample_size"), family)
    touched: set[str] = set()
    lora_bytes = 0
    for path in lora_paths:
        header = read_header(path)
        modules, _unused, _styles = group_keys(list(header.tensors), family)
        touched |= set(modules)
        lora_bytes += 4 * sum(math.prod(shape) for shape in header.shapes().values())
    shapes = {}
    for name in touched:
        shape = ldm_weight_shape(name, base_shapes, family)
        if shape is not None and (len(shape) == 2 or (len(shape) == 4 and tuple(shape[2:]) == (1, 1))):
            shapes[name] = (shape[0], shape[1])
    per_value = 2 if device.startswith("cuda") else 4
    model_bytes = per_value * sum(math.prod(shape) for shape in base_shapes.values())
    return plan_merge(
        shapes,
        len(lora_paths),
        groups=groups,
        templates=templates,
        steps=steps,
        resolution=resolution,
        budget=budget,
        device=device,
        lora_bytes=lora_bytes,
        model_bytes=model_bytes,
        methods=methods,
    )
