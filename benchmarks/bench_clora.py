"""CLoRA cost: batched routing vs one pass per variant, and CLoRA vs a plain generation.

Runs on the tiny model or an SD1.5-sized random-weight UNet (``--full``), same seed and inputs
for every variant of the comparison, and prints seconds side by side plus the max latent
difference between the batched and the sequential (reference) path.

    python benchmarks/bench_clora.py [--full] [--size 256] [--steps 10] [--loras 1 2 4] [--device cuda]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from lib_loraclr import synthetic_loras as sl
from lib_loraclr.clora_config import CloraSettings
from lib_loraclr.compose import compose, plain_generation
from lib_loraclr.lora_file import load_lora

SUBJECTS = ["cat", "dog", "hat", "car", "tree", "boat", "lamp", "bird"]


def build(full: bool, device: str):
    if not full:
        from lib_loraclr.tiny import build_tiny_model

        return build_tiny_model(seed=0, device=device)
    from lib_loraclr.runtime import SDModel
    from lib_loraclr.sd_configs import build_modules, sd15_config, sd_alphas_cumprod
    from lib_loraclr.tiny import init_weights
    from lib_loraclr.tokenizer import load_clip_tokenizer

    unet, text_encoder, _ = build_modules(sd15_config("unet"), sd15_config("text_encoder"), None)
    init_weights(unet, seed=0)
    init_weights(text_encoder, seed=1)
    model = SDModel(unet, text_encoder, load_clip_tokenizer(), None, sd_alphas_cumprod())
    return model.to(device).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="SD1.5-sized random-weight model instead of the tiny one")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--loras", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--paper-schedule", action="store_true", help="max_step 25 of 50, refinement at 0/10/20 x 20")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build(args.full, args.device)
    targets = sl.standard_targets(sl.layer_shapes(model.layer_map()))
    folder = Path(tempfile.mkdtemp())
    loras = {}
    for k in range(max(args.loras)):
        path = folder / f"l{k}.safetensors"
        sl.write_kohya_lora(path, targets, rank=8, alpha=8.0, seed=k, scale=0.02 if args.full else 0.12)
        loras[f"l{k}"] = load_lora(path)
    if args.paper_schedule:
        settings = CloraSettings(enabled=True)
    else:  # the paper's schedule scaled to the step count
        s = args.steps
        settings = CloraSettings(enabled=True, max_step=s // 2, refine_steps=(0, s // 5, 2 * s // 5), refine_iterations=max(1, s // 5))
    common = dict(steps=args.steps, width=args.size, height=args.size, sampler="ddim", seed=0)
    plain_latent, plain_s = plain_generation(model, "a " + " and a ".join(SUBJECTS[:2]), **common)
    print(f"model {'SD1.5-sized' if args.full else 'tiny'}, {args.size}px, {args.steps} steps, device {args.device}, "
          f"settings max_step={settings.max_step} refine={settings.refine_steps}x{settings.refine_iterations}")
    print(f"plain generation: {plain_s:.2f} s")
    print(f"{'K':>2} {'sequential s':>13} {'batched s':>10} {'speed-up':>9} {'x plain':>8} {'max |dlatent|':>14}")
    for K in args.loras:
        prompt = "a " + " and a ".join(f"<lora:l{k}:1> {SUBJECTS[k]}" for k in range(K))
        triggers = {f"l{k}": "" for k in range(K)}
        chosen = {f"l{k}": loras[f"l{k}"] for k in range(K)}
        start = time.perf_counter()
        seq = compose(model, prompt, chosen, settings, sequential=True, triggers=triggers, **common)
        seq_s = time.perf_counter() - start
        start = time.perf_counter()
        bat = compose(model, prompt, chosen, settings, triggers=triggers, **common)
        bat_s = time.perf_counter() - start
        diff = float((seq.latents - bat.latents).abs().max())
        print(f"{K:>2} {seq_s:13.2f} {bat_s:10.2f} {seq_s / bat_s:8.2f}x {bat_s / plain_s:7.1f}x {diff:14.2e}")


if __name__ == "__main__":
    main()
