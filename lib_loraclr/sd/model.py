"""The SD model runtime outside the WebUI: diffusers UNet/VAE + transformers CLIP text encoders.

The CLI, the demo and the tests need the same three networks the WebUI runs, without the WebUI.
We use the maintained library implementations (diffusers ``UNet2DConditionModel``/``AutoencoderKL``,
transformers ``CLIPTextModel``) built from configs shipped in ``lib_loraclr/sd/json`` instead of
hand-written networks: they are numerically faithful to the original ldm code, are what the papers'
reference code runs on, and keep every module name the LoRA ecosystem (kohya, PEFT) targets.

Checkpoints are read and written in the original ldm layout (what the WebUI loads), see
:mod:`lib_loraclr.sd.checkpoint` (which builds this value object; it never calls back).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lib_loraclr.families import DEFAULT, ModelFamily
from lib_loraclr.sd.cond import Cond
from lib_loraclr.sd.configs import native_resolution

log = logging.getLogger(__name__)


@dataclass(eq=False)
class SDModel:
    """One SD model: the networks, the tokenizer and the noise schedule, of one model family
    (``family``: SD1.x by default; SDXL adds ``text_encoder_2`` and a vector conditioning).

    ``alphas_cumprod`` is the training schedule (float32, 1000 entries) as the ldm model stores it;
    ``configs`` holds the config dicts the networks were built from (``unet``, ``text_encoder``,
    ``vae``, ``scheduler``), so a checkpoint we write records how to rebuild it.
    """

    unet: nn.Module
    text_encoder: nn.Module
    tokenizer: Any
    vae: nn.Module | None
    alphas_cumprod: torch.Tensor
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)
    vae_scaling_factor: float = 0.18215
    text_encoder_2: nn.Module | None = None
    family: ModelFamily = DEFAULT

    # -- placement ------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def text_encoders(self) -> tuple[nn.Module, ...]:
        """The text towers in the family's order."""
        return tuple(t for t in (self.text_encoder, self.text_encoder_2) if t is not None)

    def modules(self) -> dict[str, nn.Module]:
        """The networks by part name (``unet``, ``text_encoder``, ``text_encoder_2`` and ``vae``
        when present)."""
        parts = {"unet": self.unet, "text_encoder": self.text_encoder}
        if self.text_encoder_2 is not None:
            parts["text_encoder_2"] = self.text_encoder_2
        if self.vae is not None:
            parts["vae"] = self.vae
        return parts

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> SDModel:
        """Move all networks in place (returns self); ``alphas_cumprod`` stays float32 like ldm's."""
        for m in self.modules().values():
            # nn.Module.to, not diffusers' override: that one warns on every dtype cast of a model
            # built in code (it expects from_pretrained's torch_dtype).
            nn.Module.to(m, device=device, dtype=dtype)
        if device is not None:
            self.alphas_cumprod = self.alphas_cumprod.to(device)
        return self

    def eval(self) -> SDModel:
        for m in self.modules().values():
            m.eval()
        return self

    def requires_grad_(self, flag: bool = False) -> SDModel:
        for m in self.modules().values():
            m.requires_grad_(flag)
        return self

    @property
    def native_resolution(self) -> int:
        """Its pictures' size as trained (512 for SD1.5; the lab's model 64)."""
        return native_resolution(self.configs.get("unet", {}).get("sample_size"), self.family)

    @property
    def context_dim(self) -> int:
        return int(self.unet.config.cross_attention_dim)

    @property
    def sigmas(self) -> torch.Tensor:
        """k-diffusion's sigma per training timestep: ``sqrt((1 - a) / a)``."""
        ac = self.alphas_cumprod
        return ((1 - ac) / ac) ** 0.5

    # -- networks ---------------------------------------------------------------------------------
    def tokenize(self, prompts: list[str], pad_id: int | None = None) -> torch.Tensor:
        """``(B, 77)`` input ids, padded with the end token as CLIP does (or with ``pad_id``)."""
        from lib_loraclr.sd.tokenizer import tokenize_padded

        max_len = int(self.text_encoder.config.max_position_embeddings)
        ids = tokenize_padded(self.tokenizer, list(prompts), max_len, pad_id)
        return torch.tensor(ids, device=self.device)

    def encode_prompt(self, prompts: list[str] | str, size: tuple[int, int] | None = None) -> Cond:
        """The conditioning of ``prompts``, as the family's towers make it: SD1.x's context is
        CLIP's last hidden state after the final LayerNorm (the WebUI with CLIP skip 1); SDXL's
        is both towers' penultimate layers side by side, with the second tower's pooled
        projection and the picture's sizes (``size``, default the native square; no crop) as
        ``text_embeds`` and ``time_ids``, the names diffusers' UNet takes them by. Plain text;
        no ``(word:1.2)`` weighting."""
        if isinstance(prompts, str):
            prompts = [prompts]
        hidden, pooled = self.tower_states(self.tokenize(prompts))
        return Cond(torch.cat(hidden, dim=-1), self.vector_parts(pooled, len(prompts), size))

    def tower_states(self, ids: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Each tower's part of the context for ``(B, 77)`` token ids padded with the end token
        (a tower with its own padding id re-pads them), and the pooled projection when a tower
        gives one: the pieces a prompt weighting scales tower by tower."""
        from lib_loraclr.sd.tokenizer import pad_after_end

        hidden, pooled = [], None
        for tower, encoder in zip(self.family.towers, self.text_encoders, strict=True):
            tower_ids = ids if tower.pad_id is None else pad_after_end(ids, tower.pad_id)
            out = encoder(input_ids=tower_ids, output_hidden_states=tower.penultimate)
            hidden.append(out.hidden_states[-2] if tower.penultimate else out.last_hidden_state)
            if tower.pooled:
                pooled = out.text_embeds
        return hidden, pooled

    def vector_parts(
        self, pooled: torch.Tensor | None, rows: int, size: tuple[int, int] | None = None
    ) -> dict[str, torch.Tensor]:
        """The UNet's inputs beside the context: the pooled text and the picture's (original,
        crop, target) sizes where the family conditions on them; empty for SD1.x."""
        extra = {} if pooled is None else {"text_embeds": pooled}
        if self.family.size_conditioning:
            h, w = size or (self.native_resolution, self.native_resolution)
            dtype = pooled.dtype if pooled is not None else self.dtype
            sizes = torch.tensor([[h, w, 0, 0, h, w]], device=self.device, dtype=dtype)
            extra["time_ids"] = sizes.expand(rows, -1)
        return extra

    def eps(self, x: torch.Tensor, t: torch.Tensor | float | int, cond: Cond) -> torch.Tensor:
        """UNet noise prediction for latents ``x`` (B, 4, h, w) at training timestep(s) ``t`` under
        ``cond`` (its extra parts go to the UNet's ``added_cond_kwargs``).

        ``t`` may be a scalar or a (B,) tensor, integer or fractional (k-diffusion interpolates
        timesteps). Inputs are cast to the model's dtype; the output comes back in ``x.dtype``.
        """
        dtype = self.dtype
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        cond = cond.to(dtype)
        added = dict(cond.extra) or None
        out = self.unet(
            x.to(dtype), t, encoder_hidden_states=cond.context, added_cond_kwargs=added, return_dict=False
        )[0]
        return out.to(x.dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images ``(B, 3, 8h, 8w)`` in [0, 1] (use :func:`to_pil` for PIL images)."""
        if self.vae is None:
            raise RuntimeError(
                "this SDModel was built without a VAE; rebuild it with the VAE to decode images"
            )
        z = latents.to(self.dtype) / self.vae_scaling_factor
        img = self.vae.decode(z, return_dict=False)[0]
        return ((img.float() + 1) / 2).clamp(0, 1)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] ``(B, 3, H, W)`` -> scaled latents (posterior mean)."""
        if self.vae is None:
            raise RuntimeError(
                "this SDModel was built without a VAE; rebuild it with the VAE to encode images"
            )
        dist = self.vae.encode(images.to(self.dtype) * 2 - 1, return_dict=False)[0]
        return dist.mean * self.vae_scaling_factor

    # -- names ------------------------------------------------------------------------------------
    def layer_map(self) -> dict[str, nn.Module]:
        """Canonical kohya name -> live ``nn.Linear``/``nn.Conv2d`` of the UNet and text encoder."""
        from lib_loraclr.lora.keymap import layer_map_diffusers

        return layer_map_diffusers(self.unet, *self.text_encoders, family=self.family)


def to_pil(images: torch.Tensor) -> list[Any]:
    """``(B, 3, H, W)`` in [0, 1] -> list of PIL images."""
    from PIL import Image

    arr = (images.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).numpy()) for a in arr]
