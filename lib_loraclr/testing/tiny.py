"""A tiny SD1-architecture model for tests and the demo: real module names, small widths.

Every block type, block count and layer kind is SD1.5's (4 down/up levels, 2 layers per block,
cross-attention on the first three levels, conv ``proj_in``, CLIP text tower with the real 49408-token
vocabulary and 77 positions), so all 350 kohya module names and every ldm key exist, and LoRA files,
key maps, routing and checkpoint writing run on exactly the code paths a real SD1.5 model takes.
Only the widths are small, so a model builds in a fraction of a second and a UNet call is milliseconds.

Weights are re-drawn from a seeded generator instead of the libraries' initialisers: those zero
``proj_out``/``conv2``/``conv_out`` in places (a LoRA there would have no visible effect) and use the
global RNG (not reproducible alongside other code). LayerNorm/GroupNorm get non-trivial scales and
biases for the same reason.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn

from lib_loraclr.sd.configs import build_modules, sd15_config, sd_alphas_cumprod
from lib_loraclr.sd.model import SDModel

log = logging.getLogger(__name__)

# Widths per level, heads, text width: small, but every GroupNorm divides and heads > 1.
TINY_UNET = {
    "block_out_channels": [16, 32, 64, 64],  # SD: c, 2c, 4c, 4c (so every conv_shortcut exists)
    "attention_head_dim": 2,  # diffusers' name for the number of heads in SD1.x configs
    "cross_attention_dim": 32,
    "norm_num_groups": 8,
    "sample_size": 8,
}
TINY_TEXT = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 2,
    # SD's 12 layers (not fewer) so all 72 text-encoder LoRA names exist; at width 32 they cost little.
    "num_hidden_layers": 12,
    "projection_dim": 32,
}
TINY_VAE = {"block_out_channels": [8, 16, 32, 32], "norm_num_groups": 4, "sample_size": 64}


def tiny_configs() -> dict[str, dict[str, Any]]:
    """The tiny model's configs: SD1.5's with the widths of ``TINY_*`` replaced."""
    return {
        "unet": {**sd15_config("unet"), **TINY_UNET},
        "text_encoder": {**sd15_config("text_encoder"), **TINY_TEXT},
        "vae": {**sd15_config("vae"), **TINY_VAE},
        "scheduler": sd15_config("scheduler"),
    }


# Layers whose output feeds a residual sum (or the model output): drawn smaller so the residual
# stream stays O(1) through the ~30 blocks, but never zero.
_RESIDUAL_OUT = ("conv2", "proj_out", "to_out.0", "conv_out", "fc2", "out_proj", "ff.net.2")


@torch.no_grad()
def init_weights(module: nn.Module, seed: int) -> None:
    """Re-draw every parameter of ``module`` from a generator seeded with ``seed``.

    Weights ~ N(0, gain^2 / fan_in) (gain 1, or 0.5 on residual outputs), biases ~ N(0, 0.02^2),
    norm scales 1 + N(0, 0.1^2) and norm biases N(0, 0.05^2), embeddings N(0, 0.5^2).
    Parameters are visited in ``named_parameters`` order, so the result depends only on the seed.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    norm_params = set()
    for m in module.modules():
        if isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
            norm_params.update(id(p) for p in m.parameters(recurse=False))
    for name, p in module.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if id(p) in norm_params:
            base = 1.0 if leaf == "weight" else 0.0
            std = 0.1 if leaf == "weight" else 0.05
            value = base + std * torch.randn(p.shape, generator=gen)
        elif "embedding" in name:
            value = 0.5 * torch.randn(p.shape, generator=gen)
        elif p.ndim >= 2:
            fan_in = math.prod(p.shape[1:])
            gain = 0.5 if any(f".{k}." in f".{name}" for k in _RESIDUAL_OUT) else 1.0
            value = gain / math.sqrt(fan_in) * torch.randn(p.shape, generator=gen)
        else:
            value = 0.02 * torch.randn(p.shape, generator=gen)
        p.copy_(value.to(p.dtype))


def build_tiny_model(
    seed: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    tokenizer: Any = None,
    with_vae: bool = True,
    configs: dict[str, dict[str, Any]] | None = None,
) -> SDModel:
    """A seeded tiny SD1-architecture :class:`SDModel` (UNet, CLIP text encoder, VAE, SD schedule).

    ``tokenizer``: default the real CLIP tokenizer from :func:`lib_loraclr.sd.tokenizer.load_clip_tokenizer`.
    ``configs``: other widths with the same seeded weights (default :func:`tiny_configs`; SD1.5's
    own configs give a random model at full size).
    Same seed -> bit-identical weights. Latents are 4-channel at 1/8 of the image size, like SD.
    Returned in eval mode with ``requires_grad=False`` on every weight.
    """
    if tokenizer is None:
        from lib_loraclr.sd.tokenizer import load_clip_tokenizer

        tokenizer = load_clip_tokenizer()
    cfg = configs or tiny_configs()
    unet, text_encoder, vae = build_modules(
        cfg["unet"], cfg["text_encoder"], cfg["vae"] if with_vae else None
    )
    # Distinct seeds per part, so adding/removing the VAE never changes the UNet or text weights.
    init_weights(unet, seed * 3 + 0)
    init_weights(text_encoder, seed * 3 + 1)
    if vae is not None:
        init_weights(vae, seed * 3 + 2)
    model = SDModel(
        unet=unet,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        vae=vae,
        alphas_cumprod=sd_alphas_cumprod(cfg["scheduler"]),
        configs=cfg,
    )
    # Inference state like a loaded checkpoint: eval mode, frozen weights (gradients flow to inputs,
    # e.g. CLoRA's latent, without allocating weight gradients); call requires_grad_(True) to train.
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)
