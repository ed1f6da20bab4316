"""Optimisers for the LoRACLR objective: AdamW on the expansion of the loss around its start
(:mod:`~lib_loraclr.merge.expansion`), the closed-form least-squares fusion, and the reference
optimiser written as the authors' code computes (raw features, autograd) for tests and benchmarks.

The gradient is analytic: with ``a_ij = dL/d(d_ij^2)``,
``dL/dΔ = 2 sum_ij a_ij R_ij^T + 2 Δ sum_i a_i G_i + lambda_delta D/||D||``, so an iteration costs
the expansion's two products whatever the number of rows. AdamW is elementwise, so L layers of
one shape form one batched problem; the parameter AdamW decays is the offset from the base, as in
the reference. The iterate is float32 on the merge device; distances, losses and keep-best are
float64 ``(L, K, K)`` pieces on the precision's small device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lib_loraclr.merge.expansion import Expansion, Factors, RowExpansion, gram_times, through
from lib_loraclr.merge.gram import _EPS, GramStats, LossWeights, broadcast_margin, loss_from_distances
from lib_loraclr.merge.precision import Precision
from lib_loraclr.merge.stats import LayerStats


@dataclass(frozen=True)
class OptimConfig:
    """Reference defaults: AdamW lr 1e-4, weight decay 1e-4, 50 iterations, keep the best iterate."""

    iterations: int = 50
    lr: float = 1e-4
    weight_decay: float = 1e-4
    loss: LossWeights = LossWeights()


@dataclass
class OptimResult:
    D: torch.Tensor  # (L, out, in) best offsets from the base
    best_loss: torch.Tensor  # (L,)
    first_loss: torch.Tensor  # (L,) the start's loss
    history: list[float]


def loss_coefficients(d2: torch.Tensor, rows: torch.Tensor, d_out: int, w: LossWeights) -> torch.Tensor:
    """``a_ij = dL/d(d_ij^2)`` (L, K, K) of the total loss (see :func:`~lib_loraclr.merge.gram.loss_from_distances`)."""
    L, K, _ = d2.shape
    a = torch.zeros_like(d2)
    diag = w.lambda_con / K + w.lambda_mse / (K * rows.clamp_min(1) * d_out)  # (L,)
    a.diagonal(dim1=-2, dim2=-1).copy_(diag[:, None].expand(L, K))
    if K > 1:
        off = d2 + torch.diag_embed(torch.full_like(d2[..., 0], float("inf")))
        nearest, index = off.min(dim=-1)
        distance = torch.sqrt(nearest.clamp_min(_EPS))
        margin = broadcast_margin(w.margin_for(rows.clamp_min(1), d_out), distance)
        slope = -(w.lambda_con / K) * torch.relu(margin - distance) / distance
        slope = torch.where(nearest > _EPS, slope, torch.zeros_like(slope))  # the clamp has no gradient
        a.scatter_add_(-1, index[..., None], slope[..., None])
    return a


def optimise(
    W: torch.Tensor,
    D0: torch.Tensor,
    expansion: Expansion | RowExpansion,
    config: OptimConfig,
    should_stop: Callable[[], None] | None = None,
) -> OptimResult:
    """AdamW on the offset ``D`` (L, out, in) from ``D0``, evaluating ``config.iterations`` iterates
    (the start included) and keeping the best one per layer, as the reference does."""
    w = config.loss
    d_out = W.shape[1]
    D = D0.detach().to(expansion.dtype).clone()
    start = D.clone()
    opt = torch.optim.AdamW([D], lr=config.lr, weight_decay=config.weight_decay)
    best, best_loss, first_loss, history = D.clone(), None, None, []
    for step in range(max(config.iterations, 1)):
        if should_stop is not None:
            should_stop()
        point = expansion.at(D - start)
        d2 = point.distances()
        losses = loss_from_distances(d2, D, expansion.rows, d_out, w)
        if best_loss is None:
            first_loss, best_loss = losses.clone(), losses.clone()
        better = losses < best_loss
        best_loss = torch.where(better, losses, best_loss)
        best = torch.where(better.to(D.device)[:, None, None], D, best)
        history.append(float(losses.sum()))
        if step == config.iterations - 1:
            break  # the reference evaluates, then steps: its last step is never scored
        grad = point.gradient(loss_coefficients(d2, expansion.rows, d_out, w))
        if w.lambda_delta:
            norm = D.flatten(1).norm(dim=1).clamp_min(1e-30)[:, None, None]
            grad = grad + w.lambda_delta * D / norm
        D.grad = grad
        opt.step()
    return OptimResult(best, best_loss, first_loss, history)


def least_squares(
    W: torch.Tensor,
    layers: Sequence[LayerStats],
    factors: Sequence[Factors],
    precision: Precision,
    ridge: float = 1e-4,
) -> torch.Tensor:
    """Closed form of ``min sum_k ||X_k W'^T - Y_k||^2 + lam ||W' - W||^2`` (Mix-of-Show's
    gradient fusion objective); returns the offset ``D = W' - W`` (L, out, in) in float32.

    ``lam`` is ``ridge`` times the mean diagonal of ``sum_k G_k``, so it is scale-free; it keeps
    directions no concept excites at the base weight. Solved for ``D`` itself,
    ``(sum_k G_k + lam) D^T = sum_k G_k E_k^T`` (``E_k = w_k dW_k``: ``Y_k - X_k W^T = X_k E_k^T``),
    so no product of the base weight cancels. Raw layers with fewer rows than inputs take the
    same solution in row space, ``D^T = X^T (X X^T + lam)^{-1} T`` with ``T_k = X_k E_k^T``
    (``K N`` unknowns per output instead of ``in``).
    """
    exact = precision.exact
    K, d_in = layers[0].K, W.shape[2]
    N = max(s.rows for s in layers)
    if all(s.form == "raw" for s in layers) and K * N < d_in:
        X = torch.zeros(len(layers), K * N, d_in, dtype=exact, device=W.device)
        T = torch.zeros(len(layers), K * N, W.shape[1], dtype=exact, device=W.device)
        for index, (stats, pairs) in enumerate(zip(layers, factors, strict=True)):
            Xs, n = stats.inputs(exact), stats.rows
            for k, pair in enumerate(pairs):
                X[index, k * N : k * N + n] = Xs[k]
                if pair is not None:
                    T[index, k * N : k * N + n] = through(Xs[k], pair)
        lam = ridge * (X.pow(2).sum(dim=(1, 2)) / d_in).clamp_min(1e-12)
        solution = _solve_spd(torch.bmm(X, X.transpose(1, 2)), lam, T, exact)  # (L, KN, out)
        return torch.bmm(solution.transpose(1, 2), X).to(torch.float32)
    A = torch.empty(len(layers), d_in, d_in, dtype=exact, device=W.device)
    rhs = torch.zeros(len(layers), d_in, W.shape[1], dtype=exact, device=W.device)
    for index, (stats, pairs) in enumerate(zip(layers, factors, strict=True)):
        G = stats.grams(exact).to(W.device)
        A[index] = G.sum(dim=0)
        for k, pair in enumerate(pairs):
            if pair is not None:
                rhs[index] += gram_times(G[k], pair)
    lam = ridge * torch.diagonal(A, dim1=-2, dim2=-1).mean(dim=-1).clamp_min(1e-12)
    return _solve_spd(A, lam, rhs, exact).transpose(1, 2).to(torch.float32)


def least_squares_gram(W: torch.Tensor, stats: GramStats, ridge: float = 1e-4) -> torch.Tensor:
    """:func:`least_squares` from batched float64 :class:`GramStats` (tests, benchmarks)."""
    G = stats.G.double().sum(dim=1)
    rhs = torch.diagonal(stats.H, dim1=1, dim2=2).sum(dim=-1).double() - G @ W.double().transpose(1, 2)
    lam = ridge * torch.diagonal(G, dim1=-2, dim2=-1).mean(dim=-1).clamp_min(1e-12)
    return _solve_spd(G, lam, rhs, torch.float64).transpose(1, 2).to(W.dtype)


def _solve_spd(A: torch.Tensor, lam: torch.Tensor, B: torch.Tensor, exact: torch.dtype) -> torch.Tensor:
    """``(A + lam I)^{-1} B`` for symmetric positive semi-definite ``A`` (L, n, n).

    The summed Gram of correlated features (padding tokens, shared pixels) is badly conditioned;
    Cholesky fits the system and needs no pivoting. In float32 one refinement step (the residual
    solved again with the same factor) recovers most of what the factorisation lost. A system that
    is numerically singular (a tiny ridge on rank-deficient features) falls back to an SVD-based solve.
    """
    A = A + lam[:, None, None] * torch.eye(A.shape[-1], device=A.device, dtype=A.dtype)
    factor, info = torch.linalg.cholesky_ex(A)
    solution = torch.cholesky_solve(B, factor)
    if exact != torch.float64:
        solution = solution + torch.cholesky_solve(B - torch.bmm(A, solution), factor)
    bad = info != 0
    if bad.any():
        solution[bad] = torch.linalg.pinv(A[bad], hermitian=True) @ B[bad]
    return solution


def optimise_reference(
    W: torch.Tensor, X: torch.Tensor, Y: torch.Tensor, config: OptimConfig, D0: torch.Tensor | None = None
) -> OptimResult:
    """ONE layer on raw features ``X`` (K, N, in), ``Y`` (K, N, out), computed as the authors'
    ``weight_fusion.py`` does: a linear layer on all concepts at once, pairwise distances from
    squared norms and one ``(K, N out) x (N out, K)`` product, autograd, AdamW, ``iterations``
    evaluations with a step after each. The benchmark baseline, and the tests' reference."""
    w = config.loss
    offset = (D0.clone() if D0 is not None else torch.zeros_like(W)).requires_grad_(True)
    opt = torch.optim.AdamW([offset], lr=config.lr, weight_decay=config.weight_decay)
    best, best_loss, first, history = offset.detach().clone(), float("inf"), None, []
    K = X.shape[0]
    mask = torch.eye(K, dtype=torch.bool, device=X.device)
    with torch.enable_grad():
        for _ in range(max(config.iterations, 1)):
            pred = F.linear(X, W + offset)
            P, T = pred.reshape(K, -1), Y.reshape(K, -1)
            dist_sq = P.pow(2).sum(1, keepdim=True) + T.pow(2).sum(1, keepdim=True).T - 2 * P @ T.T
            dist = torch.sqrt(torch.clamp(dist_sq, min=_EPS))
            positive = torch.diagonal(dist)
            negative = (
                dist.masked_fill(mask, float("inf")).min(dim=1).values
                if K > 1
                else torch.full_like(positive, float("inf"))
            )
            margin = w.margin_for(X.shape[1], Y.shape[2])
            con = (positive.pow(2) + torch.clamp(margin - negative, min=0.0).pow(2)).mean()
            loss = (
                w.lambda_con * con + w.lambda_mse * F.mse_loss(pred, Y) + w.lambda_delta * torch.norm(offset)
            )
            value = float(loss.detach())
            first = value if first is None else first
            if value < best_loss:
                best_loss, best = value, offset.detach().clone()
            history.append(value)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return OptimResult(best[None], W.new_tensor([best_loss]), W.new_tensor([first]), history)
