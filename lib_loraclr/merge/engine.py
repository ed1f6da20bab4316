"""LoRACLR merge of K LoRAs into one set of weights (ALGORITHMS.md section 1).

Stages, in the reference's order: text encoder (features from the K concept prompts, each row with
its own LoRA), then cross-attention K/V (context of the MERGED text encoder), then spatial layers
(features from a short sampling run of every concept at once). A memory plan (``plan.py``) made
from shapes alone splits each stage's layers into feature passes that fit the budget; each pass
streams statistics (``features.py``, ``stats.py``), then every method is solved on them, layers of
one shape batched (``optimise.py``), and the report accumulates (``report.py``) before the
statistics are dropped. Layers outside the chosen groups (e.g. LoCon's 3x3 convs) take the naive
weighted sum (or the average, for ``average``) and are counted in the report.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from lib_loraclr.errors import Interrupted, LoraClrError
from lib_loraclr.families import ModelFamily
from lib_loraclr.merge import features as ft
from lib_loraclr.merge import report as rp
from lib_loraclr.merge.expansion import build_expansion
from lib_loraclr.merge.gram import MARGIN_SCALES, LossWeights, margin_activity
from lib_loraclr.merge.optimise import OptimConfig, least_squares, optimise
from lib_loraclr.merge.options import GROUPS, METHODS, layer_group
from lib_loraclr.merge.plan import MergePlan, plan_merge
from lib_loraclr.merge.precision import PRECISIONS, Precision, precision_for
from lib_loraclr.merge.sizes import format_size
from lib_loraclr.merge.stats import LayerStats
from lib_loraclr.sd.cond import Cond
from lib_loraclr.sd.configs import NATIVE_RESOLUTION

log = logging.getLogger(__name__)
Progress = Callable[[int, int, str], None]


class MergeModel(Protocol):
    """What the merge needs of a model; :class:`~lib_loraclr.sd.model.SDModel` and the WebUI adapter have it."""

    alphas_cumprod: torch.Tensor
    native_resolution: int  # the picture size it was trained at (the feature run's default)
    family: ModelFamily  # its latent scale; the rest it answers through its own methods

    def layer_map(self) -> dict[str, nn.Module]: ...
    def encode_prompt(self, prompts: list[str], size: tuple[int, int] | None = None) -> Cond: ...
    def eps(self, x: torch.Tensor, t: Any, cond: Cond) -> torch.Tensor: ...


@dataclass(frozen=True)
class MergeConfig:
    """Every merge option. Optimiser defaults are the reference's; see docs/merge.md."""

    method: str = "loraclr"
    weights: tuple[float, ...] = ()  # per LoRA; empty = 1.0 each
    concepts: tuple[str, ...] = ()  # trigger text per LoRA
    groups: tuple[str, ...] = GROUPS
    iterations: int = 50
    lr: float = 1e-4
    weight_decay: float = 1e-4
    margin: float = 0.5
    margin_scale: str = "absolute"  # or "per-element": see LossWeights.margin_for
    lambda_con: float = 1.0
    lambda_mse: float = 0.1
    lambda_delta: float = 0.001
    lsq_init: bool = True
    ridge: float = 1e-4
    seed: int = 0
    steps: int = 20
    resolution: int | None = None  # the feature run's picture size; None: the model's own
    cfg_scale: float = 7.5
    templates: tuple[str, ...] = ("photo of a {}", "{}")
    device: str | None = None
    precision: str = "auto"  # the solve's float type: auto (by device), float64, float32
    model_level: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise LoraClrError(f"merge method {self.method!r} is not one of {', '.join(METHODS)}")
        unknown = set(self.groups) - set(GROUPS)
        if unknown:
            raise LoraClrError(f"unknown layer group(s) {sorted(unknown)}; use {', '.join(GROUPS)}")
        if self.margin_scale not in MARGIN_SCALES:
            raise LoraClrError(f"margin scale {self.margin_scale!r} is not one of {', '.join(MARGIN_SCALES)}")
        if self.precision not in PRECISIONS:
            raise LoraClrError(f"merge precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.resolution is not None and (self.resolution < 64 or self.resolution % 64):
            raise LoraClrError(f"feature resolution {self.resolution} must be a multiple of 64")

    def for_model(self, model: MergeModel) -> MergeConfig:
        """This config with its resolution resolved: the model's own when none is given (a 64 px
        model's features come from 64 px pictures, in seconds instead of an hour at 512)."""
        if self.resolution is not None:
            return self
        return dataclasses.replace(
            self, resolution=int(getattr(model, "native_resolution", NATIVE_RESOLUTION))
        )

    def optim(self) -> OptimConfig:
        loss = LossWeights(
            self.margin, self.lambda_con, self.lambda_mse, self.lambda_delta, self.margin_scale
        )
        return OptimConfig(self.iterations, self.lr, self.weight_decay, loss)


@dataclass
class MergeResult:
    method: str
    offsets: dict[str, torch.Tensor]  # canonical layer -> W' - W, shaped like the weight
    report: dict[str, Any] = field(default_factory=dict)

    def merged_weight(self, name: str, base: torch.Tensor) -> torch.Tensor:
        return base + self.offsets[name].to(device=base.device, dtype=torch.float32).reshape(base.shape).to(
            base.dtype
        )


class MergeMemoryError(LoraClrError):
    """The merge cannot fit its memory budget; raised before any work, with the plan attached."""

    def __init__(self, plan: MergePlan) -> None:
        super().__init__(plan.message)
        self.plan = plan


class _Steps:
    """Progress over the whole merge, and the interrupt check between steps."""

    def __init__(self, total: int, progress: Progress | None, should_stop: Callable[[], bool] | None) -> None:
        self.total, self.done, self.progress, self.should_stop = total, 0, progress, should_stop

    def check(self) -> None:
        if self.should_stop is not None and self.should_stop():
            raise Interrupted("merge interrupted; nothing was written")

    def advance(self, label: str, n: int = 1) -> None:
        self.check()
        self.done += n
        if self.progress is not None:
            self.progress(min(self.done, self.total), self.total, label)


def naive_offset(
    name: str, loras: Sequence[Any], weights: Sequence[float], layer: nn.Module, average: bool
) -> torch.Tensor:
    """``sum_k w_k dW_k`` (or its mean over K) shaped like the weight."""
    total = torch.zeros_like(layer.weight, dtype=torch.float32)
    for lora, w in zip(loras, weights, strict=True):
        module = lora.modules.get(name)
        if module is not None:
            total += w * module.delta(dtype=torch.float32, device=layer.weight.device).reshape(
                layer.weight.shape
            )
    return total / len(loras) if average else total


def merge_layers(
    model: MergeModel, loras: Sequence[Any], groups: Sequence[str]
) -> tuple[dict[str, dict[str, nn.Module]], list[str]]:
    """The layers any LoRA touches, by merge stage, and those that take the naive sum instead."""
    layers = model.layer_map()
    touched = sorted({n for lora in loras for n in lora.modules if n in layers})
    grouped: dict[str, dict[str, nn.Module]] = {g: {} for g in GROUPS}
    fallback = []
    for name in touched:
        group = layer_group(name)
        if group in groups and ft.is_linear_like(layers[name]):
            grouped[group][name] = layers[name]
        else:
            fallback.append(name)
    return grouped, fallback


def plan_for(
    model: MergeModel,
    loras: Sequence[Any],
    config: MergeConfig,
    budget: int | None,
    methods: int = 1,
    grouped: dict[str, dict[str, nn.Module]] | None = None,
) -> MergePlan:
    """The memory plan of merging ``loras`` into ``model`` with ``config`` on the merge device
    (``grouped``: :func:`merge_layers`'s first result, when the caller has it already)."""
    config = config.for_model(model)
    if grouped is None:
        grouped, _ = merge_layers(model, loras, config.groups)
    shapes = {n: tuple(ft.base_weight(layer).shape) for g in grouped.values() for n, layer in g.items()}
    lora_bytes = 4 * sum(
        t.numel() for lora in loras for m in lora.modules.values() for t in m.tensors().values()
    )
    return plan_merge(
        shapes,
        len(loras),
        groups=config.groups,
        templates=len(config.templates),
        steps=config.steps,
        resolution=config.resolution,
        budget=budget,
        device=_device(model, config).type,
        lora_bytes=lora_bytes,
        methods=methods,
        iterations=config.iterations,
    )


def _device(model: MergeModel, config: MergeConfig) -> torch.device:
    if config.device:
        return torch.device(config.device)
    return next(iter(model.layer_map().values())).weight.device


@dataclass
class _Method:
    offsets: dict[str, torch.Tensor]
    report: rp.LayerReport
    diagnostics: dict[str, dict[str, float]]


def merge_loras(
    model: MergeModel,
    loras: Sequence[Any],
    config: MergeConfig,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
    methods: Sequence[str] | None = None,
    budget: int | None = None,
) -> dict[str, MergeResult]:
    """Merge ``loras`` (one concept each) with every method in ``methods`` (default: the
    config's) on the same statistics; returns ``{method: MergeResult}``. ``budget`` (bytes on the
    merge device, ``None``: unbounded) only changes how many feature passes are made, never the
    result; a merge that cannot fit raises :class:`MergeMemoryError` before any work."""
    if not loras:
        raise LoraClrError("no LoRAs to merge")
    config = config.for_model(model)
    K = len(loras)
    weights = list(config.weights) or [1.0] * K
    concepts = list(config.concepts) or [
        (lora.trigger_words[0] if lora.trigger_words else lora.name) for lora in loras
    ]
    if len(weights) != K or len(concepts) != K:
        raise LoraClrError(
            f"{K} LoRAs need {K} weights and {K} concept texts (got {len(weights)} and {len(concepts)})"
        )
    wanted = list(dict.fromkeys(methods or [config.method]))
    unknown = [m for m in wanted if m not in METHODS]
    if unknown:
        raise LoraClrError(f"merge method(s) {unknown} not among {', '.join(METHODS)}")
    grouped, fallback = merge_layers(model, loras, config.groups)
    plan = plan_for(model, loras, config, budget, methods=len(wanted), grouped=grouped)
    if not plan.fits:
        raise MergeMemoryError(plan)
    layers = model.layer_map()
    device = _device(model, config)
    n_te, n_sp, n_kv = (len(plan.passes.get(s, [])) for s in ("te", "spatial", "cross_kv"))
    steps = _Steps(2 * n_te + n_sp * (config.steps + 1) + len(wanted) * (2 * n_kv + 1), progress, should_stop)
    run = ft.FeatureRun(model, loras, config, weights, concepts, steps.advance)
    precision = precision_for(device, config.precision)
    solve = _Solver(config, loras, weights, layers, plan, device, precision, steps)
    states = {m: _Method({}, rp.LayerReport(K), {}) for m in wanted}
    log.info(
        "merge plan: peak %s on %s, %d feature passes, solve in %s",
        format_size(plan.peak_bytes),
        device,
        plan.feature_passes,
        precision.name,
    )

    for stage in ("te", "spatial"):  # 1. text encoder, 3. spatial: each concept with its own LoRA
        for names in plan.passes.get(stage, []):
            stats = solve.new_stats(names)
            run.text_encoder(stats) if stage == "te" else run.spatial(stats, plan.spatial_groups)
            solve(stats, states, stage)
            steps.advance(f"{stage} layers solved")
    for method, state in states.items():  # 2. cross-attention K/V on the MERGED text encoder's context
        te_offsets = {n: d for n, d in state.offsets.items() if n in grouped["te"]}
        for names in plan.passes.get("cross_kv", []):
            stats = solve.new_stats(names)
            run.cross_kv(stats, te_offsets)
            steps.advance(f"{method}: cross-attention K/V features")
            solve(stats, {method: state}, "cross_kv")
            steps.advance(f"{method}: cross-attention K/V solved")

    results = {}
    for method, state in states.items():
        offsets = state.offsets
        for name in fallback:
            offsets[name] = naive_offset(name, loras, weights, layers[name], average=method == "average")
        result = MergeResult(method, offsets)
        result.report = state.report.result(loras, concepts)
        for entry in state.diagnostics.values():  # sums over layers -> means
            entry["margin_active"] /= max(entry["layers"], 1)
            entry["moved_from_init"] /= max(entry["layers"], 1)
        result.report.update(
            diagnostics=state.diagnostics,
            fallback_layers=len(fallback),
            merged_layers=len(offsets),
            memory_plan=plan.as_json(),
            precision=precision.name,
        )
        if config.model_level:
            result.report["model_level"] = rp.model_level_report(
                model, layers, loras, weights, concepts, offsets, config
            )
        steps.advance(f"{method}: report")
        results[method] = result
    return results


class _Solver:
    """Solves every method on one pass's statistics, chunk by chunk of layers of one shape."""

    def __init__(
        self, config, loras, weights, layers, plan: MergePlan, device, precision: Precision, steps: _Steps
    ) -> None:
        self.config, self.loras, self.weights, self.layers = config, loras, weights, layers
        self.plan, self.device, self.precision, self.steps = plan, device, precision, steps

    def new_stats(self, names: Sequence[str]) -> dict[str, LayerStats]:
        plan = self.plan.layers
        return {
            n: LayerStats(plan[n].form, len(self.loras), plan[n].d_in, plan[n].d_out, self.device)
            for n in names
        }

    def _chunks(self, names: list[str]) -> list[list[str]]:
        by_shape: dict[tuple[int, int, int], list[str]] = {}
        for name in names:  # one shape and one row count: the plan's solve path is the chunk's
            p = self.plan.layers[name]
            by_shape.setdefault((p.d_out, p.d_in, p.rows), []).append(name)
        room = self.plan.solve_room(names)
        chunks = []
        for group in by_shape.values():
            size = max(1, room // self.plan.layers[group[0]].solve_bytes)
            chunks += [group[i : i + size] for i in range(0, len(group), size)]
        return chunks

    def __call__(self, stats: dict[str, LayerStats], states: dict[str, _Method], group: str) -> None:
        names = list(stats)
        silent = [n for n in names if stats[n].rows == 0]
        if silent:
            raise LoraClrError(
                f"{len(silent)} layer(s) recorded no features, e.g. {silent[0]}: the feature run never "
                "reached them (is this model's forward pass patched or replaced?)"
            )
        for chunk in self._chunks(names):
            self._solve_chunk(chunk, stats, states, group)
        stats.clear()  # the pass's statistics are done with

    def _solve_chunk(self, names, stats, states, group) -> None:
        cfg, layers, device = self.config, self.layers, self.device
        W = torch.stack([ft.base_weight(layers[n]).to(device=device, dtype=torch.float32) for n in names])
        factors = [
            [
                None if m is None else _weighted(ft.delta_factors(m, device, torch.float32), w)
                for m, w in zip((lora.modules.get(n) for lora in self.loras), self.weights, strict=True)
            ]
            for n in names
        ]
        chunk = [stats[n] for n in names]
        D_lsq = least_squares(W, chunk, factors, self.precision, cfg.ridge)
        D0 = D_lsq if cfg.lsq_init else torch.zeros_like(W)
        expansion = build_expansion(W, D0, chunk, factors, self.precision, cfg.iterations)
        for method, state in states.items():
            if method in ("sum", "average"):
                D = torch.stack(
                    [
                        naive_offset(n, self.loras, self.weights, layers[n], method == "average")
                        .reshape(W.shape[1:])
                        .to(W)
                        for n in names
                    ]
                )
            elif method == "lsq":
                D = D_lsq
            else:
                D = optimise(W, D0, expansion, cfg.optim(), should_stop=self.steps.check).D
                d2 = expansion.distances(D - D0)
                moved = (D - D0).flatten(1).norm(dim=1) / W.flatten(1).norm(dim=1)
                entry = state.diagnostics.setdefault(
                    group, {"layers": 0, "margin_active": 0.0, "moved_from_init": 0.0}
                )
                entry["layers"] += len(names)
                margin = cfg.optim().loss.margin_for(expansion.rows.clamp_min(1), W.shape[1])
                entry["margin_active"] += float(margin_activity(d2, margin).sum())
                entry["moved_from_init"] += float(moved.sum())
            state.report.add([group] * len(names), expansion, D0, D, factors)
            for i, name in enumerate(names):
                state.offsets[name] = D[i].detach().reshape(layers[name].weight.shape).float().cpu()


def _weighted(pair, weight: float):
    U, V = pair
    return U * weight, V
