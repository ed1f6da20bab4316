"""Scoped changes to a model for differentiable passes, each restored in ``finally``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn


@contextlib.contextmanager
def frozen_parameters(module: Any) -> Iterator[None]:
    """``requires_grad=False`` on every parameter of ``module`` for the block, then as before.

    CLoRA needs gradients with respect to the latent only. The WebUI's parameters require grad,
    and its built-in Lora extension copies weights in place during forward, which autograd
    refuses on such leaves while gradients are enabled; freezing them also saves memory.
    """
    changed = [p for p in module.parameters() if p.requires_grad]
    for parameter in changed:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter in changed:
            parameter.requires_grad_(True)


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
