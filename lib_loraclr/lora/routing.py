"""Per-batch-row LoRA routing: every row of one batch gets its own set of LoRAs.

Both methods run several "concept branches" at once: the merge records each concept's features
with its own LoRA, and CLoRA denoises the base prompt without LoRAs beside one variant per LoRA.
Switching weights between sequential passes costs one pass per branch; routing instead adds each
row's low-rank paths inside the patched layers, so all branches share ONE forward pass:

    y[rows of b] = x[rows of b] W^T + bias + sum_{k in loras(b)} m_k * (x[rows of b] dW_k^T)

The weights are never touched; the hooks are forward hooks removed in ``finally``, so the layers
are byte-identical afterwards, also after an exception, and the result is differentiable (CLoRA
back-propagates through it to the latent). Forward hooks fire around whatever ``forward`` the host
installed (the WebUI's attention optimisations, its built-in Lora extension), so routing coexists
with them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lib_loraclr.errors import LoraClrError

if TYPE_CHECKING:
    from lib_loraclr.lora.file import LoraFile

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoutedLora:
    """One LoRA on one row, with A1111's two multipliers (text encoder, UNet)."""

    lora: LoraFile
    te_multiplier: float = 1.0
    unet_multiplier: float = 1.0

    def multiplier(self, layer_name: str) -> float:
        return self.te_multiplier if is_text_encoder_layer(layer_name) else self.unet_multiplier


def is_text_encoder_layer(layer_name: str) -> bool:
    """A1111 applies the ``te`` multiplier to text-encoder modules and ``unet`` to the rest."""
    return layer_name.startswith("lora_te")


class RoutingError(LoraClrError, RuntimeError):
    """The batch that reached a routed layer does not have the rows the router was told about."""


@dataclass(frozen=True)
class _Group:
    """Rows that share one (LoRA, multiplier): one low-rank pass serves all of them."""

    lora_index: int
    te_multiplier: float
    unet_multiplier: float
    rows: tuple[int, ...]


class LoraRouter:
    """Holds the current row assignment that the installed hooks read.

    Made by :func:`route_loras`; set the rows before each forward pass whose batch layout differs
    (the text encoder and the UNet usually see different batches).
    """

    def __init__(self, loras: Sequence[LoraFile]) -> None:
        self.loras = list(loras)
        self._index = {id(lora): i for i, lora in enumerate(self.loras)}
        self._batch: int | None = None
        self._groups: tuple[_Group, ...] = ()
        self._rows_cache: dict[tuple[int, torch.device], torch.Tensor] = {}
        self._moved: dict[tuple[int, torch.device, torch.dtype], Any] = {}
        self.enabled = True

    def set_rows(self, rows: Sequence[Sequence[RoutedLora]] | None) -> None:
        """Assign LoRAs per batch row (``rows[b]`` for row ``b``); ``None`` routes nothing."""
        self._rows_cache.clear()
        if rows is None:
            self._batch, self._groups = None, ()
            return
        grouped: dict[tuple[int, float, float], list[int]] = {}
        for row, routed_loras in enumerate(rows):
            for routed in routed_loras:
                index = self._index.get(id(routed.lora))
                if index is None:
                    raise RoutingError(
                        f"LoRA {routed.lora.name!r} was not installed with route_loras(); pass it in `loras`"
                    )
                key = (index, float(routed.te_multiplier), float(routed.unet_multiplier))
                grouped.setdefault(key, []).append(row)
        self._batch = len(rows)
        self._groups = tuple(_Group(i, te, unet, tuple(r)) for (i, te, unet), r in grouped.items())

    @contextmanager
    def rows(self, rows: Sequence[Sequence[RoutedLora]] | None) -> Iterator[LoraRouter]:
        """Use ``rows`` inside the block and restore the previous assignment afterwards."""
        previous = (self._batch, self._groups)
        self.set_rows(rows)
        try:
            yield self
        finally:
            self._batch, self._groups = previous
            self._rows_cache.clear()

    def _row_index(self, group_number: int, group: _Group, device: torch.device) -> torch.Tensor:
        key = (group_number, device)
        index = self._rows_cache.get(key)
        if index is None:
            index = torch.tensor(group.rows, dtype=torch.long, device=device)
            self._rows_cache[key] = index
        return index

    def _forward_delta(self, module: Any, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        """``x dW^T`` for one LoRA module, its factors moved to ``x``'s device and dtype once."""
        if hasattr(module, "to"):
            key = (id(module), x.device, x.dtype)
            moved = self._moved.get(key)
            if moved is None:
                moved = self._moved[key] = module.to(device=x.device, dtype=x.dtype)
            module = moved
        return module.forward_delta(x, layer)

    def apply(self, layer_name: str, layer: nn.Module, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """The routed output of ``layer`` for input ``x`` (called by the forward hook)."""
        if not self.enabled or not self._groups:
            return output
        if x.shape[0] != self._batch:
            raise RoutingError(
                f"layer {layer_name} got a batch of {x.shape[0]} rows, but the router was set for "
                f"{self._batch}; call router.set_rows() with one entry per row of this pass"
            )
        text_encoder = is_text_encoder_layer(layer_name)
        for number, group in enumerate(self._groups):
            module = self.loras[group.lora_index].modules.get(layer_name)
            if module is None:
                continue
            multiplier = group.te_multiplier if text_encoder else group.unet_multiplier
            if multiplier == 0.0:
                continue
            if len(group.rows) == self._batch:
                delta = self._forward_delta(module, x, layer)
                output = output + (multiplier * delta).to(output.dtype)
            else:
                index = self._row_index(number, group, x.device)
                delta = self._forward_delta(module, x.index_select(0, index), layer)
                output = output.index_add(0, index, (multiplier * delta).to(output.dtype))
        return output


@contextmanager
def route_loras(layer_map: Mapping[str, nn.Module], loras: Sequence[LoraFile]) -> Iterator[LoraRouter]:
    """Install routing hooks on every layer of ``layer_map`` that any of ``loras`` touches.

    Yields a :class:`LoraRouter` with no rows set (plain model). Layers a LoRA names but the
    model lacks are reported once, not silently dropped.
    """
    router = LoraRouter(loras)
    handles = []
    missing: set[str] = set()
    try:
        touched = sorted({name for lora in loras for name in lora.modules})
        for name in touched:
            layer = layer_map.get(name)
            if layer is None:
                missing.add(name)
                continue
            handles.append(layer.register_forward_hook(_make_hook(router, name)))
        if missing:
            log.warning(
                "%d LoRA layer(s) have no matching layer in the model and are ignored, e.g. %s",
                len(missing),
                ", ".join(sorted(missing)[:3]),
            )
        yield router
    finally:
        for handle in handles:
            handle.remove()
        router._moved.clear()


def _make_hook(router: LoraRouter, name: str):
    def hook(layer: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        return router.apply(name, layer, args[0], output)

    return hook
