"""What one layer of a LoRA adds to a weight, per format (the parsers are in ``formats.py``).

The weight delta of every format matches what A1111 1.8.0's built-in Lora extension adds to the
layer's weight (``extensions-builtin/Lora/network_*.py``, read as a behavioural reference):

- LoRA / LoCon (kohya): ``dW = s * up @ down`` (convs: ``up`` 1x1, ``down`` kxk, flattened), with
  ``lora_mid`` (CP): ``dW[o,i,k,l] = s * sum_nm up[o,n] mid[n,m,k,l] down[m,i]``;
  ``s = alpha / rank`` (``rank = down.shape[0]``), ``s = 1`` without alpha (alpha = rank).
- LoHa: ``dW = s * (w1a @ w1b) * (w2a @ w2b)`` (Hadamard); with Tucker cores ``t1``/``t2``
  each factor is ``einsum(t, wa, wb)``; ``rank = w1b.shape[0]``.
- LoKr: ``dW = s * kron(w1, w2)`` with ``w1 = w1a @ w1b`` and ``w2 = w2a @ w2b`` (or the
  Tucker form with ``t2``) when factorised; ``s = alpha / rank`` only if a factorised side gives
  a rank, else 1.
- diffusers / PEFT (``lora_A``/``lora_B``, ``lora.down``/``lora.up``): as LoRA.

The result is reshaped to the target layer's shape when the element counts agree (a 2-D LoRA on
a 1x1 conv), as the built-in does.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


def _as_float(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


@dataclass(frozen=True, eq=False)
class LoraModule:
    """One target layer of one LoRA file at multiplier 1 (see module docstring for formulas).

    Immutable: nothing is cached on it; a caller that runs it many times on a device keeps the
    copy :meth:`to` gives for as long as it needs it (routing: the life of its hooks).
    """

    name: str
    format: str
    keys: tuple[str, ...]  # the file keys this module was built from
    scale: float

    @property
    def rank(self) -> int | None:
        return None

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of :meth:`delta`, from the factor shapes alone (no delta is built)."""
        return tuple(self.delta().shape)

    def _full(self) -> torch.Tensor:
        raise NotImplementedError

    def delta(
        self, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """The full weight delta ``dW`` (scale included), shaped like the target weight."""
        return (self._full() * self.scale).to(dtype=dtype, device=device)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> LoraModule:
        """A copy ready to run on ``device``: its factors moved (routing calls this once per
        device and dtype and keeps the copy while its hooks are installed)."""
        moved = {name: t.to(device=device, dtype=dtype) for name, t in self.tensors().items()}
        return dataclasses.replace(self, **moved)

    def forward_delta(self, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        """``x dW^T`` (conv: ``conv2d(x, dW)`` with the layer's geometry); dense by default."""
        return apply_dense(fit_to_layer(self.delta(x.dtype, x.device), layer), x, layer)


def fit_to_layer(delta: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """Reshape a delta to the layer's weight shape when the element counts agree."""
    weight = layer.weight
    if delta.shape != weight.shape and delta.numel() == weight.numel():
        return delta.reshape(weight.shape)
    return delta


def apply_dense(delta: torch.Tensor, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    if isinstance(layer, nn.Conv2d):
        return F.conv2d(x, delta, None, layer.stride, layer.padding, layer.dilation, layer.groups)
    return F.linear(x, delta)


@dataclass(frozen=True, eq=False)
class DenseModule(LoraModule):
    """A module given by its full delta (scale included): what a Hadamard or Kronecker module
    becomes on a device, so repeated forward passes do not rebuild it."""

    weight: torch.Tensor = None  # type: ignore[assignment]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.weight.shape)

    def _full(self) -> torch.Tensor:
        return self.weight

    def forward_delta(self, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        return apply_dense(fit_to_layer(self.weight.to(x.dtype), layer), x, layer)


@dataclass(frozen=True, eq=False)
class LowRankModule(LoraModule):
    """kohya LoRA/LoCon and diffusers/PEFT: ``up @ (mid) @ down``."""

    up: torch.Tensor = None  # type: ignore[assignment]
    down: torch.Tensor = None  # type: ignore[assignment]
    mid: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def shape(self) -> tuple[int, ...]:
        out, fan_in = int(self.up.shape[0]), int(self.down.shape[1])
        if self.mid is not None:
            return (out, fan_in, *self.mid.shape[2:])
        return (out, fan_in, *self.down.shape[2:])

    def _full(self) -> torch.Tensor:
        up, down = _as_float(self.up), _as_float(self.down)
        up2, down2 = up.reshape(up.shape[0], -1), down.reshape(down.shape[0], -1)
        if self.mid is not None:
            return torch.einsum("nmkl,in,mj->ijkl", _as_float(self.mid), up2, down2)
        product = up2 @ down2
        if down.dim() == 4:
            return product.reshape(up.shape[0], down.shape[1], *down.shape[2:])
        return product

    def forward_delta(self, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        """Through the rank-r bottleneck: ``(x down^T) up^T`` (convs: kxk down conv, 1x1 up)."""
        down, up = self.down.to(x.dtype), self.up.to(x.dtype)
        if isinstance(layer, nn.Linear) and down.dim() == 2 and self.mid is None:
            return F.linear(F.linear(x, down), up) * self.scale
        if isinstance(layer, nn.Conv2d) and layer.groups == 1:
            down = down if down.dim() == 4 else down[:, :, None, None]
            up = up if up.dim() == 4 else up[:, :, None, None]
            if self.mid is None and down.shape[1] == layer.in_channels:
                h = F.conv2d(x, down, None, layer.stride, layer.padding, layer.dilation)
                return F.conv2d(h, up) * self.scale
            if self.mid is not None:
                h = F.conv2d(x, down)
                h = F.conv2d(h, self.mid.to(x.dtype), None, layer.stride, layer.padding, layer.dilation)
                return F.conv2d(h, up) * self.scale
        return super().forward_delta(x, layer)


def _cp(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """Tucker/CP rebuild used by LoHa and LoKr: ``einsum(t[i,j,k,l], wa[i,r], wb[j,s]) -> [r,s,k,l]``."""
    temp = torch.einsum("ijkl,jr->irkl", _as_float(t), _as_float(wb))
    return torch.einsum("ijkl,ir->rjkl", temp, _as_float(wa))


def _product(wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    wa, wb = _as_float(wa), _as_float(wb)
    product = wa @ wb.reshape(wb.shape[0], -1)
    if wb.dim() == 4:
        return product.reshape(wa.shape[0], *wb.shape[1:])
    return product


class _DenseOnDevice:
    """For formats without a cheaper path than the dense delta: :meth:`to` builds it once."""

    def to(self, device=None, dtype=None) -> LoraModule:
        weight = self.delta(dtype or torch.float32, device)
        return DenseModule(self.name, self.format, self.keys, 1.0, weight=weight)


@dataclass(frozen=True, eq=False)
class LohaModule(_DenseOnDevice, LoraModule):
    w1a: torch.Tensor = None  # type: ignore[assignment]
    w1b: torch.Tensor = None  # type: ignore[assignment]
    w2a: torch.Tensor = None  # type: ignore[assignment]
    w2b: torch.Tensor = None  # type: ignore[assignment]
    t1: torch.Tensor | None = None
    t2: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return int(self.w1b.shape[0])

    @property
    def shape(self) -> tuple[int, ...]:
        if self.t1 is not None:
            return (int(self.w1a.shape[1]), int(self.w1b.shape[1]), *self.t1.shape[2:])
        return (int(self.w1a.shape[0]), int(self.w1b.shape[1]), *self.w1b.shape[2:])

    def _full(self) -> torch.Tensor:
        first = _cp(self.t1, self.w1a, self.w1b) if self.t1 is not None else _product(self.w1a, self.w1b)
        second = _cp(self.t2, self.w2a, self.w2b) if self.t2 is not None else _product(self.w2a, self.w2b)
        return first * second


@dataclass(frozen=True, eq=False)
class LokrModule(_DenseOnDevice, LoraModule):
    w1: torch.Tensor | None = None
    w1a: torch.Tensor | None = None
    w1b: torch.Tensor | None = None
    w2: torch.Tensor | None = None
    w2a: torch.Tensor | None = None
    w2b: torch.Tensor | None = None
    t2: torch.Tensor | None = None
    target_shape: tuple[int, ...] | None = None

    @property
    def rank(self) -> int | None:
        return lokr_rank(self.w1b, self.w2b)

    @property
    def shape(self) -> tuple[int, ...]:
        o1, i1 = (self.w1.shape if self.w1 is not None else (self.w1a.shape[0], self.w1b.shape[1]))[:2]
        if self.w2 is not None:
            w2_shape = tuple(self.w2.shape)
        elif self.t2 is not None:
            w2_shape = (self.w2a.shape[1], self.w2b.shape[1], *self.t2.shape[2:])
        else:
            w2_shape = (self.w2a.shape[0], _numel(tuple(self.w2b.shape[1:])))
        product = (int(o1) * int(w2_shape[0]), int(i1) * int(w2_shape[1]), *w2_shape[2:])
        if self.target_shape is not None and _numel(product) == _numel(self.target_shape):
            return tuple(self.target_shape)
        return product

    def _full(self) -> torch.Tensor:
        w1 = _as_float(self.w1) if self.w1 is not None else _as_float(self.w1a) @ _as_float(self.w1b)
        if self.w2 is not None:
            w2 = _as_float(self.w2)
        elif self.t2 is not None:
            w2 = _cp(self.t2, self.w2a, self.w2b)
        else:
            w2 = _as_float(self.w2a) @ _as_float(self.w2b).reshape(self.w2b.shape[0], -1)
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        product = torch.kron(w1.contiguous(), w2.contiguous())
        if self.target_shape is not None and product.numel() == _numel(self.target_shape):
            return product.reshape(self.target_shape)
        return product


def lokr_rank(w1b: torch.Tensor | None, w2b: torch.Tensor | None) -> int | None:
    """The rank A1111 scales LoKr by: ``w2_b``'s if factorised, else ``w1_b``'s, else none (scale 1)."""
    if w2b is not None:
        return int(w2b.shape[0])
    if w1b is not None:
        return int(w1b.shape[0])
    return None


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)
