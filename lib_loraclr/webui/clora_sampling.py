"""CLoRA inside a WebUI generation: the context that runs around this generation's ``p.sample``.

Host objects arrive as parameters (the processing object, the ``sd_samplers`` module, the
host's interrupt check), so this stays importable without the WebUI and is exercised in CI
against the stand-in. Scopes, narrowest last, all undone in ``finally``:

- ``clora_sampling`` (this generation's ``p.sample``): ``sd_samplers.create_sampler`` wrapped so
  the samplers it creates are ours: the first pass's, and the hires fix's second one (composed
  with the hires prompts' plans, see :func:`hires_settings`; plain when they bind no LoRA);
  img2img creates its sampler in ``p.init``, before ``p.sample``, so there ``p.sampler`` is taken;
- that sampler's ``sample`` / ``sample_img2img`` call: frozen parameters, the LoRA routing hooks, the attention
  capture hooks and the denoiser's ``forward`` replaced by :func:`_clora_forward`'s closure.

The denoiser's ``forward(x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond)`` runs one
CLoRA batch per call (every image's core, one UNet pass per pass kind for all images whose
contexts have one length); on a sampler step's first call it updates the sampler's
own ``x`` in place (k-diffusion samplers and A1111's DDIM reuse it after the call), and every call
is fused with that step's masks (see :func:`step_of_call` for how a call's step is known). Two
host conventions are handled:

- k-diffusion samplers (Euler, Euler a, DPM++ 2M, LMS, Heun, the SDE samplers, Restart, ...; any
  schedule type): ``x`` is the k-diffusion latent,
  ``sigma`` the noise level, the result is the denoised ``x0``;
- A1111's timestep samplers (DDIM, DDIM CFG++; ``CFGDenoiserTimesteps``, recognised by its ``alphas``): ``x``
  is the DDPM latent ``z``, ``sigma`` holds timesteps, the result is ``eps``. The core works in
  k-diffusion terms, so ``x = z / sqrt(alpha_bar)`` and ``sigma = sqrt((1 - alpha_bar) / alpha_bar)``
  on the way in, and the updated latent is written back into ``z``.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from lib_loraclr.clora.attention import attention_levels, capture_maps, heads_by_projection, map_size
from lib_loraclr.clora.batch import CloraBatch, Rows
from lib_loraclr.clora.compose import encode_variants, row_loras
from lib_loraclr.clora.core import CloraCore
from lib_loraclr.clora.prompts import ComposePlan
from lib_loraclr.clora.settings import CloraSettings
from lib_loraclr.errors import Interrupted, LoraClrError
from lib_loraclr.lora.routing import route_loras
from lib_loraclr.sd.cond import Cond
from lib_loraclr.sd.cond import cat as cat_conds
from lib_loraclr.sd.patches import checkpointing_disabled, frozen_parameters
from lib_loraclr.webui.mask_blend import HostBlend
from lib_loraclr.webui.model import WebUIModel, host_cond
from lib_loraclr.webui.patches import on_sampler_created, patched_attribute
from lib_loraclr.webui.samplers import calls_per_step, step_of_call, uncond_skipped

log = logging.getLogger(__name__)


@dataclass
class GenerationState:
    """Per generation (kept on ``p``): the current batch's plan of each image (every image is
    planned from its own prompt), the loaded LoRAs, one core per image sampled so far (for the
    mask images), each image's bindings so far, and an error found in a hook (the WebUI swallows
    exceptions raised in script hooks, so it is raised again from ``p.sample``, where it stops the
    generation)."""

    settings: CloraSettings
    plans: list[ComposePlan] = field(default_factory=list)
    loras: Mapping[str, Any] = field(default_factory=dict)
    cores: list[tuple[ComposePlan, CloraCore]] = field(default_factory=list)
    error: BaseException | None = None
    image_bindings: list[list[dict]] = field(
        default_factory=list
    )  # per image of the job so far, for the infotext
    # (done, total) work units, for the host's progress bar: denoiser calls plus latent updates
    progress: Callable[[int, int], None] | None = None
    # the host's ``modules.scripts.MaskBlendArgs`` (inpainting: scripts' on_mask_blend hook)
    mask_blend_args: Callable | None = None
    # hires fix: the current batch's plan of each image from its hires prompt (None: the hires
    # prompt binds no LoRA, the pass runs plain), and the hires pass's cores
    hr_plans: list[ComposePlan] | None = None
    hr_restore: tuple[slice, list[str]] | None = None  # the job's hires prompts while the host parses them
    hr_cores: list[tuple[ComposePlan, CloraCore]] = field(default_factory=list)
    # the host's options that skip the unconditional half (1.10: "Skip Early CFG", NGMS all steps)
    skip_early_cond: float = 0.0
    ngms_all_steps: bool = False

    def release(self) -> None:
        """Drop everything a failed generation holds (cores with their maps and closures over the
        encoded prompts and the router, the LoRA copies): the host keeps ``p`` after a failure."""
        self.plans, self.loras, self.cores, self.error = [], {}, [], None
        self.hr_plans, self.hr_cores = None, []


def hires_settings(settings: CloraSettings) -> CloraSettings:
    """The hires-fix pass composes without the contrastive update and with masks from its first
    step: the layout is the first pass's, upscaled, and the pass's own attention at its own
    resolution finds it again (finer than the first pass's masks upscaled, and aligned with what
    the pass denoises); an update there would cost the first pass's per-iteration price times
    the pixel ratio for a layout that is already set."""
    return replace(settings, step_mode="masks-only", mask_from_step=0)


def is_timestep_denoiser(denoiser: Any) -> bool:
    """A1111's ``CFGDenoiserTimesteps`` (DDIM/PLMS/UniPC) carries the model's ``alphas``."""
    return getattr(denoiser, "alphas", None) is not None


@contextlib.contextmanager
def clora_sampling(
    p: Any, state: GenerationState, sd_samplers: Any, interrupted: Callable[[], None]
) -> Iterator[None]:
    """Around this generation's ``p.sample``: its first sampler's ``sample`` runs through CLoRA.
    On any error the state is released, so nothing of the failed generation stays reachable."""
    try:
        if state.error is not None:
            raise state.error
        if not state.plans:
            raise LoraClrError(
                "CLoRA: no composition plan for this batch (see the log for the error in before_process_batch)"
            )
        with _sampler_patched(p, state, sd_samplers, interrupted):
            yield
    except BaseException as error:
        state.release()
        with_api_detail(error)
        raise


def with_api_detail(error: BaseException) -> None:
    """The host's API answers an exception raised during a generation with
    ``vars(error).get("status_code", 500)`` and ``{"detail": vars(error).get("detail", "")}``
    (``modules/api/api.py``, ``handle_exception``, 1.8.0 and 1.10.1): without a ``detail`` the client
    gets an empty message, so give it one; our own errors are the request's fault (a prompt, a
    sampler, a LoRA), so they answer 400, not 500."""
    if isinstance(error, Exception) and not getattr(error, "detail", None):
        message = str(error) if isinstance(error, LoraClrError) else f"CLoRA: {type(error).__name__}: {error}"
        with contextlib.suppress(AttributeError, TypeError):
            error.detail = message
    if isinstance(error, LoraClrError) and not isinstance(error, Interrupted):
        with contextlib.suppress(AttributeError, TypeError):
            error.status_code = getattr(error, "status_code", None) or 400


@contextlib.contextmanager
def _sampler_patched(
    p: Any, state: GenerationState, sd_samplers: Any, interrupted: Callable[[], None]
) -> Iterator[None]:
    with contextlib.ExitStack() as stack:

        def install(sampler: Any) -> None:
            hires = bool(getattr(p, "is_hr_pass", False))  # set before the hires pass creates its sampler
            if hires and not state.hr_plans:
                return  # the hires prompt binds no LoRA: a plain pass
            for name in ("sample", "sample_img2img"):
                original = getattr(sampler, name, None)
                if original is None:
                    continue

                def run(*args: Any, _original: Callable = original, **kwargs: Any) -> Any:
                    latent = args[1] if len(args) > 1 else kwargs["x"]  # (p, x, ...): maps at its size
                    with _clora_hooks(p, state, sampler, interrupted, hires, tuple(latent.shape[-2:])):
                        return _original(*args, **kwargs)

                stack.enter_context(patched_attribute(sampler, name, run))

        if is_img2img(p):
            install(p.sampler)  # img2img made its sampler in p.init, before any p.sample
        else:  # txt2img's first pass, and the hires fix's second sampler
            stack.enter_context(on_sampler_created(sd_samplers, install, first_only=False))
        yield


def is_img2img(p: Any) -> bool:
    """img2img's processing object has its init latent and its sampler before ``p.sample``."""
    return getattr(p, "init_latent", None) is not None and getattr(p, "sampler", None) is not None


@contextlib.contextmanager
def _clora_hooks(
    p: Any,
    state: GenerationState,
    sampler: Any,
    interrupted: Callable[[], None],
    hires: bool,
    latent_hw: tuple[int, int],
) -> Iterator[None]:
    """Everything CLoRA patches for one ``sampler.sample`` call (the first pass, or the hires
    pass with its own plans, negatives and settings)."""
    model = WebUIModel(p.sd_model)
    layers = model.layer_map()
    plans = state.hr_plans if hires else state.plans
    negatives = list(p.hr_negative_prompts if hires else p.negative_prompts)
    denoiser = sampler.model_wrap_cfg
    with contextlib.ExitStack() as stack:
        stack.enter_context(frozen_parameters(p.sd_model))
        stack.enter_context(checkpointing_disabled(p.sd_model))  # stock SD1.5 configs turn it on
        bound = sorted({b.lora for plan in plans for b in plan.bindings})
        router = stack.enter_context(route_loras(layers, [state.loras[n] for n in bound]))
        unet = p.sd_model.model.diffusion_model
        settings = hires_settings(state.settings) if hires else state.settings
        hw = map_size(*latent_hw, settings.map_level, attention_levels(model.family))
        maps = stack.enter_context(capture_maps(layers, heads_by_projection(unet), hw))
        rows = [row_loras(plan, state.loras, 1, styles_too=False) for plan in plans]
        keys = [(id(plan), negatives[b % len(negatives)]) for b, plan in enumerate(plans)]
        encoded: dict[tuple, Cond] = {}  # images with the same prompt (one plan) and negative: one encoding
        with torch.no_grad():
            for b, key in enumerate(keys):
                if key not in encoded:
                    encoded[key] = encode_variants(
                        model.encode_prompt, router, plans[b], [key[1]], rows[b], 1
                    )
        contexts = [encoded[key] for key in keys]
        cores = state.hr_cores if hires else state.cores
        forward = _clora_forward(
            p, state, plans, settings, cores, denoiser, sampler, router, maps, rows, contexts, interrupted
        )
        stack.enter_context(patched_attribute(denoiser, "forward", forward))
        yield
        for image, (_, core) in enumerate(cores[-len(plans) :], start=1):  # what this pass did
            updates = Counter(step for step, _, _ in core.state.losses)  # read back once, at the end
            log.info(
                "CLoRA %s pass, image %d: %d denoiser calls fused, latent updates per step %s",
                "hires" if hires else "first",
                image,
                core.state.fused_calls,
                dict(sorted(updates.items())),
            )


def _clora_forward(
    p: Any,
    state: GenerationState,
    plans: list[ComposePlan],
    settings: CloraSettings,
    kept: list[tuple[ComposePlan, CloraCore]],
    denoiser: Any,
    sampler: Any,
    router: Any,
    maps: Any,
    rows: list[list],
    contexts: list[Cond],
    interrupted: Callable[[], None],
) -> Callable:
    """The replacement of the denoiser's ``forward``: one CLoRA core per image of the batch, each
    with its own image's plan (prompts, bindings), rows and contexts (masks and the contrastive
    loss are per image), and one UNet pass per pass kind for all images whose contexts have the
    same length (see :func:`same_context_groups`), called once per denoiser call."""
    timesteps = is_timestep_denoiser(denoiser)
    current: dict[str, Any] = {}

    def eps_fn_for(images: list[int]) -> Callable:
        routed = [row for b in images for row in rows[b]]  # the batch's rows: image after image
        context = cat_conds([contexts[b] for b in images])

        def eps_fn(x_rows: torch.Tensor, sigma_rows: torch.Tensor, selected: Rows) -> torch.Tensor:
            router.set_rows([routed[r] for r in selected])
            image_cond = current.get("image_cond")
            if image_cond is not None:
                image_cond = image_cond.index_select(0, selected.images)
            cond = host_cond(context.rows(selected.index).to(x_rows.dtype), image_cond)
            view = sigma_rows.reshape(-1, 1, 1, 1).to(x_rows.dtype)
            if timesteps:
                t = current["t"].index_select(0, selected.images)
                return denoiser.inner_model(x_rows * (1 + view**2).rsqrt(), t, cond=cond)
            return (x_rows - denoiser.inner_model(x_rows, sigma_rows, cond=cond)) / view

        return eps_fn

    # Progress counts the latent updates beside the denoiser calls: at the refinement steps (paper:
    # 21 updates at step 0) one step is most of the work, and the bar would sit at 0 % meanwhile.
    at = {"call": 0}

    def report() -> None:
        steps = int(getattr(denoiser, "steps", None) or 0)  # set by the sampler once it runs
        calls = int(getattr(denoiser, "total_steps", None) or steps)
        if state.progress is not None and steps:
            extra_total = sum(core.updates_at(s) for core in cores for s in range(steps))
            updates_done = sum(core.state.updates for core in cores)
            state.progress(min(at["call"], calls) + updates_done, calls + extra_total)

    def check() -> None:  # the batch calls it before each latent update and pass
        interrupted()
        report()

    cores = [CloraCore(plan, settings, None, maps, float(p.cfg_scale), check) for plan in plans]
    kept.extend(zip(plans, cores, strict=True))
    batches = [
        (images, CloraBatch([cores[b] for b in images], eps_fn_for(images), maps, check))
        for images in same_context_groups(contexts)
    ]

    def denoise_all(
        latent: torch.Tensor,
        sigma_rows: torch.Tensor,
        t: torch.Tensor | None,
        image_cond: torch.Tensor | None,
        region: Callable | None,
        step: int,
        cond_only: bool,
    ) -> torch.Tensor:
        """Every group's batch on its images of ``latent`` (updated in place); the denoised
        predictions in the batch's order."""
        out = []
        for images, batch in batches:
            whole = len(images) == latent.shape[0]  # one group: the batch's own tensors, no copies
            part = latent if whole else latent[images]
            current["image_cond"] = image_cond if image_cond is None or whole else image_cond[images]
            current["t"] = t if t is None or whole else t[images]
            mask = None if region is None else region(images)
            out.append(
                batch.denoise(part, sigma_rows if whole else sigma_rows[images], step, mask, cond_only)
            )
            if not whole:
                with torch.no_grad():
                    latent[images] = part  # the update reaches the batch's latent
        if len(batches) == 1:
            return out[0]
        order = torch.tensor([b for images, _ in batches for b in images], device=latent.device)
        return torch.cat(out)[torch.argsort(order)]

    def forward(x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond):  # the host's signature
        at["call"] = int(getattr(denoiser, "step", 0) or 0)
        step, _ = step_of_call(at["call"], calls_per_step(denoiser))
        check()
        ngms = float(s_min_uncond or 0.0)
        skipped = uncond_skipped(  # no guidance on this call, as the host decides it
            at["call"],
            int(getattr(denoiser, "total_steps", 0) or 0),
            float(sigma.reshape(-1)[0]) if ngms > 0 else 0.0,  # read back only where the rule needs it
            ngms,
            state.skip_early_cond,
            state.ngms_all_steps,
        )
        p.extra_generation_params.update(skipped)
        for core in cores:  # the host's scale; DDIM CFG++ sets a multiplier (1 / 12.5)
            core.cfg_scale = float(cond_scale) * float(getattr(denoiser, "cond_scale_miltiplier", 1.0))
        cond_only = bool(skipped)
        blend = HostBlend.of(p, denoiser, sigma, state.mask_blend_args)  # inpainting: the host's blend
        before = blend is not None and blend.before
        x_in = blend(x) if before else x  # blended before denoising: a new tensor, the model's input
        region = None if blend is None else (lambda images: blend.region(images, x.shape[0]))
        if timesteps:
            t = sigma.reshape(-1).expand(x.shape[0])
            alpha_bar = denoiser.alphas.to(x.device, torch.float64)[t.round().long()]
            k_sigma = ((1 - alpha_bar) / alpha_bar).sqrt().float()
            root = alpha_bar.sqrt().reshape(-1, 1, 1, 1).to(x.dtype)
            k_x = x_in / root
            start = k_x.clone() if before else None
            denoised = denoise_all(k_x, k_sigma, t, image_cond, region, step, cond_only)
            with torch.no_grad():  # DDIM continues from the update
                if start is not None:
                    x.add_((k_x - start) * root)  # zero where the update did not reach
                else:
                    x.copy_(k_x * root)
            result = (k_x - denoised) / k_sigma.reshape(-1, 1, 1, 1).to(x.dtype)  # eps
        else:
            start = x_in.clone() if before else None
            sigma_rows = sigma.reshape(-1).expand(x.shape[0])
            denoised = result = denoise_all(x_in, sigma_rows, None, image_cond, region, step, cond_only)
            if start is not None:
                with torch.no_grad():
                    x.add_(x_in - start)  # the update reaches the sampler's own latent
        if getattr(denoiser, "need_last_noise_uncond", False):  # DDIM CFG++ steps along it
            denoiser.last_noise_uncond = torch.cat([core.state.last_uncond for core in cores]).to(x.dtype)
        if blend is not None and not before:
            result = blend(result)
        sampler.last_latent = denoised  # the live preview, as the host's denoiser sets it
        denoiser.step += 1
        return result

    return forward


def same_context_groups(contexts: list[Cond]) -> list[list[int]]:
    """Images whose contexts have the same length (prompts of as many 75-token chunks) share one
    UNet pass; a longer prompt's image goes in a pass of its own, since padding the shorter
    contexts would change their attention (and so their images)."""
    groups: dict[tuple, list[int]] = {}
    for b, context in enumerate(contexts):
        groups.setdefault(tuple(context.context.shape[1:]), []).append(b)
    return list(groups.values())
