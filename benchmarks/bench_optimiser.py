"""LoRACLR optimiser: Gram-statistics batched AdamW vs the reference per-layer loop on raw features.

Same random features for both, SD1.5 layer shapes, K concepts, rows = steps x positions (spatial
layers: 20 x 1024 by default). Prints time, final loss and peak RSS of each, side by side.

    python benchmarks/bench_optimiser.py [--concepts 2 5 12] [--rows 20480] [--iterations 50] [--device cuda]
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from lib_loraclr.merge.gram import GramStats, LossWeights, raw_loss
from lib_loraclr.merge.optimise import OptimConfig, optimise_gram, optimise_reference


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concepts", type=int, nargs="+", default=[2, 5, 12])
    parser.add_argument("--shapes", nargs="+", default=["320x320", "640x640", "320x768"])
    parser.add_argument("--rows", type=int, default=20 * 1024)
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    config = OptimConfig(iterations=args.iterations, lr=1e-4, loss=LossWeights(margin=0.5))
    print(f"rows per concept {args.rows}, iterations {args.iterations}, device {args.device}")
    print(f"{'shape':>9} {'K':>3} {'reference s':>12} {'gram s':>8} {'speed-up':>9} {'ref loss':>12} {'gram loss':>12} "
          f"{'ref MiB':>8} {'gram MiB':>9}   (losses: both results evaluated on the raw features in float64)")
    for shape in args.shapes:
        d_out, d_in = (int(v) for v in shape.split("x"))
        for K in args.concepts:
            g = torch.Generator().manual_seed(K)
            X = torch.randn(K, args.rows, d_in, generator=g).to(args.device) / d_in**0.5
            W = (torch.randn(d_out, d_in, generator=g) / d_in**0.5).to(args.device)
            M = W + torch.randn(K, d_out, d_in, generator=g).to(args.device) * 0.02
            Y = torch.einsum("kni,koi->kno", X, M)
            raw_bytes = (X.numel() + Y.numel()) * 4 / 2**20
            start = time.perf_counter()
            ref = optimise_reference(W, X, Y, config)
            ref_time = time.perf_counter() - start
            start = time.perf_counter()
            stats = GramStats.zeros(1, K, d_in, d_out, device=args.device)
            for chunk in range(0, args.rows, 4096):  # streamed, as during feature collection
                stats.update_xy(0, X[:, chunk:chunk + 4096], Y[:, chunk:chunk + 4096])
            ours = optimise_gram(W[None], stats, config)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            gram_time = time.perf_counter() - start
            exact = [float(raw_loss(W.double(), D.double(), X.double(), Y.double(), config.loss)) for D in (ref.D[0], ours.D[0])]
            print(f"{shape:>9} {K:>3} {ref_time:12.2f} {gram_time:8.2f} {ref_time / gram_time:8.1f}x "
                  f"{exact[0]:12.8g} {exact[1]:12.8g} {raw_bytes:8.0f} {stats.nbytes() / 2**20:9.1f}")
    print(f"process peak RSS {peak_rss_mib():.0f} MiB (reference keeps raw X and Y; gram keeps only the statistics)")


if __name__ == "__main__":
    main()
