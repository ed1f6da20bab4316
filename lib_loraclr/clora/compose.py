"""CLoRA composition outside the WebUI: plan, contexts, routing, capture and a reference sampler.

The WebUI adapter uses the same pieces (:func:`row_loras`, :func:`encode_variants`,
:class:`~lib_loraclr.clora.core.CloraCore`) around the WebUI's own denoiser.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lib_loraclr.clora.attention import (
    StopForward,
    attention_levels,
    capture_maps,
    heads_by_projection,
    map_size,
    pass_grad_mode,
)
from lib_loraclr.clora.batch import CloraBatch, Rows
from lib_loraclr.clora.core import CloraCore
from lib_loraclr.clora.encode import encode_weighted
from lib_loraclr.clora.prompts import Binding, ComposePlan, plan_composition
from lib_loraclr.clora.settings import CloraSettings
from lib_loraclr.clora.tokens import tokenizer_counter
from lib_loraclr.errors import PromptError
from lib_loraclr.lora.routing import RoutedLora, route_loras
from lib_loraclr.sd.cond import Cond
from lib_loraclr.sd.patches import frozen_parameters
from lib_loraclr.sd.sampling import SAMPLERS as REFERENCE_SAMPLERS
from lib_loraclr.sd.sampling import (
    DiscreteSchedule,
    sigmas_ddim,
    sigmas_from_alphas,
    sigmas_karras,
)

log = logging.getLogger(__name__)
# the CLI's names: the reference samplers, and DPM++ 2M on the Karras schedule (see sigmas_for)
SAMPLERS = {**REFERENCE_SAMPLERS, "dpmpp_2m_karras": REFERENCE_SAMPLERS["dpmpp_2m"]}


def row_loras(
    plan: ComposePlan, loras: Mapping[str, Any], images: int, styles_too: bool = True
) -> list[list[RoutedLora]]:
    """Per row of the (half, variant, image) layout: the variant's LoRA plus every style LoRA
    (in the WebUI the built-in applies style LoRAs, so ``styles_too`` is off there)."""
    styles = [RoutedLora(loras[s.lora], s.te, s.unet) for s in plan.styles] if styles_too else []
    per_variant = [styles] + [[RoutedLora(loras[b.lora], b.te, b.unet), *styles] for b in plan.bindings]
    return [per_variant[v] for _half in range(2) for v in range(len(per_variant)) for _ in range(images)]


def encode_variants(
    encode: Callable[[list[str]], Cond],
    router: Any,
    plan: ComposePlan,
    negatives: Sequence[str],
    rows: list[list[RoutedLora]],
    images: int,
) -> Cond:
    """Conditioning of every row: variant prompts and the negative, each through its own LoRA's text encoder."""
    texts = [p for p in plan.prompts for _ in range(images)]
    texts = texts + [negatives[i % len(negatives)] for _ in plan.prompts for i in range(images)]
    with router.rows(rows):
        return encode(texts)


@dataclass
class ComposeResult:
    latents: torch.Tensor
    plan: ComposePlan
    cores: list[CloraCore]  # one per image: its own masks, losses and record
    seconds: float

    @property
    def core(self) -> CloraCore:
        """The first image's core (a single-image composition's)."""
        return self.cores[0]


def sigmas_for(sampler: str, alphas_cumprod: torch.Tensor, steps: int) -> torch.Tensor:
    if sampler == "ddim":
        return sigmas_ddim(alphas_cumprod, steps)
    if sampler.endswith("karras"):
        full = sigmas_from_alphas(alphas_cumprod, 1000)
        return sigmas_karras(steps, float(full[-2]), float(full[0]))
    return sigmas_from_alphas(alphas_cumprod, steps)


def compose(
    model: Any,
    prompt: str,
    loras: Mapping[str, Any],
    settings: CloraSettings | None = None,
    *,
    negative: str = "",
    steps: int = 50,
    cfg_scale: float = 7.5,
    seed: int = 0,
    sampler: str = "ddim",
    width: int = 512,
    height: int = 512,
    images: int = 1,
    sequential: bool = False,
    triggers: Mapping[str, str] | None = None,
    stop_early: bool = True,
    trim_graph: bool = True,
    bindings: Sequence[Binding] | None = None,
    latents: torch.Tensor | None = None,
    callback: Callable[[dict], None] | None = None,
) -> ComposeResult:
    """One CLoRA generation on an :class:`~lib_loraclr.sd.model.SDModel`-like model; returns latents.

    ``images`` latents from one prompt and seed, sampled together in one UNet pass per pass
    kind, each with its own masks and loss (``result.cores``). ``sequential=True`` runs the
    reference's loop instead (one UNet pass per variant, its CFG pair together); the latents are
    the same up to float rounding. ``stop_early=False`` lets maps-only
    passes run the whole UNet, ``trim_graph=False`` lets a pass that gives the loss and the
    prediction record its whole graph (only to measure those levers)."""
    settings = settings or CloraSettings(enabled=True)
    if sampler not in SAMPLERS:
        raise PromptError(f"sampler {sampler!r} is not one of {', '.join(SAMPLERS)}")
    trigger_of = triggers or {
        n: (lora.trigger_words[0] if getattr(lora, "trigger_words", None) else "")
        for n, lora in loras.items()
    }
    counter = tokenizer_counter(model.tokenizer)
    plan = plan_composition(prompt, counter, trigger_of.get, bindings, lora_exists=loras.__contains__)
    used = {b.lora for b in plan.bindings} | {s.lora for s in plan.styles}
    layers = model.layer_map()
    image_rows = row_loras(plan, loras, 1)
    rows = image_rows * images  # image after image, each image's (half, variant) rows
    param = next(model.unet.parameters())
    schedule = DiscreteSchedule(model.alphas_cumprod)
    if latents is None:
        gen = torch.Generator().manual_seed(seed)
        scale = model.family.latent_scale
        latents = torch.randn(images, 4, height // scale, width // scale, generator=gen)
    x = latents.to(device=param.device, dtype=param.dtype)
    sigmas = sigmas_for(sampler, model.alphas_cumprod.float().cpu(), steps).to(param.device)
    started = time.perf_counter()
    # gradients flow to the latent only: frozen weights keep autograd from saving what their
    # gradients would need (memory, time); restored afterwards
    with (
        frozen_parameters(model.unet, *model.text_encoders),
        route_loras(layers, [loras[n] for n in sorted(used)]) as router,
        capture_maps(
            layers,
            heads_by_projection(model.unet),
            map_size(*x.shape[-2:], settings.map_level, attention_levels(model.family)),
        ) as maps,
    ):
        with torch.no_grad():  # one prompt for every image: encoded once
            contexts = encode_variants(
                lambda t: encode_weighted(model, t, counter, size=(height, width), negatives=len(t) // 2),
                router,
                plan,
                [negative],
                image_rows,
                1,
            ).repeat(images)

        def run(x_rows: torch.Tensor, sigma_rows: torch.Tensor, ids: list[int], index: torch.Tensor):
            router.set_rows([rows[r] for r in ids])
            c_in = (sigma_rows**2 + 1) ** -0.5
            return model.eps(
                x_rows * c_in.reshape(-1, 1, 1, 1).to(x_rows.dtype),
                schedule.sigma_to_t(sigma_rows),
                contexts.rows(index),
            )

        def eps_fn(x_rows: torch.Tensor, sigma_rows: torch.Tensor, selected: Rows) -> torch.Tensor:
            if not sequential:
                return run(x_rows, sigma_rows, list(selected), selected.index)
            return _sequential(run, maps, x_rows, sigma_rows, selected, len(plan.prompts))

        cores = [CloraCore(plan, settings, None, maps, cfg_scale) for _ in range(images)]
        batch = CloraBatch(cores, eps_fn, maps, stop_early=stop_early, trim_graph=trim_graph)
        kwargs = (
            {"generator": torch.Generator().manual_seed(seed + 1)} if sampler in ("euler_a", "ddim") else {}
        )
        out = SAMPLERS[sampler](
            lambda xx, sigma, **_: batch.denoise(xx, sigma),
            x * sigmas[0],
            sigmas,
            callback=callback,
            disable=True,
            **kwargs,
        )
    return ComposeResult(out, plan, cores, time.perf_counter() - started)


def _sequential(
    run: Callable,
    maps: Any,
    x_rows: torch.Tensor,
    sigma_rows: torch.Tensor,
    selected: Sequence[int],
    variants: int,
) -> torch.Tensor:
    """The reference's way: one pass per variant (its CFG pair in one batch, every image's rows of
    that variant together), maps gathered per row. Rows are image after image, each image's
    ``(half, variant)`` block a multiple of ``variants`` long, so row ``r`` is variant ``r % variants``."""
    outputs, gathered, order, stopped, layers = [], [], [], False, 0
    stop_early, trim_graph = maps.stop_early, maps.trim_graph
    groups: dict[int, list[int]] = {}
    for i, r in enumerate(selected):
        groups.setdefault(r % variants, []).append(i)
    for v in sorted(groups):
        group = groups[v]
        maps.reset(stop_early=stop_early, trim_graph=trim_graph)
        ids = [selected[i] for i in group]
        try:
            with pass_grad_mode():  # each variant's pass records its own graph up to its maps
                outputs.append(
                    run(x_rows[group], sigma_rows[group], ids, torch.tensor(ids, device=x_rows.device))
                )
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


def plain_generation(
    model: Any,
    prompt: str,
    *,
    negative: str = "",
    steps: int = 50,
    cfg_scale: float = 7.5,
    seed: int = 0,
    sampler: str = "ddim",
    width: int = 512,
    height: int = 512,
) -> tuple[torch.Tensor, float]:
    """The same sampler without CLoRA (for the cost comparison)."""
    from lib_loraclr.sd.sampling import CFGDenoiser, EpsDenoiser

    param = next(model.unet.parameters())
    gen = torch.Generator().manual_seed(seed)
    scale = model.family.latent_scale
    x = torch.randn(1, 4, height // scale, width // scale, generator=gen)
    x = x.to(device=param.device, dtype=param.dtype)
    sigmas = sigmas_for(sampler, model.alphas_cumprod.float().cpu(), steps).to(param.device)
    started = time.perf_counter()
    with torch.no_grad():
        both = encode_weighted(model, [prompt, negative], size=(height, width), negatives=1)
        cond, uncond = both.rows([0]), both.rows([1])
    den = CFGDenoiser(EpsDenoiser(model.eps, model.alphas_cumprod))
    kwargs = {"generator": torch.Generator().manual_seed(seed + 1)} if sampler in ("euler_a", "ddim") else {}
    out = SAMPLERS[sampler](
        lambda xx, sigma, **_: den(xx, sigma, cond, uncond, cfg_scale),
        x * sigmas[0],
        sigmas,
        disable=True,
        **kwargs,
    )
    return out, time.perf_counter() - started


def save_masks(result: ComposeResult, folder: Path) -> list[Path]:
    """The last step's masks and, per concept, its variant's mask-token attention map as PNGs."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    state, plan = result.core.state, result.plan
    h, w = state.map_hw or (int(round(state.masks.shape[1] ** 0.5)),) * 2
    variant_rows = result.core.variant_rows(result.core.all_rows)
    masks, maps = state.masks.cpu(), state.maps.cpu()  # kept on the model's device until shown

    def write(values: torch.Tensor, name: str) -> Path:
        pixels = (values.reshape(h, w).clamp(0, 1).numpy() * 255).round().astype("uint8")
        path = folder / name
        Image.fromarray(pixels).resize((w * 8, h * 8), Image.NEAREST).save(path)
        return path

    names = ["base", *[b.lora for b in plan.bindings]]
    paths = [write(masks[v], f"mask_{v}_{name}.png") for v, name in enumerate(names)]
    for v in range(1, len(names)):
        tokens = [p for p in plan.mask_tokens[v] if p < maps.shape[2]]
        if tokens:
            attn = maps[variant_rows[v]].mean(dim=0)[:, tokens].sum(dim=1)
            paths.append(write(attn / attn.max().clamp_min(1e-12), f"attention_{v}_{names[v]}.png"))
    return paths


def overlap_fraction(masks: torch.Tensor) -> float:
    """Share of concept-mask pixels claimed by more than one concept."""
    concept = masks[1:]
    claimed = (concept.sum(dim=0) > 0).float().sum()
    overlap = (concept.sum(dim=0) > 1).float().sum()
    return float(overlap / claimed.clamp_min(1))


def run_compose_demo(
    model: Any, lora_paths: Sequence[Path], out_dir: Path, steps: int = 6, size: int = 128
) -> dict[str, Any]:
    """The demo's composition: two tiny LoRAs bound to 'cat' and 'dog' on the tiny model.

    Writes ``clora_demo.png`` and ``clora_masks/``; returns the figures: the contrastive loss and
    the cross-group attention overlap (:func:`~lib_loraclr.clora.maps.group_overlap`) at the first
    step, before its first latent update vs before its last one (after ``refine_iterations``
    updates), and the final masks' overlap fraction."""
    from lib_loraclr.lora.file import load_lora
    from lib_loraclr.sd.model import to_pil

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    loras = {Path(p).stem: load_lora(p, model_family=model.family.id) for p in list(lora_paths)[:2]}
    a, b = list(loras)
    prompt = f"a <lora:{a}:1> cat and a <lora:{b}:1> dog in the forest"
    settings = CloraSettings(enabled=True, max_step=steps // 2, refine_steps=(0,), refine_iterations=4)
    result = compose(
        model, prompt, loras, settings, steps=steps, width=size, height=size, sampler="ddim", seed=0
    )
    losses = [entry[1] for entry in result.core.state.losses]
    first_step = [loss for step, loss, _ in result.core.state.losses if step == 0]
    overlaps = [value for step, value in result.core.state.overlaps if step == 0]
    image_path = out_dir / "clora_demo.png"
    to_pil(model.decode(result.latents))[0].save(image_path)
    masks = save_masks(result, out_dir / "clora_masks")
    return {
        "prompt": prompt,
        "variants": list(result.plan.prompts),
        "image": str(image_path),
        "masks_dir": str(out_dir / "clora_masks"),
        "masks": [str(p) for p in masks],
        "loss_before": first_step[0] if first_step else None,
        "loss_after": first_step[-1] if first_step else None,
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "overlap_before": overlaps[0] if overlaps else None,
        "overlap_after": overlaps[-1] if overlaps else None,
        "mask_overlap_fraction": overlap_fraction(result.core.state.masks.cpu()),
        "seconds": result.seconds,
    }
