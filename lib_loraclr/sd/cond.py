"""Conditioning as one value: the cross-attention context and whatever else a family's UNet takes.

SD1.x conditions its UNet on a context alone; SDXL also on a vector (the second text tower's
pooled output and the picture's size, crop and target-size embeddings), and a LoRA on that tower
changes both. Samplers, the merge's feature run and CLoRA stack, split and reorder conditioning by
batch rows without knowing what it holds, so it travels as one :class:`Cond` whose parts all have
the batch first; only the model that made it (the runtime's ``encode_prompt``) and the model that
takes it (``eps``) look inside.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class Cond:
    """A batch of conditioning. ``context`` is the cross-attention context ``(B, tokens, width)``;
    ``extra`` the family's other inputs by name (each ``(B, ...)``), empty for SD1.x."""

    context: torch.Tensor
    extra: Mapping[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, value in self.extra.items():
            if value.shape[0] != self.context.shape[0]:
                raise ValueError(
                    f"conditioning part {name!r} has {value.shape[0]} rows, the context {self.context.shape[0]}"
                )

    def __len__(self) -> int:
        return self.context.shape[0]

    @property
    def tokens(self) -> int:
        """Context tokens per row (77 per prompt chunk)."""
        return self.context.shape[1]

    @property
    def device(self) -> torch.device:
        return self.context.device

    def _map(self, fn: Any) -> Cond:
        return Cond(fn(self.context), {k: fn(v) for k, v in self.extra.items()})

    def rows(self, index: torch.Tensor | slice | Sequence[int]) -> Cond:
        """The rows ``index`` selects (a slice, a list or an index tensor), in that order."""
        if isinstance(index, slice):
            return self._map(lambda v: v[index])
        index = torch.as_tensor(index, device=self.device, dtype=torch.long)
        return self._map(lambda v: v.index_select(0, index.to(v.device)))

    def to(self, *args: Any, **kwargs: Any) -> Cond:
        """Every part moved or cast as ``Tensor.to`` would."""
        return self._map(lambda v: v.to(*args, **kwargs))

    def repeat(self, times: int) -> Cond:
        """The batch ``times`` over, one copy after another (``x.repeat(times, ...)``'s row order)."""
        return self._map(lambda v: v.repeat(times, *([1] * (v.ndim - 1))))

    def detach(self) -> Cond:
        return self._map(torch.Tensor.detach)


def cat(conds: Sequence[Cond]) -> Cond:
    """The rows of ``conds`` one after another; every one must have the same parts."""
    if not conds:
        raise ValueError("no conditioning to concatenate")
    names = set(conds[0].extra)
    for c in conds[1:]:
        if set(c.extra) != names:
            raise ValueError(f"cannot stack conditioning with parts {sorted(names)} and {sorted(c.extra)}")
    extra = {n: torch.cat([c.extra[n] for c in conds]) for n in conds[0].extra}
    return Cond(torch.cat([c.context for c in conds]), extra)
