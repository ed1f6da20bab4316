"""``python -m lib_loraclr lab``: the quality lab (docs/quality.md).

Without flags it measures both tables on the committed world (``lib_loraclr/lab/trained``);
``--train --world DIR`` makes a world first (each stage cached, so a rerun resumes), ``--smoke``
runs every stage on a toy budget (checks the pipeline, not the quality).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="loraclr-lab", help="folder for tables.md, results.json and grids")
    parser.add_argument(
        "--world", help="the trained world to use or (with --train) to make; default: the committed one"
    )
    parser.add_argument(
        "--train", action="store_true", help="train the world (stages already in --world are kept)"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="toy budget for every stage (CI); quality is meaningless"
    )
    parser.add_argument(
        "--pictures", type=int, help="pictures per table cell, held-out seeds (default 64; 1 with --smoke)"
    )
    parser.add_argument(
        "--export-webui",
        metavar="MODELS_DIR",
        help="copy the world's checkpoint (+ .yaml) and LoRAs into a WebUI's models folder and stop",
    )
    parser.add_argument(
        "--tables",
        nargs="+",
        metavar="TABLE",
        default=[],
        help="measure only these tables, named as their grids: merge_K2 merge_K4 merge_K8 compose_K2 "
        "compose_K3 compose_K4 (default: all)",
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--device", default="cpu", help="with --train: where the base and the LoRAs train (e.g. cuda)"
    )
    parser.add_argument(
        "--budget",
        nargs="+",
        metavar="FIELD=N",
        default=[],
        help="with --train: override the training budget, e.g. base_steps=20000 base_batch=256 "
        "base_grounding=0.5 (fields of lib_loraclr.lab.train.Budget)",
    )
    parser.add_argument(
        "--train-seconds",
        type=float,
        help="with --train: stop the base's training after this many seconds (a later --train continues)",
    )
    parser.add_argument(
        "--train-only",
        action="store_true",
        help="with --train: stop after training (no gates, no tables; the next --train measures the gates)",
    )


def run(args: argparse.Namespace) -> int:
    import torch

    from lib_loraclr.lab.build import Training
    from lib_loraclr.lab.run import run as run_lab

    if args.threads:
        torch.set_num_threads(args.threads)
    world = Path(args.world) if args.world else None
    if args.export_webui:
        from lib_loraclr.lab.build import COMMITTED
        from lib_loraclr.lab.export import export_to_webui

        for path in export_to_webui(world or COMMITTED, Path(args.export_webui)).values():
            print(path)  # noqa: T201
        return 0
    training = Training(args.device, args.train_seconds, gates=not args.train_only)
    budget = parse_budget(args.budget)
    results = run_lab(
        world,
        Path(args.out),
        args.train,
        args.smoke,
        args.pictures,
        training=training,
        budget=budget,
        only=args.tables,
    )
    if args.train_only:
        return 0
    print(Path(args.out) / "tables.md")  # noqa: T201
    return 0 if results else 1


def parse_budget(items: list[str]) -> dict[str, float]:
    """``["base_steps=20000", "base_grounding=0.5"]`` -> ``{"base_steps": 20000, "base_grounding": 0.5}``,
    each a field of ``Budget`` (counts are whole numbers, weights may have a fraction)."""
    import dataclasses

    from lib_loraclr.errors import LoraClrError
    from lib_loraclr.lab.train import Budget

    kinds = {
        f.name: type(f.default) if f.default is not dataclasses.MISSING else int
        for f in dataclasses.fields(Budget)
    }
    out: dict[str, float] = {}
    for item in items:
        name, _, value = item.partition("=")
        kind = kinds.get(name)
        try:
            number = kind(value) if kind is not None else None
        except ValueError:
            number = None
        if number is None or number < 0:
            raise LoraClrError(
                f"--budget {item!r}: expected FIELD=N (N >= 0, a whole number except for base_grounding) "
                f"with FIELD one of {', '.join(sorted(kinds))}"
            )
        out[name] = number
    return out
