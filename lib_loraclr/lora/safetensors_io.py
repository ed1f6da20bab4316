"""Reading LoRA and checkpoint files safely.

We parse the safetensors header ourselves before handing the file to the safetensors library:
that gives a precise message for empty, truncated or corrupt files (the library's own errors do
not name the file or the fix), and lets ``inspect`` look at a 2 GB checkpoint without reading a
tensor. Pickled ``.pt``/``.ckpt`` files are refused unless the caller opts in, and then only
``torch.load(weights_only=True)`` is used: never unpickle arbitrary objects.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lib_loraclr.errors import LoraFileError

_DTYPES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
}
_MAX_HEADER = 100 * 1024 * 1024
PICKLE_SUFFIXES = (".pt", ".ckpt", ".pth", ".bin")


@dataclass(frozen=True)
class Header:
    """What a safetensors header says: tensor dtypes and shapes, and the string metadata."""

    path: Path
    tensors: dict[str, tuple[str, tuple[int, ...]]] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: shape for name, (_, shape) in self.tensors.items()}


def read_header(path: str | os.PathLike[str]) -> Header:
    """Parse and validate a safetensors header without reading any tensor data."""
    path = Path(path)
    if not path.exists():
        raise LoraFileError(path, f"file not found at {path}; check the path or the WebUI's LoRA folder")
    if path.is_dir():
        raise LoraFileError(path, "is a folder, not a .safetensors file")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise LoraFileError(path, "is a pickle (.pt/.ckpt); use the .safetensors version of this file")
    size = path.stat().st_size
    if size == 0:
        raise LoraFileError(
            path, "is empty (0 bytes); the download or copy did not finish — get the file again"
        )
    with path.open("rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise LoraFileError(path, f"is truncated ({size} bytes): too short for a safetensors header")
        (length,) = struct.unpack("<Q", head)
        if length == 0 or length > _MAX_HEADER or 8 + length > size:
            raise LoraFileError(
                path,
                f"is not a valid safetensors file (header length {length} for a {size}-byte file); it may be truncated or another format",
            )
        raw = handle.read(length)
    try:
        parsed = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise LoraFileError(
            path, f"has an invalid safetensors header ({error}); the file is corrupt"
        ) from None
    if not isinstance(parsed, dict):
        raise LoraFileError(path, "has an invalid safetensors header (not a JSON object)")
    metadata = parsed.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise LoraFileError(path, "has invalid safetensors metadata (not a string map)")
    data_size = size - 8 - length
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, info in parsed.items():
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise LoraFileError(path, f"entry {name!r} is not a tensor (no dtype/shape/data_offsets)")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in _DTYPES:
            raise LoraFileError(path, f"tensor {name!r} has unsupported dtype {dtype!r}")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise LoraFileError(path, f"tensor {name!r} has an invalid shape {shape!r}")
        begin, end = offsets
        numel = 1
        for d in shape:
            numel *= d
        if end - begin != numel * _DTYPES[dtype] or end > data_size or begin < 0:
            raise LoraFileError(path, f"tensor {name!r} points outside the file (truncated download?)")
        tensors[name] = (dtype, tuple(shape))
    return Header(path, tensors, {str(k): str(v) for k, v in metadata.items()})


def load_tensors(
    path: str | os.PathLike[str], *, allow_pickle: bool = False, device: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a LoRA file.

    ``allow_pickle`` admits ``.pt``/``.ckpt`` files through ``torch.load(weights_only=True)``,
    which refuses anything but tensors and plain containers.
    """
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise LoraFileError(
                path,
                "is a pickle (.pt/.ckpt); pickles are refused by default — use the .safetensors version, "
                "or allow weights-only loading explicitly (--allow-pickle)",
            )
        if not path.exists():
            raise LoraFileError(path, f"file not found at {path}")
        try:
            loaded = torch.load(path, map_location=device, weights_only=True)
        except Exception as error:  # noqa: BLE001 - any unpickling failure is the file's fault
            raise LoraFileError(path, f"could not be read as weights-only pickle: {error}") from None
        if isinstance(loaded, dict) and "state_dict" in loaded and isinstance(loaded["state_dict"], dict):
            loaded = loaded["state_dict"]
        if not isinstance(loaded, dict):
            raise LoraFileError(path, "does not hold a dict of tensors")
        bad = [k for k, v in loaded.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise LoraFileError(path, f"entry {bad[0]!r} is not a tensor")
        return dict(loaded), {}
    header = read_header(path)
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path), device=str(device))
    except Exception as error:  # noqa: BLE001 - the library's message is kept, the file named
        raise LoraFileError(path, f"could not be read: {error}") from None
    return tensors, dict(header.metadata)


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The file's sha256 (hex); A1111's short hash is its first 10 digits."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
