"""A stand-in for a merge device without float64 (Apple's MPS, DirectML), on the CPU.

Inside :func:`float64_refused` every torch operation that produces a float64 tensor raises, unless
the tensor is one of the solve's small pieces: ``(L, K, K)``, ``(L, K)``, ``(K, K)``, ``(L,)``, their
views with unit axes, or a scalar, with ``L`` at most ``max_layers`` (distances, losses, keep-best, report sums). The check
runs at the dispatcher, below every Python API, so factories, in-place updates and library
internals (optimisers, linear algebra) are all seen.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class Float64Refused(RuntimeError):
    """A float64 tensor larger than the small pieces was made where float64 is refused."""


class _Refuse(TorchDispatchMode):
    def __init__(self, concepts: int, max_layers: int) -> None:
        super().__init__()
        self.K, self.max_layers = concepts, max_layers
        self.allowed = 0  # small float64 tensors seen (a test can check the pieces exist)

    def _small(self, shape: torch.Size) -> bool:
        dims = tuple(shape)  # (L, K, K) and its views: leading L (or K), then K or 1
        return not dims or (
            len(dims) <= 3
            and dims[0] <= max(self.max_layers, self.K)
            and all(d in (1, self.K) for d in dims[1:])
        )

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float64:
                if not self._small(tensor.shape):
                    raise Float64Refused(f"{func}: float64 {tuple(tensor.shape)} where float64 is refused")
                self.allowed += 1
        return out


@contextlib.contextmanager
def float64_refused(concepts: int, max_layers: int = 128) -> Iterator[_Refuse]:
    """Refuse float64 tensors other than the small ``(L, K, K)`` pieces inside the block."""
    mode = _Refuse(concepts, max_layers)
    with mode:
        yield mode
