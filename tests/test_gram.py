"""Gram-statistics loss and gradient equal the raw-feature ones; batched AdamW equals the per-layer loop."""

from __future__ import annotations

import pytest
import torch

from lib_loraclr.merge.expansion import expansion_from_gram
from lib_loraclr.merge.gram import (
    GramStats,
    LossWeights,
    gram_loss,
    margin_activity,
    pair_distances_sq,
    raw_loss,
)
from lib_loraclr.merge.optimise import OptimConfig, least_squares_gram, optimise, optimise_reference


def _problem(L=3, K=4, N=40, d_in=6, d_out=5, seed=0, delta_scale=0.3):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(L, K, N, d_in, generator=g, dtype=torch.float64)
    W = torch.randn(L, d_out, d_in, generator=g, dtype=torch.float64)
    dW = torch.randn(L, K, d_out, d_in, generator=g, dtype=torch.float64) * delta_scale
    M = W[:, None] + dW
    Y = torch.einsum("lkni,lkoi->lkno", X, M)
    return X, W, M, Y


@pytest.mark.parametrize("margin", [0.0, 1e4])  # inactive, always active
def test_gram_loss_and_gradient_equal_raw(margin) -> None:
    X, W, M, Y = _problem()
    stats = GramStats.from_features(X, M)
    weights = LossWeights(margin=margin)
    D = (torch.randn(W.shape, dtype=torch.float64) * 0.1).requires_grad_(True)
    gram = gram_loss(W, D, stats, weights)
    (grad_gram,) = torch.autograd.grad(gram.sum(), D)
    for layer in range(W.shape[0]):
        Dl = D.detach()[layer].clone().requires_grad_(True)
        raw = raw_loss(W[layer], Dl, X[layer], Y[layer], weights)
        (grad_raw,) = torch.autograd.grad(raw, Dl)
        torch.testing.assert_close(gram[layer].detach(), raw.detach(), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(grad_gram[layer], grad_raw, rtol=1e-8, atol=1e-10)
    active = margin_activity(pair_distances_sq(W + D.detach(), stats), margin)
    assert torch.all(active == (1.0 if margin > 0 else 0.0))


@pytest.mark.parametrize("margin", [0.0, 100.0])  # inactive, active for every concept
@pytest.mark.parametrize("start", ["base", "lsq"])
def test_batched_optimiser_equals_the_reference_written_as_the_authors_compute(margin, start) -> None:
    """The expansion with analytic gradients, batched over layers, walks the same AdamW path as
    autograd on raw features (the authors' formulation), iterate for iterate."""
    X, W, M, Y = _problem(L=3, K=3, N=30)
    stats = GramStats.from_features(X, M)
    config = OptimConfig(iterations=15, lr=1e-2, loss=LossWeights(margin=margin))
    D0 = least_squares_gram(W, stats) if start == "lsq" else torch.zeros_like(W)
    batched = optimise(W, D0, expansion_from_gram(W + D0, stats, torch.float64), config)
    refs = [optimise_reference(W[layer], X[layer], Y[layer], config, D0=D0[layer]) for layer in range(3)]
    for layer, ref in enumerate(refs):
        torch.testing.assert_close(batched.D[layer], ref.D[0], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(batched.best_loss[layer], ref.best_loss[0], rtol=1e-10, atol=0)
    for step, total in enumerate(batched.history):  # every evaluated iterate, not only the best
        assert total == pytest.approx(sum(ref.history[step] for ref in refs), rel=1e-10)
    assert len(batched.history) == config.iterations  # the reference scores `iterations` iterates


def test_least_squares_is_the_normal_equation_solution() -> None:
    X, W, M, Y = _problem(L=2, K=3, N=50)
    stats = GramStats.from_features(X, M)
    D = least_squares_gram(W, stats, ridge=0.0)
    for layer in range(2):
        Xs = X[layer].reshape(-1, X.shape[-1])
        Ys = Y[layer].reshape(-1, Y.shape[-1])
        expected = torch.linalg.lstsq(Xs, Ys).solution.T
        torch.testing.assert_close(W[layer] + D[layer], expected, rtol=1e-8, atol=1e-8)


def test_single_concept_least_squares_reproduces_the_lora() -> None:
    X, W, M, Y = _problem(L=1, K=1, N=50)
    D = least_squares_gram(W, GramStats.from_features(X, M), ridge=0.0)
    torch.testing.assert_close(W + D, M[:, 0], rtol=1e-8, atol=1e-8)


def test_per_element_margin_is_the_absolute_one_scaled_by_the_element_count() -> None:
    """``margin_scale="per-element"``: the loss equals the paper's with ``margin * sqrt(N out)``,
    in the Gram form, the raw form and the optimiser; the activity reads the same margin."""
    X, W, M, Y = _problem(L=3, K=3, N=30)
    stats = GramStats.from_features(X, M)
    N, d_out = X.shape[2], W.shape[1]
    d2 = pair_distances_sq(W, stats)
    nearest = (d2 + torch.diag_embed(torch.full((3, 3), float("inf"), dtype=d2.dtype))).min(-1).values.sqrt()
    per_element = float(nearest.median()) / (N * d_out) ** 0.5  # active for about half the concepts
    scaled = LossWeights(margin=per_element, margin_scale="per-element")
    absolute = LossWeights(margin=per_element * (N * d_out) ** 0.5)
    D = torch.randn(W.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 1e-3
    torch.testing.assert_close(gram_loss(W, D, stats, scaled), gram_loss(W, D, stats, absolute))
    torch.testing.assert_close(
        raw_loss(W[0], D[0], X[0], Y[0], scaled), raw_loss(W[0], D[0], X[0], Y[0], absolute)
    )
    active = margin_activity(d2, scaled.margin_for(stats.rows, d_out))
    assert 0 < float(active.mean()) < 1
    torch.testing.assert_close(active, margin_activity(d2, absolute.margin))
    config = OptimConfig(iterations=10, lr=1e-2, loss=scaled)
    batched = optimise(W, torch.zeros_like(W), expansion_from_gram(W, stats, torch.float64), config)
    ref = optimise_reference(W[1], X[1], Y[1], config)
    torch.testing.assert_close(batched.D[1], ref.D[0], rtol=1e-9, atol=1e-12)
