"""Streaming feature collection for the merge: all K concepts in one batch, statistics accumulated.

Each forward pass carries R row groups of K rows (concept fastest: row ``r*K + k`` belongs to
concept ``k``), and per-row LoRA routing gives row ``k`` LoRA ``k``. A forward pre-hook on each
recorded layer reshapes its input to (K, n, in) — rows paired across concepts by prompt index,
token or pixel position and step — and adds it to the layer's
:class:`~lib_loraclr.merge.stats.LayerStats` together with the targets
``Y_k = X_k (W + w_k dW_k)^T`` (when its form needs them). Nothing per row outlives the hook
except in the ``raw`` form, which is chosen only where rows are fewer than inputs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lib_loraclr.merge.stats import LayerStats


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


def target_weights(W: torch.Tensor, modules: Sequence[Any], weights: Sequence[float]) -> torch.Tensor:
    """``M_k = W + w_k dW_k`` (K, out, in) in float64 for one layer (``None`` module: ``W``)."""
    out = []
    for module, w in zip(modules, weights, strict=True):
        M = W.to(torch.float64).clone()
        if module is not None:
            M += w * module.delta(dtype=torch.float64, device=W.device).reshape(W.shape)
        out.append(M)
    return torch.stack(out)


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
        if layer_stats.form != "cross":  # the cross form needs no targets while recording
            for k in range(K):
                module = deltas[k].get(name)
                factors.append(None if module is None else delta_factors(module, W.device, torch.float32))

        def hook(layer: nn.Module, args: tuple) -> None:
            rows = _rows(args[0].detach(), layer)  # (B, n, in)
            if rows.shape[0] % K:
                raise RuntimeError(f"{name}: batch of {rows.shape[0]} is not a multiple of {K} concepts")
            X = rows.reshape(rows.shape[0] // K, K, rows.shape[1], rows.shape[2]).transpose(0, 1)
            X = X.reshape(K, -1, rows.shape[2]).float()
            if layer_stats.form == "cross":
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
