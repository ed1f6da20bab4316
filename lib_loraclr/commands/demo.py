"""``python -m lib_loraclr demo``: the whole job on a built-in tiny model, no downloads.

Builds a seeded tiny SD1-architecture model and three tiny concept LoRAs, merges them with every
method on the same statistics and prints the fidelity table; then runs the CLoRA composition of
the same LoRAs (when that engine is present) and writes the image and its masks.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

CONCEPTS = ("sks cat", "zwx dog", "qrt hat")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", help="folder for the tiny checkpoint, LoRAs, merge and images (default: a temp folder)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--concepts", type=int, default=3, help="number of concept LoRAs (2..12)")
    parser.add_argument("--steps", type=int, default=4, help="sampling steps recorded for spatial features")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    import torch

    from lib_loraclr.lora.file import load_lora
    from lib_loraclr.merge.engine import MergeConfig, merge_loras
    from lib_loraclr.merge.options import METHODS
    from lib_loraclr.merge.report import summary, table
    from lib_loraclr.merge.writer import merge_metadata, write_merged_checkpoint
    from lib_loraclr.sd.checkpoint import save_checkpoint
    from lib_loraclr.testing import synthetic_loras as sl
    from lib_loraclr.testing.tiny import build_tiny_model

    torch.manual_seed(args.seed)
    out = Path(args.out or tempfile.mkdtemp(prefix="loraclr_demo_"))
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    model = build_tiny_model(seed=args.seed)
    base = out / "tiny_sd15.safetensors"
    save_checkpoint(model, str(base))
    targets = sl.standard_targets(sl.layer_shapes(model.layer_map()))
    names = [f"concept{k}" for k in range(args.concepts)]
    concepts = [CONCEPTS[k] if k < len(CONCEPTS) else f"xq{k} object" for k in range(args.concepts)]
    paths = []
    for k, name in enumerate(names):
        path = out / f"{name}.safetensors"
        sl.write_kohya_lora(
            path, targets, rank=4, alpha=4.0, seed=100 + k, scale=0.12, metadata={"ss_output_name": name}
        )
        sl.write_sidecar(path, concepts[k])
        paths.append(path)
    loras = [load_lora(p) for p in paths]
    config = MergeConfig(concepts=tuple(concepts), steps=args.steps, resolution=128, seed=args.seed)
    results = merge_loras(model, loras, config, methods=list(METHODS))
    merged = out / "tiny_loraclr_merge.safetensors"
    meta = merge_metadata("loraclr", {"steps": args.steps}, loras, concepts, base)
    write_merged_checkpoint(base, merged, results["loraclr"].offsets, dtype="fp32", metadata=meta)
    merge_seconds = time.perf_counter() - started
    methods = summary(results)
    document = {
        "merge": {
            "methods": methods,
            "concepts": concepts,
            "checkpoint": str(merged),
            "seconds": merge_seconds,
        },
        "out": str(out),
    }
    try:
        from lib_loraclr.clora.compose import run_compose_demo
    except ImportError:
        run_compose_demo = None
    if run_compose_demo is not None:
        document["compose"] = run_compose_demo(model, paths, out)
    if args.json:
        print(json.dumps(document, indent=2, default=float))
        return 0
    print(
        f"LoRACLR demo: {len(loras)} tiny concept LoRAs merged into a tiny SD1.5-architecture model ({merge_seconds:.1f} s)"
    )
    print(table(methods))
    print(f"\nmerged checkpoint: {merged}")
    if "compose" in document:
        compose = document["compose"]
        print(f"CLoRA image: {compose.get('image')}  masks: {compose.get('masks_dir')}")
        for key, value in compose.items():
            if isinstance(value, float):
                print(f"  {key}: {value:.4f}")
    print(f"files in {out}", file=sys.stderr)
    return 0
