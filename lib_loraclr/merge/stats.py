"""One layer's merge statistics, kept in the smallest exact form for its shape and row count.

Every form holds enough to build the layer's exact Gram problem (:class:`~lib_loraclr.merge.gram.GramStats`)
at solve time, one layer at a time, so only the compact forms live through the feature run:

- ``raw``: the rows themselves, ``X`` (K, N, in) and ``Y`` (K, N, out), when a concept has no more
  rows than the layer has inputs (77-token text features at SD width): ``K N (in + out)`` numbers.
- ``cross``: the input cross-Grams ``C_ab = X_a^T X_b`` for ``a <= b`` (``C_ba = C_ab^T``); the
  targets are linear in the input, ``Y_b = X_b M_b^T``, so ``H_ab = C_ab M_b^T`` and
  ``||Y_b||^2 = <M_b C_bb, M_b>``: ``K (K + 1) / 2 in^2`` numbers, smallest when ``in < ~2 out``.
- ``gram``: ``G_k = X_k^T X_k``, ``H_ab = X_a^T Y_b`` and ``c_b = ||Y_b||^2``: ``K in^2 + K^2 in out``
  numbers, smallest when ``in > ~2 out`` (``ff.net.2``).

Statistics are float32, the precision of the features themselves (the model runs in float32 or
half precision). What needs more is the loss near the fit, a small difference of large terms: the
solver reads every piece in float64 and expands the loss around its start (see
:mod:`~lib_loraclr.merge.optimise`), so keep-best compares true losses. Storing float64 would
double the memory for no gain over the features' precision.
"""

from __future__ import annotations

import torch

from lib_loraclr.merge.gram import GramStats

FORMS = ("raw", "cross", "gram")
_STATS = torch.float32


def form_sizes(concepts: int, rows: int, d_in: int, d_out: int) -> dict[str, int]:
    """Bytes each form holds for one layer (float32)."""
    K = concepts
    return {
        "raw": K * rows * (d_in + d_out) * 4,
        "cross": K * (K + 1) // 2 * d_in * d_in * 4,
        "gram": (K * d_in * d_in + K * K * d_in * d_out + K) * 4,
    }


def choose_form(concepts: int, rows: int, d_in: int, d_out: int) -> str:
    """Raw rows when a concept has no more rows than inputs; otherwise the smaller Gram form."""
    if rows <= d_in:
        return "raw"
    sizes = form_sizes(concepts, rows, d_in, d_out)
    return "cross" if sizes["cross"] <= sizes["gram"] else "gram"


class LayerStats:
    """Statistics of one layer for ``K`` concepts, accumulated batch by batch."""

    def __init__(self, form: str, concepts: int, d_in: int, d_out: int, device: torch.device | str) -> None:
        if form not in FORMS:
            raise ValueError(f"unknown statistics form {form!r}")
        self.form, self.K, self.d_in, self.d_out = form, concepts, d_in, d_out
        self.rows = 0
        K = concepts
        if form == "raw":
            self._X: list[torch.Tensor] = []
            self._Y: list[torch.Tensor] = []
        elif form == "cross":
            self.pairs = [(a, b) for a in range(K) for b in range(a, K)]
            self.C = torch.zeros(len(self.pairs), d_in, d_in, device=device, dtype=_STATS)
        else:
            self.G = torch.zeros(K, d_in, d_in, device=device, dtype=_STATS)
            self.H = torch.zeros(K, K, d_in, d_out, device=device, dtype=_STATS)
            self.c = torch.zeros(K, device=device, dtype=_STATS)

    def update(self, X: torch.Tensor, Y: torch.Tensor | None = None) -> None:
        """Add rows paired across concepts: ``X`` (K, n, in), targets ``Y`` (K, n, out) (``cross``: unused)."""
        self.rows += X.shape[1]
        if self.form == "raw":
            self._X.append(X.float())
            self._Y.append(Y.float())
        elif self.form == "cross":
            start = 0
            for a in range(self.K):  # C[a, a:] += X_a^T X_b, no gathered copies of X
                block = torch.einsum("ni,bnj->bij", X[a], X[a:])
                self.C[start : start + self.K - a] += block.to(_STATS)
                start += self.K - a
        else:
            self.G += torch.einsum("kni,knj->kij", X, X).to(_STATS)
            self.H += torch.einsum("ani,bno->abio", X, Y.to(X.dtype)).to(_STATS)
            self.c += Y.double().pow(2).sum(dim=(1, 2)).to(_STATS)

    # -- the exact Gram problem, read one piece at a time (float64) --------------------------------
    # ``M`` (K, out, in): the targets' weights ``W + w_k dW_k``; only the ``cross`` form needs them.
    def grams(self) -> torch.Tensor:
        """``G_k = X_k^T X_k`` (K, in, in)."""
        if self.form == "raw":
            X = self._rows(self._X).double()
            return torch.einsum("kni,knj->kij", X, X)
        if self.form == "cross":
            return torch.stack([self.C[self.pairs.index((k, k))] for k in range(self.K)]).double()
        return self.G.double()

    def target_norms(self, M: torch.Tensor | None = None) -> torch.Tensor:
        """``c_k = ||Y_k||^2`` (K,)."""
        if self.form == "raw":
            return self._rows(self._Y).double().pow(2).sum(dim=(1, 2))
        if self.form == "cross":
            M = self._weights(M)
            return torch.einsum("koi,kij,koj->k", M, self.grams(), M)
        return self.c.double()

    def cross(self, a: int, b: int, M: torch.Tensor | None = None) -> torch.Tensor:
        """``H_ab = X_a^T Y_b`` (in, out), built on demand so no (K, K, in, out) tensor is held."""
        if self.form == "raw":
            return self._rows(self._X)[a].double().T @ self._rows(self._Y)[b].double()
        if self.form == "cross":
            M = self._weights(M)
            C = self.C[self.pairs.index((min(a, b), max(a, b)))].double()
            return (C if a <= b else C.T) @ M[b].T
        return self.H[a, b].double()

    def cross_row(self, a: int, M: torch.Tensor | None = None) -> torch.Tensor:
        """``H_ab`` for every ``b`` (K, in, out), in one batched product."""
        if self.form == "raw":
            return torch.einsum("ni,bno->bio", self._rows(self._X)[a].double(), self._rows(self._Y).double())
        if self.form == "cross":
            M = self._weights(M)
            blocks = [self.C[self.pairs.index((min(a, b), max(a, b)))] for b in range(self.K)]
            C = torch.stack(
                [block.T if b < a else block for b, block in enumerate(blocks)]
            ).double()  # C_ab = C_ba^T
            return torch.bmm(C, M.transpose(1, 2))
        return self.H[a].double()

    def gram(self, M: torch.Tensor | None = None) -> GramStats:
        """The whole Gram problem as one :class:`GramStats` (L = 1), for tests and small layers."""
        K = self.K
        G = self.grams()
        H = torch.stack([torch.stack([self.cross(a, b, M) for b in range(K)]) for a in range(K)])
        rows = torch.tensor([float(self.rows)], dtype=_STATS, device=G.device)
        return GramStats(G[None], H[None], self.target_norms(M)[None], rows)

    def _rows(self, chunks: list[torch.Tensor]) -> torch.Tensor:
        if len(chunks) > 1:  # concatenate once; later reads reuse it
            chunks[:] = [torch.cat(chunks, dim=1)]
        return chunks[0]

    def _weights(self, M: torch.Tensor | None) -> torch.Tensor:
        if M is None:
            raise ValueError("the cross form needs the targets' weights M = W + w_k dW_k")
        return M.to(device=self.C.device, dtype=torch.float64)
