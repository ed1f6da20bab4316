"""``python -m lib_loraclr merge``: K LoRAs into one checkpoint of their family, outside the WebUI."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lib_loraclr import families
from lib_loraclr.merge.engine import MergeConfig
from lib_loraclr.merge.gram import MARGIN_SCALES
from lib_loraclr.merge.options import METHODS
from lib_loraclr.merge.precision import PRECISIONS

_FAMILIES = " or ".join(f.title for f in families.FAMILIES)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = MergeConfig()
    parser.add_argument(
        "--base",
        required=True,
        help=f"{_FAMILIES} checkpoint (.safetensors, in its own layout); only read",
    )
    parser.add_argument(
        "--lora", action="append", required=True, metavar="PATH[:WEIGHT]", help="a concept LoRA (repeat)"
    )
    parser.add_argument(
        "--concept",
        action="append",
        default=[],
        metavar="TEXT",
        help="trigger text of each --lora, in order (default: its activation text / trigger words)",
    )
    parser.add_argument(
        "--out", help="output checkpoint (.safetensors); written atomically (required unless --estimate)"
    )
    parser.add_argument("--method", choices=METHODS, default=d.method)
    parser.add_argument("--report", help="write the fidelity report (JSON) here")
    parser.add_argument(
        "--compare", action="store_true", help="also report every other method on the same statistics"
    )
    parser.add_argument(
        "--dtype", choices=["fp16", "fp32"], default="fp16", help="dtype of the saved checkpoint"
    )
    parser.add_argument(
        "--lora-rank", type=int, default=0, help="also save the merge as a LoRA of this rank (0 = no)"
    )
    parser.add_argument(
        "--groups", default=",".join(d.groups), help="layer groups to merge: te,cross_kv,spatial"
    )
    parser.add_argument("--iterations", type=int, default=d.iterations)
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--margin", type=float, default=d.margin)
    parser.add_argument(
        "--margin-scale",
        choices=MARGIN_SCALES,
        default=d.margin_scale,
        help="absolute: the paper's margin on d_ij; per-element: on its RMS per element (margin x sqrt(rows x out))",
    )
    parser.add_argument("--lambda-delta", type=float, default=d.lambda_delta)
    parser.add_argument("--lambda-mse", type=float, default=d.lambda_mse)
    parser.add_argument(
        "--no-lsq-init", action="store_true", help="start the contrastive optimiser at W (the paper's init)"
    )
    parser.add_argument(
        "--steps", type=int, default=d.steps, help="sampling steps recorded for spatial features"
    )
    parser.add_argument(
        "--resolution",
        type=int,
        default=d.resolution,
        help="image size of the feature sampling run (default: the model's own, "
        + ", ".join(f"{f.native_resolution} for {f.example}" for f in families.FAMILIES)
        + ")",
    )
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=d.precision,
        help="float type of the solve: auto (float64 on the CPU and GPUs with fast float64, else float32)",
    )
    parser.add_argument(
        "--allow-pickle", action="store_true", help="read .pt/.ckpt LoRAs with torch.load(weights_only=True)"
    )
    parser.add_argument(
        "--max-memory",
        metavar="SIZE",
        help="what the merge device may hold in all, model included, e.g. 24GiB (default: its free memory "
        "less 10%%); the merge makes as many feature passes as it needs to stay inside",
    )
    parser.add_argument(
        "--estimate",
        action="store_true",
        help="print the memory plan from file headers (no tensor is read) and exit: 0 fits, 3 does not",
    )
    parser.add_argument("--json", action="store_true", help="with --estimate: the plan as JSON")


def _split(spec: str) -> tuple[str, float]:
    path, sep, weight = spec.rpartition(":")
    if sep and path and weight.replace(".", "", 1).replace("-", "", 1).isdigit():
        return path, float(weight)
    return spec, 1.0


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from lib_loraclr.errors import LoraClrError
    from lib_loraclr.lora.file import check_base_model, load_lora
    from lib_loraclr.merge.engine import merge_loras
    from lib_loraclr.merge.plan import plan_from_files
    from lib_loraclr.merge.report import summary, table
    from lib_loraclr.merge.sizes import default_budget, parse_size
    from lib_loraclr.merge.writer import export_lora, merge_metadata, write_merged_checkpoint
    from lib_loraclr.sd.checkpoint import load_checkpoint

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    specs = [_split(s) for s in args.lora]
    groups = tuple(g.strip() for g in args.groups.split(",") if g.strip())
    methods = list(dict.fromkeys([args.method, *(METHODS if args.compare else [])]))
    try:
        budget = parse_size(args.max_memory) if args.max_memory else default_budget(device)
    except ValueError as error:
        raise LoraClrError(f"--max-memory: {error}") from None
    plan = plan_from_files(
        args.base,
        [p for p, _ in specs],
        device=device,
        budget=budget,
        groups=groups,
        steps=args.steps,
        resolution=args.resolution,
        methods=len(methods),
    )
    if args.estimate:
        print(json.dumps(plan.as_json(), indent=2) if args.json else _plan_text(plan))
        return 0 if plan.fits else 3
    if not plan.fits:
        raise LoraClrError(plan.message)
    if not args.out:
        raise LoraClrError("--out is required (or pass --estimate to only print the memory plan)")
    if args.concept and len(args.concept) != len(specs):
        raise LoraClrError(
            f"{len(specs)} --lora but {len(args.concept)} --concept; give one concept per LoRA or none"
        )
    model = load_checkpoint(
        args.base, device=device, dtype=torch.float16 if device.startswith("cuda") else torch.float32
    )
    shapes = {n: tuple(m.weight.shape) for n, m in model.layer_map().items()}
    family = model.family.id  # the LoRAs are read with the model's family's names
    loras = [
        load_lora(path, allow_pickle=args.allow_pickle, target_shapes=shapes, model_family=family)
        for path, _ in specs
    ]
    for lora in loras:
        check_base_model(lora, family)
    concepts = args.concept or [
        (lora.trigger_words[0] if lora.trigger_words else lora.name) for lora in loras
    ]
    config = MergeConfig(
        method=args.method,
        weights=tuple(w for _, w in specs),
        concepts=tuple(concepts),
        groups=groups,
        iterations=args.iterations,
        lr=args.lr,
        margin=args.margin,
        margin_scale=args.margin_scale,
        lambda_delta=args.lambda_delta,
        lambda_mse=args.lambda_mse,
        lsq_init=not args.no_lsq_init,
        steps=args.steps,
        resolution=args.resolution,
        seed=args.seed,
        device=device,
        precision=args.precision,
    )
    bar = tqdm(total=1, desc="LoRACLR merge", unit="step")

    def progress(done: int, total: int, label: str) -> None:
        bar.total = total
        bar.n = done
        bar.set_postfix_str(label)
        bar.refresh()

    model_bytes = plan.breakdown["model"]
    results = merge_loras(
        model,
        loras,
        config,
        progress=progress,
        methods=methods,
        budget=None if budget is None else budget - model_bytes,
    )
    bar.close()
    chosen = results[args.method]
    params = {k: v for k, v in vars(config).items() if k not in ("concepts", "weights")}
    meta = merge_metadata(args.method, params, loras, concepts, Path(args.base), config.weights)
    write_merged_checkpoint(args.base, args.out, chosen.offsets, dtype=args.dtype, metadata=meta)
    print(f"saved {args.out}", file=sys.stderr)
    if args.lora_rank:
        lora_out = str(args.out).removesuffix(".safetensors") + f"_lora_r{args.lora_rank}.safetensors"
        export_lora(chosen.offsets, lora_out, args.lora_rank, metadata=meta)
        print(f"saved {lora_out}", file=sys.stderr)
    methods_summary = summary(results)
    print(table(methods_summary))
    if args.report:
        with open(args.report, "w", encoding="utf-8") as handle:
            json.dump({"method": args.method, "methods": methods_summary}, handle, indent=2)
    return 0


def _plan_text(plan) -> str:
    from lib_loraclr.merge.sizes import format_size

    doc = plan.as_json()
    lines = [
        f"memory plan on {doc['device']}: peak {doc['peak']} of {doc['budget']} -> {'fits' if doc['fits'] else 'does NOT fit'}",
        f"feature passes: {doc['passes']}",
    ]
    for stage, entry in doc["stages"].items():
        forms = ", ".join(f"{n} {f}" for f, n in entry["forms"].items())
        lines.append(
            f"  {stage:<9} {entry['layers']:>4} layers in {entry['passes']} pass(es), statistics "
            f"{format_size(entry['statistics_bytes'])} ({forms})"
        )
    lines += [f"  {k}: {format_size(v)}" for k, v in doc["breakdown"].items() if v]
    if doc["message"]:
        lines.append(doc["message"])
    return "\n".join(lines)
