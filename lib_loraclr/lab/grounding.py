"""Attention grounding for the lab's training: each object word attends to its own object.

A model of the lab's size learns to draw the asked objects without its cross-attention ever
localising them (world v3's 8 x 8 maps put 19 % of an object word's attention on its object, about
what a uniform map does; `docs/quality.md`), and CLoRA's masks are cut from those maps, so CLoRA
could not be measured there at all. Large text-to-image models learn localised maps from scale;
the lab teaches them directly, as TokenCompose (Wang et al., CVPR 2024) fine-tunes SD: a token
loss (the share of a word's attention outside its object) and a pixel loss (binary cross-entropy
between its min-max normalised map and the object's mask), on the cross-attention layers at
CLoRA's map level, beside the noise-prediction loss. The masks come free: every training picture
is rendered with its class map. A class word and the colour or trigger word before it ("red cat",
"sks cat") both point at that class's object (classes never repeat within a scene).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lib_loraclr.clora.attention import AttentionMaps, capture_maps, heads_by_projection
from lib_loraclr.lab import world as w

NO_OBJECT = -1


@dataclass(frozen=True)
class Grounding:
    """Per caption: which object (class index) each token names, and each class's share of every
    map pixel. Compact (a few MB for the base's 16000 scenes); :meth:`targets` expands a batch."""

    token_class: torch.Tensor  # (N, tokens) int8, NO_OBJECT where a token names no object
    coverage: torch.Tensor  # (N, classes, map pixels) float16
    weight: float  # of the grounding loss beside the noise-prediction loss

    def targets(self, idx: torch.Tensor) -> torch.Tensor:
        """``(B, tokens, map pixels)`` object masks of captions ``idx`` (zero rows: no object)."""
        cls = self.token_class[idx].long()
        cover = self.coverage[idx].float()
        picked = torch.gather(cover, 1, cls.clamp(min=0).unsqueeze(-1).expand(-1, -1, cover.shape[-1]))
        return picked * (cls >= 0).unsqueeze(-1)


def word_classes(caption: str) -> list[int]:
    """Per word of a lab caption, the class index of the object it names, else ``NO_OBJECT``: the
    class word and a colour or trigger word right before it."""
    words = caption.split()
    out = [w.CLASSES.index(word) if word in w.CLASSES else NO_OBJECT for word in words]
    modifiers = {*w.COLOURS, *(i.trigger for i in w.IDENTITIES)}
    for j in range(1, len(words)):
        if out[j] != NO_OBJECT and words[j - 1] in modifiers:
            out[j - 1] = out[j]
    return out


def token_classes(tokenizer: Any, caption: str, tokens: int) -> np.ndarray:
    """:func:`word_classes` at token positions (the start token first, as CLIP's tokenizer puts
    it; a word of several tokens gives each of them)."""
    out = np.full(tokens, NO_OBJECT, np.int8)
    position = 1
    for word, cls in zip(caption.split(), word_classes(caption), strict=True):
        n = len(tokenizer(word, add_special_tokens=False)["input_ids"])
        out[position : min(position + n, tokens - 1)] = cls
        position += n
    return out


def class_coverage(class_maps: np.ndarray, map_hw: tuple[int, int]) -> torch.Tensor:
    """``(N, classes, h * w)``: the share of each map pixel each class covers (class maps hold
    ``1 + class index``, 0 for the background)."""
    n, height, width = class_maps.shape
    maps = torch.from_numpy(class_maps.astype(np.int64))
    onehot = F.one_hot(maps, 1 + len(w.CLASSES))[..., 1:].permute(0, 3, 1, 2).float()
    pooled = F.adaptive_avg_pool2d(onehot, map_hw)
    return pooled.reshape(n, len(w.CLASSES), -1).half()


def grounding_for(
    tokenizer: Any,
    captions: Sequence[str],
    class_maps: np.ndarray,
    map_hw: tuple[int, int],
    weight: float,
    tokens: int = 77,
) -> Grounding:
    """The :class:`Grounding` of a rendered training set."""
    token_class = torch.from_numpy(np.stack([token_classes(tokenizer, c, tokens) for c in captions]))
    return Grounding(token_class, class_coverage(class_maps, map_hw), weight)


def grounding_loss(maps: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """TokenCompose's token + pixel losses, averaged over the object tokens of the batch.

    ``maps``: ``(B, map pixels, tokens)`` head- and layer-averaged cross-attention probabilities;
    ``targets``: ``(B, tokens, map pixels)`` from :meth:`Grounding.targets`. Zero when the batch
    names no object (every caption dropped for classifier-free guidance)."""
    attention = maps.transpose(1, 2)
    named = targets.sum(-1) > 0
    if not bool(named.any()):
        return maps.sum() * 0.0
    a, mask = attention[named], targets[named]
    outside = 1 - (a * mask).sum(-1) / a.sum(-1).clamp(min=1e-8)
    lo, hi = a.amin(-1, keepdim=True), a.amax(-1, keepdim=True)
    normalised = ((a - lo) / (hi - lo).clamp(min=1e-8)).clamp(1e-4, 1 - 1e-4)
    pixel = F.binary_cross_entropy(normalised, (mask > 0.5).float())
    return outside.mean() + pixel


def inside_share(maps: torch.Tensor, targets: torch.Tensor) -> float:
    """The mean share of an object word's attention that falls on its object (a uniform map gives
    the object's area; world v3 gave 0.19)."""
    attention = maps.transpose(1, 2)
    named = targets.sum(-1) > 0
    a, mask = attention[named], targets[named]
    return float(((a * mask).sum(-1) / a.sum(-1).clamp(min=1e-8)).mean())


def grounding_maps(model: Any, grounding: Grounding | None) -> contextlib.AbstractContextManager:
    """The cross-attention maps at CLoRA's map level, recorded with their graph while training
    with ``grounding`` (its coverage names the map's pixels); nothing without it."""
    if grounding is None or grounding.weight <= 0:
        return contextlib.nullcontext()
    pixels = grounding.coverage.shape[-1]
    return capture_maps(model.layer_map(), heads_by_projection(model.unet), pixels)


def grounded(
    loss: torch.Tensor,
    maps: AttentionMaps | None,
    grounding: Grounding | None,
    idx: torch.Tensor,
    dropped: torch.Tensor | None = None,
) -> torch.Tensor:
    """``loss`` plus the weighted grounding loss of this batch (captions dropped for CFG name nothing)."""
    if maps is None or grounding is None:
        return loss
    targets = grounding.targets(idx)
    if dropped is not None:
        targets[dropped] = 0
    return loss + grounding.weight * grounding_loss(maps.mean(), targets.to(loss.device))
