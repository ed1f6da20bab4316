"""``python -m lib_loraclr``: one entry point, one module per subcommand in ``commands/``.

Subcommands are imported lazily so ``inspect`` works without diffusers installed.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys

from lib_loraclr import __version__
from lib_loraclr.errors import LoraClrError

# name -> module under lib_loraclr.commands exposing add_arguments(parser) and run(args) -> int
SUBCOMMANDS = {
    "demo": "Merge and compose on a built-in tiny model with its own tiny LoRAs (no downloads).",
    "inspect": "Show a LoRA file's format, base model, rank, layers and trigger words.",
    "merge": "Merge K LoRAs into one checkpoint (LoRACLR, least squares, sum or average).",
    "compose": "Generate one image with several LoRAs bound to subjects (CLoRA).",
    "lab": "The quality lab: measure merge and composition in a small world a model has learned.",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lib_loraclr", description=__doc__)
    parser.add_argument("--version", action="version", version=f"sd-webui-loraclr {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in SUBCOMMANDS.items():
        if importlib.util.find_spec(f"lib_loraclr.commands.{name}") is None:
            continue  # a subcommand not shipped in this build
        module = importlib.import_module(f"lib_loraclr.commands.{name}")
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    module = importlib.import_module(f"lib_loraclr.commands.{args.command}")
    try:
        return int(module.run(args) or 0)
    except LoraClrError as error:
        print(f"error: {error}", file=sys.stderr)  # noqa: T201
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)  # noqa: T201
        return 130
