"""What CLoRA computes from one image's attention maps (ALGORITHMS.md 2.3, 2.4): the contrastive
loss's embeddings and the loss, the concept masks, the masked fusion, and the overlap diagnostic.

Maps are ``(rows, pixels, context tokens)``; a variant's map is the mean over its rows. The
functions the core calls on every update run on the maps' device without reading a value back
to the host (no ``float()``, no boolean indexing, no index built from a Python list per call):
on a GPU each of those would wait for the whole queued UNet pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lib_loraclr.clora.prompts import ComposePlan


def normalise_maps(maps: torch.Tensor) -> torch.Tensor:
    """Min-max normalise each map (last dim = pixels) to [0, 1]."""
    low = maps.min(dim=-1, keepdim=True).values
    high = maps.max(dim=-1, keepdim=True).values
    return (maps - low) / (high - low).clamp_min(1e-8)


def nt_xent(embeddings: torch.Tensor, labels: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """NT-Xent / InfoNCE with group labels (pytorch_metric_learning's ``NTXentLoss`` definition):
    for every ordered positive pair (a, p), ``-log(e^{s_ap/t} / (e^{s_ap/t} + sum_n e^{s_an/t}))``
    over the anchor's negatives n, with cosine similarity s; the mean over positive pairs
    (0 without any), taken as a masked sum so that nothing is read back to the host."""
    z = F.normalize(embeddings, dim=-1)
    sim = (z @ z.T) / temperature
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    positive = same & ~eye
    neg_exp = torch.where(~same, sim, torch.full_like(sim, float("-inf")))
    neg_lse = torch.logsumexp(neg_exp, dim=1, keepdim=True).expand_as(sim)  # log sum_n e^{s_an}
    losses = torch.logaddexp(sim, neg_lse) - sim
    weights = positive.to(sim.dtype)
    return (losses * weights).sum() / weights.sum().clamp_min(1)


@dataclass(frozen=True)
class EmbeddingIndex:
    """Which (variant, token) maps are the loss's embeddings, their group labels and each present
    group's members, as tensors on the maps' device. It depends only on the plan and the context
    length, so a core builds it once instead of copying a fresh index to the device per update."""

    variants: torch.Tensor  # (E,) variant of each embedding
    positions: torch.Tensor  # (E,) context token of each embedding
    labels: torch.Tensor  # (E,) concept group of each embedding
    members: torch.Tensor  # (present groups, E): 1 where the embedding belongs to the group


def embedding_index(plan: ComposePlan, context_tokens: int, device: torch.device) -> EmbeddingIndex:
    """Every group member's token inside the context, in (variant, group, position) order."""
    chosen = [
        (v, position, g)
        for v in range(len(plan.prompts))
        for g, members in enumerate(plan.groups)
        for position in members[v]
        if position < context_tokens
    ]
    if not chosen:
        raise RuntimeError(
            "no concept token falls inside the context; is the prompt longer than the model's context?"
        )
    variants, positions, labels = (list(column) for column in zip(*chosen, strict=True))
    present = sorted(set(labels))
    members = [[float(label == g) for label in labels] for g in present]
    return EmbeddingIndex(
        *(torch.tensor(values, device=device) for values in (variants, positions, labels)),
        torch.tensor(members, device=device),
    )


def variant_means(maps: torch.Tensor, variant_rows: Sequence[Sequence[int]]) -> torch.Tensor:
    """(variants, pixels, tokens): each variant's map, the mean over its rows of ``maps``."""
    return torch.stack([maps[list(rows)].mean(dim=0) for rows in variant_rows])


def embed(variant_maps: torch.Tensor, index: EmbeddingIndex) -> torch.Tensor:
    """(E, pixels): the min-max normalised map of each embedding of ``index``."""
    return normalise_maps(variant_maps[index.variants, :, index.positions])


def group_embeddings(
    maps: torch.Tensor, plan: ComposePlan, variant_rows: Sequence[Sequence[int]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """One embedding per (group member token): its map, min-max normalised; labels = group index."""
    variant_maps = variant_means(maps, variant_rows)
    index = embedding_index(plan, variant_maps.shape[-1], maps.device)
    return embed(variant_maps, index), index.labels


def overlap_tensor(embeddings: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
    """:func:`group_overlap` as a 0-dim tensor (nothing read back), from :class:`EmbeddingIndex`'s
    ``members``: per group the mean of its members' maps as a distribution over pixels, the
    histogram intersection averaged over group pairs."""
    embeddings = embeddings.detach()
    members = members.to(embeddings.dtype)
    groups = (members @ embeddings) / members.sum(dim=1, keepdim=True)
    dists = groups / groups.sum(dim=1, keepdim=True).clamp_min(1e-12)
    first, second = torch.triu_indices(len(dists), len(dists), 1, device=dists.device)
    if first.numel() == 0:
        return dists.new_zeros(())
    return torch.minimum(dists[first], dists[second]).sum(dim=1).mean()


def overlap_of(embeddings: torch.Tensor, labels: torch.Tensor) -> float:
    """:func:`group_overlap` from the loss's embeddings and labels."""
    present = sorted(set(labels.tolist()))
    return float(overlap_tensor(embeddings, torch.stack([labels == g for g in present])))


def group_overlap(maps: torch.Tensor, plan: ComposePlan, variant_rows: Sequence[Sequence[int]]) -> float:
    """Cross-group attention overlap, a quality proxy in [0, 1]: per concept group the mean of its
    members' min-max normalised maps as a distribution over pixels, then the histogram
    intersection ``sum_p min(a_p, b_p)`` averaged over group pairs (1 = same region, 0 = disjoint)."""
    variant_maps = variant_means(maps, variant_rows)
    index = embedding_index(plan, variant_maps.shape[-1], maps.device)
    return float(overlap_tensor(embed(variant_maps, index), index.members))


def masks_of(
    variant_maps: torch.Tensor,
    plan: ComposePlan,
    threshold: float,
    morphology: str = "none",
    map_hw: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Binary masks (variants, pixels) from the variants' maps: variant k's mask tokens over
    ``threshold * max`` (strictly, as the reference; union over its tokens); the base (variant 0)
    keeps every pixel no concept claims."""
    V, pixels, tokens = variant_maps.shape
    h, w = map_hw or square(pixels)
    masks = torch.zeros(V, pixels, device=variant_maps.device)
    for v in range(1, V):
        for position in plan.mask_tokens[v]:
            if position < tokens:
                token = variant_maps[v, :, position]
                masks[v] = torch.maximum(masks[v], (token > threshold * token.max()).float())
    if morphology != "none" and V > 1:
        masks[1:] = morph(masks[1:].reshape(V - 1, 1, h, w), morphology).reshape(V - 1, -1)
    masks[0] = (masks[1:].sum(dim=0) == 0).float() if V > 1 else 1.0
    return masks


def concept_masks(
    maps: torch.Tensor,
    plan: ComposePlan,
    variant_rows: Sequence[Sequence[int]],
    threshold: float,
    morphology: str = "none",
    map_hw: tuple[int, int] | None = None,
) -> torch.Tensor:
    """:func:`masks_of` from rows of maps and each variant's rows."""
    return masks_of(variant_means(maps, variant_rows), plan, threshold, morphology, map_hw)


def concept_heatmaps(
    maps: torch.Tensor, plan: ComposePlan, variant_rows: Sequence[Sequence[int]]
) -> torch.Tensor:
    """What the masks are cut from, for display: per bound variant (1..V-1) the max over its mask
    tokens of their min-max normalised maps, in [0, 1]. Returns (V - 1, pixels) on the CPU."""
    out = torch.zeros(max(len(variant_rows) - 1, 0), maps.shape[1])
    for v in range(1, len(variant_rows)):
        variant_map = maps[list(variant_rows[v])].mean(dim=0).float().cpu()
        tokens = [t for t in plan.mask_tokens[v] if t < variant_map.shape[1]]
        if tokens:
            out[v - 1] = normalise_maps(variant_map[:, tokens].T).max(dim=0).values
    return out


def square(pixels: int) -> tuple[int, int]:
    """(side, side) of a square map of ``pixels``; maps of another shape must say theirs."""
    side = int(round(pixels**0.5))
    if side * side != pixels:
        raise ValueError(f"maps of {pixels} pixels are not square; pass map_hw")
    return side, side


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
    mh, mw = map_hw or square(masks.shape[1])
    up = F.interpolate(masks.reshape(variants, 1, mh, mw).float(), size=latent_hw, mode="nearest").to(
        eps.dtype
    )
    weights = up[None, :, None]  # (1, V, 1, 1, h, w)
    return (per * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1e-8)
