"""``python -m lib_loraclr compose``: one image with several LoRAs bound to subjects (CLoRA)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lib_loraclr import families
from lib_loraclr.clora.attention import MAP_LEVEL_CHOICES
from lib_loraclr.clora.compose import SAMPLERS
from lib_loraclr.clora.settings import MORPHOLOGY, STEP_MODES, CloraSettings

_FAMILIES = " or ".join(f.title for f in families.FAMILIES)
_SIZES = ", ".join(f"{f.example} {f.native_resolution}" for f in families.FAMILIES)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = CloraSettings()
    parser.add_argument(
        "--base", required=True, help=f"{_FAMILIES} checkpoint (.safetensors, in its own layout)"
    )
    parser.add_argument(
        "--prompt", required=True, help='e.g. "a <lora:blackcat:1> cat and a <lora:corgi:0.8> dog"'
    )
    parser.add_argument("--negative", default="", help="negative prompt")
    parser.add_argument("--lora-dir", default=".", help="folder of the LoRA files named in the prompt")
    parser.add_argument("--out", required=True, help="output image (.png)")
    parser.add_argument("--save-masks", metavar="DIR", help="write the last step's masks here")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--cfg", type=float, default=7.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sampler", default="ddim", choices=list(SAMPLERS))
    parser.add_argument("--width", type=int, help=f"default: the model's native size ({_SIZES})")
    parser.add_argument("--height", type=int, help="default: the model's native size")
    parser.add_argument(
        "--step-mode", choices=STEP_MODES, default=d.step_mode, help="how each latent update is sized"
    )
    parser.add_argument("--step-size", type=float, default=d.step_size, help="the paper mode's step")
    parser.add_argument(
        "--relative-step",
        type=float,
        default=d.relative_step,
        help="the relative mode's ||update|| / ||latent||",
    )
    parser.add_argument(
        "--map-level", choices=MAP_LEVEL_CHOICES, default=d.map_level, help="attention-map resolution"
    )
    parser.add_argument("--max-step", type=int, default=d.max_step)
    parser.add_argument("--refine-steps", default=",".join(map(str, d.refine_steps)))
    parser.add_argument("--refine-iterations", type=int, default=d.refine_iterations)
    parser.add_argument("--temperature", type=float, default=d.temperature)
    parser.add_argument("--mask-threshold", type=float, default=d.mask_threshold)
    parser.add_argument("--mask-from-step", type=int, default=d.mask_from_step)
    parser.add_argument("--morphology", choices=MORPHOLOGY, default=d.morphology)
    parser.add_argument(
        "--recompute-prediction", action="store_true", help="predict again after the latent update"
    )
    parser.add_argument(
        "--cond-only-loss", action="store_true", help="loss on the prompt half only (faster; a deviation)"
    )
    parser.add_argument("--device", default=None)


def run(args: argparse.Namespace) -> int:
    import torch

    from lib_loraclr.clora.compose import compose, save_masks
    from lib_loraclr.clora.prompts import split_bindings
    from lib_loraclr.errors import PromptError
    from lib_loraclr.lora.file import check_base_model, load_lora
    from lib_loraclr.sd.checkpoint import load_checkpoint
    from lib_loraclr.sd.model import to_pil

    settings = CloraSettings.from_dict(
        {
            "enabled": True,
            "step_mode": args.step_mode,
            "step_size": args.step_size,
            "relative_step": args.relative_step,
            "map_level": args.map_level,
            "max_step": args.max_step,
            "refine_steps": args.refine_steps,
            "refine_iterations": args.refine_iterations,
            "temperature": args.temperature,
            "mask_threshold": args.mask_threshold,
            "mask_from_step": args.mask_from_step,
            "morphology": args.morphology,
            "reuse_prediction": not args.recompute_prediction,
            "cond_only_loss": args.cond_only_loss,
        }
    )
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    _, bindings, styles = split_bindings(args.prompt)
    paths = {}
    for name in {b.lora for b in bindings} | {s.lora for s in styles}:
        paths[name] = Path(args.lora_dir) / f"{name}.safetensors"
        if not paths[name].exists():
            raise PromptError(f"LoRA {name!r} not found: no {paths[name]}; pass --lora-dir")
    model = load_checkpoint(
        args.base, device=device, dtype=torch.float16 if device.startswith("cuda") else torch.float32
    )
    loras = {}
    for name, path in paths.items():  # read with the model's family's names, refused if of another
        loras[name] = load_lora(path, model_family=model.family.id)
        check_base_model(loras[name], model.family.id)
    size = model.native_resolution
    result = compose(
        model,
        args.prompt,
        loras,
        settings,
        negative=args.negative,
        steps=args.steps,
        cfg_scale=args.cfg,
        seed=args.seed,
        sampler=args.sampler,
        width=args.width or size,
        height=args.height or size,
    )
    to_pil(model.decode(result.latents))[0].save(args.out)
    info = {"image": args.out, "variants": list(result.plan.prompts), "seconds": result.seconds}
    if args.save_masks:
        info["masks"] = [str(p) for p in save_masks(result, Path(args.save_masks))]
    print(json.dumps(info, indent=2))
    print(f"saved {args.out}", file=sys.stderr)
    return 0
