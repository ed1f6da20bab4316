"""CLoRA composition outside the WebUI: plan, contexts, routing, capture and a reference sampler.

The WebUI adapter uses the same pieces (:func:`row_loras`, :func:`encode_variants`,
:class:`~lib_loraclr.clora.CloraCore`) around the WebUI's own denoiser.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lib_loraclr.attention import StopForward, capture_maps, heads_by_projection, map_tokens
from lib_loraclr.clora import CloraCore
from lib_loraclr.clora_config import CloraSettings
from lib_loraclr.errors import PromptError
from lib_loraclr.prompts import ComposePlan, plan_composition, tokenizer_counter
from lib_loraclr.routing import RoutedLora, route_loras
from lib_loraclr.sampling import (
    DiscreteSchedule,
    sample_ddim,
    sample_dpmpp_2m,
    sample_euler,
    sample_euler_ancestral,
    sigmas_ddim,
    sigmas_from_alphas,
    sigmas_karras,
)

log = logging.getLogger(__name__)
SAMPLERS = {"euler": sample_euler, "euler_a": sample_euler_ancestral, "dpmpp_2m": sample_dpmpp_2m,
            "dpmpp_2m_karras": sample_dpmpp_2m, "ddim": sample_ddim}  # fmt: skip


def row_loras(plan: ComposePlan, loras: Mapping[str, Any], images: int, styles_too: bool = True) -> list[list[RoutedLora]]:
    """Per row of the (half, variant, image) layout: the variant's LoRA plus every style LoRA
    (in the WebUI the built-in applies style LoRAs, so ``styles_too`` is off there)."""
    styles = [RoutedLora(loras[s.lora], s.te, s.unet) for s in plan.styles] if styles_too else []
    per_variant = [styles] + [[RoutedLora(loras[b.lora], b.te, b.unet), *styles] for b in plan.bindings]
    return [per_variant[v] for _half in range(2) for v in range(len(per_variant)) for _ in range(images)]


def encode_variants(encode: Callable[[list[str]], torch.Tensor], router: Any, plan: ComposePlan, negatives: Sequence[str],
                    rows: list[list[RoutedLora]], images: int) -> torch.Tensor:  # fmt: skip
    """Contexts of every row: variant prompts and the negative, each through its own LoRA's text encoder."""
    texts = [p for p in plan.prompts for _ in range(images)]
    texts = texts + [negatives[i % len(negatives)] for _ in plan.prompts for i in range(images)]
    with router.rows(rows):
        return encode(texts)


@dataclass
class ComposeResult:
    latents: torch.Tensor
    plan: ComposePlan
    core: CloraCore
    seconds: float


def sigmas_for(sampler: str, alphas_cumprod: torch.Tensor, steps: int) -> torch.Tensor:
    if sampler == "ddim":
        return sigmas_ddim(alphas_cumprod, steps)
    if sampler.endswith("karras"):
        full = sigmas_from_alphas(alphas_cumprod, 1000)
        return sigmas_karras(steps, float(full[-2]), float(full[0]))
    return sigmas_from_alphas(alphas_cumprod, steps)


def compose(model: Any, prompt: str, loras: Mapping[str, Any], settings: CloraSettings | None = None, *, negative: str = "",
            steps: int = 50, cfg_scale: float = 7.5, seed: int = 0, sampler: str = "ddim", width: int = 512, height: int = 512,
            images: int = 1, sequential: bool = False, triggers: Mapping[str, str] | None = None,
            callback: Callable[[dict], None] | None = None) -> ComposeResult:  # fmt: skip
    """One CLoRA generation on an :class:`~lib_loraclr.runtime.SDModel`-like model; returns latents."""
    settings = settings or CloraSettings(enabled=True)
    if sampler not in SAMPLERS:
        raise PromptError(f"sampler {sampler!r} is not one of {', '.join(SAMPLERS)}")
    missing = sorted({n for n in _tag_names(prompt) if n not in loras})
    if missing:
        raise PromptError(f"LoRA not found: {', '.join(missing)}")
    trigger_of = triggers or {n: (lora.trigger_words[0] if getattr(lora, "trigger_words", None) else "") for n, lora in loras.items()}
    plan = plan_composition(prompt, tokenizer_counter(model.tokenizer), trigger_of.get)
    used = {b.lora for b in plan.bindings} | {s.lora for s in plan.styles}
    layers = model.layer_map()
    rows = row_loras(plan, loras, images)
    param = next(model.unet.parameters())
    schedule = DiscreteSchedule(model.alphas_cumprod)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(images, 4, height // 8, width // 8, generator=gen).to(device=param.device, dtype=param.dtype)
    sigmas = sigmas_for(sampler, model.alphas_cumprod.float().cpu(), steps).to(param.device)
    started = time.perf_counter()
    with route_loras(layers, [loras[n] for n in sorted(used)]) as router, \
            capture_maps(layers, heads_by_projection(model.unet), map_tokens(height // 8, width // 8)) as maps:  # fmt: skip
        contexts = encode_variants(model.encode_prompt, router, plan, [negative], rows, images)

        def run(x_rows: torch.Tensor, sigma_rows: torch.Tensor, rows_here: list[int]) -> torch.Tensor:
            router.set_rows([rows[r] for r in rows_here])
            c_in = (sigma_rows**2 + 1) ** -0.5
            return model.eps(x_rows * c_in.reshape(-1, 1, 1, 1).to(x_rows.dtype), schedule.sigma_to_t(sigma_rows), contexts[rows_here])

        def eps_fn(x_rows: torch.Tensor, sigma_rows: torch.Tensor, selected: Sequence[int]) -> torch.Tensor:
            if not sequential:
                return run(x_rows, sigma_rows, list(selected))
            # the reference's way: one pass per variant (and CFG half), maps gathered per row
            outputs, gathered, order, stopped, layers = [], [], [], False, 0
            stop_early = maps.stop_early
            for group in _by_variant(selected, images, len(plan.prompts)):
                maps.reset(stop_early=stop_early)
                try:
                    outputs.append(run(x_rows[group], sigma_rows[group], [selected[i] for i in group]))
                except StopForward:
                    stopped = True
                gathered.append(maps.mean())
                layers = maps.layers
                order += group
            inverse = torch.argsort(torch.tensor(order, device=x_rows.device))
            maps.total, maps.layers = torch.cat(gathered)[inverse] * layers, layers
            if stopped:
                raise StopForward
            return torch.cat(outputs)[inverse]

        core = CloraCore(plan, settings, images, eps_fn, maps, cfg_scale)
        kwargs = {"generator": torch.Generator().manual_seed(seed + 1)} if sampler in ("euler_a", "ddim") else {}
        latents = SAMPLERS[sampler](lambda xx, sigma, **_: core.denoise(xx, sigma), x * sigmas[0], sigmas,
                                    callback=callback, disable=True, **kwargs)  # fmt: skip
    return ComposeResult(latents, plan, core, time.perf_counter() - started)


def _by_variant(selected: Sequence[int], images: int, variants: int) -> list[list[int]]:
    groups: dict[tuple[int, int], list[int]] = {}
    for i, r in enumerate(selected):
        groups.setdefault(((r // images) // variants, (r // images) % variants), []).append(i)
    return [groups[k] for k in sorted(groups, key=lambda k: (k[1], k[0]))]


def _tag_names(prompt: str) -> list[str]:
    from lib_loraclr.prompts import split_bindings

    _, bindings, styles = split_bindings(prompt)
    return [b.lora for b in bindings] + [s.lora for s in styles]


def plain_generation(model: Any, prompt: str, *, negative: str = "", steps: int = 50, cfg_scale: float = 7.5, seed: int = 0,
                     sampler: str = "ddim", width: int = 512, height: int = 512) -> tuple[torch.Tensor, float]:  # fmt: skip
    """The same sampler without CLoRA (for the cost comparison)."""
    from lib_loraclr.sampling import CFGDenoiser, EpsDenoiser

    param = next(model.unet.parameters())
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, height // 8, width // 8, generator=gen).to(device=param.device, dtype=param.dtype)
    sigmas = sigmas_for(sampler, model.alphas_cumprod.float().cpu(), steps).to(param.device)
    started = time.perf_counter()
    cond, uncond = model.encode_prompt([prompt]), model.encode_prompt([negative])
    den = CFGDenoiser(EpsDenoiser(model.eps, model.alphas_cumprod))
    kwargs = {"generator": torch.Generator().manual_seed(seed + 1)} if sampler in ("euler_a", "ddim") else {}
    out = SAMPLERS[sampler](lambda xx, sigma, **_: den(xx, sigma, cond, uncond, cfg_scale), x * sigmas[0], sigmas,
                            disable=True, **kwargs)  # fmt: skip
    return out, time.perf_counter() - started


def save_masks(result: ComposeResult, folder: Path) -> list[Path]:
    """The last step's masks and every concept's attention map as PNG files."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    masks = result.core.state.masks
    side = int(round(masks.shape[1] ** 0.5))
    names = ["base", *[b.lora for b in result.plan.bindings]]
    for v, name in enumerate(names):
        image = Image.fromarray((masks[v].reshape(side, -1).numpy() * 255).astype("uint8")).resize((side * 8, side * 8), Image.NEAREST)
        path = folder / f"mask_{v}_{name}.png"
        image.save(path)
        paths.append(path)
    return paths


def overlap_fraction(masks: torch.Tensor) -> float:
    """Share of concept-mask pixels claimed by more than one concept."""
    concept = masks[1:]
    claimed = (concept.sum(dim=0) > 0).float().sum()
    overlap = (concept.sum(dim=0) > 1).float().sum()
    return float(overlap / claimed.clamp_min(1))


def run_compose_demo(model: Any, lora_paths: Sequence[Path], out_dir: Path) -> dict[str, Any]:
    """The demo's composition: two tiny LoRAs bound to 'cat' and 'dog' on the tiny model."""
    from lib_loraclr.lora_file import load_lora
    from lib_loraclr.runtime import to_pil

    loras = {p.stem: load_lora(p) for p in lora_paths[:2]}
    a, b = list(loras)
    prompt = f"a <lora:{a}:1> cat and a <lora:{b}:1> dog in the forest"
    settings = CloraSettings(enabled=True, max_step=4, refine_steps=(0,), refine_iterations=2)
    result = compose(model, prompt, loras, settings, steps=6, width=128, height=128, sampler="ddim", seed=0)
    losses = [entry[1] for entry in result.core.state.losses]
    image_path = out_dir / "clora_demo.png"
    to_pil(model.decode(result.latents))[0].save(image_path)
    masks = save_masks(result, out_dir / "clora_masks")
    return {
        "prompt": prompt,
        "image": str(image_path),
        "masks_dir": str(out_dir / "clora_masks"),
        "masks": [str(p) for p in masks],
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "mask_overlap_fraction": overlap_fraction(result.core.state.masks),
        "seconds": result.seconds,
    }
