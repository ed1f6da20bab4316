"""Optimisers for the LoRACLR objective: AdamW on an expansion of the loss around its start,
the closed-form least-squares fusion, and the reference optimiser written as the authors' code
computes (raw features, autograd) for tests and benchmarks.

Why an expansion: near a good fit ``d_ij^2 = <W' G_i, W'> - 2 <W'^T, H_ij> + c_j`` is a small
difference of large numbers, so float32 evaluation picks noise when it keeps the best iterate.
Written around the start ``W0 = W + D0`` with ``W' = W0 + Δ``,

    d_ij^2 = d0_ij + 2 <Δ^T, R_ij> + <G_i, Δ^T Δ>,    R_ij = G_i W0^T - H_ij = X_i^T (X_i W0^T - Y_j),

``d0`` and ``R`` are formed once in float64 from the float64 statistics; the terms that change
are small in ``Δ`` and accurate in float32. The gradient is analytic: with
``a_ij = dL/d(d_ij^2)``, ``dL/dΔ = 2 sum_ij a_ij R_ij^T + 2 Δ sum_i a_i G_i + lambda_delta D/||D||``,
so one iteration costs two ``out x in x in`` products and two ``K^2 in out`` contractions,
whatever the number of rows. AdamW is elementwise, so L layers of one shape form one batched
problem; the parameter AdamW decays is the offset from the base, as in the reference.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lib_loraclr.merge.gram import _EPS, GramStats, LossWeights, loss_from_distances
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


@dataclass
class Expansion:
    """The loss of ``W0 + Δ`` for L layers of one shape: exact constants plus terms small in ``Δ``."""

    d0: torch.Tensor  # (L, K, K) float64: d_ij^2 at the start
    R: torch.Tensor  # (L, K, K, in, out) float32
    G: torch.Tensor  # (L, K, in, in) float32
    rows: torch.Tensor  # (L,) rows per concept

    def distances(self, delta: torch.Tensor) -> torch.Tensor:
        """``d_ij^2`` (L, K, K) in float64 at ``W0 + delta``."""
        L, K = self.d0.shape[:2]
        S = torch.bmm(delta.transpose(1, 2), delta)  # Δ^T Δ (L, in, in)
        linear = torch.bmm(self.R.reshape(L, K * K, -1), delta.transpose(1, 2).reshape(L, -1, 1)).reshape(
            L, K, K
        )
        quad = torch.bmm(self.G.reshape(L, K, -1), S.reshape(L, -1, 1))  # <G_i, Δ^T Δ> (L, K, 1)
        return (self.d0 + (2 * linear + quad).double()).clamp_min(0.0)

    def gradient(self, delta: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """``sum_ij a_ij d(d_ij^2)/dΔ`` (L, out, in) for coefficients ``a`` (L, K, K)."""
        L, K, _, d_in, d_out = self.R.shape
        a = a.to(self.R.dtype)
        weighted_R = torch.bmm(a.reshape(L, 1, K * K), self.R.reshape(L, K * K, -1)).reshape(L, d_in, d_out)
        weighted_G = torch.bmm(a.sum(dim=-1)[:, None], self.G.reshape(L, K, -1)).reshape(L, d_in, d_in)
        return 2 * weighted_R.transpose(1, 2) + 2 * torch.bmm(delta, weighted_G)


def build_expansion(
    W0: torch.Tensor,
    layers: Sequence[LayerStats],
    targets: Sequence[torch.Tensor | None],
    dtype: torch.dtype = torch.float32,
) -> Expansion:
    """Form ``d0``, ``R`` and ``G`` for layers of one shape at start weights ``W0`` (L, out, in),
    one concept pair at a time (no float64 (K, K, in, out) tensor is held)."""
    L, d_out, d_in = W0.shape
    K = layers[0].K
    device = W0.device
    d0 = torch.empty(L, K, K, dtype=torch.float64, device=device)
    R = torch.empty(L, K, K, d_in, d_out, dtype=dtype, device=device)
    G32 = torch.empty(L, K, d_in, d_in, dtype=dtype, device=device)
    for index, (stats, M) in enumerate(zip(layers, targets, strict=True)):
        W = W0[index].to(torch.float64)
        G = stats.grams().to(device)
        c = stats.target_norms(M).to(device)
        GW = torch.einsum("kij,oj->kio", G, W)  # G_a W0^T (K, in, out)
        quad = torch.einsum("kio,oi->k", GW, W)
        for a in range(K):
            H = stats.cross_row(a, M).to(device)  # (K, in, out): H_ab for every b
            R[index, a] = GW[a] - H
            d0[index, a] = quad[a] - 2 * torch.einsum("bio,oi->b", H, W) + c
        G32[index] = G
    rows = torch.tensor([float(s.rows) for s in layers], dtype=torch.float64, device=device)
    return Expansion(d0, R, G32, rows)


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
        slope = -(w.lambda_con / K) * torch.relu(w.margin - distance) / distance
        slope = torch.where(nearest > _EPS, slope, torch.zeros_like(slope))  # the clamp has no gradient
        a.scatter_add_(-1, index[..., None], slope[..., None])
    return a


def optimise(
    W: torch.Tensor,
    D0: torch.Tensor,
    expansion: Expansion,
    config: OptimConfig,
    should_stop: Callable[[], None] | None = None,
) -> OptimResult:
    """AdamW on the offset ``D`` (L, out, in) from ``D0``, evaluating ``config.iterations`` iterates
    (the start included) and keeping the best one per layer, as the reference does."""
    w = config.loss
    d_out = W.shape[1]
    D = D0.detach().to(expansion.R.dtype).clone()
    start = D.clone()
    opt = torch.optim.AdamW([D], lr=config.lr, weight_decay=config.weight_decay)
    best, best_loss, first_loss, history = D.clone(), None, None, []
    for step in range(max(config.iterations, 1)):
        if should_stop is not None:
            should_stop()
        delta = D - start
        d2 = expansion.distances(delta)
        losses = loss_from_distances(d2, D.double(), expansion.rows, d_out, w)
        if best_loss is None:
            first_loss, best_loss = losses.clone(), losses.clone()
        better = losses < best_loss
        best_loss = torch.where(better, losses, best_loss)
        best = torch.where(better[:, None, None], D, best)
        history.append(float(losses.sum()))
        if step == config.iterations - 1:
            break  # the reference evaluates, then steps: its last step is never scored
        a = loss_coefficients(d2, expansion.rows, d_out, w)
        grad = expansion.gradient(delta, a)
        if w.lambda_delta:
            norm = D.flatten(1).norm(dim=1).clamp_min(1e-30)[:, None, None]
            grad = grad + w.lambda_delta * D / norm
        D.grad = grad
        opt.step()
    return OptimResult(best, best_loss, first_loss, history)


def least_squares(
    W: torch.Tensor, layers: Sequence[LayerStats], targets: Sequence[torch.Tensor | None], ridge: float = 1e-4
) -> torch.Tensor:
    """Closed form of ``min sum_k ||X_k W'^T - Y_k||^2 + lam ||W' - W||^2`` (Mix-of-Show's
    gradient fusion objective); returns the offset ``D = W' - W`` (L, out, in) in float32.

    ``lam`` is ``ridge`` times the mean diagonal of ``sum_k G_k``, so it is scale-free; it keeps
    directions no concept excites at the base weight.
    """
    G = torch.stack([s.grams().sum(dim=0) for s in layers]).to(W.device)
    H = torch.stack(
        [sum(s.cross(k, k, M) for k in range(s.K)) for s, M in zip(layers, targets, strict=True)]
    ).to(W.device)
    return _solve_ridge(W, G, H, ridge)


def least_squares_gram(W: torch.Tensor, stats: GramStats, ridge: float = 1e-4) -> torch.Tensor:
    """:func:`least_squares` from batched :class:`GramStats` (tests, benchmarks)."""
    return _solve_ridge(
        W, stats.G.sum(dim=1).double(), torch.diagonal(stats.H, dim1=1, dim2=2).sum(dim=-1).double(), ridge
    )


def _solve_ridge(W: torch.Tensor, G: torch.Tensor, H: torch.Tensor, ridge: float) -> torch.Tensor:
    # float64: the summed Gram of correlated features (padding tokens, shared pixels) is badly
    # conditioned; Cholesky fits the symmetric positive definite system and needs no pivoting
    G, H = G.double(), H.double()
    scale = torch.diagonal(G, dim1=-2, dim2=-1).mean(dim=-1).clamp_min(1e-12)
    lam = (ridge * scale)[:, None, None]
    eye = torch.eye(G.shape[-1], device=G.device, dtype=G.dtype)
    Wt = W.to(G.dtype).transpose(1, 2)
    A, rhs = G + lam * eye, H + lam * Wt
    factor, info = torch.linalg.cholesky_ex(A)
    solution = torch.cholesky_solve(rhs, factor)  # (L, in, out) = W'^T
    bad = info != 0
    if bad.any():  # numerically singular (a tiny ridge on rank-deficient features): SVD-based solve
        solution[bad] = torch.linalg.pinv(A[bad], hermitian=True) @ rhs[bad]
    return (solution.transpose(1, 2) - W.to(G.dtype)).to(W.dtype)


def expansion_from_gram(W0: torch.Tensor, stats: GramStats, dtype: torch.dtype = torch.float32) -> Expansion:
    """:class:`Expansion` from batched :class:`GramStats` (tests, benchmarks)."""
    W = W0.double()
    G, H, c = stats.G.double(), stats.H.double(), stats.c.double()
    GW = torch.einsum("lkij,loj->lkio", G, W)
    quad = torch.einsum("lkio,loi->lk", GW, W)
    cross = torch.einsum("loi,labio->lab", W, H)
    d0 = quad[:, :, None] - 2 * cross + c[:, None, :]
    return Expansion(d0, (GW[:, :, None] - H).to(dtype), G.to(dtype), stats.rows.double())


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
            con = (positive.pow(2) + torch.clamp(w.margin - negative, min=0.0).pow(2)).mean()
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
