"""``python -m lib_loraclr inspect LORA [--base CKPT] [--json]``: what a LoRA file is, from its header only."""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("lora", help="LoRA file (.safetensors)")
    parser.add_argument(
        "--base", help="checkpoint (.safetensors, ldm layout) to resolve the LoRA's layers against"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    from lib_loraclr.lora.file import inspect_lora

    info = inspect_lora(args.lora, base=args.base)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    rows = [
        ("file", info["file"]),
        ("format", info["format"]),
        ("base model", info["base_model"]),
        ("rank", info["rank"]),
        ("target layers", f"{info['modules']} ({info['text_encoder_modules']} text encoder)"),
        ("unused keys", info["unused_keys"]),
        ("trigger words", ", ".join(info["trigger_words"]) or "(none)"),
    ]
    if info.get("base"):
        rows.append(("resolved on base", f"{info['resolved']} of {info['modules']}"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    for name in info["unresolved"][:20]:
        print(f"  unresolved: {name}")
    if len(info["unresolved"]) > 20:
        print(f"  ... and {len(info['unresolved']) - 20} more")
    return 0
