"""LoRACLR optimiser, ours vs the reference written as the authors' ``weight_fusion.py`` computes.

Both get the same random features of one layer: K concepts, ``rows`` rows per concept (paired),
targets ``Y_k = X_k M_k^T``, 50 AdamW iterations at the paper's settings. The reference is
``lib_loraclr.merge.optimise.optimise_reference``: one linear layer over all concepts at once,
pairwise distances from squared norms and one ``(K, N out) x (N out, K)`` product, autograd,
AdamW; vectorised, no Python loop over pairs. Ours is everything the merge does for that layer:
accumulate the statistics from the rows in batches (its smallest exact form), least squares,
build the expansion, iterate. Both results are scored on the raw rows in float64.

    python benchmarks/bench_optimiser.py [--concepts 2 4 12] [--rows 2048 10240 20480]
                                         [--shapes 320x320 1280x320] [--start zero|lsq] [--device cuda]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib_loraclr.merge.expansion import build_expansion  # noqa: E402
from lib_loraclr.merge.gram import LossWeights, raw_loss  # noqa: E402
from lib_loraclr.merge.optimise import OptimConfig, least_squares, optimise, optimise_reference  # noqa: E402
from lib_loraclr.merge.precision import precision_for  # noqa: E402
from lib_loraclr.merge.stats import LayerStats, choose_form  # noqa: E402


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def ours(W, X, Y, M, config, start: str, device: str, batch: int = 4096):
    K, N, d_in = X.shape
    form = choose_form(K, N, d_in, W.shape[0])
    stats = LayerStats(form, K, d_in, W.shape[0], device)
    for chunk in range(0, N, batch):  # streamed, as during feature collection
        stats.update(X[:, chunk : chunk + batch], Y[:, chunk : chunk + batch])
    factors = [[(M[k] - W, None) for k in range(K)]]  # each concept's delta, dense
    precision = precision_for(device)
    W1 = W[None]
    D0 = least_squares(W1, [stats], factors, precision) if start == "lsq" else torch.zeros_like(W1)
    expansion = build_expansion(W1, D0, [stats], factors, precision, config.iterations)
    result = optimise(W1, D0, expansion, config)
    return result.D[0], form, D0[0]


def _warm_up(config, args) -> None:
    """One small run of each side first, so neither pays the libraries' one-time start-up in the table."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(2, 512, 64, generator=g).to(args.device)
    W = torch.randn(64, 64, generator=g).to(args.device)
    M = W + 0.02 * torch.randn(2, 64, 64, generator=g).to(args.device)
    Y = torch.einsum("kni,koi->kno", X, M)
    ours(W, X, Y, M, config, args.start, args.device)
    optimise_reference(W, X, Y, config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concepts", type=int, nargs="+", default=[2, 4, 12])
    parser.add_argument("--rows", type=int, nargs="+", default=[2048, 10240, 20480])
    parser.add_argument(
        "--shapes", nargs="+", default=["320x320"], help="out x in of the layer (SD1.5 shapes)"
    )
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument(
        "--start", choices=["zero", "lsq"], default="zero", help="the reference's W init, or our default"
    )
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    config = OptimConfig(iterations=args.iterations, lr=1e-4, loss=LossWeights(margin=0.5))
    print(
        f"iterations {args.iterations}, start {args.start}, device {args.device}, torch threads {torch.get_num_threads()}"
    )
    _warm_up(config, args)
    print(
        f"{'shape':>9} {'K':>3} {'rows':>6} {'form':>6} {'reference s':>12} {'ours s':>8} {'speed-up':>9} "
        f"{'ref loss':>14} {'our loss':>14}   (losses: both results scored on the raw rows in float64)"
    )
    for shape in args.shapes:
        d_out, d_in = (int(v) for v in shape.split("x"))
        for K in args.concepts:
            for rows in args.rows:
                g = torch.Generator().manual_seed(K * 7 + rows)
                X = (torch.randn(K, rows, d_in, generator=g) / d_in**0.5).to(args.device)
                W = (torch.randn(d_out, d_in, generator=g) / d_in**0.5).to(args.device)
                M = W + torch.randn(K, d_out, d_in, generator=g).to(args.device) * 0.02
                Y = torch.einsum("kni,koi->kno", X, M)
                _sync(args.device)
                start = time.perf_counter()
                D_ours, form, D0 = ours(W, X, Y, M, config, args.start, args.device)
                _sync(args.device)
                our_time = time.perf_counter() - start
                start = time.perf_counter()
                ref = optimise_reference(W, X, Y, config, D0=D0 if args.start == "lsq" else None)
                _sync(args.device)
                ref_time = time.perf_counter() - start
                exact = [
                    float(raw_loss(W.double(), D.double(), X.double(), Y.double(), config.loss))
                    for D in (ref.D[0], D_ours)
                ]
                print(
                    f"{shape:>9} {K:>3} {rows:>6} {form:>6} {ref_time:12.2f} {our_time:8.2f} {ref_time / our_time:8.1f}x "
                    f"{exact[0]:14.8g} {exact[1]:14.8g}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
