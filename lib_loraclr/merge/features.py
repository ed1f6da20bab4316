"""Streaming feature collection for the merge: all K concepts in one batch, statistics accumulated.

Each forward pass carries R row groups of K rows (concept fastest: row ``r*K + k`` belongs to
concept ``k``), and per-row LoRA routing gives row ``k`` LoRA ``k``. A forward pre-hook on each
recorded layer reshapes its input to (K, n, in) — rows paired across concepts by prompt index,
token or pixel position and step — and adds it to the layer's
:class:`~lib_loraclr.merge.stats.LayerStats` together with the targets
``Y_k = X_k (W + w_k dW_k)^T`` (when its form needs them: ``gram``). Nothing per row outlives the
hook except in the ``raw`` form, which is chosen only where rows are fewer than inputs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lib_loraclr.lora.routing import RoutedLora, route_loras
from lib_loraclr.merge.stats import LayerStats
from lib_loraclr.sd.cond import Cond
from lib_loraclr.sd.patches import offsets_applied
from lib_loraclr.sd.sampling import CFGDenoiser, EpsDenoiser, sample_euler, sigmas_from_alphas


def base_weight(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as a 2-D (out, in) matrix (1x1 convs flattened)."""
    weight = layer.weight.detach()
    return weight.reshape(weight.shape[0], -1)


def is_linear_like(layer: nn.Module) -> bool:
    if isinstance(layer, nn.Linear):
        return True
    return (
        isinstance(layer, nn.Conv2d)
        and layer.kernel_size == (1, 1)
        and layer.groups == 1
        and layer.stride == (1, 1)
    )


def _rows(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """Layer input as (B, n, in): tokens or pixels of each batch row."""
    if isinstance(layer, nn.Conv2d):
        return x.flatten(2).transpose(1, 2)
    return x.reshape(x.shape[0], -1, x.shape[-1])


def delta_factors(
    module: Any, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``dW = U V`` as (out, r) and (r, in) on ``device``: the low-rank factors where the format has
    them (scale folded into ``U``); formats without them (LoHa, LoKr, CP) give ``(dW, None)``."""
    up, down = getattr(module, "up", None), getattr(module, "down", None)
    if up is not None and down is not None and getattr(module, "mid", None) is None:
        U = up.reshape(up.shape[0], -1).to(device=device, dtype=dtype) * module.scale
        V = down.reshape(down.shape[0], -1).to(device=device, dtype=dtype)
        if U.shape[1] == V.shape[0]:
            return U, V
    delta = module.delta(dtype=dtype, device=device)
    return delta.reshape(delta.shape[0], -1), None


@contextlib.contextmanager
def recording(
    stats: Mapping[str, LayerStats],
    layers: Mapping[str, nn.Module],
    deltas: Sequence[Mapping[str, Any]],
    weights: Sequence[float],
) -> Iterator[None]:
    """Accumulate ``stats[name]`` for every layer named there during the passes inside the block.

    ``deltas[k]`` maps layer names to LoRA ``k``'s modules, ``weights[k]`` is its multiplier. The
    LoRA factors a hook needs are moved to the layer's device once, here, and dropped on exit.
    """
    K = len(deltas)
    handles = []

    def make_hook(name: str):
        layer_stats = stats[name]
        W = base_weight(layers[name]).float()
        factors = []
        if layer_stats.needs_targets:  # the raw and cross forms need no targets while recording
            for k in range(K):
                module = deltas[k].get(name)
                factors.append(None if module is None else delta_factors(module, W.device, torch.float32))

        def hook(layer: nn.Module, args: tuple) -> None:
            rows = _rows(args[0].detach(), layer)  # (B, n, in)
            if rows.shape[0] % K:
                raise RuntimeError(f"{name}: batch of {rows.shape[0]} is not a multiple of {K} concepts")
            X = rows.reshape(rows.shape[0] // K, K, rows.shape[1], rows.shape[2]).transpose(0, 1)
            X = X.reshape(K, -1, rows.shape[2]).float()
            if not layer_stats.needs_targets:
                layer_stats.update(X)
                return
            Y = X @ W.T
            for k, pair in enumerate(factors):
                if pair is not None:
                    U, V = pair
                    Y[k] += weights[k] * ((X[k] @ V.T if V is not None else X[k]) @ U.T)
            layer_stats.update(X, Y)

        return hook

    try:
        for name in stats:
            handles.append(layers[name].register_forward_pre_hook(make_hook(name)))
        yield
    finally:
        for handle in handles:
            handle.remove()


class FeatureRun:
    """The merge's feature passes (deterministic for a seed, so a layer's statistics do not depend
    on which pass collected them). Rows are K concepts times the prompt templates, concept fastest."""

    def __init__(
        self,
        model: Any,
        loras: Sequence[Any],
        config: Any,
        weights: Sequence[float],
        concepts: Sequence[str],
        advance: Callable[[str], None] | None = None,
    ) -> None:
        self.model, self.loras, self.config, self.weights = model, loras, config, list(weights)
        self.layers = model.layer_map()
        self.deltas = [lora.modules for lora in loras]
        self.prompts = [t.format(c) for t in config.templates for c in concepts]  # row p*K + k
        self.routed = [[RoutedLora(lora, w, w)] for lora, w in zip(loras, weights, strict=True)]
        self.advance = advance or (lambda label: None)  # progress, and the interrupt check

    def _recording(self, stats: dict[str, LayerStats]):
        return recording(stats, self.layers, self.deltas, self.weights)

    @torch.no_grad()
    def text_encoder(self, stats: dict[str, LayerStats]) -> None:
        """Each concept's prompts through the text encoder with its own LoRA."""
        with (
            route_loras(self.layers, self.loras) as router,
            router.rows(self.routed * len(self.config.templates)),
        ):
            with self._recording(stats):
                self.model.encode_prompt(self.prompts)
        self.advance("text encoder features")

    @torch.no_grad()
    def cross_kv(self, stats: dict[str, LayerStats], te_offsets: dict[str, torch.Tensor]) -> None:
        """The K/V layers on the context of the text encoder merged with ``te_offsets``."""
        with offsets_applied(self.layers, te_offsets):
            context = self.model.encode_prompt(self.prompts).context
        with self._recording(stats):
            for name in stats:
                self.layers[name](context.to(self.layers[name].weight.dtype))

    def _eps_in_groups(self, router: Any, groups: int) -> Callable[..., torch.Tensor]:
        """``model.eps`` over the batch in calls of ``groups`` groups of K rows, each call routed
        as its rows: the working set of a call shrinks, the statistics stay the same (every call
        holds whole groups of all K concepts, in the run's row order)."""
        rows = groups * len(self.routed)

        def eps(x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
            outs = []
            for start in range(0, x.shape[0], rows):
                part = slice(start, start + rows)
                with router.rows(self.routed * (x[part].shape[0] // len(self.routed))):
                    outs.append(self.model.eps(x[part], t[part], cond.rows(part)))
            return torch.cat(outs)

        return eps

    @torch.no_grad()
    def spatial(self, stats: dict[str, LayerStats], groups: int = 0) -> None:
        """One sampling run of every concept at once, each row with its LoRA (text encoder and UNet);
        the UNet takes ``groups`` groups of K rows per call (0: the whole batch, both CFG halves)."""
        config, model = self.config, self.model
        K, P = len(self.routed), len(config.templates)
        with route_loras(self.layers, self.loras) as router:
            with router.rows(self.routed * P):
                picture = (config.resolution, config.resolution)
                context = model.encode_prompt(self.prompts, size=picture)
                uncond = model.encode_prompt([""] * len(self.prompts), size=picture)
            size = config.resolution // model.family.latent_scale
            gen = torch.Generator().manual_seed(config.seed)
            noise = torch.randn(1, 4, size, size, generator=gen).repeat(K * P, 1, 1, 1)
            param = next(iter(self.layers.values())).weight
            noise = noise.to(device=param.device, dtype=param.dtype)
            eps = model.eps if groups in (0, 2 * P) else self._eps_in_groups(router, groups)
            denoiser = CFGDenoiser(EpsDenoiser(eps, model.alphas_cumprod))
            sigmas = sigmas_from_alphas(model.alphas_cumprod.float().cpu(), config.steps).to(noise.device)

            def callback(_info: dict) -> None:
                self.advance("spatial features")

            # CFG batch: [cond rows, uncond rows], concept fastest
            with router.rows(self.routed * (2 * P)), self._recording(stats):
                sample_euler(
                    lambda x, sigma, **kw: denoiser(x, sigma, context, uncond, config.cfg_scale),
                    noise * sigmas[0],
                    sigmas,
                    callback=callback,
                    disable=True,
                )
