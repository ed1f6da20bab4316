"""One layer's merge statistics, kept in the smallest exact form for its shape and row count.

Every form holds enough to build the layer's exact Gram problem (:class:`~lib_loraclr.merge.gram.GramStats`)
at solve time, one layer at a time, so only the compact forms live through the feature run:

- ``raw``: the input rows themselves, ``X`` (K, N, in), when a concept has no more rows than the
  layer has inputs (77-token text features at SD width): ``K N in`` numbers. The targets are
  linear in the input, ``Y_b = X_b M_b^T`` (``M_b = W + w_b dW_b``), so they are not stored.
- ``cross``: the input cross-Grams ``C_ab = X_a^T X_b`` for ``a <= b`` (``C_ba = C_ab^T``);
  ``H_ab = C_ab M_b^T`` and ``||Y_b||^2 = <M_b C_bb, M_b>``: ``K (K + 1) / 2 in^2`` numbers,
  smallest when ``in < ~2 out``.
- ``gram``: ``G_k = X_k^T X_k``, ``H_ab = X_a^T Y_b`` and ``c_b = ||Y_b||^2``: ``K in^2 + K^2 in out``
  numbers, smallest when ``in > ~2 out`` (``ff.net.2``).

Statistics are float32, the precision of the features themselves (the model runs in float32 or
half precision). What needs more is the loss near the fit, a small difference of large terms: the
solver reads the pieces in its precision (:mod:`~lib_loraclr.merge.precision`) and forms every
constant from differences that carry no base weight (:mod:`~lib_loraclr.merge.expansion`).
Storing float64 would double the memory for no gain over the features' precision.
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
        "raw": K * rows * d_in * 4,
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
        elif form == "cross":
            self.pairs = [(a, b) for a in range(K) for b in range(a, K)]
            self.C = torch.zeros(len(self.pairs), d_in, d_in, device=device, dtype=_STATS)
        else:
            self.G = torch.zeros(K, d_in, d_in, device=device, dtype=_STATS)
            self.H = torch.zeros(K, K, d_in, d_out, device=device, dtype=_STATS)
            self.c = torch.zeros(K, device=device, dtype=_STATS)

    @property
    def needs_targets(self) -> bool:
        """Whether :meth:`update` needs the targets ``Y`` (only the ``gram`` form keeps them)."""
        return self.form == "gram"

    def update(self, X: torch.Tensor, Y: torch.Tensor | None = None) -> None:
        """Add rows paired across concepts: ``X`` (K, n, in), targets ``Y`` (K, n, out) (``gram`` only)."""
        self.rows += X.shape[1]
        if self.form == "raw":
            self._X.append(X.to(_STATS))
        elif self.form == "cross":
            start = 0
            for a in range(self.K):  # C[a, a:] += X_a^T X_b, no gathered copies of X
                block = torch.einsum("ni,bnj->bij", X[a], X[a:])
                self.C[start : start + self.K - a] += block.to(_STATS)
                start += self.K - a
        else:
            self.G += torch.einsum("kni,knj->kij", X, X).to(_STATS)
            self.H += torch.einsum("ani,bno->abio", X, Y.to(X.dtype)).to(_STATS)
            self.c += Y.to(_STATS).pow(2).sum(dim=(1, 2))

    # -- the pieces of the exact Gram problem, read in the solver's precision ----------------------
    # ``M`` (K, out, in): the targets' weights ``W + w_k dW_k``; the raw and cross forms need them.
    def inputs(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The raw form's rows ``X`` (K, N, in)."""
        if self.form != "raw":
            raise ValueError(f"the {self.form} form keeps no rows")
        if len(self._X) > 1:  # concatenate once; later reads reuse it
            self._X[:] = [torch.cat(self._X, dim=1)]
        return self._X[0].to(dtype)

    def grams(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """``G_k = X_k^T X_k`` (K, in, in)."""
        if self.form == "raw":
            X = self.inputs(dtype)
            return torch.einsum("kni,knj->kij", X, X)
        if self.form == "cross":
            return torch.stack([self.C[self.pairs.index((k, k))] for k in range(self.K)]).to(dtype)
        return self.G.to(dtype)

    def input_row(self, a: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """``C_ab = X_a^T X_b`` for every ``b`` (K, in, in); raw and cross forms."""
        if self.form == "raw":
            X = self.inputs(dtype)
            return torch.einsum("ni,bnj->bij", X[a], X)
        if self.form != "cross":
            raise ValueError("the gram form keeps no input cross-Grams")
        blocks = [self.C[self.pairs.index((min(a, b), max(a, b)))] for b in range(self.K)]
        return torch.stack([block.T if b < a else block for b, block in enumerate(blocks)]).to(dtype)

    def target_norms(self, M: torch.Tensor | None = None, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """``c_k = ||Y_k||^2`` (K,)."""
        if self.form == "gram":
            return self.c.to(dtype)
        M = self._weights(M, dtype)
        if self.form == "raw":
            return torch.einsum("kni,koi->kno", self.inputs(dtype), M).pow(2).sum(dim=(1, 2))
        return torch.einsum("koi,kij,koj->k", M, self.grams(dtype), M)

    def cross_row(
        self, a: int, M: torch.Tensor | None = None, dtype: torch.dtype = torch.float64
    ) -> torch.Tensor:
        """``H_ab = X_a^T Y_b`` for every ``b`` (K, in, out), so no (K, K, in, out) tensor is held."""
        if self.form == "gram":
            return self.H[a].to(dtype)
        return torch.bmm(self.input_row(a, dtype), self._weights(M, dtype).transpose(1, 2))

    def gram(self, M: torch.Tensor | None = None) -> GramStats:
        """The whole Gram problem as one :class:`GramStats` (L = 1, float64), for tests and small layers."""
        G = self.grams()
        H = torch.stack([self.cross_row(a, M) for a in range(self.K)])
        rows = torch.tensor([float(self.rows)], dtype=_STATS, device=G.device)
        return GramStats(G[None], H[None], self.target_norms(M)[None], rows)

    def _weights(self, M: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        if M is None:
            raise ValueError(f"the {self.form} form needs the targets' weights M = W + w_k dW_k")
        device = self.C.device if self.form == "cross" else self._X[0].device
        return M.to(device=device, dtype=dtype)
