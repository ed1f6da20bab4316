"""Writing merges: a full checkpoint in the base's layout, and the merge as a kohya LoRA.

The checkpoint is the base file's tensors, key for key, with only the merged layers' weights
changed (floating tensors cast to the chosen dtype), written through a temp file in the same
folder and ``os.replace`` so a reader never sees a partial file. The base file is only read.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from lib_loraclr import __version__, families
from lib_loraclr.errors import LoraFileError
from lib_loraclr.families.layout import Source
from lib_loraclr.lora.safetensors_io import file_sha256, load_tensors, read_header
from lib_loraclr.merge.options import DTYPES
from lib_loraclr.sd.checkpoint import CONFIG_METADATA_KEY, atomic_save_safetensors

log = logging.getLogger(__name__)
_TORCH_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}  # keys: options.DTYPES


def weight_source(name: str, keys: Mapping[str, Any]) -> Source | None:
    """Where a canonical layer's weight is in this checkpoint: its key and, for a row block of a
    fused tensor (SDXL's second-tower q/k/v in ``in_proj_weight``), which block; ``None`` when
    the checkpoint lacks it. Text layers are found with or without ``text_model.``."""
    layer = families.find_layer(name)
    if layer is None:
        return None
    where = layer.tower.source(layer.diffusers + ".weight") if layer.tower else Source(layer.ldm_key)
    if where.key in keys:
        return where
    if layer.tower is not None and not layer.tower.openclip:  # old checkpoints without text_model.
        older = where.key.replace(".text_model.", ".", 1)
        return Source(older) if older in keys else None
    return None


def ldm_weight_key(name: str, keys: Mapping[str, Any]) -> str | None:
    """The checkpoint key holding a canonical layer's weight (a fused layer: the whole tensor)."""
    where = weight_source(name, keys)
    return where.key if where is not None else None


def _add_offset(stored: torch.Tensor, where: Source, delta: torch.Tensor) -> torch.Tensor:
    """``stored`` with ``delta`` added to the part ``where`` names (a row block, or all of it), in
    float32 and back to the stored dtype."""
    out = stored.to(torch.float32, copy=True)  # one copy, whatever the stored dtype
    part = where.of(out)  # a view of out's rows
    part += delta.float().reshape(part.shape)
    return out.to(stored.dtype)


def check_base_file(base: str | os.PathLike[str]) -> None:
    """The merge is written by copying the base file key for key, so the base must be a readable
    ``.safetensors``: refuse anything else (a ``.ckpt`` pickle, a missing or corrupt file) before any
    work, with the reader's message."""
    read_header(base)


def merge_metadata(
    method: str,
    params: Mapping[str, Any],
    loras: Sequence[Any],
    concepts: Sequence[str],
    base: Path,
    weights: Sequence[float] | None = None,
) -> dict[str, str]:
    """What a merged checkpoint records: method, parameters, every source LoRA (file, A1111 short
    hash, weight, concept) and the base (file name and short hash), so a merge can be reproduced."""
    weights = list(weights) if weights else [1.0] * len(loras)
    return {
        "loraclr_version": __version__,
        "loraclr_method": method,
        "loraclr_params": json.dumps(dict(params), sort_keys=True, default=str),
        "loraclr_sources": json.dumps(
            [
                {
                    "name": lora.name,
                    "file": lora.path.name,
                    "short_hash": lora.short_hash,
                    "weight": w,
                    "concept": c,
                }
                for lora, w, c in zip(loras, weights, concepts, strict=True)
            ]
        ),
        "loraclr_base": base.name,
        "loraclr_base_hash": file_sha256(base)[:10],
    }


def write_merged_checkpoint(
    base: str | os.PathLike[str],
    out: str | os.PathLike[str],
    offsets: Mapping[str, torch.Tensor],
    dtype: str = "fp16",
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Base tensors + offsets on the merged layers -> ``out`` (atomic). Returns ``out``."""
    base, out = Path(base), Path(out)
    if out.resolve() == base.resolve():
        raise LoraFileError(
            out, "is the base checkpoint itself; choose another output name (the base is never modified)"
        )
    if dtype not in DTYPES:
        raise LoraFileError(out, f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    target = _TORCH_DTYPES[dtype]
    tensors, base_meta = load_tensors(base)
    missing = []
    for name, delta in offsets.items():
        where = weight_source(name, tensors)
        if where is None:
            missing.append(name)
            continue
        tensors[where.key] = _add_offset(tensors[where.key], where, delta)
    if missing:
        family = families.owner(missing[0]) or families.DEFAULT
        raise LoraFileError(
            base,
            f"{len(missing)} merged layers are not in this checkpoint (e.g. {missing[0]}); is it {family.title}?",
        )
    for (
        key,
        tensor,
    ) in tensors.items():  # weights in the chosen precision; schedules and other buffers float32
        if tensor.is_floating_point():
            tensors[key] = tensor.to(target if key.endswith((".weight", ".bias")) else torch.float32)
    meta = {k: v for k, v in base_meta.items() if k == CONFIG_METADATA_KEY or not k.startswith("loraclr_")}
    meta.update(metadata or {})
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors({k: v.contiguous() for k, v in tensors.items()}, out, meta)
    log.info("wrote %s (%d merged layers, %s)", out, len(offsets), dtype)
    return out


def export_lora(
    offsets: Mapping[str, torch.Tensor],
    out: str | os.PathLike[str],
    rank: int,
    metadata: Mapping[str, str] | None = None,
    dtype: torch.dtype = torch.float16,
) -> Path:
    """The merge's change ``W' - W`` as a kohya LoRA (truncated SVD at ``rank``, alpha = rank)."""
    out = Path(out)
    tensors: dict[str, torch.Tensor] = {}
    for name, delta in offsets.items():
        delta = delta.float()
        matrix = delta.reshape(delta.shape[0], -1)
        r = max(1, min(rank, *matrix.shape))
        U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
        root = S[:r].sqrt()
        up = U[:, :r] * root
        down = root[:, None] * Vh[:r]
        if delta.dim() == 4:
            down = down.reshape(r, *delta.shape[1:])
            up = up[:, :, None, None]
        tensors[f"{name}.lora_up.weight"] = up.to(dtype).contiguous()
        tensors[f"{name}.lora_down.weight"] = down.to(dtype).contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(float(r))
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(rank),
        "ss_base_model_version": "sd_v1",
    }
    meta.update(metadata or {})
    atomic_save_safetensors(tensors, out, meta)
    return out
