"""Tiny LoRA files in every supported format, for tests and the built-in demo.

Each writer draws seeded factors for the given target layers (canonical name -> base weight
shape), writes them in that format's real key layout and returns the factors, so a test can
compute the expected delta on its own from the documented formula.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from lib_loraclr import families
from lib_loraclr.families import ModelFamily
from lib_loraclr.lora import keymap

Targets = Mapping[str, tuple[int, ...]]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(gen: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen) * scale


def _save(
    path: str | os.PathLike[str], tensors: dict[str, torch.Tensor], metadata: Mapping[str, str] | None
) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=dict(metadata or {}))
    return path


def write_kohya_lora(
    path: str | os.PathLike[str],
    targets: Targets,
    *,
    rank: int = 4,
    alpha: float | None = None,
    seed: int = 0,
    scale: float = 0.1,
    conv_mid: bool = False,
    metadata: Mapping[str, str] | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, dict[str, torch.Tensor]]:
    """kohya LoRA (2-D and 1x1 layers) / LoCon (kxk convs, optionally with ``lora_mid``)."""
    gen = _gen(seed)
    tensors: dict[str, torch.Tensor] = {}
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for name, shape in targets.items():
        out_dim, in_dim = shape[0], shape[1]
        if len(shape) == 4 and shape[2] * shape[3] > 1 and conv_mid:
            f = {
                "down": _randn(gen, rank, in_dim, 1, 1, scale=scale),
                "mid": _randn(gen, rank, rank, shape[2], shape[3], scale=scale),
                "up": _randn(gen, out_dim, rank, 1, 1, scale=scale),
            }
        elif len(shape) == 4:
            f = {
                "down": _randn(gen, rank, in_dim, shape[2], shape[3], scale=scale),
                "up": _randn(gen, out_dim, rank, 1, 1, scale=scale),
            }
        else:
            f = {
                "down": _randn(gen, rank, in_dim, scale=scale),
                "up": _randn(gen, out_dim, rank, scale=scale),
            }
        for part, tensor in f.items():
            tensors[f"{name}.lora_{part}.weight"] = tensor.to(dtype)
        if alpha is not None:
            tensors[f"{name}.alpha"] = torch.tensor(float(alpha))
        factors[name] = f
    _save(path, tensors, metadata)
    return factors


def write_loha(
    path: str | os.PathLike[str],
    targets: Targets,
    *,
    rank: int = 4,
    alpha: float | None = None,
    seed: int = 0,
    scale: float = 0.3,
    tucker: bool = False,
    metadata: Mapping[str, str] | None = None,
) -> dict[str, dict[str, torch.Tensor]]:
    """LyCORIS LoHa; ``tucker`` gives kxk convs ``hada_t1``/``hada_t2`` cores."""
    gen = _gen(seed)
    tensors: dict[str, torch.Tensor] = {}
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for name, shape in targets.items():
        out_dim, in_dim = shape[0], shape[1]
        kernel = shape[2:] if len(shape) == 4 else ()
        if tucker and kernel and kernel[0] * kernel[1] > 1:
            f = {
                "w1_a": _randn(gen, rank, out_dim, scale=scale),
                "w1_b": _randn(gen, rank, in_dim, scale=scale),
                "w2_a": _randn(gen, rank, out_dim, scale=scale),
                "w2_b": _randn(gen, rank, in_dim, scale=scale),
                "t1": _randn(gen, rank, rank, *kernel, scale=scale),
                "t2": _randn(gen, rank, rank, *kernel, scale=scale),
            }
        else:
            flat_in = in_dim * (kernel[0] * kernel[1] if kernel else 1)
            f = {
                "w1_a": _randn(gen, out_dim, rank, scale=scale),
                "w1_b": _randn(gen, rank, flat_in, scale=scale),
                "w2_a": _randn(gen, out_dim, rank, scale=scale),
                "w2_b": _randn(gen, rank, flat_in, scale=scale),
            }
            if kernel:
                f["w1_b"] = f["w1_b"].reshape(rank, in_dim, *kernel)
                f["w2_b"] = f["w2_b"].reshape(rank, in_dim, *kernel)
        for part, tensor in f.items():
            tensors[f"{name}.hada_{part}"] = tensor
        if alpha is not None:
            tensors[f"{name}.alpha"] = torch.tensor(float(alpha))
        factors[name] = f
    _save(path, tensors, metadata)
    return factors


def _split(dim: int) -> tuple[int, int]:
    """A factor pair (a, b) with a * b == dim and a small (LyCORIS's ``factorization``)."""
    for a in (4, 2, 8, 3):
        if dim % a == 0 and dim // a >= 1:
            return a, dim // a
    return 1, dim


def write_lokr(
    path: str | os.PathLike[str],
    targets: Targets,
    *,
    rank: int = 2,
    alpha: float | None = None,
    seed: int = 0,
    scale: float = 0.3,
    factorise_w1: bool = False,
    factorise_w2: bool = True,
    tucker: bool = False,
    metadata: Mapping[str, str] | None = None,
) -> dict[str, dict[str, torch.Tensor]]:
    """LyCORIS LoKr: ``kron(w1, w2)``, each side full or factorised (``_a``/``_b``), ``t2`` Tucker."""
    gen = _gen(seed)
    tensors: dict[str, torch.Tensor] = {}
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for name, shape in targets.items():
        (o1, o2), (i1, i2) = _split(shape[0]), _split(shape[1])
        kernel = tuple(shape[2:]) if len(shape) == 4 else ()
        f: dict[str, torch.Tensor] = {}
        if factorise_w1:
            f["w1_a"], f["w1_b"] = _randn(gen, o1, rank, scale=scale), _randn(gen, rank, i1, scale=scale)
        else:
            f["w1"] = _randn(gen, o1, i1, scale=scale)
        if tucker and kernel:
            f["w2_a"], f["w2_b"] = _randn(gen, rank, o2, scale=scale), _randn(gen, rank, i2, scale=scale)
            f["t2"] = _randn(gen, rank, rank, *kernel, scale=scale)
        elif factorise_w2:
            flat = i2 * (kernel[0] * kernel[1] if kernel else 1)
            f["w2_a"], f["w2_b"] = _randn(gen, o2, rank, scale=scale), _randn(gen, rank, flat, scale=scale)
        else:
            f["w2"] = _randn(gen, o2, i2, *kernel, scale=scale)
        for part, tensor in f.items():
            tensors[f"{name}.lokr_{part}"] = tensor
        if alpha is not None:
            tensors[f"{name}.alpha"] = torch.tensor(float(alpha))
        factors[name] = f
    _save(path, tensors, metadata)
    return factors


def write_diffusers_lora(
    path: str | os.PathLike[str],
    targets: Targets,
    *,
    rank: int = 4,
    seed: int = 0,
    scale: float = 0.1,
    style: str = "peft",
    alpha: float | None = None,
    metadata: Mapping[str, str] | None = None,
    family: ModelFamily = families.DEFAULT,
) -> dict[str, dict[str, torch.Tensor]]:
    """diffusers/PEFT layouts: ``style`` = ``peft`` (``lora_A``/``lora_B``), ``diffusers``
    (``lora.down``/``lora.up``) or ``processor`` (``attn1.processor.to_q_lora.down``); module
    paths and prefixes (``text_encoder_2.``) are ``family``'s."""
    gen = _gen(seed)
    tensors: dict[str, torch.Tensor] = {}
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for name, shape in targets.items():
        resolved = keymap.kohya_to_diffusers(name, family)
        if resolved is None or len(shape) != 2:
            continue
        side, module_path = resolved
        prefix = keymap.peft_prefix(side, family) + module_path
        f = {"down": _randn(gen, rank, shape[1], scale=scale), "up": _randn(gen, shape[0], rank, scale=scale)}
        if style == "peft":
            keys = {"down": f"{prefix}.lora_A.weight", "up": f"{prefix}.lora_B.weight"}
        elif style == "processor" and ".attn" in prefix and ".to_" in prefix:
            head, leaf = prefix.rsplit(".attn", 1)
            attn, proj = leaf.split(".", 1)
            proj = proj.replace("to_out.0", "to_out")
            keys = {p: f"{head}.attn{attn}.processor.{proj}_lora.{p}.weight" for p in ("down", "up")}
        else:
            keys = {p: f"{prefix}.lora.{p}.weight" for p in ("down", "up")}
        for part, key in keys.items():
            tensors[key] = f[part]
        if alpha is not None:
            tensors[f"{prefix}.alpha"] = torch.tensor(float(alpha))
        factors[name] = f
    _save(path, tensors, metadata)
    return factors


def write_sidecar(path: str | os.PathLike[str], activation_text: str, preferred_weight: float = 1.0) -> Path:
    """A1111's user metadata JSON next to a LoRA (what the card's edit dialog writes)."""
    sidecar = Path(path).with_suffix(".json")
    sidecar.write_text(
        json.dumps({"activation text": activation_text, "preferred weight": preferred_weight}),
        encoding="utf-8",
    )
    return sidecar


def layer_shapes(layer_map: Mapping[str, torch.nn.Module]) -> dict[str, tuple[int, ...]]:
    """Target shapes of a model's layer map (for the writers above)."""
    return {name: tuple(module.weight.shape) for name, module in layer_map.items()}


def standard_targets(
    shapes: Mapping[str, tuple[int, ...]], locon: bool = False
) -> dict[str, tuple[int, ...]]:
    """kohya's default LoRA targets (attention blocks + text encoder), plus resnets/samplers for LoCon."""
    picked = {}
    for name, shape in shapes.items():
        layer = families.find_layer(name)
        kind = layer.kind if layer is not None else ""
        if kind in ("attention", "text") or (locon and kind in ("resnet", "sampler")):
            picked[name] = shape
    return picked


def concept_loras(model, folder: str | os.PathLike[str], seeds, rank: int = 4, scale: float = 0.12) -> list:
    """kohya LoRAs of ``model``'s default targets, one per seed, written to ``folder`` and read back
    (the concepts of the merge tests, demo and benchmarks)."""
    from lib_loraclr.lora.file import load_lora

    targets = standard_targets(layer_shapes(model.layer_map()))
    loras = []
    for seed in seeds:
        path = Path(folder) / f"c{seed}.safetensors"
        write_kohya_lora(path, targets, rank=rank, alpha=float(rank), seed=seed, scale=scale)
        loras.append(load_lora(path, model_family=model.family.id))
    return loras
