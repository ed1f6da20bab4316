"""``python -m lib_loraclr demo``: the whole job on a built-in model, no downloads.

Uses the quality lab's trained world (``lib_loraclr/lab/trained``: a small SD1.x model that has
learned its world, and one real LoRA per identity) when it is there, so the figures mean something;
otherwise (or with ``--random``) a seeded tiny random model and random LoRAs, which prove only the
wiring. Merges the LoRAs with every method on the same statistics and prints the fidelity table;
then composes two of them with CLoRA and writes the image and its masks.
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
    parser.add_argument(
        "--random",
        action="store_true",
        help="use a random tiny model and LoRAs even when the lab world is there",
    )


def _lab_world(args: argparse.Namespace, out: Path):
    """(model, LoRA paths, concepts, base checkpoint, picture size) from the lab's trained world
    (read in place: the merge only reads its base)."""
    from lib_loraclr.lab import build, world
    from lib_loraclr.lab.model import load_lab_model

    identities = world.IDENTITIES[: max(2, min(args.concepts, len(world.IDENTITIES)))]
    base = build.COMMITTED / build.CHECKPOINT
    paths = [build.lora_path(build.COMMITTED, i) for i in identities]
    return load_lab_model(base), paths, [i.phrase for i in identities], base, world.CANVAS


def run(args: argparse.Namespace) -> int:
    import torch

    from lib_loraclr.lab.build import COMMITTED, world_complete
    from lib_loraclr.lora.file import load_lora
    from lib_loraclr.merge.engine import MergeConfig, merge_loras
    from lib_loraclr.merge.options import METHODS
    from lib_loraclr.merge.report import summary, table
    from lib_loraclr.merge.writer import merge_metadata, write_merged_checkpoint

    torch.manual_seed(args.seed)
    out = Path(args.out or tempfile.mkdtemp(prefix="loraclr_demo_"))
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    learned = world_complete(COMMITTED) and not args.random
    if learned:
        model, paths, concepts, base, size = _lab_world(args, out)
    else:
        model, paths, concepts, base, size = _random_world(args, out)
    loras = [load_lora(p) for p in paths]
    config = MergeConfig(concepts=tuple(concepts), steps=args.steps, resolution=max(64, size), seed=args.seed)
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
            "model": "quality lab world (trained)" if learned else "random tiny model (wiring only)",
            "seconds": merge_seconds,
        },
        "out": str(out),
    }
    try:
        from lib_loraclr.clora.compose import run_compose_demo
    except ImportError:
        run_compose_demo = None
    if run_compose_demo is not None:
        document["compose"] = run_compose_demo(model, paths, out, size=size)
    if args.json:
        print(json.dumps(document, indent=2, default=float))
        return 0
    print(
        f"LoRACLR demo: {len(loras)} concept LoRAs merged into the {document['merge']['model']} "
        f"({merge_seconds:.1f} s)"
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


def _random_world(args: argparse.Namespace, out: Path):
    """(model, LoRA paths, concepts, base checkpoint, picture size): seeded random tiny ones."""
    from lib_loraclr.sd.checkpoint import save_checkpoint
    from lib_loraclr.testing import synthetic_loras as sl
    from lib_loraclr.testing.tiny import build_tiny_model

    model = build_tiny_model(seed=args.seed)
    base = out / "tiny_sd15.safetensors"
    save_checkpoint(model, str(base))
    targets = sl.standard_targets(sl.layer_shapes(model.layer_map()))
    concepts = [CONCEPTS[k] if k < len(CONCEPTS) else f"xq{k} object" for k in range(args.concepts)]
    paths = []
    for k in range(args.concepts):
        path = out / f"concept{k}.safetensors"
        sl.write_kohya_lora(
            path,
            targets,
            rank=4,
            alpha=4.0,
            seed=100 + k,
            scale=0.12,
            metadata={"ss_output_name": f"concept{k}"},
        )
        sl.write_sidecar(path, concepts[k])
        paths.append(path)
    return model, paths, concepts, base, 128
