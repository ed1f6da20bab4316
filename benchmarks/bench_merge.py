"""A whole merge: K LoRAs into a random SD1.5-size model, time per stage and peak memory, the
memory plan's estimate beside what was measured.

Each K runs in its own process. Stages are timed from the merge's progress events: features (text
encoder, sampling run, cross-attention K/V), solve (every method's layers), report (layer and model
level), write (the checkpoint, atomically). The merge's peak is what the process holds above its
size just before ``merge_loras`` (model and LoRAs already loaded): RSS sampled every 20 ms on the
CPU, ``torch.cuda.max_memory_allocated`` less the allocation before on a GPU. The estimate beside it
is the memory plan's peak for the same merge (which likewise excludes the resident model).

    python benchmarks/bench_merge.py                 # tiny model, K = 2 4, a smoke run
    python benchmarks/bench_merge.py --full          # SD1.5 widths, K = 2 4 8 12
    python benchmarks/bench_merge.py --full --device cuda --steps 20 --resolution 512 --iterations 50
    python benchmarks/bench_merge.py --full --concepts 12 --against 1257445   # side by side with that commit

On the CPU, ``--full`` defaults to reduced work (2 sampling steps at 128 px, 5 iterations) so
K = 12 finishes on two cores; the statistics forms and the plan are those of that setting.
``--against REV`` runs the same merge with the code of git revision ``REV`` right after each K
(same machine, same files) and prints both rows, the speed-up, and how far the merged weights are
apart: the largest relative difference ``||W'_new - W'_old|| / ||W'_old||`` over the layers.
``--precision`` picks the solve's precision policy (``auto``, ``float64``, ``float32``);
``--refuse-float64`` makes any float64 tensor other than the solve's small ``(L, K, K)`` pieces an
error (a check that the device path has none; the guard slows every operation, so not a timing).

On a GPU (item 5 of issue 18; not yet measured), at the paper's settings (20 steps at 512 px,
50 iterations: the defaults with ``--device cuda``)::

    python benchmarks/bench_merge.py --full --device cuda --concepts 2 4 12 --max-memory 24GiB
    python benchmarks/bench_merge.py --full --device cuda --concepts 2 4 12 --max-memory 24GiB --precision float32
    python benchmarks/bench_merge.py --full --device cuda --concepts 2 --steps 2 --iterations 5 \
        --precision float32 --refuse-float64
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

_CODE = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--code=")), None)
sys.path.insert(0, _CODE or str(Path(__file__).resolve().parents[1]))  # --code: another revision's tree


class _RssSampler:
    """The process's resident size above its size on entry, sampled every 20 ms (the peak)."""

    def __enter__(self) -> _RssSampler:
        self.start, self.peak, self._stop = _rss(), 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _rss() - self.start)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss() - self.start)


def _rss() -> int:
    with open("/proc/self/statm", encoding="ascii") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _one(args: argparse.Namespace) -> dict:
    import torch

    from lib_loraclr.lora.file import load_lora
    from lib_loraclr.merge.engine import MergeConfig, merge_loras, plan_for
    from lib_loraclr.merge.sizes import default_budget, parse_size
    from lib_loraclr.merge.writer import merge_metadata, write_merged_checkpoint
    from lib_loraclr.sd.checkpoint import save_checkpoint
    from lib_loraclr.sd.configs import build_modules, sd15_config, sd_alphas_cumprod
    from lib_loraclr.sd.model import SDModel
    from lib_loraclr.sd.tokenizer import load_clip_tokenizer
    from lib_loraclr.testing import synthetic_loras as sl
    from lib_loraclr.testing.tiny import build_tiny_model

    torch.manual_seed(0)
    device, K = args.device, args.one
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    if args.full:
        cfg = {p: sd15_config(p) for p in ("unet", "text_encoder", "vae", "scheduler")}
        unet, te, _vae = build_modules(cfg["unet"], cfg["text_encoder"], None, device="cpu")
        model = SDModel(
            unet.to(device, dtype),
            te.to(device, dtype),
            load_clip_tokenizer(),
            None,
            sd_alphas_cumprod().to(device),
            configs=cfg,
        )
    else:
        model = build_tiny_model(seed=0)
    work = Path(args.work)
    base = work / "base.safetensors"
    if not base.exists():
        save_checkpoint(model, base, dtype=torch.float16)
    targets = sl.standard_targets(sl.layer_shapes(model.layer_map()))
    loras = []
    for k in range(K):
        path = work / f"lora{k}.safetensors"
        if not path.exists():
            sl.write_kohya_lora(
                path, targets, rank=args.rank, alpha=float(args.rank), seed=100 + k, scale=0.05
            )
        loras.append(load_lora(path))
    precision = {} if args.precision == "auto" else {"precision": args.precision}  # older code: no option
    config = MergeConfig(
        concepts=tuple(f"concept{k}" for k in range(K)),
        steps=args.steps,
        resolution=args.resolution,
        iterations=args.iterations,
        device=device,
        model_level=False,
        **precision,
    )
    budget = parse_size(args.max_memory) if args.max_memory else default_budget(device)
    plan = plan_for(model, loras, config, budget)
    before = 0
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    sampler = _RssSampler()
    stages = {"features": 0.0, "solve": 0.0, "report": 0.0}
    clock = [time.perf_counter()]

    def progress(done: int, total: int, label: str) -> None:
        now = time.perf_counter()
        stage = "report" if "report" in label else "solve" if "solved" in label else "features"
        stages[stage] += now - clock[0]
        clock[0] = now

    start = time.perf_counter()
    import contextlib

    guard = contextlib.nullcontext()
    if (
        args.refuse_float64
    ):  # every float64 tensor but the small (L, K, K) pieces raises (slower: not a timing)
        from lib_loraclr.testing.float64_guard import float64_refused

        guard = float64_refused(K)
    with sampler, guard:
        results = merge_loras(model, loras, config, progress=progress, budget=budget)
    merge_time = time.perf_counter() - start
    start = time.perf_counter()
    out = work / f"merged_{K}.safetensors"
    write_merged_checkpoint(
        base,
        out,
        results["loraclr"].offsets,
        metadata=merge_metadata("loraclr", {}, loras, config.concepts, base),
    )
    stages["write"] = time.perf_counter() - start
    out.unlink()
    if args.save_offsets:
        from safetensors.torch import save_file

        save_file({n: t.contiguous() for n, t in results["loraclr"].offsets.items()}, args.save_offsets)
    peak = torch.cuda.max_memory_allocated() - before if device.startswith("cuda") else sampler.peak
    doc = plan.as_json()
    return {
        "K": K,
        "merge_s": merge_time,
        **{f"{k}_s": v for k, v in stages.items()},
        "peak_bytes": peak,
        "estimate_bytes": doc["peak_bytes"],
        "passes": doc["passes"],
        "fits": doc["fits"],
        "forms": {s: v["forms"] for s, v in doc["stages"].items()},
    }


def _row(label: str, r: dict) -> str:
    return (
        f"{label:>10} {r['merge_s']:8.1f} {r['features_s']:9.1f} {r['solve_s']:7.1f} {r['report_s']:7.1f} "
        f"{r['write_s']:7.1f} {r['passes']:>6} {r['peak_bytes'] / 2**30:9.2f} {r['estimate_bytes'] / 2**30:13.2f}  "
        f"{r['forms']}"
    )


def _merged_apart(base: Path, new: Path, old: Path) -> float:
    """The largest ``||W'_new - W'_old|| / ||W'_old||`` over the merged layers (weights from ``base``)."""
    from safetensors.torch import load_file

    from lib_loraclr.lora.keymap import kohya_to_ldm

    weights, a, b = load_file(base), load_file(new), load_file(old)
    worst = 0.0
    for name, offset in a.items():
        W = weights[kohya_to_ldm(name) + ".weight"].double().reshape(offset.shape)
        merged_old = W + b[name].double()
        worst = max(worst, float((offset.double() - b[name].double()).norm() / merged_old.norm()))
    return worst


def _old_tree(rev: str, into: Path) -> Path:
    """The library as it was at git revision ``rev``, unpacked under ``into``."""
    root = Path(__file__).resolve().parents[1]
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "-C", str(root), "archive", rev, "lib_loraclr"], check=True, capture_output=True
    )
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="SD1.5 widths (default: the tiny model)")
    parser.add_argument(
        "--concepts", type=int, nargs="+", help="K values (default: 2 4, or 2 4 8 12 with --full)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--steps", type=int, help="sampling steps recorded (default: 20 on a GPU, 2 on the CPU)"
    )
    parser.add_argument(
        "--resolution", type=int, help="feature run size (default: 512 on a GPU, 128 on the CPU)"
    )
    parser.add_argument(
        "--iterations", type=int, help="AdamW iterations (default: 50 on a GPU, 5 on the CPU)"
    )
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument(
        "--max-memory", help="budget for the merge, e.g. 20GiB (default: free memory less 10%%)"
    )
    parser.add_argument("--precision", default="auto", choices=("auto", "float64", "float32"))
    parser.add_argument("--against", metavar="REV", help="also run git revision REV's code, side by side")
    parser.add_argument(
        "--refuse-float64",
        action="store_true",
        help="fail if the merge makes a float64 tensor other than its small (L, K, K) pieces (a check, not a timing)",
    )
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--code", help=argparse.SUPPRESS)
    parser.add_argument("--save-offsets", help=argparse.SUPPRESS)
    args = parser.parse_args()
    gpu = args.device.startswith("cuda")
    args.steps = args.steps or (20 if gpu else 2)
    args.resolution = args.resolution or (512 if gpu else 128)
    args.iterations = args.iterations if args.iterations is not None else (50 if gpu else 5)
    if args.one:
        print(json.dumps(_one(args)))
        return
    concepts = args.concepts or ([2, 4, 8, 12] if args.full else [2, 4])
    print(
        f"{'full SD1.5' if args.full else 'tiny'} model, device {args.device}, steps {args.steps}, resolution "
        f"{args.resolution}, iterations {args.iterations}, LoRA rank {args.rank}, precision {args.precision}"
    )
    print(
        f"{'K / code':>10} {'merge s':>8} {'features':>9} {'solve':>7} {'report':>7} {'write':>7} {'passes':>6} "
        f"{'peak GiB':>9} {'estimate GiB':>13}  forms"
    )
    with tempfile.TemporaryDirectory() as work:
        old = _old_tree(args.against, Path(work) / "old") if args.against else None
        for K in concepts:
            runs = {"this": None, args.against: old} if old else {"this": None}
            rows = {}
            for label, code in runs.items():
                cmd = [sys.executable, __file__, "--one", str(K), "--work", work, "--device", args.device]
                cmd += ["--steps", str(args.steps), "--resolution", str(args.resolution)]
                cmd += ["--iterations", str(args.iterations), "--rank", str(args.rank)]
                cmd += ["--full"] if args.full else []
                cmd += ["--max-memory", args.max_memory] if args.max_memory else []
                cmd += [f"--code={code}", "--precision", "auto"] if code else ["--precision", args.precision]
                cmd += ["--refuse-float64"] if args.refuse_float64 and not code else []
                cmd += ["--save-offsets", str(Path(work) / f"offsets_{label}.safetensors")] if old else []
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode:
                    tail = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode
                    print(f"{K:>3} {label}: failed: {tail}", flush=True)
                    continue
                rows[label] = json.loads(proc.stdout.strip().splitlines()[-1])
                print(_row(f"{K} {label}"[:10], rows[label]), flush=True)
            if old and len(rows) == 2:
                apart = _merged_apart(
                    Path(work) / "base.safetensors",
                    Path(work) / "offsets_this.safetensors",
                    Path(work) / f"offsets_{args.against}.safetensors",
                )
                speedup = rows[args.against]["merge_s"] / rows["this"]["merge_s"]
                print(
                    f"{K:>3}: merge {speedup:.2f}x faster than {args.against}; merged weights apart {apart:.2e}"
                )
    print(
        "peak: what the merge held above the loaded model and LoRAs (RSS sampled every 20 ms, or CUDA allocations); "
        "estimate: the memory plan's peak for the same merge"
    )


if __name__ == "__main__":
    main()
