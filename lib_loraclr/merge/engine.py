"""LoRACLR merge of K LoRAs into one set of weights (ALGORITHMS.md section 1).

Stages, in the reference's order: text encoder (features from the K concept prompts, each row with
its own LoRA), then cross-attention K/V (context of the MERGED text encoder), then spatial layers
(features from a short sampling run of every concept at once). Each stage streams Gram statistics
(``features.py``) and solves every layer bucket in one batched problem (``optimise.py``).
Layers outside the chosen groups (e.g. LoCon's 3x3 convs) take the naive weighted sum (or the
average, for ``average``) and are counted in the report.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch
from torch import nn

from lib_loraclr.errors import Interrupted, LoraClrError
from lib_loraclr.lora.routing import RoutedLora, route_loras
from lib_loraclr.merge import features as ft
from lib_loraclr.merge.gram import LossWeights, margin_activity
from lib_loraclr.merge.optimise import OptimConfig, least_squares, optimise_gram
from lib_loraclr.sd.patches import offsets_applied
from lib_loraclr.sd.sampling import CFGDenoiser, EpsDenoiser, sample_euler, sigmas_from_alphas

log = logging.getLogger(__name__)
METHODS = ("loraclr", "lsq", "sum", "average")
Progress = Callable[[int, int, str], None]


class MergeModel(Protocol):
    """What the merge needs of a model; :class:`~lib_loraclr.sd.model.SDModel` and the WebUI adapter have it."""

    alphas_cumprod: torch.Tensor

    def layer_map(self) -> dict[str, nn.Module]: ...
    def encode_prompt(self, prompts: list[str]) -> torch.Tensor: ...
    def eps(self, x: torch.Tensor, t: Any, context: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class MergeConfig:
    """Every merge option. Optimiser defaults are the reference's; see docs/merge.md."""

    method: str = "loraclr"
    weights: tuple[float, ...] = ()  # per LoRA; empty = 1.0 each
    concepts: tuple[str, ...] = ()  # trigger text per LoRA
    groups: tuple[str, ...] = ft.GROUPS
    iterations: int = 50
    lr: float = 1e-4
    weight_decay: float = 1e-4
    margin: float = 0.5
    lambda_con: float = 1.0
    lambda_mse: float = 0.1
    lambda_delta: float = 0.001
    lsq_init: bool = True
    ridge: float = 1e-4
    seed: int = 0
    steps: int = 20
    resolution: int = 512
    cfg_scale: float = 7.5
    templates: tuple[str, ...] = ("photo of a {}", "{}")
    device: str | None = None
    model_level: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise LoraClrError(f"merge method {self.method!r} is not one of {', '.join(METHODS)}")
        unknown = set(self.groups) - set(ft.GROUPS)
        if unknown:
            raise LoraClrError(f"unknown layer group(s) {sorted(unknown)}; use {', '.join(ft.GROUPS)}")
        if self.resolution % 64:
            raise LoraClrError(f"feature resolution {self.resolution} must be a multiple of 64")

    def optim(self) -> OptimConfig:
        loss = LossWeights(self.margin, self.lambda_con, self.lambda_mse, self.lambda_delta)
        return OptimConfig(self.iterations, self.lr, self.weight_decay, loss)


@dataclass
class MergeResult:
    method: str
    offsets: dict[str, torch.Tensor]  # canonical layer -> W' - W, shaped like the weight
    report: dict[str, Any] = field(default_factory=dict)

    def merged_weight(self, name: str, base: torch.Tensor) -> torch.Tensor:
        return base + self.offsets[name].to(device=base.device, dtype=torch.float32).reshape(base.shape).to(base.dtype)


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


def naive_offset(name: str, loras: Sequence[Any], weights: Sequence[float], layer: nn.Module, average: bool) -> torch.Tensor:
    """``sum_k w_k dW_k`` (or its mean over K) shaped like the weight."""
    total = torch.zeros_like(layer.weight, dtype=torch.float32)
    for lora, w in zip(loras, weights, strict=True):
        module = lora.modules.get(name)
        if module is not None:
            total += w * module.delta(dtype=torch.float32, device=layer.weight.device).reshape(layer.weight.shape)
    return total / len(loras) if average else total


def merge_loras(
    model: MergeModel,
    loras: Sequence[Any],
    config: MergeConfig,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
    methods: Sequence[str] | None = None,
) -> dict[str, MergeResult] | MergeResult:
    """Merge ``loras`` (one concept each). With ``methods`` given, solve every method on the same
    statistics and return ``{method: MergeResult}``; otherwise return ``config.method``'s result."""
    from lib_loraclr.merge import report as rp

    if not loras:
        raise LoraClrError("no LoRAs to merge")
    K = len(loras)
    weights = list(config.weights) or [1.0] * K
    concepts = list(config.concepts) or [(lora.trigger_words[0] if lora.trigger_words else lora.name) for lora in loras]
    if len(weights) != K or len(concepts) != K:
        raise LoraClrError(f"{K} LoRAs need {K} weights and {K} concept texts (got {len(weights)} and {len(concepts)})")
    wanted = list(methods) if methods else [config.method]
    layers = model.layer_map()
    touched = sorted({n for lora in loras for n in lora.modules if n in layers})
    grouped: dict[str, dict[str, nn.Module]] = {g: {} for g in ft.GROUPS}
    fallback = []
    for name in touched:
        group = ft.layer_group(name)
        if group in config.groups and ft.is_linear_like(layers[name]):
            grouped[group][name] = layers[name]
        else:
            fallback.append(name)
    device = torch.device(config.device) if config.device else next(iter(layers.values())).weight.device
    dtype = torch.float32
    deltas = [lora.modules for lora in loras]
    prompts = [t.format(c) for t in config.templates for c in concepts]  # row p*K + k
    steps = _Steps(4 + config.steps + 3 * len(wanted), progress, should_stop)
    routed = [[RoutedLora(lora, w, w)] for lora, w in zip(loras, weights, strict=True)]

    with route_loras(layers, loras) as router, torch.no_grad():
        # 1. text encoder: features of each concept's prompts with its own LoRA
        te = ft.plan_buckets(grouped["te"], K, device, dtype)
        if grouped["te"]:
            with router.rows(routed * len(config.templates)), ft.recording(te, layers, deltas, weights):
                model.encode_prompt(prompts)
        steps.advance("text encoder features")
        # 3. spatial: one sampling run of all concepts, each row with its LoRA (TE and UNet)
        spatial = ft.plan_buckets(grouped["spatial"], K, device, dtype)
        if grouped["spatial"]:
            _spatial_run(model, router, routed, prompts, config, spatial, layers, deltas, weights, steps)
        else:
            steps.advance("spatial features", config.steps)

    log.info("merge statistics: %.1f MiB (te %d, spatial %d layers)", (te.nbytes() + spatial.nbytes()) / 2**20,
             len(grouped["te"]), len(grouped["spatial"]))  # fmt: skip
    results = {}
    for method in wanted:
        cfg = replace(config, method=method)
        offsets: dict[str, torch.Tensor] = {}
        diagnostics: dict[str, Any] = {}
        offsets.update(_solve(te, cfg, loras, weights, layers, steps, diagnostics, "te"))
        steps.advance(f"{method}: text encoder solved")
        # 2. cross-attention K/V on the merged text encoder's context
        kv = ft.plan_buckets(grouped["cross_kv"], K, device, dtype)
        if grouped["cross_kv"]:
            te_offsets = {n: d for n, d in offsets.items() if n in grouped["te"]}
            with torch.no_grad(), offsets_applied(layers, te_offsets):
                context = model.encode_prompt(prompts)
                with ft.recording(kv, layers, deltas, weights):
                    for name in grouped["cross_kv"]:
                        layers[name](context.to(layers[name].weight.dtype))
        offsets.update(_solve(kv, cfg, loras, weights, layers, steps, diagnostics, "cross_kv"))
        offsets.update(_solve(spatial, cfg, loras, weights, layers, steps, diagnostics, "spatial"))
        steps.advance(f"{method}: solved")
        for name in fallback:
            offsets[name] = naive_offset(name, loras, weights, layers[name], average=method == "average")
        result = MergeResult(method, offsets)
        result.report = rp.layer_report([te, kv, spatial], offsets, loras, weights, concepts)
        for entry in diagnostics.values():  # sums over layers -> means
            entry["margin_active"] /= max(entry["layers"], 1)
            entry["moved_from_init"] /= max(entry["layers"], 1)
        result.report.update(diagnostics=diagnostics, fallback_layers=len(fallback), merged_layers=len(offsets))
        if config.model_level:
            result.report["model_level"] = rp.model_level_report(model, layers, loras, weights, concepts, offsets, config)
        steps.advance(f"{method}: report")
        results[method] = result
    return results if methods else results[config.method]


def _spatial_run(model, router, routed, prompts, config, collection, layers, deltas, weights, steps) -> None:
    K = len(routed)
    P = len(config.templates)
    router.set_rows(routed * P)
    context = model.encode_prompt(prompts)
    uncond = model.encode_prompt([""] * len(prompts))
    router.set_rows(routed * (2 * P))  # CFG batch: [cond rows, uncond rows], concept fastest
    size = config.resolution // 8
    gen = torch.Generator().manual_seed(config.seed)
    noise = torch.randn(1, 4, size, size, generator=gen).repeat(K * P, 1, 1, 1)
    param = next(iter(layers.values())).weight
    noise = noise.to(device=param.device, dtype=param.dtype)
    denoiser = CFGDenoiser(EpsDenoiser(model.eps, model.alphas_cumprod))
    sigmas = sigmas_from_alphas(model.alphas_cumprod.float().cpu(), config.steps).to(noise.device)

    def callback(_info: dict) -> None:
        steps.advance("spatial features")

    with ft.recording(collection, layers, deltas, weights):
        sample_euler(
            lambda x, sigma, **kw: denoiser(x, sigma, context, uncond, config.cfg_scale),
            noise * sigmas[0], sigmas, callback=callback, disable=True,
        )  # fmt: skip
    router.set_rows(None)


def _solve(collection, cfg: MergeConfig, loras, weights, layers, steps, diagnostics, group) -> dict[str, torch.Tensor]:
    offsets: dict[str, torch.Tensor] = {}
    for bucket in collection.buckets.values():
        stats, W = bucket.stats, bucket.W
        if cfg.method in ("sum", "average"):
            D = torch.stack([naive_offset(n, loras, weights, layers[n], cfg.method == "average").reshape(W.shape[1:]).to(W)
                             for n in bucket.names])  # fmt: skip
        else:
            D = least_squares(W, stats, cfg.ridge)
            if cfg.method == "loraclr":
                D0 = D if cfg.lsq_init else None
                result = optimise_gram(W, stats, cfg.optim(), D0=D0, should_stop=steps.check)
                D = result.D
                active = margin_activity(W, D, stats, cfg.margin)
                moved = (D - (D0 if D0 is not None else 0)).flatten(1).norm(dim=1) / W.flatten(1).norm(dim=1)
                entry = diagnostics.setdefault(group, {"layers": 0, "margin_active": 0.0, "moved_from_init": 0.0})
                entry["layers"] += len(bucket.names)
                entry["margin_active"] += float(active.sum())
                entry["moved_from_init"] += float(moved.sum())
        for i, name in enumerate(bucket.names):
            offsets[name] = D[i].detach().reshape(layers[name].weight.shape).float().cpu()
    return offsets
