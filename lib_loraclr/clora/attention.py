"""Differentiable cross-attention maps at one resolution, from forward hooks on ``to_q``/``to_k``.

Hooks on the projections (not a replacement of the attention forward) work the same on diffusers'
``Attention`` and on the WebUI's ldm ``CrossAttention``, whatever fast kernel (sdp, xformers,
sub-quadratic, Doggettx) computes the attention itself: we recompute ``softmax(QK^T/sqrt(d))``
explicitly only for the layers at the wanted resolution (16x16 for 512x512 SD1.5), a few percent
of the UNet's work. Once the last such layer has been seen, a pass that only needs the maps can
be cut short (:class:`StopForward`), skipping the costly high-resolution up blocks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from lib_loraclr import families


class StopForward(Exception):  # noqa: N818 - control flow, not an error
    """Raised from a hook to end a maps-only pass after the last needed layer."""


def cross_attention_pairs(layer_map: Mapping[str, nn.Module]) -> list[tuple[str, nn.Module, nn.Module]]:
    """``(prefix, to_q, to_k)`` of every UNet cross-attention layer, in the order the UNet runs
    them (the family's order of its canonical names: diffusers-style or ldm-style alike)."""
    pairs = []
    for name, module in layer_map.items():
        if name.startswith("lora_unet_") and name.endswith("attn2_to_q"):
            prefix = name[: -len("_to_q")]
            key = layer_map.get(prefix + "_to_k")
            if key is not None:
                pairs.append((name, prefix, module, key))
    family = families.owner(pairs[0][0]) if pairs else None
    if family is not None:
        pairs.sort(key=lambda p: family.position(p[0]))
    return [(prefix, q, k) for _, prefix, q, k in pairs]


def heads_by_projection(root: nn.Module) -> dict[int, int]:
    """``id(to_q) -> heads`` for every attention module under ``root`` (both runtimes name it ``heads``)."""
    found = {}
    for module in root.modules():
        to_q, heads = getattr(module, "to_q", None), getattr(module, "heads", None)
        if isinstance(to_q, nn.Module) and isinstance(heads, int):
            found[id(to_q)] = heads
    return found


class AttentionMaps:
    """Accumulates head- and layer-averaged cross-attention probabilities of matching layers."""

    def __init__(self, tokens: int, hw: tuple[int, int] | None = None) -> None:
        self.tokens = tokens  # pixels per map, e.g. 256 for 16x16
        self.hw = hw  # the maps' (h, w) when the caller knows it (non-square pictures)
        self.total: torch.Tensor | None = None
        self.layers = 0
        self.expected_layers: int | None = None
        self.stop_early = False
        self.trim_graph = False
        self._query: dict[int, torch.Tensor] = {}

    def reset(self, stop_early: bool = False, trim_graph: bool = False) -> None:
        """Before a pass. ``stop_early``: end it after the last map layer (:class:`StopForward`);
        ``trim_graph``: run the rest of it without recording gradients (the caller restores the
        grad mode when the pass ends, see :func:`pass_grad_mode`)."""
        self.total, self.layers, self.stop_early, self.trim_graph = None, 0, stop_early, trim_graph
        self._query.clear()

    def mean(self) -> torch.Tensor:
        """(B, tokens, context tokens) averaged over heads and layers."""
        if self.total is None:
            raise RuntimeError(f"no cross-attention layer with {self.tokens} pixels ran; wrong latent size?")
        return self.total / self.layers

    def on_query(self, key: int, output: torch.Tensor) -> None:
        if output.shape[1] == self.tokens:
            self._query[key] = output

    def on_key(self, key: int, output: torch.Tensor, heads: int) -> None:
        q = self._query.pop(key, None)
        if q is None:
            return
        b, n, inner = q.shape
        d = inner // heads
        # float32 scores whatever the model's dtype (fp16 logits of 77 tokens lose the small maps)
        qh = q.reshape(b, n, heads, d).transpose(1, 2).float()
        kh = output.reshape(b, output.shape[1], heads, d).transpose(1, 2).float()
        probs = torch.softmax((qh @ kh.transpose(-1, -2)) * d**-0.5, dim=-1).mean(dim=1)
        self.total = probs if self.total is None else self.total + probs
        self.layers += 1
        if self.expected_layers is not None and self.layers >= self.expected_layers:
            if self.stop_early:
                raise StopForward
            if self.trim_graph:  # the loss needs no more; the rest only gives eps, used detached
                torch.set_grad_enabled(False)


@contextlib.contextmanager
def pass_grad_mode() -> Iterator[None]:
    """Around one UNet pass whose maps may turn gradients off after the last map layer
    (``trim_graph``): the thread's grad mode is put back when the pass ends, also on error."""
    enabled = torch.is_grad_enabled()
    try:
        yield
    finally:
        torch.set_grad_enabled(enabled)


@contextlib.contextmanager
def capture_maps(
    layer_map: Mapping[str, nn.Module], heads: Mapping[int, int], tokens: int | tuple[int, int]
) -> Iterator[AttentionMaps]:
    """Hooks on every UNet cross-attention's ``to_q``/``to_k`` recording maps of ``tokens`` pixels
    (or of that ``(h, w)``); removed in ``finally``."""
    maps = (
        AttentionMaps(tokens[0] * tokens[1], tuple(tokens))
        if isinstance(tokens, tuple)
        else AttentionMaps(tokens)
    )
    handles = []
    try:
        for _, to_q, to_k in cross_attention_pairs(layer_map):
            n_heads = heads.get(id(to_q))
            if n_heads is None:
                raise RuntimeError("cannot find the head count of a cross-attention layer")
            key = id(to_q)
            handles.append(to_q.register_forward_hook(lambda m, a, out, key=key: maps.on_query(key, out)))
            handles.append(
                to_k.register_forward_hook(lambda m, a, out, key=key, h=n_heads: maps.on_key(key, out, h))
            )
        yield maps
    finally:
        for handle in handles:
            handle.remove()


# The attention-map resolution, by the pixel width it divides: the reference takes maps at W/32
# (16 x 16 at 512 px, two UNet downsamples below an 8x-downscaled latent); W/16 and W/8 are one
# and zero downsamples below the latent. "auto" is W/32 unless that is smaller than
# MIN_AUTO_MAP_SIDE on a side, then the next finer level that is not; only levels where the model
# has cross-attention count (SDXL has none at W/8).
MAP_LEVELS = {"W/32": 2, "W/16": 1, "W/8": 0}
MAP_LEVEL_CHOICES = ("auto", *MAP_LEVELS)
MIN_AUTO_MAP_SIDE = 8
SD_LEVELS = (0, 1, 2)  # downsamples with cross-attention in SD1.x's UNet (and the lab's)


def attention_levels(family: families.ModelFamily) -> tuple[int, ...]:
    """The UNet downsamples at which a family's model has cross-attention (SDXL: 1 and 2)."""
    return tuple(d.bit_length() - 1 for d in family.cross_attention_downscales)


def map_downsamples(
    latent_h: int, latent_w: int, level: str = "auto", levels: tuple[int, ...] = SD_LEVELS
) -> int:
    """UNet downsamples between the latent and the maps of ``level`` (see :data:`MAP_LEVELS`), for
    a model with cross-attention at ``levels``; ``ValueError`` for a level the model lacks."""
    if level != "auto":
        if MAP_LEVELS[level] not in levels:
            have = ", ".join(n for n, d in MAP_LEVELS.items() if d in levels)
            raise ValueError(
                f"map level {level} has no cross-attention in this model; use auto or one of {have}"
            )
        return MAP_LEVELS[level]
    usable = sorted((d for d in levels if d <= MAP_LEVELS["W/32"]), reverse=True)
    for downsamples in usable:
        if min(-(-latent_h // 2**downsamples), -(-latent_w // 2**downsamples)) >= MIN_AUTO_MAP_SIDE:
            return downsamples
    return min(levels)


def map_size(
    latent_h: int, latent_w: int, level: str = "auto", levels: tuple[int, ...] = SD_LEVELS
) -> tuple[int, int]:
    """(h, w) of the maps CLoRA uses at ``level``: each downsample rounds up, as the UNet's
    strided convolutions do; 16 x 16 for a 64 x 64 latent (512 x 512 SD1.5) at W/32 or auto."""
    f = 2 ** map_downsamples(latent_h, latent_w, level, levels)
    return -(-latent_h // f), -(-latent_w // f)


def map_tokens(
    latent_height: int, latent_width: int, level: str = "auto", levels: tuple[int, ...] = SD_LEVELS
) -> int:
    """Pixels of the maps of :func:`map_size` (256 for a 64x64 latent at W/32)."""
    h, w = map_size(latent_height, latent_width, level, levels)
    return h * w
