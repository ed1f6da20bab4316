"""Scoped changes to a model for differentiable passes, each restored in ``finally``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn


@contextlib.contextmanager
def frozen_parameters(*modules: Any) -> Iterator[None]:
    """``requires_grad=False`` on every parameter of ``modules`` for the block, then as before.

    CLoRA needs gradients with respect to the latent only. The WebUI's parameters require grad,
    and its built-in Lora extension copies weights in place during forward, which autograd
    refuses on such leaves while gradients are enabled; freezing them also saves memory.
    """
    changed = [p for module in modules for p in module.parameters() if p.requires_grad]
    for parameter in changed:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter in changed:
            parameter.requires_grad_(True)


# The flags that make a block recompute itself instead of keeping its graph: ldm's
# ``BasicTransformerBlock.checkpoint`` and ``ResBlock.use_checkpoint`` (A1111's stock
# v1-inference.yaml sets ``use_checkpoint: True``), diffusers' ``gradient_checkpointing``.
CHECKPOINT_FLAGS = ("checkpoint", "use_checkpoint", "gradient_checkpointing")


@contextlib.contextmanager
def checkpointing_disabled(module: Any) -> Iterator[None]:
    """Gradient checkpointing off on every submodule of ``module`` for the block, then as before.

    ldm runs a checkpointed block's forward under ``torch.no_grad()`` and recomputes it in the
    backward pass; its output still has a graph, but what a hook captures INSIDE the block (CLoRA's
    attention maps) has none, so ``torch.autograd.grad`` of a loss on those maps fails ("element 0
    of tensors does not require grad"), and its backward differentiates the block's parameters too,
    which fails on frozen ones. Only flags that are exactly ``True`` are touched.
    """
    changed = []
    try:
        for submodule in module.modules():
            for flag in CHECKPOINT_FLAGS:
                if submodule.__dict__.get(flag) is True:
                    setattr(submodule, flag, False)
                    changed.append((submodule, flag))
        yield
    finally:
        for submodule, flag in changed:
            setattr(submodule, flag, True)


@contextlib.contextmanager
def offsets_applied(layers: Mapping[str, nn.Module], offsets: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Temporarily add offsets to the live weights; the exact original bytes come back in ``finally``."""
    saved = {}
    try:
        with torch.no_grad():
            for name, delta in offsets.items():
                weight = layers[name].weight
                saved[name] = weight.detach().clone()
                weight.add_(delta.reshape(weight.shape).to(device=weight.device, dtype=weight.dtype))
        yield
    finally:
        with torch.no_grad():
            for name, original in saved.items():
                layers[name].weight.copy_(original)
