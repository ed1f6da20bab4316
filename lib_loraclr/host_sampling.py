"""CLoRA inside a WebUI generation: the context that runs around this generation's ``p.sample``.

Host objects arrive as parameters (the processing object, the ``sd_samplers`` module, the
host's interrupt exception), so this stays importable without the WebUI and is exercised in CI
against the stand-in. Everything it patches is restored when ``p.sample`` returns or raises:
the routing and attention hooks, ``sd_samplers.create_sampler``, and the denoiser's ``forward``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from lib_loraclr.attention import capture_maps, heads_by_projection, map_tokens
from lib_loraclr.clora import CloraCore
from lib_loraclr.clora_config import CloraSettings
from lib_loraclr.compose import encode_variants, row_loras
from lib_loraclr.host_patches import frozen_parameters, on_sampler_created, patched_attribute
from lib_loraclr.prompts import ComposePlan
from lib_loraclr.routing import route_loras
from lib_loraclr.webui_model import WebUIModel

log = logging.getLogger(__name__)

# k-diffusion samplers that call the denoiser once per step on sigma (CLoRA counts steps by calls).
# A1111 1.8.0 runs DDIM/PLMS/UniPC through its timestep samplers, which CLoRA does not hook (yet);
# Heun/DPM2 call the model twice per step.
SUPPORTED_SAMPLERS = ("Euler", "Euler a", "DPM++ 2M", "DPM++ 2M Karras", "LMS", "LMS Karras")


def sampler_supported(name: str) -> bool:
    return name in SUPPORTED_SAMPLERS


@dataclass
class GenerationState:
    """Per generation (kept on ``p``): the plan, the loaded LoRAs and the last core for the UI."""

    settings: CloraSettings
    plan: ComposePlan | None = None
    loras: Mapping[str, Any] = field(default_factory=dict)
    cores: list[CloraCore] = field(default_factory=list)


@contextlib.contextmanager
def clora_sampling(p: Any, state: GenerationState, sd_samplers: Any, interrupted: Callable[[], None]) -> Iterator[None]:
    """Run this generation's first sampler through the CLoRA core."""
    model = WebUIModel(p.sd_model)
    layers = model.layer_map()
    images = len(p.prompts)
    plan = state.plan
    rows = row_loras(plan, state.loras, images, styles_too=False)
    unet_root = p.sd_model.model.diffusion_model
    with contextlib.ExitStack() as stack:
        stack.enter_context(frozen_parameters(p.sd_model))
        used = sorted({b.lora for b in plan.bindings})
        router = stack.enter_context(route_loras(layers, [state.loras[n] for n in used]))
        height, width = p.height // 8, p.width // 8
        maps = stack.enter_context(capture_maps(layers, heads_by_projection(unet_root), map_tokens(height, width)))
        with torch.no_grad():
            contexts = encode_variants(model.encode_prompt, router, plan, list(p.negative_prompts), rows, images)

        def install(sampler: Any) -> None:
            denoiser = sampler.model_wrap_cfg
            current: dict[str, Any] = {}

            def eps_fn(x_rows: torch.Tensor, sigma_rows: torch.Tensor, selected: list[int]) -> torch.Tensor:
                router.set_rows([rows[r] for r in selected])
                image_cond = current.get("image_cond")
                cond = {"c_crossattn": [contexts[selected].to(x_rows.dtype)]}
                if image_cond is not None:
                    cond["c_concat"] = [image_cond[[r % images for r in selected]]]
                denoised = denoiser.inner_model(x_rows, sigma_rows, cond=cond)
                return (x_rows - denoised) / sigma_rows.reshape(-1, 1, 1, 1).to(x_rows.dtype)

            core = CloraCore(plan, state.settings, images, eps_fn, maps, float(p.cfg_scale), interrupted)
            state.cores.append(core)

            def forward(x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond):  # the host's signature
                interrupted()
                current["image_cond"] = image_cond
                denoised = core.denoise(x, sigma)
                denoiser.step += 1
                return denoised

            stack.enter_context(patched_attribute(denoiser, "forward", forward))

        stack.enter_context(on_sampler_created(sd_samplers, install))
        yield
