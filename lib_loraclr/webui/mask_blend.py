"""Inpainting inside CLoRA's denoiser call: the host's mask blend, as its ``CFGDenoiser.forward``
does it (A1111 1.8.0 and 1.10.1, ``apply_blend``), around CLoRA's latent update.

The host keeps ``mask`` (1 = keep the original), ``nmask`` (1 = inpaint) and ``init_latent`` on
the denoiser and blends ``current * nmask + init_latent * mask``, letting scripts change the blend
through their ``on_mask_blend`` hook (``MaskBlendArgs`` with the denoiser and sigma; soft
inpainting uses it). ``mask_before_denoising`` decides what is blended:

- False (k-diffusion samplers): the call's result, the denoised prediction;
- True (A1111's timestep samplers: DDIM; any denoiser a script switches): the model's input, a new
  tensor; the sampler's own latent stays as it was.

CLoRA's latent update is masked by ``nmask``: it changes the latent only where the host inpaints
(outside, the host keeps the original anyway); with the blend before denoising it is computed on
the blended input and added to the sampler's own latent.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


class HostBlend:
    """The host's blend for one denoiser call, or ``None`` from :meth:`of` without a mask."""

    def __init__(self, p: Any, denoiser: Any, sigma: Any, make_args: Callable | None) -> None:
        self.p, self.denoiser, self.sigma, self.make_args = p, denoiser, sigma, make_args
        self.mask, self.nmask, self.init_latent = denoiser.mask, denoiser.nmask, denoiser.init_latent
        self.before = bool(getattr(denoiser, "mask_before_denoising", False))

    @classmethod
    def of(cls, p: Any, denoiser: Any, sigma: Any, make_args: Callable | None) -> HostBlend | None:
        if getattr(denoiser, "mask", None) is None:
            return None
        return cls(p, denoiser, sigma, make_args)

    def __call__(self, current: torch.Tensor) -> torch.Tensor:
        blended = current * self.nmask + self.init_latent * self.mask
        scripts = getattr(self.p, "scripts", None)
        if scripts is not None and self.make_args is not None:
            args = self.make_args(
                current,
                self.nmask,
                self.init_latent,
                self.mask,
                blended,
                denoiser=self.denoiser,
                sigma=self.sigma,
            )
            scripts.on_mask_blend(self.p, args)
            blended = args.blended_latent
        return blended

    def region(self, images: list[int], batch: int) -> torch.Tensor:
        """Where the update may change the images ``images`` of a batch of ``batch``: their
        ``nmask`` (the host's is one latent-sized mask for the batch, ``(4, h, w)``, or one per image)."""
        nmask = self.nmask
        if nmask.dim() == 4 and nmask.shape[0] == batch and batch > 1:
            return nmask[images]
        return nmask
