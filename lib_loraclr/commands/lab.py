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
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")


def run(args: argparse.Namespace) -> int:
    import torch

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
    results = run_lab(world, Path(args.out), train=args.train, smoke=args.smoke, pictures=args.pictures)
    print(Path(args.out) / "tables.md")  # noqa: T201
    return 0 if results else 1
