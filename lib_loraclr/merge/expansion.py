"""The LoRACLR loss of L layers of one shape, expanded around the optimiser's start.

Near a good fit ``d_ij^2 = <W' G_i, W'> - 2 <W'^T, H_ij> + c_j`` is a small difference of large
numbers, so a float32 evaluation would let keep-best pick noise. Written around the start
``W0 = W + D0`` with ``W' = W0 + Δ``,

    d_ij^2 = d0_ij + 2 <Δ^T, R_ij> + <G_i, Δ^T Δ>,    R_ij = G_i W0^T - H_ij = X_i^T Z_ij,

with ``Z_ij = X_i W0^T - Y_j`` the residual rows. ``d0`` (float64) and ``R`` are formed once; the
terms that change are small in ``Δ`` and accurate in float32. Both are formed without the base
weight's large products cancelling, so the float32 precision policy
(:mod:`~lib_loraclr.merge.precision`) loses nothing the statistics had: ``Y_j = X_j M_j^T`` with
``M_j = W + E_j`` (``E_j = w_j dW_j``), so

    Z_ij = X_i D0^T - X_j E_j^T + (X_i - X_j) W^T,      (the last term is 0 for i = j)
    R_ij = G_i (D0 - E_j)^T - Hres_ij,                 Hres_ij = H_ij - G_i M_j^T = X_i^T (X_j - X_i) M_j^T,

and the diagonal (the fit of each concept, what keep-best compares when the margin is inactive)
never touches ``W``. Two forms of the same expansion:

- :class:`Expansion` keeps ``R`` (L, K, K, in, out) and ``G`` (L, K, in, in): an iteration costs two
  ``out x in x in`` products and two ``K^2 in out`` contractions, whatever the rows;
- :class:`RowExpansion` keeps the raw form's rows ``X`` (L, K, N, in) and residuals ``Z``
  (L, K, K, N, out): an iteration costs two ``K N in out`` products. It is used where that is
  cheaper (few rows, many inputs: SD1.5's ``ff.net.2`` has 5120 inputs and, at 128 px, 128 rows).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lib_loraclr.merge.gram import GramStats
from lib_loraclr.merge.precision import Precision
from lib_loraclr.merge.stats import LayerStats

Factors = Sequence[tuple[torch.Tensor, torch.Tensor | None] | None]  # per concept: E = U V, or U dense


@dataclass
class Expansion:
    """The loss of ``W0 + Δ`` from Gram pieces: exact constants plus terms small in ``Δ``."""

    d0: torch.Tensor  # (L, K, K) float64: d_ij^2 at the start (on the precision's small device)
    R: torch.Tensor  # (L, K, K, in, out) float32
    G: torch.Tensor  # (L, K, in, in) float32
    rows: torch.Tensor  # (L,) rows per concept (float64, small device)

    @property
    def dtype(self) -> torch.dtype:
        return self.R.dtype

    def at(self, delta: torch.Tensor) -> _GramPoint:
        return _GramPoint(self, delta)

    def distances(self, delta: torch.Tensor) -> torch.Tensor:
        """``d_ij^2`` (L, K, K) in float64 at ``W0 + delta``."""
        return self.at(delta).distances()

    def effects(self, D: torch.Tensor, factors: Sequence[Factors]) -> tuple[torch.Tensor, torch.Tensor]:
        """``own[l, k, j] = ||X_k E_j^T||^2`` and ``cross[l, k, j] = <X_k D^T, X_k E_j^T>`` (L, K, K) on
        the device, from ``factors[l][j]`` (None: LoRA j leaves layer l alone)."""
        L, K = self.G.shape[:2]
        own = self.G.new_zeros(L, K, K)
        cross = self.G.new_zeros(L, K, K)
        for i in range(L):
            Di = D[i].to(self.G.dtype)
            for j, pair in enumerate(factors[i]):
                if pair is None:
                    continue
                U, V = (t if t is None else t.to(self.G.dtype) for t in pair)
                EtE, DtE = (U.T @ U, Di.T @ U) if V is None else (V.T @ (U.T @ U) @ V, (Di.T @ U) @ V)
                own[i, :, j] = torch.einsum("kab,ab->k", self.G[i], EtE)
                cross[i, :, j] = torch.einsum("kab,ab->k", self.G[i], DtE)
        return own, cross


@dataclass
class _GramPoint:
    e: Expansion
    delta: torch.Tensor

    def distances(self) -> torch.Tensor:
        e, delta = self.e, self.delta
        L, K = e.d0.shape[:2]
        S = torch.bmm(delta.transpose(1, 2), delta)  # Δ^T Δ (L, in, in)
        linear = torch.bmm(e.R.reshape(L, K * K, -1), delta.transpose(1, 2).reshape(L, -1, 1))
        quad = torch.bmm(e.G.reshape(L, K, -1), S.reshape(L, -1, 1))  # <G_i, Δ^T Δ> (L, K, 1)
        return (e.d0 + _widen(2 * linear.reshape(L, K, K) + quad, e.d0)).clamp_min(0.0)

    def gradient(self, a: torch.Tensor) -> torch.Tensor:
        """``sum_ij a_ij d(d_ij^2)/dΔ`` (L, out, in) for coefficients ``a`` (L, K, K)."""
        e, delta = self.e, self.delta
        L, K, _, d_in, d_out = e.R.shape
        a = a.to(e.R.dtype).to(e.R.device)  # narrowed where float64 lives, then moved
        weighted_R = torch.bmm(a.reshape(L, 1, K * K), e.R.reshape(L, K * K, -1)).reshape(L, d_in, d_out)
        weighted_G = torch.bmm(a.sum(dim=-1)[:, None], e.G.reshape(L, K, -1)).reshape(L, d_in, d_in)
        return 2 * weighted_R.transpose(1, 2) + 2 * torch.bmm(delta, weighted_G)


@dataclass
class RowExpansion:
    """The same expansion from the raw form's rows (``R_ij = X_i^T Z_ij``, ``G_i = X_i^T X_i``);
    layers with fewer rows are padded with zero rows, which add nothing to any term."""

    d0: torch.Tensor  # (L, K, K) float64, small device
    X: torch.Tensor  # (L, K, N, in) float32
    Z: torch.Tensor  # (L, K, K, N, out) float32: residual rows at the start
    rows: torch.Tensor  # (L,)

    @property
    def dtype(self) -> torch.dtype:
        return self.Z.dtype

    def at(self, delta: torch.Tensor) -> _RowPoint:
        L, K, N, d_in = self.X.shape
        Q = torch.bmm(self.X.reshape(L, K * N, d_in), delta.transpose(1, 2))  # X_i Δ^T
        return _RowPoint(self, Q.reshape(L, K, N, -1))

    def distances(self, delta: torch.Tensor) -> torch.Tensor:
        return self.at(delta).distances()

    def effects(self, D: torch.Tensor, factors: Sequence[Factors]) -> tuple[torch.Tensor, torch.Tensor]:
        """As :meth:`Expansion.effects`, through the rows."""
        L, K = self.X.shape[:2]
        own = self.X.new_zeros(L, K, K)
        cross = self.X.new_zeros(L, K, K)
        for i in range(L):
            XD = self.X[i] @ D[i].to(self.X.dtype).T  # (K, N, out)
            for j, pair in enumerate(factors[i]):
                if pair is not None:
                    XE = through(self.X[i], pair)
                    own[i, :, j] = XE.pow(2).sum(dim=(1, 2))
                    cross[i, :, j] = (XD * XE).sum(dim=(1, 2))
        return own, cross


@dataclass
class _RowPoint:
    e: RowExpansion
    Q: torch.Tensor  # (L, K, N, out): X_i Δ^T

    def distances(self) -> torch.Tensor:
        linear = torch.einsum("lino,lijno->lij", self.Q, self.e.Z)  # <Δ^T, R_ij> = <X_i Δ^T, Z_ij>
        quad = self.Q.pow(2).sum(dim=(2, 3))[:, :, None]  # <G_i, Δ^T Δ> = ||X_i Δ^T||^2
        return (self.e.d0 + _widen(2 * linear + quad, self.e.d0)).clamp_min(0.0)

    def gradient(self, a: torch.Tensor) -> torch.Tensor:
        """``2 sum_i (sum_j a_ij Z_ij + a_i X_i Δ^T)^T X_i``: both gradient terms in one product."""
        L, K, N, d_in = self.e.X.shape
        a = a.to(self.Q.dtype).to(self.Q.device)
        B = torch.einsum("lij,lijno->lino", a, self.e.Z) + a.sum(dim=-1)[:, :, None, None] * self.Q
        return 2 * torch.bmm(B.reshape(L, K * N, -1).transpose(1, 2), self.e.X.reshape(L, K * N, d_in))


def _widen(small: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``small`` on ``like``'s device, then in its dtype (a device without float64 never holds one)."""
    return small.to(like.device).to(like.dtype)


def rows_cheaper(concepts: int, rows: int, d_in: int, d_out: int, iterations: int) -> bool:
    """Whether the raw form's expansion costs fewer multiply-adds through its rows than through Grams."""
    K, N = concepts, rows
    grams = K * N * d_in * (d_in + K * d_out) + iterations * 2 * d_in * d_out * (d_in + K * K)
    through_rows = (3 + 2 * iterations) * K * N * d_in * d_out
    return through_rows <= grams


def through(X: torch.Tensor, pair: tuple[torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
    """``X E^T`` for ``E = U V`` (``V`` None: ``U`` is ``E``), through the factors."""
    U, V = (t if t is None else t.to(X.dtype) for t in pair)
    return X @ U.T if V is None else (X @ V.T) @ U.T


def dense(pair, shape: torch.Size, like: torch.Tensor) -> torch.Tensor:
    """``E = U V`` (out, in) in ``like``'s dtype and device; zeros where the LoRA is absent."""
    if pair is None:
        return like.new_zeros(shape)
    U, V = (t if t is None else t.to(like) for t in pair)
    return U.reshape(shape) if V is None else U @ V


def gram_times(G: torch.Tensor, pair) -> torch.Tensor | None:
    """``G E^T`` (in, out) through the factors; ``None`` where the LoRA is absent."""
    if pair is None:
        return None
    U, V = (t if t is None else t.to(G) for t in pair)
    return G @ U.T if V is None else (G @ V.T) @ U.T


def build_expansion(
    W: torch.Tensor,
    D0: torch.Tensor,
    layers: Sequence[LayerStats],
    factors: Sequence[Factors],
    precision: Precision,
    iterations: int = 50,
) -> Expansion | RowExpansion:
    """The expansion of L layers of one shape (base ``W`` and start offset ``D0``: (L, out, in)),
    ``factors[l][k]`` LoRA k's weighted delta on layer l; constants in ``precision.exact``."""
    L, d_out, d_in = W.shape
    K = layers[0].K
    N = max(s.rows for s in layers)
    if all(s.form == "raw" for s in layers) and rows_cheaper(K, N, d_in, d_out, iterations):
        return _row_expansion(W, D0, layers, factors, precision, N)
    d0 = torch.empty(L, K, K, dtype=torch.float64, device=precision.small)
    R = torch.empty(L, K, K, d_in, d_out, dtype=torch.float32, device=W.device)
    G32 = torch.empty(L, K, d_in, d_in, dtype=torch.float32, device=W.device)
    for index, stats in enumerate(layers):
        pieces = _gram_pieces if stats.form != "raw" else _raw_gram_pieces
        args = (W[index], D0[index], stats, factors[index], precision)
        for a, (R_a, d0_a, G_a) in enumerate(pieces(*args)):
            R[index, a], d0[index, a], G32[index, a] = R_a, d0_a, G_a
    rows = torch.tensor([float(s.rows) for s in layers], dtype=torch.float64, device=precision.small)
    return Expansion(d0, R, G32, rows)


def _residuals(W, D0, stats: LayerStats, factors: Factors, exact: torch.dtype):
    """Per ``a``, the residual rows ``Z_ab`` for every ``b`` (K, N, out) (see the module docstring)."""
    X = stats.inputs(exact)
    W, D0 = W.to(exact), D0.to(exact)
    P = X @ W.T  # X_b W^T
    A = X @ D0.T  # X_a D0^T
    B = torch.stack(
        [
            through(X[b], pair) if pair is not None else torch.zeros_like(P[b])
            for b, pair in enumerate(factors)
        ]
    )  # X_b E_b^T
    for a in range(stats.K):
        yield (A[a] - B) + (P[a] - P)  # P_a - P_a is exactly 0: the diagonal never sees W


def _raw_gram_pieces(W, D0, stats, factors, precision):
    X = stats.inputs(precision.exact)
    for a, Z in enumerate(_residuals(W, D0, stats, factors, precision.exact)):
        R_a = torch.einsum("ni,bno->bio", X[a], Z)
        yield R_a, precision.small64(Z.pow(2).sum(dim=(1, 2))), X[a].T @ X[a]


def _gram_pieces(W, D0, stats: LayerStats, factors: Factors, precision: Precision):
    """Per concept ``a``: ``R_ab`` (K, in, out), ``d0_ab`` (K,) and ``G_a`` from the cross or gram form.

    ``d0_ab = <F_b G_a, F_b> - 2 <F_b^T, Hres_ab> + s_ab`` with ``F_b = D0 - E_b`` and
    ``s_ab = ||(X_a - X_b) M_b^T||^2 = c_b - <M_b G_a, M_b> - 2 <M_b^T, Hres_ab>`` (0 for ``a = b``).
    """
    exact, K = precision.exact, stats.K
    W, D0 = W.to(exact), D0.to(exact)
    G = stats.grams(exact)
    E = torch.stack([dense(pair, W.shape, W) for pair in factors])

    def times(Gs: torch.Tensor, b: int) -> torch.Tensor:  # G_s E_b^T through the factors
        pair = factors[b]
        return Gs.new_zeros(Gs.shape[-1], W.shape[0]) if pair is None else gram_times(Gs, pair)

    def on_w(A: torch.Tensor) -> torch.Tensor:  # <A_b, W^T> for every b
        return torch.einsum("bio,oi->b", A, W)

    def on_e(A: torch.Tensor) -> torch.Tensor:  # <A_b, E_b^T> for every b
        return torch.einsum("bio,boi->b", A, E)

    def target_norm(b: int) -> torch.Tensor:  # c_b = <G_b M_b^T, M_b^T>, one (in, out) piece at a time
        GM = G[b] @ W.T + times(G[b], b)
        return torch.einsum("io,oi->", GM, W) + torch.einsum("io,oi->", GM, E[b])

    if stats.form == "gram":
        c = stats.target_norms(dtype=exact)
    else:
        c = torch.stack([target_norm(b) for b in range(K)])
    small = precision.small64
    for a in range(K):
        GWa = G[a] @ W.T
        GE = torch.stack([times(G[a], b) for b in range(K)])
        if stats.form == "cross":  # (C_ab - C_aa) M_b^T: exactly 0 for b = a
            Cd = stats.input_row(a, exact) - G[a]
            Hres = Cd @ W.T + torch.stack([times(Cd[b], b) for b in range(K)])
        else:
            Hres = stats.cross_row(a, dtype=exact) - GWa - GE
            Hres[a] = 0.0  # H_aa = G_a M_a^T: the targets are the inputs through M_a
        # s_ab = c_b - <G_a M_b^T, M_b^T> - 2 <Hres_ab, M_b^T>, with G_a M_b^T = G_a W^T + GE_b
        gm = torch.einsum("io,oi->", GWa, W) + on_w(GE) + torch.einsum("io,boi->b", GWa, E) + on_e(GE)
        s = c - gm - 2 * (on_w(Hres) + on_e(Hres))
        s[a] = 0.0  # ||(X_a - X_a) M_a^T||^2
        GF = GE.neg_().add_(G[a] @ D0.T)  # G_a F_b^T, in GE's memory (the plan counts three of these)
        q = torch.einsum("bio,oi->b", GF, D0) - on_e(GF)
        m = torch.einsum("bio,oi->b", Hres, D0) - on_e(Hres)
        yield GF.sub_(Hres), small(q) - 2 * small(m) + small(s), G[a]


def _row_expansion(W, D0, layers, factors, precision: Precision, N: int) -> RowExpansion:
    L, d_out, d_in = W.shape
    K = layers[0].K
    X = torch.zeros(L, K, N, d_in, dtype=torch.float32, device=W.device)
    Z = torch.zeros(L, K, K, N, d_out, dtype=torch.float32, device=W.device)
    d0 = torch.empty(L, K, K, dtype=torch.float64, device=precision.small)
    for index, stats in enumerate(layers):
        n = stats.rows
        X[index, :, :n] = stats.inputs(torch.float32)
        for a, Z_a in enumerate(_residuals(W[index], D0[index], stats, factors[index], precision.exact)):
            Z[index, a, :, :n] = Z_a
            d0[index, a] = precision.small64(Z_a.pow(2).sum(dim=(1, 2)))
    rows = torch.tensor([float(s.rows) for s in layers], dtype=torch.float64, device=precision.small)
    return RowExpansion(d0, X, Z, rows)


def expansion_from_gram(W0: torch.Tensor, stats: GramStats, dtype: torch.dtype = torch.float32) -> Expansion:
    """:class:`Expansion` from batched float64 :class:`GramStats` (tests, benchmarks)."""
    W = W0.double()
    G, H, c = stats.G.double(), stats.H.double(), stats.c.double()
    GW = torch.einsum("lkij,loj->lkio", G, W)
    quad = torch.einsum("lkio,loi->lk", GW, W)
    cross = torch.einsum("loi,labio->lab", W, H)
    d0 = quad[:, :, None] - 2 * cross + c[:, None, :]
    return Expansion(d0, (GW[:, :, None] - H).to(dtype), G.to(dtype), stats.rows.double())
