"""Streaming feature collection for the merge: all K concepts in one batch, Grams accumulated.

Each forward pass carries R row groups of K rows (concept fastest: row ``r*K + k`` belongs to
concept ``k``), and per-row LoRA routing gives row ``k`` LoRA ``k``. A forward pre-hook on each
recorded layer reshapes its input to (K, n, in) — rows paired across concepts by prompt index,
token or pixel position and step — and adds them to the layer's :class:`GramStats` together with
the targets ``Y_k = X_k (W + w_k dW_k)^T``. Nothing per-row is kept, so memory does not grow
with the number of steps or pixels.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from lib_loraclr.merge.gram import GramStats

GROUPS = ("te", "cross_kv", "spatial")


def layer_group(name: str) -> str | None:
    """Which merge group a canonical layer belongs to (``None``: not a linear feature layer)."""
    if name.startswith("lora_te"):
        return "te"
    if name.endswith(("attn2_to_k", "attn2_to_v")):
        return "cross_kv"
    if "_attentions_" in name:
        return "spatial"
    return None


def base_weight(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as a 2-D (out, in) matrix (1x1 convs flattened)."""
    weight = layer.weight.detach()
    return weight.reshape(weight.shape[0], -1)


def is_linear_like(layer: nn.Module) -> bool:
    if isinstance(layer, nn.Linear):
        return True
    return isinstance(layer, nn.Conv2d) and layer.kernel_size == (1, 1) and layer.groups == 1 and layer.stride == (1, 1)


def _rows(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """Layer input as (B, n, in): tokens or pixels of each batch row."""
    if isinstance(layer, nn.Conv2d):
        return x.flatten(2).transpose(1, 2)
    return x.reshape(x.shape[0], -1, x.shape[-1])


def delta_rows(module, X: torch.Tensor) -> torch.Tensor:
    """``X dW^T`` for 2-D rows ``X`` (..., in), through the low-rank factors when the format has them."""
    up, down = getattr(module, "up", None), getattr(module, "down", None)
    if up is not None and down is not None and getattr(module, "mid", None) is None and down[0].numel() == X.shape[-1]:
        down2, up2 = down.reshape(down.shape[0], -1).to(X), up.reshape(up.shape[0], -1).to(X)
        return (X @ down2.T) @ up2.T * module.scale
    delta = module.delta(dtype=X.dtype, device=X.device)
    return X @ delta.reshape(delta.shape[0], -1).T


@dataclass
class Bucket:
    """Layers of one (out, in) shape share one batched :class:`GramStats`."""

    names: list[str]
    stats: GramStats
    W: torch.Tensor  # (L, out, in) base weights


@dataclass
class Collection:
    buckets: dict[tuple[int, int], Bucket] = field(default_factory=dict)

    def names(self) -> list[str]:
        return [n for b in self.buckets.values() for n in b.names]

    def nbytes(self) -> int:
        return sum(b.stats.nbytes() for b in self.buckets.values())


def plan_buckets(layers: Mapping[str, nn.Module], concepts: int, device: torch.device | str, dtype: torch.dtype) -> Collection:
    by_shape: dict[tuple[int, int], list[str]] = {}
    for name, layer in layers.items():
        w = base_weight(layer)
        by_shape.setdefault((w.shape[0], w.shape[1]), []).append(name)
    collection = Collection()
    for (d_out, d_in), names in sorted(by_shape.items()):
        W = torch.stack([base_weight(layers[n]).to(device=device, dtype=dtype) for n in names])
        collection.buckets[(d_out, d_in)] = Bucket(names, GramStats.zeros(len(names), concepts, d_in, d_out, device, dtype), W)
    return collection


@contextlib.contextmanager
def recording(
    collection: Collection,
    layers: Mapping[str, nn.Module],
    deltas: Sequence[Mapping[str, object]],
    weights: Sequence[float],
) -> Iterator[None]:
    """Accumulate statistics of every layer in ``collection`` during the passes inside the block.

    ``deltas[k]`` maps layer names to LoRA ``k``'s modules, ``weights[k]`` is its multiplier.
    """
    K = len(deltas)
    handles = []
    index = {}
    for bucket in collection.buckets.values():
        for i, name in enumerate(bucket.names):
            index[name] = (bucket, i)

    def make_hook(name: str):
        bucket, i = index[name]

        def hook(layer: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            rows = _rows(x, layer)  # (B, n, in)
            if rows.shape[0] % K:
                raise RuntimeError(f"{name}: batch of {rows.shape[0]} is not a multiple of {K} concepts")
            X = rows.reshape(rows.shape[0] // K, K, rows.shape[1], rows.shape[2]).transpose(0, 1)
            X = X.reshape(K, -1, rows.shape[2]).to(bucket.stats.G.dtype)
            W = bucket.W[i]
            Y = X @ W.T
            targets = []
            for k in range(K):
                module = deltas[k].get(name)
                targets.append(Y[k] + weights[k] * delta_rows(module, X[k]) if module is not None else Y[k])
            bucket.stats.update_xy(i, X, torch.stack(targets))

        return hook

    try:
        for name in index:
            handles.append(layers[name].register_forward_pre_hook(make_hook(name)))
        yield
    finally:
        for handle in handles:
            handle.remove()
