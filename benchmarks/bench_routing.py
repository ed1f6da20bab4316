"""Batched per-row LoRA routing vs the reference's one-pass-per-variant loop.

Same model, LoRAs, prompt, seed and sampler for both; the composition runs without latent updates
(``max_step 0``: masks and fusion only) so the figure isolates the routing: ONE UNet pass over
2(K+1) rows per step vs K+1 passes of one CFG pair each. Prints seconds side by side, the ratio
and the max latent difference (fp32).

    python benchmarks/bench_routing.py [--full] [--size 128] [--steps 4] [--loras 1 2 4 8] [--device cuda]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from lib_loraclr.clora.compose import compose  # noqa: E402
from lib_loraclr.clora.settings import CloraSettings  # noqa: E402
from lib_loraclr.lora.file import load_lora  # noqa: E402
from lib_loraclr.testing import synthetic_loras as sl  # noqa: E402

SUBJECTS = ["cat", "dog", "hat", "car", "tree", "boat", "lamp", "bird"]


def build(full: bool, device: str):
    """The tiny model, or an SD1.5-sized one (random weights: the cost is the architecture's)."""
    if not full:
        from lib_loraclr.testing.tiny import build_tiny_model

        return build_tiny_model(seed=0).to(device)
    from lib_loraclr.sd.configs import build_modules, sd15_config, sd_alphas_cumprod
    from lib_loraclr.sd.model import SDModel
    from lib_loraclr.sd.tokenizer import load_clip_tokenizer
    from lib_loraclr.testing.tiny import init_weights

    unet, text_encoder, _ = build_modules(sd15_config("unet"), sd15_config("text_encoder"), None)
    init_weights(unet, seed=0)
    init_weights(text_encoder, seed=1)
    return SDModel(unet, text_encoder, load_clip_tokenizer(), None, sd_alphas_cumprod()).to(device).eval()


def make_loras(model, count: int, full: bool) -> dict:
    targets = sl.standard_targets(sl.layer_shapes(model.layer_map()))
    folder = Path(tempfile.mkdtemp())
    out = {}
    for k in range(count):
        path = folder / f"l{k}.safetensors"
        sl.write_kohya_lora(
            path,
            targets,
            rank=8 if full else 4,
            alpha=8.0 if full else 4.0,
            seed=k,
            scale=0.02 if full else 0.12,
        )
        out[f"l{k}"] = load_lora(path)
    return out


def prompt_for(k: int) -> str:
    return "a " + " and a ".join(f"<lora:l{i}:1> {SUBJECTS[i]}" for i in range(k))


def timed(fn):
    """``(result, wall seconds, process CPU seconds)``. On a shared CPU box the CPU time (with
    ``--threads 1``) is the steadier figure: other jobs stretch the wall time, not our CPU time."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start, cpu = time.perf_counter(), time.process_time()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--full", action="store_true", help="SD1.5-sized random-weight model instead of the tiny one"
    )
    parser.add_argument("--size", type=int, default=128, help="image side in pixels (latent = size / 8)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--loras", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build(args.full, args.device)
    loras = make_loras(model, max(args.loras), args.full)
    settings = CloraSettings(enabled=True, max_step=0)
    common = dict(
        steps=args.steps,
        width=args.size,
        height=args.size,
        sampler="ddim",
        seed=0,
        triggers={n: "" for n in loras},
    )
    print(
        f"routing: model {'SD1.5-sized' if args.full else 'tiny'}, {args.size}px, {args.steps} steps, device {args.device}, "
        f"threads {torch.get_num_threads()}"
    )
    print(
        f"{'K':>2} {'rows':>5} {'per-variant s':>14} {'batched s':>10} {'speed-up':>9} {'CPU s (per-variant/batched)':>28} "
        f"{'CPU speed-up':>13} {'max |dlatent|':>14}"
    )
    compose(model, prompt_for(1), {"l0": loras["l0"]}, settings, **{**common, "steps": 1})  # warm-up
    for K in args.loras:
        chosen = {f"l{k}": loras[f"l{k}"] for k in range(K)}
        prompt = prompt_for(K)
        seq, seq_s, seq_c = timed(
            lambda prompt=prompt, chosen=chosen: compose(
                model, prompt, chosen, settings, sequential=True, **common
            )
        )
        bat, bat_s, bat_c = timed(
            lambda prompt=prompt, chosen=chosen: compose(model, prompt, chosen, settings, **common)
        )
        diff = float((seq.latents - bat.latents).abs().max())
        print(
            f"{K:>2} {2 * (K + 1):>5} {seq_s:14.2f} {bat_s:10.2f} {seq_s / bat_s:8.2f}x {seq_c:14.2f} / {bat_c:11.2f} "
            f"{seq_c / bat_c:12.2f}x {diff:14.2e}"
        )


if __name__ == "__main__":
    main()
