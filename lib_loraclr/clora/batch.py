"""One UNet pass for a whole batch of CLoRA images: every image's variants are rows of one call.

Each image keeps its own :class:`~lib_loraclr.clora.core.CloraCore` (plan, masks, loss, record);
the batch lays their rows out image after image (each image's ``(half, variant)`` rows in a
block), runs each pass once for all of them, and hands every core its slice of the maps and of
the predictions. The latent update differentiates the SUM of the images' losses: images are
independent rows of the UNet, so each image's gradient is the gradient of its own loss, exactly
the step it would take alone (a mean over the batch would shrink each step by 1 / images).

Nothing in a denoiser call reads a value back to the host: the row indices are built once per
selection of rows, and losses are recorded as device tensors (see ``CloraState``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from lib_loraclr.clora.attention import AttentionMaps, StopForward, pass_grad_mode


class Rows(tuple):
    """The rows of one pass (a tuple of row numbers of the batch's layout) with, on the pass's
    device, ``index`` (the same numbers) and ``images`` (each row's image, its latent's position
    in ``x``), for ``index_select``: made once per selection, since a tensor built from a list
    per pass is a host-to-device copy that waits for the device."""

    index: torch.Tensor
    images: torch.Tensor


class CloraBatch:
    """Images' cores sampled together: ``denoise(x, sigma)`` once per denoiser call, ``x`` holding
    one latent per core (in the cores' order).

    ``eps_fn(x_rows, sigma_rows, rows)`` runs the (routed, hooked) UNet on ``rows`` (a
    :class:`Rows`) of the batch's layout, image ``b``'s rows being ``offsets[b] + r`` for its
    core's rows ``r``, and returns eps for them; ``maps`` is the capture its hooks fill.
    ``stop_early`` lets maps-only passes end after the last map layer, ``trim_graph`` lets a
    pass that gives both the loss and the prediction record its graph only up to the last map
    layer (the prediction is used without its gradient: same results, less memory and time);
    both are off only to measure them.
    """

    def __init__(
        self,
        cores: Sequence[Any],
        eps_fn: Callable,
        maps: AttentionMaps,
        check_interrupt: Callable[[], None] | None = None,
        stop_early: bool = True,
        trim_graph: bool = True,
    ) -> None:
        self.cores, self.eps_fn, self.maps = list(cores), eps_fn, maps
        self.check_interrupt = check_interrupt or (lambda: None)
        self.stop_early, self.trim_graph = stop_early, trim_graph
        self.offsets = [0]
        for core in self.cores:
            self.offsets.append(self.offsets[-1] + len(core.all_rows))
        self._rows: dict[tuple, tuple[Rows, list[int]]] = {}

    def rows(self, images: Sequence[int], loss: bool, device: torch.device) -> tuple[Rows, list[int]]:
        """The rows of ``images`` (their loss rows, or all) and how many each image has; cached
        per selection."""
        key = (tuple(images), loss, device)
        found = self._rows.get(key)
        if found is None:
            per = [self.cores[b].loss_rows if loss else self.cores[b].all_rows for b in images]
            rows = Rows(self.offsets[b] + r for b, local in zip(images, per, strict=True) for r in local)
            rows.index = torch.tensor(list(rows), dtype=torch.long, device=device)
            image_of = [b for b, local in zip(images, per, strict=True) for _ in local]
            rows.images = torch.tensor(image_of, dtype=torch.long, device=device)
            found = self._rows[key] = (rows, [len(p) for p in per])
        return found

    def _pass(
        self, x: torch.Tensor, sigma: torch.Tensor, images: Sequence[int], loss: bool, maps_only: bool
    ) -> tuple[list[torch.Tensor] | None, list[torch.Tensor]]:
        """One UNet pass over ``images``' rows: per image its eps (``None`` for a pass cut short
        after the maps) and its maps."""
        rows, counts = self.rows(images, loss, x.device)
        grad = torch.is_grad_enabled()
        self.maps.reset(stop_early=maps_only and self.stop_early, trim_graph=grad and self.trim_graph)
        kind = "maps_only" if maps_only else ("full" if grad else "no_grad")
        for b in images:
            self.cores[b].state.passes[kind] += 1
        try:
            with pass_grad_mode():
                eps = self.eps_fn(x.index_select(0, rows.images), sigma.index_select(0, rows.images), rows)
        except StopForward:
            eps = None
        if eps is not None and self.maps.expected_layers is None:
            self.maps.expected_layers = self.maps.layers  # later maps-only passes stop after the last one
        maps = list(self.maps.mean().split(counts))
        return (None if eps is None else list(eps.split(counts))), maps

    def denoise(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor | float,
        step: int | None = None,
        update_mask: torch.Tensor | None = None,
        cond_only: bool = False,
    ) -> torch.Tensor:
        """The fused, guided denoised prediction of every image at ``x``; ``x`` is updated in
        place by the latent updates, so the sampler continues from the updated latent.

        ``step``: the sampler's step index (see ``CloraCore.begin``): the latent updates run on a
        step's first call, a later call at the same step only predicts and fuses. ``update_mask``
        (broadcast to ``x``): where the update may change ``x`` (inpainting: the host's
        ``nmask``). ``cond_only``: no guidance on this call (the host's "Skip Early CFG", NGMS)."""
        cores = self.cores
        sigma_rows = _sigma_rows(sigma, len(cores), x.device)
        started = [core.begin(step, tuple(x.shape[-2:])) for core in cores]
        eps: list[torch.Tensor | None] = [None] * len(cores)
        maps: list[torch.Tensor | None] = [None] * len(cores)
        for it in range(max((updates for _, updates in started), default=0)):
            self.check_interrupt()
            active = [b for b, (_, updates) in enumerate(started) if it < updates]
            wanted = [b for b in active if cores[b].reuses_prediction and it == started[b][1] - 1]
            grad, pass_eps, pass_maps = self._update_gradient(x, sigma_rows, active, not wanted)
            for b in wanted:
                i = active.index(b)
                eps[b], maps[b] = pass_eps[i].detach(), pass_maps[i].detach()
            step_x = torch.cat(
                [
                    core.latent_step(x[b : b + 1], sigma_rows[b : b + 1], grad[b : b + 1])
                    for b, core in enumerate(cores)
                ]
            )
            with torch.no_grad():
                x.sub_(step_x if update_mask is None else step_x * update_mask.to(x.dtype))
        pending = [b for b in range(len(cores)) if eps[b] is None]
        if pending:
            self.check_interrupt()
            with torch.no_grad():
                pass_eps, pass_maps = self._pass(x, sigma_rows, pending, loss=False, maps_only=False)
            for i, b in enumerate(pending):
                eps[b], maps[b] = pass_eps[i], pass_maps[i]
        with torch.no_grad():
            return torch.cat(
                [
                    core.combine(
                        x[b : b + 1], sigma_rows[b : b + 1], eps[b], maps[b], started[b][0], cond_only
                    )
                    for b, core in enumerate(cores)
                ]
            )

    def _update_gradient(
        self, x: torch.Tensor, sigma: torch.Tensor, images: list[int], maps_only: bool
    ) -> tuple[torch.Tensor, list[torch.Tensor] | None, list[torch.Tensor]]:
        """``d(sum of images' losses)/dx`` (zero for images not in ``images``), each image's loss
        and overlap recorded, and the pass's eps and maps per image."""
        with torch.enable_grad():
            z = x.detach().requires_grad_(True)
            pass_eps, pass_maps = self._pass(z, sigma, images, loss=True, maps_only=maps_only)
            results = [self.cores[b].loss(m) for b, m in zip(images, pass_maps, strict=True)]
            (grad,) = torch.autograd.grad(sum(loss for loss, _ in results), z)
        for b, (loss, overlap) in zip(images, results, strict=True):
            core = self.cores[b]
            core.state.record_update(core.state.step, loss, overlap)
        return grad, pass_eps, pass_maps


def _sigma_rows(sigma: torch.Tensor | float, images: int, device: torch.device) -> torch.Tensor:
    """One float32 sigma per image, from a scalar, a 0-dim / one-element tensor or one per image."""
    if not torch.is_tensor(sigma):
        return torch.full((images,), float(sigma), device=device)
    flat = sigma.reshape(-1).to(device, torch.float32)
    return flat.expand(images) if flat.numel() == 1 else flat
