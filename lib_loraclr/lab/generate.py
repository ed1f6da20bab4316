"""Pictures from the lab model, and the judge's reading of them.

One sampler for every method (DDIM, 30 steps, guidance 2), seeded per
picture, so methods differ only in their weights (or, for CLoRA, in its own denoiser) and every
row of a table starts from the same noise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from lib_loraclr.clora.compose import SAMPLERS, sigmas_for
from lib_loraclr.lab import judge as jg
from lib_loraclr.lab import world as w
from lib_loraclr.merge.engine import naive_offset
from lib_loraclr.sd.model import SDModel
from lib_loraclr.sd.patches import offsets_applied
from lib_loraclr.sd.sampling import CFGDenoiser, EpsDenoiser


@dataclass(frozen=True)
class Sampling:
    steps: int = 30
    cfg_scale: float = 2.0  # the lab model draws cleanest at low guidance (7.5 turns its LoRAs to noise)
    sampler: str = "ddim"


def noise(seed: int) -> torch.Tensor:
    """The starting latent of picture ``seed`` (the same for every method)."""
    return torch.randn(1, 4, w.CANVAS // 8, w.CANVAS // 8, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def sample(
    model: SDModel,
    prompts: Sequence[str],
    seeds: Sequence[int],
    sampling: Sampling,
    offsets: Mapping[str, torch.Tensor] | None = None,
    batch: int = 48,
) -> torch.Tensor:
    """Pictures (N, 3, 64, 64) in [0, 1] for prompt i with seed i; ``offsets`` (weight deltas by
    kohya layer name) are added to the weights for the call and removed after."""
    patch = offsets_applied(model.layer_map(), offsets) if offsets else nullcontext()
    out = []
    den = CFGDenoiser(EpsDenoiser(model.eps, model.alphas_cumprod))
    sigmas = sigmas_for(sampling.sampler, model.alphas_cumprod.float(), sampling.steps)
    with patch:
        uncond_one = model.encode_prompt([""])
        for start in range(0, len(prompts), batch):
            chunk_prompts = list(prompts[start : start + batch])
            chunk_seeds = list(seeds[start : start + batch])
            cond = model.encode_prompt(chunk_prompts)
            uncond = uncond_one.repeat(len(chunk_prompts))
            x = torch.cat([noise(s) for s in chunk_seeds])

            def denoise(xx, sigma, _cond=cond, _uncond=uncond, **_):
                return den(xx, sigma, _cond, _uncond, sampling.cfg_scale)

            latents = SAMPLERS[sampling.sampler](denoise, x * sigmas[0], sigmas, disable=True)
            out.append(model.decode(latents))
    return torch.cat(out)


def lora_offsets(model: SDModel, loras: Sequence, weights: Sequence[float] | None = None) -> dict:
    """``sum_k w_k dW_k`` per layer: what the WebUI's built-in Lora applies for stacked tags."""
    layers = model.layer_map()
    weights = list(weights or [1.0] * len(loras))
    names = sorted({n for lora in loras for n in lora.modules})
    return {n: naive_offset(n, loras, weights, layers[n], average=False) for n in names}


@dataclass(frozen=True)
class Verdict:
    """What the judge reads in one picture, against the subjects the prompt asked for."""

    identities: tuple[bool, ...]  # per subject: an object of its class wears its look
    classes: tuple[bool, ...]  # per subject: an object of its class is there
    bleeding: tuple[bool, ...]  # per subject: its look is on an object of another class

    @property
    def all_identities(self) -> bool:
        return all(self.identities)

    @property
    def all_classes(self) -> bool:
        return all(self.classes)


def judge_pictures(judge: jg.Judge, images: torch.Tensor, subjects: Sequence[Sequence[int]]) -> list[Verdict]:
    """``subjects[i]``: identity indices picture i should show (each on its own class)."""
    class_maps, look_maps = jg.read_maps(judge, images)
    out = []
    for i, wanted in enumerate(subjects):
        seen = jg.read_objects(class_maps[i], look_maps[i])
        by_class = {s.cls: s for s in seen}
        ids, cls, bleed = [], [], []
        for k in wanted:
            ident = w.IDENTITIES[k]
            obj = by_class.get(ident.cls)
            cls.append(obj is not None)
            ids.append(obj is not None and obj.identity == k)
            bleed.append(any(s.identity == k and s.cls != ident.cls for s in seen))
        out.append(Verdict(tuple(ids), tuple(cls), tuple(bleed)))
    return out


def class_cells(judge: jg.Judge, images: torch.Tensor) -> np.ndarray:
    """The judge's class map per picture (N, 16, 16)."""
    return jg.read_maps(judge, images)[0]


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and its standard error."""
    a = np.asarray(values, dtype=np.float64)
    if len(a) == 0:
        return float("nan"), float("nan")
    se = float(a.std(ddof=1) / np.sqrt(len(a))) if len(a) > 1 else 0.0
    return float(a.mean()), se
