"""Shipped model configs and the noise schedule, so nothing is fetched from the hub.

``lib_loraclr/sd/json/<stem>_<part>.json`` hold each family's values (the family names its stem
and parts) for diffusers' ``UNet2DConditionModel`` and ``AutoencoderKL`` and transformers'
``CLIPTextConfig``; the tiny test models and checkpoints of other widths are the same dicts with a
few widths replaced.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

import torch

from lib_loraclr.families import DEFAULT, ModelFamily

CONFIG_NAMES = DEFAULT.config_parts
NATIVE_RESOLUTION = DEFAULT.native_resolution  # the default family's pictures, in pixels
LATENT_SCALE = DEFAULT.latent_scale  # pixels per latent cell (the VAE's three downsamples)


def native_resolution(latent_size: Any = None, family: ModelFamily = DEFAULT) -> int:
    """The picture size a model was trained at, from the latent size its config names (diffusers'
    ``unet.sample_size``, ldm's ``model.params.image_size``); the family's own when it names none."""
    try:
        size = int(latent_size)
    except (TypeError, ValueError):
        return family.native_resolution
    return size * family.latent_scale if size > 0 else family.native_resolution


def family_config(family: ModelFamily, part: str) -> dict[str, Any]:
    """A fresh copy of the family's shipped config ``part`` (one of its ``config_parts``)."""
    if part not in family.config_parts:
        raise ValueError(
            f"unknown config part {part!r} of {family.title}; expected one of {', '.join(family.config_parts)}"
        )
    name = f"{family.config_stem}_{part}.json"
    text = resources.files("lib_loraclr.sd").joinpath("json", name).read_text(encoding="utf-8")
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


def sd15_config(part: str) -> dict[str, Any]:
    """A fresh copy of the default family's shipped config ``part`` (one of :data:`CONFIG_NAMES`)."""
    return family_config(DEFAULT, part)


def betas_scaled_linear(start: float = 0.00085, end: float = 0.012, steps: int = 1000) -> torch.Tensor:
    """SD's training betas: linear in sqrt(beta) (ldm's "linear" schedule), float64."""
    return torch.linspace(start**0.5, end**0.5, steps, dtype=torch.float64) ** 2


def sd_alphas_cumprod(scheduler: dict[str, Any] | None = None) -> torch.Tensor:
    """``alphas_cumprod`` of the SD1.x schedule as the ldm model stores it (float32, 1000 entries)."""
    cfg = scheduler or sd15_config("scheduler")
    if cfg.get("beta_schedule", "scaled_linear") != "scaled_linear":
        raise ValueError(f"only the scaled_linear SD schedule is supported, got {cfg['beta_schedule']!r}")
    betas = betas_scaled_linear(cfg["beta_start"], cfg["beta_end"], cfg["num_train_timesteps"])
    return torch.cumprod(1.0 - betas, dim=0).to(torch.float32)


def ldm_schedule_buffers(scheduler: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """The 12 schedule buffers an ldm ``LatentDiffusion`` checkpoint carries, computed as ldm does
    (float64 math, stored float32), so checkpoints we write have the real layout key for key."""
    cfg = scheduler or sd15_config("scheduler")
    betas = betas_scaled_linear(cfg["beta_start"], cfg["beta_end"], cfg["num_train_timesteps"])
    alphas = 1.0 - betas
    ac = torch.cumprod(alphas, dim=0)
    ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    out = {
        "betas": betas,
        "alphas_cumprod": ac,
        "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": ac.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - ac).sqrt(),
        "log_one_minus_alphas_cumprod": (1.0 - ac).log(),
        "sqrt_recip_alphas_cumprod": (1.0 / ac).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / ac - 1.0).sqrt(),
        "posterior_variance": post_var,
        "posterior_log_variance_clipped": post_var.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * ac_prev.sqrt() / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - ac_prev) * alphas.sqrt() / (1.0 - ac),
    }
    return {k: v.to(torch.float32) for k, v in out.items()}


TOWER_PARTS = ("text_encoder", "text_encoder_2")  # config parts of the text towers, in order


def build_networks(configs: dict[str, Any], device: torch.device | str | None = None) -> dict[str, Any]:
    """Every network ``configs`` describes, by part name: the UNet, the text towers (the second,
    SDXL's, with its pooled projection) and the VAE when it has a config; ``device="meta"``
    allocates nothing."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    kinds = {"text_encoder": CLIPTextModel, "text_encoder_2": CLIPTextModelWithProjection}
    out: dict[str, Any] = {}
    with torch.device(device or "cpu"):
        out["unet"] = UNet2DConditionModel(**configs["unet"])
        for part in TOWER_PARTS:
            if configs.get(part) is not None:
                out[part] = kinds[part](CLIPTextConfig(**configs[part]))
        if configs.get("vae") is not None:
            out["vae"] = AutoencoderKL(**configs["vae"])
    return out


def build_modules(
    unet_cfg: dict[str, Any],
    text_cfg: dict[str, Any],
    vae_cfg: dict[str, Any] | None,
    device: torch.device | str | None = None,
) -> tuple[Any, Any, Any]:
    """(unet, text_encoder, vae) of a one-tower model (:func:`build_networks`)."""
    nets = build_networks({"unet": unet_cfg, "text_encoder": text_cfg, "vae": vae_cfg}, device)
    return nets["unet"], nets["text_encoder"], nets.get("vae")
