"""CLoRA's sampling-time composition (ALGORITHMS.md section 2), called once per denoiser call.

Rows of one batched UNet pass: ``(half, variant, image)`` with ``half`` 0 = prompt, 1 = negative;
variant 0 is the base prompt without LoRAs, variant k carries LoRA k (routing), style LoRAs are on
every row. Per call:

1. while ``step < max_step`` (and ``refine_iterations`` times at the refinement steps): the
   contrastive loss on the min-max normalised cross-attention maps of every concept group's
   tokens, its gradient through the UNet to the latent, and ``x -= step_size * grad`` (in place:
   the sampler continues from the updated latent);
2. masks per variant from its maps (``alpha * max`` threshold, union over its mask tokens,
   optional morphology; the base keeps what no concept claims), the fused prediction per CFG half
   ``sum_v M_v eps_v / sum_v M_v``, then CFG.

The reference denoises with the prediction computed BEFORE the last latent update (its quirk);
that is our default (``reuse_prediction``), which also saves a pass; ``reuse_prediction=False``
predicts again at the updated latent (as Attend-and-Excite does).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lib_loraclr.clora.attention import AttentionMaps, StopForward, map_size
from lib_loraclr.clora.prompts import ComposePlan
from lib_loraclr.clora.settings import CloraSettings

log = logging.getLogger(__name__)


def normalise_maps(maps: torch.Tensor) -> torch.Tensor:
    """Min-max normalise each map (last dim = pixels) to [0, 1]."""
    low = maps.min(dim=-1, keepdim=True).values
    high = maps.max(dim=-1, keepdim=True).values
    return (maps - low) / (high - low).clamp_min(1e-8)


def nt_xent(embeddings: torch.Tensor, labels: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """NT-Xent / InfoNCE with group labels (pytorch_metric_learning's ``NTXentLoss`` definition):
    for every ordered positive pair (a, p), ``-log(e^{s_ap/t} / (e^{s_ap/t} + sum_n e^{s_an/t}))``
    over the anchor's negatives n, with cosine similarity s; the mean over positive pairs."""
    z = F.normalize(embeddings, dim=-1)
    sim = (z @ z.T) / temperature
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    positive = same & ~eye
    negative = ~same
    if not positive.any():
        return embeddings.sum() * 0
    neg_exp = torch.where(negative, sim, torch.full_like(sim, float("-inf")))
    neg_lse = torch.logsumexp(neg_exp, dim=1, keepdim=True).expand_as(sim)  # log sum_n e^{s_an}
    denominator = torch.logaddexp(sim, neg_lse)
    losses = denominator - sim
    return losses[positive].mean()


def group_embeddings(
    maps: torch.Tensor, plan: ComposePlan, variant_rows: Sequence[Sequence[int]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """One embedding per (group member token): its map, min-max normalised; labels = group index.

    ``maps`` is (rows, pixels, context tokens); each variant's map is the mean over its rows.
    """
    embeddings, labels = [], []
    for v, rows in enumerate(variant_rows):
        variant_map = maps[list(rows)].mean(dim=0)  # (pixels, tokens)
        for g, members in enumerate(plan.groups):
            for position in members[v]:
                if position < variant_map.shape[1]:
                    embeddings.append(variant_map[:, position])
                    labels.append(g)
    if not embeddings:
        raise RuntimeError(
            "no concept token falls inside the context; is the prompt longer than the model's context?"
        )
    stacked = normalise_maps(torch.stack(embeddings))
    return stacked, torch.tensor(labels, device=maps.device)


def concept_masks(
    maps: torch.Tensor,
    plan: ComposePlan,
    variant_rows: Sequence[Sequence[int]],
    threshold: float,
    morphology: str = "none",
    map_hw: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Binary masks (variants, pixels): variant k's mask tokens over ``threshold * max`` (strictly,
    as the reference; union over its tokens); the base (variant 0) keeps every pixel no concept claims."""
    V = len(variant_rows)
    h, w = map_hw or _square(maps.shape[1])
    masks = torch.zeros(V, maps.shape[1], device=maps.device)
    for v in range(1, V):
        variant_map = maps[list(variant_rows[v])].mean(dim=0)
        for position in plan.mask_tokens[v]:
            if position < variant_map.shape[1]:
                token = variant_map[:, position]
                masks[v] = torch.maximum(masks[v], (token > threshold * token.max()).float())
    if morphology != "none" and V > 1:
        masks[1:] = morph(masks[1:].reshape(V - 1, 1, h, w), morphology).reshape(V - 1, -1)
    masks[0] = (masks[1:].sum(dim=0) == 0).float() if V > 1 else 1.0
    return masks


def concept_heatmaps(
    maps: torch.Tensor, plan: ComposePlan, variant_rows: Sequence[Sequence[int]]
) -> torch.Tensor:
    """What the masks are cut from, for display: per bound variant (1..V-1) the max over its mask
    tokens of their min-max normalised maps, in [0, 1]. Returns (V - 1, pixels)."""
    out = torch.zeros(max(len(variant_rows) - 1, 0), maps.shape[1])
    for v in range(1, len(variant_rows)):
        variant_map = maps[list(variant_rows[v])].mean(dim=0).float().cpu()
        tokens = [t for t in plan.mask_tokens[v] if t < variant_map.shape[1]]
        if tokens:
            out[v - 1] = normalise_maps(variant_map[:, tokens].T).max(dim=0).values
    return out


def _square(pixels: int) -> tuple[int, int]:
    side = int(round(pixels**0.5))
    if side * side != pixels:
        raise ValueError(f"maps of {pixels} pixels are not square; pass map_hw")
    return side, side


def group_overlap(maps: torch.Tensor, plan: ComposePlan, variant_rows: Sequence[Sequence[int]]) -> float:
    """Cross-group attention overlap, a quality proxy in [0, 1]: per concept group the mean of its
    members' min-max normalised maps as a distribution over pixels, then the histogram
    intersection ``sum_p min(a_p, b_p)`` averaged over group pairs (1 = same region, 0 = disjoint)."""
    return overlap_of(*group_embeddings(maps, plan, variant_rows))


def overlap_of(embeddings: torch.Tensor, labels: torch.Tensor) -> float:
    """:func:`group_overlap` from the loss's embeddings and labels."""
    embeddings = embeddings.detach()
    groups = [embeddings[labels == g].mean(dim=0) for g in labels.unique().tolist()]
    dists = [g / g.sum().clamp_min(1e-12) for g in groups]
    pairs = [(a, b) for i, a in enumerate(dists) for b in dists[i + 1 :]]
    if not pairs:
        return 0.0
    return float(sum(torch.minimum(a, b).sum() for a, b in pairs) / len(pairs))


def morph(masks: torch.Tensor, operation: str) -> torch.Tensor:
    """3x3 max-pool morphology on (N, 1, h, w) binary masks."""

    def dilate(m: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(m, 3, stride=1, padding=1)

    def erode(m: torch.Tensor) -> torch.Tensor:
        return 1 - F.max_pool2d(1 - m, 3, stride=1, padding=1)

    ops = {
        "dilate": dilate,
        "erode": erode,
        "open": lambda m: dilate(erode(m)),
        "close": lambda m: erode(dilate(m)),
    }
    return ops[operation](masks)


def fuse(
    eps: torch.Tensor,
    masks: torch.Tensor,
    variants: int,
    latent_hw: tuple[int, int],
    map_hw: tuple[int, int] | None = None,
) -> torch.Tensor:
    """``sum_v M_v eps_v / sum_v M_v`` per (half, image): eps rows are (half, variant, image);
    masks are upsampled to the latent with nearest neighbours. Returns (2, images, c, h, w)."""
    rows, c, h, w = eps.shape
    per = eps.reshape(2, variants, rows // (2 * variants), c, h, w)
    mh, mw = map_hw or _square(masks.shape[1])
    up = F.interpolate(masks.reshape(variants, 1, mh, mw).float(), size=latent_hw, mode="nearest").to(
        eps.dtype
    )
    weights = up[None, :, None]  # (1, V, 1, 1, h, w)
    return (per * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1e-8)


@dataclass
class CloraState:
    """What a UI shows: the last masks and maps, and every latent update's loss."""

    masks: torch.Tensor | None = None  # (variants, map pixels), last call
    maps: torch.Tensor | None = None  # (rows, map pixels, context tokens), last call
    map_hw: tuple[int, int] | None = None
    losses: list[tuple[int, float, float]] = field(default_factory=list)  # (step, loss, nan): one per update
    overlaps: list[tuple[int, float]] = field(
        default_factory=list
    )  # (step, cross-group overlap): one per update
    step: int = 0
    fused_calls: int = 0  # denoiser calls answered with a fused prediction
    last_uncond: torch.Tensor | None = None  # the last call's fused unconditional eps
    passes: dict[str, int] = field(default_factory=lambda: {"full": 0, "maps_only": 0, "no_grad": 0})


class CloraCore:
    """The sampler-agnostic core: ``denoise(x, sigma)`` once per denoiser call.

    ``eps_fn(x_rows, sigma_rows, rows)`` runs the (routed, hooked) UNet on the given rows of the
    full batch layout and returns eps for them; ``maps`` is the :class:`AttentionMaps` its hooks
    fill. The core decides which rows each pass needs. ``stop_early`` lets passes that only need
    the maps end after the last map layer (a speed lever; off only to measure it).

    Latents are k-diffusion's ``x = z / sqrt(alpha_bar)``; the update is the reference's
    ``z <- z - step_size * dL/dz`` in the DDPM latent ``z`` the reference works on, which in ``x``
    is ``x <- x - step_size * (1 + sigma^2) * dL/dx`` (``z = x / sqrt(1 + sigma^2)``).
    """

    def __init__(
        self,
        plan: ComposePlan,
        settings: CloraSettings,
        images: int,
        eps_fn: Callable,
        maps: AttentionMaps,
        cfg_scale: float,
        check_interrupt: Callable[[], None] | None = None,
        stop_early: bool = True,
    ) -> None:
        self.plan, self.settings, self.images = plan, settings, images
        self.variants = len(plan.prompts)
        self.eps_fn, self.maps, self.cfg_scale = eps_fn, maps, cfg_scale
        self.check_interrupt = check_interrupt or (lambda: None)
        self.stop_early = stop_early
        self.state = CloraState()
        V, B = self.variants, images
        self.all_rows = list(range(2 * V * B))
        self.loss_rows = list(range(V * B)) if settings.cond_only_loss else self.all_rows
        self._variant_of = [(r // B) % V for r in range(2 * V * B)]
        self.map_hw: tuple[int, int] | None = None
        self._updated_step: int | None = None  # the step whose latent updates already ran
        self._step_masks: tuple[int, torch.Tensor] | None = None  # (step, its masks): later calls reuse them

    def variant_rows(self, rows: Sequence[int]) -> list[list[int]]:
        """For each variant, the indices (within ``rows``) of its rows."""
        out: list[list[int]] = [[] for _ in range(self.variants)]
        for i, r in enumerate(rows):
            out[self._variant_of[r]].append(i)
        return out

    def _pass(
        self, x: torch.Tensor, sigma: torch.Tensor, rows: Sequence[int], maps_only: bool
    ) -> torch.Tensor | None:
        B = self.images
        index = torch.tensor([r % B for r in rows], device=x.device)
        self.maps.reset(stop_early=maps_only and self.stop_early)
        self.state.passes[
            "maps_only" if maps_only else ("full" if torch.is_grad_enabled() else "no_grad")
        ] += 1
        try:
            eps = self.eps_fn(x.index_select(0, index), sigma.index_select(0, index), rows)
        except StopForward:
            return None
        if self.maps.expected_layers is None:
            self.maps.expected_layers = self.maps.layers  # later maps-only passes stop after the last one
        return eps

    def loss(
        self, x: torch.Tensor, sigma: torch.Tensor, maps_only: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The contrastive loss at ``x`` (differentiable) and, for a full pass, every row's eps."""
        eps = self._pass(x, sigma, self.loss_rows, maps_only)
        embeddings, labels = group_embeddings(self.maps.mean(), self.plan, self.variant_rows(self.loss_rows))
        self.state.overlaps.append((self.state.step, overlap_of(embeddings, labels)))
        return nt_xent(embeddings, labels, self.settings.temperature), eps

    def updates_at(self, step: int) -> int:
        """Latent updates at ``step``: one below ``max_step``, plus ``refine_iterations`` more at the
        refinement steps (the reference updates once, then repeats the update 20 times)."""
        s = self.settings
        if s.step_size <= 0 or step >= s.max_step or not self.plan.groups:
            return 0
        return 1 + (s.refine_iterations if step in s.refine_steps else 0)

    def denoise(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor | float,
        step: int | None = None,
        update_mask: torch.Tensor | None = None,
        cond_only: bool = False,
    ) -> torch.Tensor:
        """The fused, guided denoised prediction at ``x``; ``x`` is updated in place by the latent
        step, so the sampler continues from the updated latent.

        ``step``: the sampler's step index. Without it the core counts its calls (right for
        samplers that call the denoiser once per step). With it, a later call at the same step
        (Heun, DPM2, DPM++ SDE, Restart) only predicts and fuses, with the masks of that step's
        first call: the latent updates run on a step's first call, and the step's calls (the
        sampler combines their predictions) share one layout.

        ``update_mask`` (broadcast to ``x``): where the latent update may change ``x`` (inpainting:
        the host's ``nmask``; outside it the host keeps the original). ``cond_only``: no guidance
        on this call, the fused prompt half alone (the host's "Skip Early CFG" and NGMS).
        ``state.last_uncond`` keeps the call's fused unconditional eps (DDIM CFG++ reads it)."""
        if step is not None:
            self.state.step = int(step)
        s, step = self.settings, self.state.step
        if torch.is_tensor(sigma):
            sigma_rows = (
                sigma.reshape(-1).to(x.device, torch.float32).expand(self.images)
                if sigma.numel() == 1
                else sigma.reshape(-1).to(x.device, torch.float32)
            )
        else:
            sigma_rows = torch.full((self.images,), float(sigma), device=x.device)
        self.map_hw = map_size(*x.shape[-2:])
        if self.map_hw[0] * self.map_hw[1] != self.maps.tokens:  # maps of another level (tests, custom UNets)
            self.map_hw = _square(self.maps.tokens)
        eps, maps_for_masks = None, None
        first = step != self._updated_step
        updates = self.updates_at(step) if first else 0
        self._updated_step = step
        # the reference's quirk: the last update's pass also gives the prediction (at the latent
        # before that update); only possible when that pass covers every row
        reuse = s.reuse_prediction and self.loss_rows == self.all_rows
        scale = (s.step_size * (1 + sigma_rows.double() ** 2)).to(x.dtype).reshape(-1, 1, 1, 1)
        for it in range(updates):
            self.check_interrupt()
            want_eps = reuse and it == updates - 1
            with torch.enable_grad():
                z = x.detach().requires_grad_(True)
                loss, pass_eps = self.loss(z, sigma_rows, maps_only=not want_eps)
                (grad,) = torch.autograd.grad(loss, z)
            if want_eps:
                eps, maps_for_masks = pass_eps.detach(), self.maps.mean().detach()
            with torch.no_grad():
                x.sub_(scale * grad if update_mask is None else scale * grad * update_mask.to(x.dtype))
            self.state.losses.append((step, float(loss.detach()), float("nan")))
        if eps is None:
            self.check_interrupt()
            with torch.no_grad():
                eps = self._pass(x, sigma_rows, self.all_rows, maps_only=False)
                maps_for_masks = self.maps.mean()
        with torch.no_grad():
            return self._combine(x, sigma_rows, eps, maps_for_masks, first, cond_only)

    def _combine(
        self,
        x: torch.Tensor,
        sigma_rows: torch.Tensor,
        eps: torch.Tensor,
        maps: torch.Tensor,
        first: bool = True,
        cond_only: bool = False,
    ) -> torch.Tensor:
        s, V = self.settings, self.variants
        step = self.state.step
        if not first and self._step_masks is not None and self._step_masks[0] == step:
            masks = self._step_masks[1]
        elif step >= s.mask_from_step:
            masks = concept_masks(
                maps, self.plan, self.variant_rows(self.all_rows), s.mask_threshold, s.morphology, self.map_hw
            )
        else:  # the reference before apply_mask_after: every variant everywhere (a plain average)
            masks = torch.ones(V, maps.shape[1], device=x.device)
        self._step_masks = (step, masks)
        fused = fuse(eps, masks, V, tuple(x.shape[-2:]), self.map_hw)  # (2, B, c, h, w)
        guided = fused[0] if cond_only else fused[1] + self.cfg_scale * (fused[0] - fused[1])
        self.state.last_uncond = fused[0] if cond_only else fused[1]  # as the host: cond when skipped
        self.state.masks, self.state.maps = masks.detach().cpu(), maps.detach().float().cpu()
        self.state.map_hw = self.map_hw
        self.state.fused_calls += 1
        self.state.step += 1
        return x - sigma_rows.reshape(-1, 1, 1, 1).to(x.dtype) * guided
