"""LoRACLR's per-layer objective, evaluated exactly from streamed Gram statistics.

For concept ``i`` with recorded layer inputs ``X_i`` (N x in, rows paired across concepts) and
targets ``Y_j = X_j M_j^T`` (``M_j = W + w_j dW_j``), the merged weight ``W' = W + D`` gives
``P_i = X_i W'^T`` and

    d_ij^2 = ||P_i - Y_j||^2 = <W' G_i, W'> - 2 <W'^T, H_ij> + c_j,
    G_i = X_i^T X_i,   H_ij = X_i^T Y_j,   c_j = ||Y_j||^2.

So ``G`` (K x in x in), ``H`` (K x K x in x out) and ``c`` (K) are sufficient: the loss and its
gradient cost O(K^2 in out) per iteration whatever the number of recorded rows, and the
statistics are accumulated while the model runs instead of storing features. Everything is
batched over a leading layer axis ``L`` (layers of equal shape are optimised as one problem).

Loss (ALGORITHMS.md 1.2, reference defaults in :class:`LossWeights`):
``L_con = mean_i [d_ii^2 + relu(m - min_{j!=i} d_ij)^2]``, ``m`` the margin (see
:meth:`LossWeights.margin_for`: the paper's absolute one, or per element),
``L_mse = mean over elements of (P_i - Y_i)^2 = sum_i d_ii^2 / (K N out)``,
``L_reg = ||D||_F``; total ``l_con L_con + l_mse L_mse + l_reg L_reg``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_EPS = 1e-12


MARGIN_SCALES = ("absolute", "per-element")


@dataclass(frozen=True)
class LossWeights:
    margin: float = 0.5
    lambda_con: float = 1.0
    lambda_mse: float = 0.1
    lambda_delta: float = 0.001
    margin_scale: str = "absolute"

    def margin_for(self, rows: torch.Tensor | float, d_out: int) -> torch.Tensor | float:
        """The margin ``m`` that ``min_j d_ij`` is held above, per layer.

        "absolute" is the paper's: ``m = margin`` against ``d_ij``, a Frobenius norm over every
        recorded row and output, which is in the tens to hundreds in SD's layers, so a margin of
        0.5 never engages. "per-element": ``m = margin * sqrt(rows * d_out)``, i.e. the margin
        is on the RMS per element of ``P_i - Y_j``, the same at any layer width or feature count."""
        if self.margin_scale == "absolute":
            return self.margin
        return self.margin * (rows * d_out) ** 0.5


@dataclass
class GramStats:
    """Sufficient statistics of ``L`` layers of equal shape for ``K`` concepts."""

    G: torch.Tensor  # (L, K, in, in)
    H: torch.Tensor  # (L, K, K, in, out)
    c: torch.Tensor  # (L, K)
    rows: torch.Tensor  # (L,) rows per concept recorded so far

    @classmethod
    def zeros(
        cls, layers: int, concepts: int, d_in: int, d_out: int, device=None, dtype=torch.float32
    ) -> GramStats:
        return cls(
            G=torch.zeros(layers, concepts, d_in, d_in, device=device, dtype=dtype),
            H=torch.zeros(layers, concepts, concepts, d_in, d_out, device=device, dtype=dtype),
            c=torch.zeros(layers, concepts, device=device, dtype=dtype),
            rows=torch.zeros(layers, device=device, dtype=dtype),
        )

    @property
    def concepts(self) -> int:
        return self.G.shape[1]

    def update(self, layer: int, X: torch.Tensor, M: torch.Tensor) -> None:
        """Add rows: ``X`` (K, n, in) paired across concepts, ``M`` (K, out, in) the targets' weights."""
        X = X.to(self.G.dtype)
        self.update_xy(layer, X, torch.einsum("kni,koi->kno", X, M.to(self.G.dtype)))

    def update_xy(self, layer: int, X: torch.Tensor, Y: torch.Tensor) -> None:
        """Add rows given inputs ``X`` (K, n, in) and targets ``Y`` (K, n, out) (bias removed)."""
        X, Y = X.to(self.G.dtype), Y.to(self.G.dtype)
        self.G[layer] += torch.einsum("kni,knj->kij", X, X)
        self.H[layer] += torch.einsum("ani,bno->abio", X, Y)
        self.c[layer] += Y.pow(2).sum(dim=(1, 2))
        self.rows[layer] += X.shape[1]

    @classmethod
    def from_features(cls, X: torch.Tensor, M: torch.Tensor) -> GramStats:
        """Statistics of raw features ``X`` (L, K, N, in) with weights ``M`` (L, K, out, in)."""
        L, K, _, d_in = X.shape
        stats = cls.zeros(L, K, d_in, M.shape[2], device=X.device, dtype=X.dtype)
        for layer in range(L):
            stats.update(layer, X[layer], M[layer])
        return stats


def pair_distances_sq(Wp: torch.Tensor, stats: GramStats) -> torch.Tensor:
    """``d_ij^2`` for every layer: (L, K, K) from ``W'`` (L, out, in)."""
    WG = torch.einsum("loi,lkij->lkoj", Wp, stats.G)
    quad = torch.einsum("lkoj,loj->lk", WG, Wp)  # <W' G_i, W'>
    cross = torch.einsum("loi,lkjio->lkj", Wp, stats.H)  # <W'^T, H_ij>
    return (quad[:, :, None] - 2 * cross + stats.c[:, None, :]).clamp_min(0.0)


def loss_from_distances(
    d2: torch.Tensor, D: torch.Tensor, rows: torch.Tensor, d_out: int, w: LossWeights
) -> torch.Tensor:
    """Per-layer total loss (L,) from ``d_ij^2`` (L, K, K) and the offset ``D`` (L, out, in)."""
    K = d2.shape[-1]
    diag = torch.diagonal(d2, dim1=-2, dim2=-1)  # (L, K)
    if K > 1:
        off = d2 + torch.diag_embed(torch.full_like(diag, float("inf")))
        nearest = torch.sqrt(off.min(dim=-1).values.clamp_min(_EPS))
        margin = broadcast_margin(w.margin_for(rows.clamp_min(1), d_out), nearest)
        margin_term = torch.relu(margin - nearest).pow(2)
    else:
        margin_term = torch.zeros_like(diag)
    con = (diag + margin_term).mean(dim=-1)
    mse = diag.sum(dim=-1) / (K * rows.clamp_min(1) * d_out)
    reg = D.flatten(1).norm(dim=1).to(d2.device).to(d2.dtype)  # D's precision; moved, then widened
    return w.lambda_con * con + w.lambda_mse * mse + w.lambda_delta * reg


def gram_loss(W: torch.Tensor, D: torch.Tensor, stats: GramStats, w: LossWeights) -> torch.Tensor:
    """Per-layer loss (L,) of ``W' = W + D`` from Gram statistics."""
    return loss_from_distances(pair_distances_sq(W + D, stats), D, stats.rows, W.shape[1], w)


def raw_loss(
    W: torch.Tensor, D: torch.Tensor, X: torch.Tensor, Y: torch.Tensor, w: LossWeights
) -> torch.Tensor:
    """The same loss on raw features (one layer): ``X`` (K, N, in), ``Y`` (K, N, out); the reference form."""
    P = torch.einsum("kni,oi->kno", X, W + D)
    K = X.shape[0]
    margin = w.margin_for(X.shape[1], Y.shape[2])
    d = torch.stack([torch.stack([(P[i] - Y[j]).norm() for j in range(K)]) for i in range(K)])
    diag = torch.diagonal(d)
    con_terms = []
    for i in range(K):
        others = [d[i, j] for j in range(K) if j != i]
        margin_term = torch.relu(margin - torch.stack(others).min()).pow(2) if others else d.new_zeros(())
        con_terms.append(diag[i].pow(2) + margin_term)
    con = torch.stack(con_terms).mean()
    mse = (P - Y).pow(2).mean()
    return w.lambda_con * con + w.lambda_mse * mse + w.lambda_delta * D.norm()


def margin_activity(d2: torch.Tensor, margin: torch.Tensor | float) -> torch.Tensor:
    """Fraction of concepts whose margin term is active, per layer (L,), from ``d_ij^2`` (L, K, K)
    and the margin (a number, or one per layer: :meth:`LossWeights.margin_for`)."""
    K = d2.shape[-1]
    if K < 2:
        return torch.zeros(d2.shape[0], device=d2.device)
    off = d2 + torch.diag_embed(torch.full_like(torch.diagonal(d2, dim1=-2, dim2=-1), float("inf")))
    nearest = off.min(dim=-1).values.sqrt()
    return (nearest < broadcast_margin(margin, nearest)).float().mean(dim=-1)


def broadcast_margin(margin: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor | float:
    """A per-layer margin (L,) shaped to broadcast against ``like`` (L, K); a number as it is."""
    if not torch.is_tensor(margin):
        return margin
    return margin.to(like.device, like.dtype).reshape(-1, *([1] * (like.dim() - 1)))
