"""Optimisers for the LoRACLR objective: batched AdamW on Gram statistics, the reference loop,
and the closed-form least-squares fusion.

AdamW is elementwise, so one AdamW over a stacked (L, out, in) offset is exactly L independent
per-layer AdamW runs: all layers of one shape are optimised together in one batched problem.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from lib_loraclr.merge.gram import GramStats, LossWeights, gram_loss, raw_loss


@dataclass(frozen=True)
class OptimConfig:
    """Reference defaults: AdamW lr 1e-4, weight decay 1e-4, 50 iterations, keep the best iterate."""

    iterations: int = 50
    lr: float = 1e-4
    weight_decay: float = 1e-4
    loss: LossWeights = LossWeights()


@dataclass
class OptimResult:
    D: torch.Tensor  # (L, out, in) best offsets
    best_loss: torch.Tensor  # (L,)
    first_loss: torch.Tensor  # (L,)
    history: list[float]


def optimise_gram(
    W: torch.Tensor,
    stats: GramStats,
    config: OptimConfig,
    D0: torch.Tensor | None = None,
    should_stop: Callable[[], None] | None = None,
) -> OptimResult:
    """Minimise the loss of ``W' = W + D`` for L layers at once; returns the best ``D`` per layer."""
    W = W.to(stats.G.dtype)
    D = (D0.clone() if D0 is not None else torch.zeros_like(W)).to(W.dtype).requires_grad_(True)
    opt = torch.optim.AdamW([D], lr=config.lr, weight_decay=config.weight_decay)
    best = D.detach().clone()
    best_loss = torch.full((W.shape[0],), float("inf"), device=W.device, dtype=W.dtype)
    first_loss = None
    history = []
    with torch.enable_grad():
        for _ in range(config.iterations + 1):
            if should_stop is not None:
                should_stop()
            losses = gram_loss(W, D, stats, config.loss)
            detached = losses.detach()
            if first_loss is None:
                first_loss = detached.clone()
            better = detached < best_loss
            best_loss = torch.where(better, detached, best_loss)
            best = torch.where(better[:, None, None], D.detach(), best)
            history.append(float(detached.sum()))
            if len(history) > config.iterations:
                break  # the last iterate is evaluated, not stepped
            opt.zero_grad(set_to_none=True)
            losses.sum().backward()
            opt.step()
    return OptimResult(best, best_loss, first_loss, history)


def optimise_reference(
    W: torch.Tensor, X: torch.Tensor, Y: torch.Tensor, config: OptimConfig, D0: torch.Tensor | None = None
) -> OptimResult:
    """The reference loop for ONE layer on raw features ``X`` (K, N, in), ``Y`` (K, N, out)."""
    D = (D0.clone() if D0 is not None else torch.zeros_like(W)).requires_grad_(True)
    opt = torch.optim.AdamW([D], lr=config.lr, weight_decay=config.weight_decay)
    best, best_loss, first, history = D.detach().clone(), float("inf"), None, []
    with torch.enable_grad():
        for step in range(config.iterations + 1):
            loss = raw_loss(W, D, X, Y, config.loss)
            value = float(loss.detach())
            first = value if first is None else first
            if value < best_loss:
                best_loss, best = value, D.detach().clone()
            history.append(value)
            if step == config.iterations:
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return OptimResult(best[None], W.new_tensor([best_loss]), W.new_tensor([first]), history)


def least_squares(W: torch.Tensor, stats: GramStats, ridge: float = 1e-4) -> torch.Tensor:
    """Closed form of ``min sum_k ||X_k W'^T - Y_k||^2 + lam ||W' - W||^2`` (Mix-of-Show's
    gradient fusion objective); returns the offset ``D = W' - W`` (L, out, in).

    ``lam`` is ``ridge`` times the mean diagonal of ``sum_k G_k``, so it is scale-free; it keeps
    directions no concept excites at the base weight.
    """
    # float64: the summed Gram of correlated features (padding tokens, shared pixels) is badly
    # conditioned, and a float32 solve can blow up depending on summation order (thread count)
    G = stats.G.sum(dim=1).double()  # (L, in, in)
    H = torch.diagonal(stats.H, dim1=1, dim2=2).sum(dim=-1).double()  # (L, in, out): sum_k H_kk
    scale = torch.diagonal(G, dim1=-2, dim2=-1).mean(dim=-1).clamp_min(1e-12)
    lam = (ridge * scale)[:, None, None]
    eye = torch.eye(G.shape[-1], device=G.device, dtype=G.dtype)
    Wt = W.to(G.dtype).transpose(1, 2)
    rhs = H + lam * Wt
    # the system is symmetric positive definite: Cholesky needs no pivoting (MKL's pivoted LU
    # misbehaves after a thread-count change inside one process)
    factor = torch.linalg.cholesky(G + lam * eye)
    solution = torch.cholesky_solve(rhs, factor)  # (L, in, out) = W'^T
    return (solution.transpose(1, 2) - W.to(G.dtype)).to(stats.G.dtype)
