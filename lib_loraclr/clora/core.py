"""CLoRA's sampling-time composition of one image (ALGORITHMS.md section 2).

An image's rows are ``(half, variant)`` with ``half`` 0 = prompt, 1 = negative; variant 0 is the
base prompt without LoRAs, variant k carries LoRA k (routing), style LoRAs are on every row. Per
denoiser call:

1. while ``step < max_step`` (and ``refine_iterations`` times at the refinement steps): the
   contrastive loss on the min-max normalised cross-attention maps of every concept group's
   tokens, its gradient through the UNet to the latent, and ``x -= step_size * grad`` (in place:
   the sampler continues from the updated latent);
2. masks per variant from its maps (``alpha * max`` threshold, union over its mask tokens,
   optional morphology; the base keeps what no concept claims), the fused prediction per CFG half
   ``sum_v M_v eps_v / sum_v M_v``, then CFG.

:class:`CloraCore` owns one image's plan, loss, masks, fusion and record;
:class:`~lib_loraclr.clora.batch.CloraBatch` runs the UNet passes, for one image or many images
at once. The reference denoises with the prediction computed BEFORE the last latent update (its
quirk); that is our default (``reuse_prediction``), which also saves a pass;
``reuse_prediction=False`` predicts again at the updated latent (as Attend-and-Excite does).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from lib_loraclr.clora.attention import AttentionMaps, map_size
from lib_loraclr.clora.batch import CloraBatch
from lib_loraclr.clora.maps import (  # noqa: F401 - the core's vocabulary, importable from here
    EmbeddingIndex,
    concept_heatmaps,
    concept_masks,
    embed,
    embedding_index,
    fuse,
    group_embeddings,
    group_overlap,
    masks_of,
    morph,
    normalise_maps,
    nt_xent,
    overlap_of,
    overlap_tensor,
    square,
)
from lib_loraclr.clora.prompts import ComposePlan
from lib_loraclr.clora.settings import CloraSettings

log = logging.getLogger(__name__)


@dataclass
class CloraState:
    """What a UI shows: the last masks and maps (on the model's device: copied only when they
    are shown), and every latent update's loss and overlap. Those are kept as device tensors
    and read back once, when first asked for, so that the step loop never waits for the device."""

    masks: torch.Tensor | None = None  # (variants, map pixels), last call
    maps: torch.Tensor | None = None  # (rows, map pixels, context tokens), last call
    map_hw: tuple[int, int] | None = None
    step: int = 0
    fused_calls: int = 0  # denoiser calls answered with a fused prediction
    last_uncond: torch.Tensor | None = None  # the last call's fused unconditional eps
    passes: dict[str, int] = field(default_factory=lambda: {"full": 0, "maps_only": 0, "no_grad": 0})
    _pending: list[tuple[int, torch.Tensor, torch.Tensor]] = field(default_factory=list, repr=False)
    _read: list[tuple[int, float, float]] = field(default_factory=list, repr=False)

    def record_update(self, step: int, loss: torch.Tensor, overlap: torch.Tensor) -> None:
        """One latent update's loss and cross-group overlap, not read back yet."""
        self._pending.append((step, loss.detach(), overlap.detach()))

    @property
    def updates(self) -> int:
        """Latent updates so far (without reading any value back)."""
        return len(self._read) + len(self._pending)

    def _read_back(self) -> list[tuple[int, float, float]]:
        if self._pending:
            values = torch.stack([torch.stack([loss, overlap]) for _, loss, overlap in self._pending])
            pairs = values.double().cpu().tolist()  # one transfer for all pending updates
            self._read += [(s, lo, ov) for (s, _, _), (lo, ov) in zip(self._pending, pairs, strict=True)]
            self._pending = []
        return self._read

    @property
    def losses(self) -> list[tuple[int, float, float]]:
        """``(step, loss, nan)``, one per update (the third slot is kept for the record's shape)."""
        return [(s, loss, float("nan")) for s, loss, _ in self._read_back()]

    @property
    def overlaps(self) -> list[tuple[int, float]]:
        """``(step, cross-group overlap)`` before each update (see :func:`group_overlap`)."""
        return [(s, overlap) for s, _, overlap in self._read_back()]


class CloraCore:
    """One image's composition: its plan, its rows, its loss, masks and fusion, and its record.

    ``eps_fn(x_rows, sigma_rows, rows)`` runs the (routed, hooked) UNet on the given rows of this
    image's layout and returns eps for them; ``maps`` is the :class:`AttentionMaps` its hooks fill.
    Both serve :meth:`denoise`, this image alone; many images in one UNet pass go through a
    :class:`~lib_loraclr.clora.batch.CloraBatch` of their cores, which brings its own ``eps_fn``.
    ``stop_early`` and ``trim_graph``: see :class:`~lib_loraclr.clora.batch.CloraBatch`.

    Latents are k-diffusion's ``x = z / sqrt(alpha_bar)``; the update is the reference's
    ``z <- z - step_size * dL/dz`` in the DDPM latent ``z`` the reference works on, which in ``x``
    is ``x <- x - step_size * (1 + sigma^2) * dL/dx`` (``z = x / sqrt(1 + sigma^2)``).
    """

    def __init__(
        self,
        plan: ComposePlan,
        settings: CloraSettings,
        eps_fn: Callable | None,
        maps: AttentionMaps,
        cfg_scale: float,
        check_interrupt: Callable[[], None] | None = None,
        stop_early: bool = True,
        trim_graph: bool = True,
    ) -> None:
        self.plan, self.settings = plan, settings
        self.variants = len(plan.prompts)
        self.eps_fn, self.maps, self.cfg_scale = eps_fn, maps, cfg_scale
        self.check_interrupt = check_interrupt or (lambda: None)
        self.stop_early, self.trim_graph = stop_early, trim_graph
        self.state = CloraState()
        V = self.variants
        self.all_rows = list(range(2 * V))
        self.loss_rows = list(range(V)) if settings.cond_only_loss else self.all_rows
        # the reference's quirk: the last update's pass also gives the prediction (at the latent
        # before that update); only possible when that pass covers every row
        self.reuses_prediction = settings.reuse_prediction and self.loss_rows == self.all_rows
        self.map_hw: tuple[int, int] | None = None
        self._updated_step: int | None = None  # the step whose latent updates already ran
        self._step_masks: tuple[int, torch.Tensor] | None = None  # (step, its masks): later calls reuse them
        self._index: dict[tuple[int, torch.device], EmbeddingIndex] = {}
        self._alone: CloraBatch | None = None  # this image alone, for denoise()

    def variant_rows(self, rows: Sequence[int]) -> list[list[int]]:
        """For each variant, the indices (within ``rows``) of its rows."""
        out: list[list[int]] = [[] for _ in range(self.variants)]
        for i, r in enumerate(rows):
            out[r % self.variants].append(i)
        return out

    def updates_at(self, step: int) -> int:
        """Latent updates at ``step``: one below ``max_step``, plus ``refine_iterations`` more at the
        refinement steps (the reference updates once, then repeats the update 20 times)."""
        s = self.settings
        if not s.updates_latents or step >= s.max_step or not self.plan.groups:
            return 0
        return 1 + (s.refine_iterations if step in s.refine_steps else 0)

    def begin(self, step: int | None, latent_hw: tuple[int, int]) -> tuple[bool, int]:
        """A denoiser call starts: ``(first call of its step, latent updates it makes)``.

        ``step``: the sampler's step index; without it the core counts its calls (right for
        samplers that call the denoiser once per step). A later call at the same step (Heun,
        DPM2, DPM++ SDE, Restart) makes no update and fuses with that step's first masks."""
        if step is not None:
            self.state.step = int(step)
        step = self.state.step
        self.map_hw = self.maps.hw or map_size(*latent_hw, self.settings.map_level)
        if self.map_hw[0] * self.map_hw[1] != self.maps.tokens:  # maps of another level (tests, custom UNets)
            self.map_hw = square(self.maps.tokens)
        first = step != self._updated_step
        self._updated_step = step
        return first, self.updates_at(step) if first else 0

    def latent_step(self, x: torch.Tensor, sigma: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """What one update subtracts from this image's latent ``x`` (1, c, h, w), from the loss
        gradient ``grad``.

        "paper": ``step_size * (1 + sigma^2) * grad``, the reference's step in ``z`` taken in
        ``x``. Its size depends on the gradient's scale, which falls with the number of map pixels
        (the loss averages over them): a step tuned for 16 x 16 maps saturates 2 x 2 ones and
        hardly moves 32 x 32 ones. "relative": the gradient's direction, scaled so that the update
        is ``relative_step`` times the latent's norm, whatever the resolution or the sigma."""
        s = self.settings
        if s.step_mode == "relative":
            # an image without an update this iteration has a zero gradient, and so a zero step
            ratio = s.relative_step * x.detach().float().norm() / grad.float().norm().clamp_min(1e-30)
            return (ratio * grad.float()).to(x.dtype)
        scale = s.step_size * (1 + sigma.double() ** 2)
        return scale.to(x.dtype).reshape(-1, 1, 1, 1) * grad

    def loss(self, maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The contrastive loss (differentiable) and the cross-group overlap (detached) from the
        maps of this image's :attr:`loss_rows`, in their order."""
        halves = len(self.loss_rows) // self.variants
        variant_maps = maps.reshape(halves, self.variants, *maps.shape[1:]).mean(dim=0)
        key = (variant_maps.shape[-1], variant_maps.device)
        index = self._index.get(key)
        if index is None:
            index = self._index[key] = embedding_index(self.plan, *key)
        embeddings = embed(variant_maps, index)
        loss = nt_xent(embeddings, index.labels, self.settings.temperature)
        return loss, overlap_tensor(embeddings, index.members)

    def denoise(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor | float,
        step: int | None = None,
        update_mask: torch.Tensor | None = None,
        cond_only: bool = False,
    ) -> torch.Tensor:
        """This image alone: :meth:`CloraBatch.denoise <lib_loraclr.clora.batch.CloraBatch.denoise>`
        with this core's ``eps_fn`` and ``maps``; ``x`` is updated in place."""
        if self._alone is None:
            self._alone = CloraBatch(
                [self], self.eps_fn, self.maps, self.check_interrupt, self.stop_early, self.trim_graph
            )
        return self._alone.denoise(x, sigma, step, update_mask, cond_only)

    def combine(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        eps: torch.Tensor,
        maps: torch.Tensor,
        first: bool = True,
        cond_only: bool = False,
    ) -> torch.Tensor:
        """The fused, guided denoised prediction of this image from every row's ``eps`` and maps.

        ``cond_only``: no guidance on this call, the fused prompt half alone (the host's "Skip
        Early CFG" and NGMS); ``state.last_uncond`` keeps the call's fused unconditional eps."""
        s, V = self.settings, self.variants
        step = self.state.step
        if not first and self._step_masks is not None and self._step_masks[0] == step:
            masks = self._step_masks[1]
        elif step >= s.mask_from_step:
            variant_maps = maps.reshape(2, V, *maps.shape[1:]).mean(dim=0)
            masks = masks_of(variant_maps, self.plan, s.mask_threshold, s.morphology, self.map_hw)
        else:  # the reference before apply_mask_after: every variant everywhere (a plain average)
            masks = torch.ones(V, maps.shape[1], device=x.device)
        self._step_masks = (step, masks)
        fused = fuse(eps, masks, V, tuple(x.shape[-2:]), self.map_hw)  # (2, 1, c, h, w)
        guided = fused[0] if cond_only else fused[1] + self.cfg_scale * (fused[0] - fused[1])
        self.state.last_uncond = fused[0] if cond_only else fused[1]  # as the host: cond when skipped
        self.state.masks, self.state.maps = masks, maps.detach()
        self.state.map_hw = self.map_hw
        self.state.fused_calls += 1
        self.state.step += 1
        return x - sigma.reshape(-1, 1, 1, 1).to(x.dtype) * guided
