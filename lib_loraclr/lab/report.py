"""The lab's outputs: the tables as markdown and JSON, and one picture grid per table."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

SCALE = 2  # grid pictures at 128 px: the world's 64 px are hard to see


def _fmt(cell: dict[str, float] | None, percent: bool = True) -> str:
    if not cell:
        return "–"
    k = 100 if percent else 1
    return (
        f"{cell['mean'] * k:.1f} ± {cell['se'] * k:.1f}"
        if percent
        else f"{cell['mean']:.2f} ± {cell['se']:.2f}"
    )


def _with_difference(cell: dict[str, Any] | None) -> str:
    """``mean ± se`` and, when the cell has one, its paired difference from the baseline."""
    text = _fmt(cell)
    diff = (cell or {}).get("vs_baseline")
    if diff:
        text += f" ({diff['mean'] * 100:+.1f} ± {diff['se'] * 100:.1f})"
    return text


def merge_markdown(table: dict[str, Any]) -> str:
    cols = ("identity", "class", "pair identity", "pair class")
    baseline = table["rows"][table["baseline"]]
    n, pairs = baseline["identity"]["n"], baseline.get("pair identity", {}).get("n", 0)
    lines = [
        f"**K = {table['K']}** ({', '.join(table['identities'])}; {n} single-concept and {pairs} pair "
        f"pictures per method, the same seeds for every method; in brackets the paired difference "
        f"from {table['baseline']}, in points)",
        "",
        "| method | identity % | class % | pair: both identities % | pair: both classes % |",
        "|---|---|---|---|---|",
    ]
    for method, row in table["rows"].items():
        lines.append(f"| {method} | " + " | ".join(_with_difference(row.get(c)) for c in cols) + " |")
    for method, groups in table.get("diagnostics", {}).items():
        active = ", ".join(f"{g} {100 * d['margin_active']:.0f} %" for g, d in groups.items())
        moved = ", ".join(f"{g} {d['moved_from_init']:.2e}" for g, d in groups.items())
        lines.append(f"\n{method}: margin active in {active}; moved from its start (relative) {moved}.")
    return "\n".join(lines)


def composition_markdown(table: dict[str, Any]) -> str:
    n = next(iter(table["rows"].values()))["all identities"]["n"]
    lines = [
        f"**K = {table['K']}** subjects ({'; '.join(table['columns'])}; {n} pictures per method, the "
        f"same seeds for every method; in brackets the paired difference from {table['baseline']}, in points)",
        "",
        "| method | every subject its identity % | subjects with their identity % | bleeding % "
        "| all classes % | saturated pixels % | mask IoU |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, row in table["rows"].items():
        iou = _fmt(row.get("mask IoU"), percent=False) if "mask IoU" in row else "–"
        cells = [
            _with_difference(row.get(c))
            for c in ("all identities", "subject identity", "bleeding", "class", "saturated")
        ]
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {iou} |")
    return "\n".join(lines)


def grid(pictures: dict[str, torch.Tensor], columns: Sequence[str], path: Path) -> Path:
    """Rows = methods (label on the left), columns = prompts (label on top)."""
    size, label_w, label_h = 64 * SCALE, 150, 30
    rows = list(pictures)
    width = label_w + size * len(columns)
    height = label_h + size * len(rows)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, text in enumerate(columns):
        _text(draw, (label_w + c * size + 2, 2), text, size - 4)
    for r, method in enumerate(rows):
        _text(draw, (4, label_h + r * size + size // 2 - 6), method, label_w - 8)
        for c in range(len(columns)):
            pic = pictures[method][c].clamp(0, 1).permute(1, 2, 0).numpy()
            tile = Image.fromarray((pic * 255).round().astype(np.uint8)).resize((size, size), Image.NEAREST)
            canvas.paste(tile, (label_w + c * size, label_h + r * size))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def _text(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, width: int) -> None:
    """Word-wrapped label in the default bitmap font (6 px per character)."""
    per_line = max(4, width // 6)
    words, lines, line = text.split(), [], ""
    for word in words:
        if len(line) + len(word) + 1 > per_line and line:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    lines.append(line)
    for i, part in enumerate(lines[:3]):
        draw.text((xy[0], xy[1] + 10 * i), part, fill=(0, 0, 0))


def world_sheet(path: Path, seed: int = 0) -> Path:
    """Ground-truth pictures: a row of base scenes (with captions) and a row of the identities."""
    from lib_loraclr.lab import world as w

    rng = np.random.default_rng(seed)
    base = [w.random_scene(rng) for _ in range(len(w.IDENTITIES))]
    alone = [w.random_scene(rng, identity=k) for k in range(len(w.IDENTITIES))]
    pictures = {
        "base world": torch.stack([_tensor(w.render(s)[0]) for s in base]),
        "identities": torch.stack([_tensor(w.render(s)[0]) for s in alone]),
    }
    return grid(pictures, [i.phrase for i in w.IDENTITIES], path)


def _tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1).float() / 255
