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

On the CPU, ``--full`` defaults to reduced work (2 sampling steps at 128 px, 5 iterations) so
K = 12 finishes on two cores; the statistics forms and the plan are those of that setting.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


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
    from lib_loraclr.merge.plan import default_budget
    from lib_loraclr.merge.sizes import parse_size
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
    config = MergeConfig(
        concepts=tuple(f"concept{k}" for k in range(K)),
        steps=args.steps,
        resolution=args.resolution,
        iterations=args.iterations,
        device=device,
        model_level=False,
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
    with sampler:
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
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
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
        f"{args.resolution}, iterations {args.iterations}, LoRA rank {args.rank}"
    )
    print(
        f"{'K':>3} {'merge s':>8} {'features':>9} {'solve':>7} {'report':>7} {'write':>7} {'passes':>6} "
        f"{'peak GiB':>9} {'estimate GiB':>13}  forms"
    )
    with tempfile.TemporaryDirectory() as work:
        for K in concepts:
            cmd = (
                [
                    sys.executable,
                    __file__,
                    "--one",
                    str(K),
                    "--work",
                    work,
                    "--device",
                    args.device,
                    "--steps",
                    str(args.steps),
                    "--resolution",
                    str(args.resolution),
                    "--iterations",
                    str(args.iterations),
                    "--rank",
                    str(args.rank),
                ]
                + (["--full"] if args.full else [])
                + (["--max-memory", args.max_memory] if args.max_memory else [])
            )
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                print(
                    f"{K:>3} failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}"
                )
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            print(
                f"{K:>3} {r['merge_s']:8.1f} {r['features_s']:9.1f} {r['solve_s']:7.1f} {r['report_s']:7.1f} "
                f"{r['write_s']:7.1f} {r['passes']:>6} {r['peak_bytes'] / 2**30:9.2f} {r['estimate_bytes'] / 2**30:13.2f}  "
                f"{r['forms']}",
                flush=True,
            )
    print(
        "peak: what the merge held above the loaded model and LoRAs (RSS sampled every 20 ms, or CUDA allocations); "
        "estimate: the memory plan's peak for the same merge"
    )


if __name__ == "__main__":
    main()
