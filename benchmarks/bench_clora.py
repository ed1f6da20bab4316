"""The number users feel: a CLoRA generation vs a plain one (same size, steps, sampler), and each
speed lever measured on its own, plus quality proxies.

Rows, cumulative: the reference's way (one pass per variant, maps-only passes run the whole UNet),
+ one batched pass, + maps-only passes stop after the last map layer, + the pass that gives both
the loss and the prediction records its graph only up to the last map layer (the default; the
prediction is used without its gradient), + the loss on the prompt half only (a documented
deviation, off by default). On CUDA the peak column is ``torch.cuda.max_memory_allocated`` of
each run (the model included). ``--steps 50 --paper-schedule``
is the paper's schedule (updates below step 25, 20 refinements at 0/10/20); shorter runs scale it
(updates below steps/2, refinements at steps*{0, .2, .4}, steps*20/50 of them), which keeps the
share of extra UNet work the same.

    python benchmarks/bench_clora.py [--full] [--size 256] [--steps 10] [--loras 2] [--device cuda]
        [--images 4]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from bench_routing import build, make_loras, prompt_for, timed  # noqa: E402

from lib_loraclr.clora.compose import compose, overlap_fraction, plain_generation  # noqa: E402
from lib_loraclr.clora.core import group_overlap  # noqa: E402
from lib_loraclr.clora.settings import CloraSettings  # noqa: E402


def schedule(steps: int, paper: bool) -> CloraSettings:
    if paper:
        return CloraSettings(enabled=True)
    refine = max(1, round(steps * 20 / 50))
    return CloraSettings(
        enabled=True,
        max_step=steps // 2,
        refine_steps=tuple(sorted({0, steps // 5, 2 * steps // 5})),
        refine_iterations=refine,
    )


def quality(model, loras, size: int, steps: int) -> None:
    """Loss and cross-group overlap before vs after the first step's updates; final mask overlap."""
    chosen = {k: loras[k] for k in ("l0", "l1")}
    settings = CloraSettings(
        enabled=True, max_step=max(1, steps // 2), refine_steps=(0,), refine_iterations=10
    )
    result = compose(
        model,
        prompt_for(2),
        chosen,
        settings,
        steps=steps,
        width=size,
        height=size,
        sampler="ddim",
        seed=0,
        triggers={"l0": "", "l1": ""},
    )
    state = result.core.state
    first = [loss for step, loss, _ in state.losses if step == 0]
    overlaps = [value for step, value in state.overlaps if step == 0]
    off = compose(
        model,
        prompt_for(2),
        chosen,
        replace(settings, step_size=0.0),
        steps=steps,
        width=size,
        height=size,
        sampler="ddim",
        seed=0,
        triggers={"l0": "", "l1": ""},
    )
    rows = off.core.variant_rows(off.core.all_rows)
    print(f"quality (tiny-or-chosen model, K=2, {size}px, {steps} steps, 1+10 updates at step 0):")
    print(f"  contrastive loss        step 0 before {first[0]:.4f} -> after 10 updates {first[-1]:.4f}")
    print(f"  cross-group overlap     step 0 before {overlaps[0]:.4f} -> after 10 updates {overlaps[-1]:.4f}")
    print(
        f"  final-step overlap      without updates {group_overlap(off.core.state.maps, off.plan, rows):.4f} "
        f"-> with {group_overlap(state.maps, result.plan, rows):.4f}"
    )
    print(
        f"  mask overlap fraction   without updates {overlap_fraction(off.core.state.masks):.4f} "
        f"-> with {overlap_fraction(state.masks):.4f}"
    )


def batch_of_images(model, loras, settings: CloraSettings, common: dict, K: int, images: int) -> None:
    """``images`` compositions one after another vs one ``compose(images=N)`` (every image's rows
    in one UNet pass): seconds side by side and the largest latent difference."""
    chosen = {f"l{k}": loras[f"l{k}"] for k in range(K)}
    prompt, triggers = prompt_for(K), {n: "" for n in chosen}
    size = common["width"] // 8
    latents = torch.randn(images, 4, size, size, generator=torch.Generator().manual_seed(1))
    run = dict(common, triggers=triggers)
    singles, single_s, single_c = timed(
        lambda: [
            compose(model, prompt, chosen, settings, latents=latents[b : b + 1], **run) for b in range(images)
        ]
    )
    batched, batch_s, batch_c = timed(
        lambda: compose(model, prompt, chosen, settings, images=images, latents=latents, **run)
    )
    diff = max(
        float((batched.latents[b] - single.latents[0]).abs().max()) for b, single in enumerate(singles)
    )
    print(
        f"{K:>2} {images} images: one at a time {single_s:.2f} s ({single_c:.2f} s CPU), one pass "
        f"{batch_s:.2f} s ({batch_c:.2f} s CPU), {single_s / batch_s:.2f}x; max latent difference {diff:.1e}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--full", action="store_true", help="SD1.5-sized random-weight model instead of the tiny one"
    )
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--loras", type=int, nargs="+", default=[2])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16"], help="the model's (fp16: GPU)")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument(
        "--paper-schedule",
        action="store_true",
        help="max_step 25, refinement at 0/10/20 x 20 (use --steps 50)",
    )
    parser.add_argument(
        "--levers", default="reference,batched,truncated,trimmed,cond_only", help="comma list of rows to run"
    )
    parser.add_argument("--quality", action="store_true", help="also print the quality proxies")
    parser.add_argument(
        "--images", type=int, default=0, help="also time N images one at a time vs in one pass"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build(args.full, args.device)
    if args.dtype == "fp16":
        model = model.to(dtype=torch.float16)
    cuda = args.device.startswith("cuda")
    loras = make_loras(model, max(max(args.loras), 2), args.full)
    settings = schedule(args.steps, args.paper_schedule)
    common = dict(steps=args.steps, width=args.size, height=args.size, sampler="ddim", seed=0)
    plain_generation(model, "a cat", **{**common, "steps": 1})  # warm-up
    # and a short CLoRA run: the first backward pass's one-off set-up (allocator, kernels) would
    # otherwise land in the first row (on an H200 it made K = 1 dearer than K = 2)
    warm = {"l0": loras["l0"]}
    compose(model, prompt_for(1), warm, schedule(2, False), triggers={"l0": ""}, **{**common, "steps": 2})
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    _, plain_s, plain_c = timed(lambda: plain_generation(model, "a cat and a dog", **common))
    plain_peak = f", peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if cuda else ""
    print(
        f"clora: model {'SD1.5-sized' if args.full else 'tiny'}, {args.size}px, {args.steps} steps, device {args.device}, "
        f"threads {torch.get_num_threads()}, updates below step {settings.max_step}, "
        f"refinement {settings.refine_steps} x {settings.refine_iterations}"
    )
    print(f"plain generation: {plain_s:.2f} s wall, {plain_c:.2f} s CPU{plain_peak}")
    levers = {
        "reference": (
            "one pass per variant, full maps-only passes",
            dict(sequential=True, stop_early=False, trim_graph=False),
            settings,
        ),
        "batched": ("+ one batched pass", dict(stop_early=False, trim_graph=False), settings),
        "truncated": ("+ maps-only passes stop at the last map layer", dict(trim_graph=False), settings),
        "trimmed": ("+ graph only to the last map layer (default)", {}, settings),
        "cond_only": (
            "+ loss on the prompt half only (deviation)",
            {},
            replace(settings, cond_only_loss=True),
        ),
        "masks_only": (
            "step mode masks-only: masked fusion, no latent update",
            {},
            replace(settings, step_mode="masks-only"),
        ),
    }
    print(
        f"{'K':>2} {'lever':<58} {'seconds':>8} {'x plain':>8} {'CPU s':>8} {'x plain':>8} "
        f"{'UNet passes (full/maps-only/no-grad)':>38}{'  peak GiB' if cuda else ''}"
    )
    for K in args.loras:
        chosen = {f"l{k}": loras[f"l{k}"] for k in range(K)}
        for name in args.levers.split(","):
            label, kwargs, s = levers[name]
            prompt, triggers = prompt_for(K), {n: "" for n in chosen}
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            result, seconds, cpu = timed(
                lambda prompt=prompt, s=s, kwargs=kwargs, triggers=triggers, chosen=chosen: compose(
                    model, prompt, chosen, s, triggers=triggers, **common, **kwargs
                )
            )
            p = result.core.state.passes
            print(
                f"{K:>2} {label:<58} {seconds:8.2f} {seconds / plain_s:7.2f}x {cpu:8.2f} {cpu / plain_c:7.2f}x "
                f"{p['full']:>30}/{p['maps_only']}/{p['no_grad']}"
                + (f"  {torch.cuda.max_memory_allocated() / 2**30:8.2f}" if cuda else "")
            )
    for K in args.loras if args.images > 1 else []:
        batch_of_images(model, loras, settings, common, K, args.images)
    if args.quality:
        quality(model, loras, args.size, args.steps)


if __name__ == "__main__":
    main()
