"""SD1.5 reference data vendored in ``tests/data`` (every ldm checkpoint key with its shape, the
350 kohya LoRA module names) and a header-only checkpoint built from it."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"


def ldm_shapes() -> dict[str, tuple[int, ...]]:
    rows = (DATA / "sd15_ldm_keys.tsv").read_text().splitlines()
    return {
        k: tuple(int(d) for d in s.split("x"))
        for k, s in (r.split("\t") for r in rows if not r.startswith("#"))
    }


def kohya_modules() -> list[tuple[str, str, str, tuple[int, ...]]]:
    """(kohya name, kind 'lora'|'locon', diffusers path, base weight shape) for all 350 SD1.5 modules."""
    rows = (DATA / "sd15_kohya_lora_modules.tsv").read_text().splitlines()
    out = []
    for row in rows:
        if row.startswith("#"):
            continue
        name, kind, path, shape = row.split("\t")
        out.append((name, kind, path, tuple(int(d) for d in shape.split("x"))))
    return out


def write_header_only_checkpoint(path: Path, shapes: dict[str, tuple[int, ...]]) -> Path:
    """A full-size fp16 SD1.5 safetensors file whose data is a sparse hole: the header is real, no 2 GB written."""
    header, offset = {}, 0
    for key, shape in shapes.items():
        size = 2
        for d in shape:
            size *= d
        header[key] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as handle:
        handle.write(struct.pack("<Q", len(raw)))
        handle.write(raw)
    os.truncate(path, 8 + len(raw) + offset)
    return path
