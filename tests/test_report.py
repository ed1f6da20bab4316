"""The layer report against its definition computed directly on raw rows."""

from __future__ import annotations

import pytest
import torch

from lib_loraclr.merge.expansion import expansion_from_gram
from lib_loraclr.merge.gram import GramStats
from lib_loraclr.merge.report import LayerReport


class _Lora:
    def __init__(self, name: str) -> None:
        self.name = name


def test_layer_report_equals_the_definition_on_raw_rows() -> None:
    g = torch.Generator().manual_seed(5)
    K, N, d_in, d_out, r = 3, 50, 6, 4, 2
    X = torch.randn(K, N, d_in, generator=g, dtype=torch.float64)
    W = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    U = torch.randn(K, d_out, r, generator=g, dtype=torch.float64)
    V = torch.randn(K, r, d_in, generator=g, dtype=torch.float64)
    E = U @ V  # each LoRA's weighted delta
    M = W + E
    Y = torch.einsum("kni,koi->kno", X, M)
    stats = GramStats.from_features(X[None], M[None])
    D0 = 0.3 * torch.randn(1, d_out, d_in, generator=g, dtype=torch.float64)
    D = D0 + 0.05 * torch.randn(1, d_out, d_in, generator=g, dtype=torch.float64)
    report = LayerReport(K)
    dense_for_last = [(U[k], V[k]) if k < K - 1 else (E[k], None) for k in range(K)]  # both factor kinds
    report.add(["spatial"], expansion_from_gram(W[None] + D0, stats, torch.float64), D0, D, [dense_for_last])
    out = report.result([_Lora(f"l{k}") for k in range(K)], [f"c{k}" for k in range(K)])
    Wp = W + D[0]
    for k in range(K):
        own = (X[k] @ E[k].T).norm()
        error = (X[k] @ Wp.T - Y[k]).norm() / own
        talk = max(
            float(((X[k] @ D[0].T) * (X[k] @ E[j].T)).sum() / (X[k] @ E[j].T).pow(2).sum())
            for j in range(K)
            if j != k
        )
        assert out["concepts"][k]["error"] == pytest.approx(float(error), rel=1e-9)
        assert out["concepts"][k]["cross_talk"] == pytest.approx(max(talk, 0.0), rel=1e-9, abs=1e-12)
