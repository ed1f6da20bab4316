"""An ldm-named view of an :class:`SDModel`: the same layer objects under the WebUI's module names.

Glue code written for the WebUI finds layers by name on ``shared.sd_model``
(``model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k``,
``cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj``,
``first_stage_model.decoder.up.0.block.0.conv1``). Tests and the CLI run diffusers modules whose
names differ. :func:`ldm_view` builds a module tree whose ``named_modules()`` yields the SAME leaf
module objects (so a hook or weight change through the view is a change of the runtime's layer)
under ldm names, plus ``apply_model`` like ldm's ``LatentDiffusion``. Containers between leaves are
plain ``nn.Module`` stand-ins; only the leaves and the text transformer are real.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lib_loraclr.lora.keymap import LDM_UNET, transformers_text_prefix, unet_diffusers_to_ldm
from lib_loraclr.sd import vae_keys
from lib_loraclr.sd.cond import Cond

_LEAF_TYPES = (nn.Linear, nn.Conv2d, nn.GroupNorm, nn.LayerNorm, nn.Embedding)


class _Node(nn.Module):
    """A named container of the view (ldm's blocks are not rebuilt, only their names)."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover - never called
        raise RuntimeError("ldm_view containers are names only; call apply_model on the view")


def _insert(root: nn.Module, path: str, leaf: nn.Module) -> None:
    node = root
    *parents, last = path.split(".")
    for part in parents:
        child = node._modules.get(part)
        if child is None:
            child = _Node()
            node.add_module(part, child)
        node = child
    node.add_module(last, leaf)


def _leaves(module: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in module.named_modules() if isinstance(m, _LEAF_TYPES)]


class LdmView(nn.Module):
    """Stand-in for the WebUI's ``sd_model`` (SD1.x ``LatentDiffusion``) built on an SDModel."""

    is_sd1 = True
    is_sd2 = False
    is_sdxl = False

    def __init__(self, model: Any) -> None:
        super().__init__()
        object.__setattr__(self, "sd", model)  # not a submodule: names come only from the view
        self.model = _Node()
        unet_root = _Node()
        self.model.add_module("diffusion_model", unet_root)
        for name, leaf in _leaves(model.unet):
            _insert(
                unet_root,
                unet_diffusers_to_ldm(f"{name}.weight").removeprefix(LDM_UNET).rsplit(".", 1)[0],
                leaf,
            )

        # The text transformer is the real module: its own names below text_model are the WebUI's.
        self.cond_stage_model = _Node()
        te = model.text_encoder
        if transformers_text_prefix(te):
            self.cond_stage_model.add_module("transformer", te)
        else:
            holder = _Node()
            holder.add_module("text_model", te)
            self.cond_stage_model.add_module("transformer", holder)

        self.first_stage_model = _Node()
        if model.vae is not None:
            levels = len(model.vae.config.block_out_channels)
            for name, leaf in _leaves(model.vae):
                path = vae_keys.vae_diffusers_to_ldm(f"{name}.weight", levels).rsplit(".", 1)[0]
                _insert(self.first_stage_model, path, leaf)
        self.register_buffer("alphas_cumprod", model.alphas_cumprod, persistent=False)
        self.image_size = model.configs.get("unet", {}).get("sample_size", 64)  # ldm's latent size

    def apply_model(self, x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        """ldm's ``apply_model(x_noisy, t, cond)``: eps prediction; ``cond`` is the context tensor or
        ldm's ``{"c_crossattn": [context]}``."""
        if isinstance(cond, dict):
            cond = torch.cat(list(cond["c_crossattn"]), dim=1)
        return self.sd.eps(x, t, Cond(cond))

    def get_learned_conditioning(self, prompts: Any) -> torch.Tensor:
        """ldm's text conditioning (a context tensor), through this view's own text encoder (a
        copy runs its copy)."""
        return self.sd.encode_prompt(list(prompts)).context

    def decode_first_stage(self, z: torch.Tensor) -> torch.Tensor:
        return self.sd.decode(z)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        return self.apply_model(x, t, cond)


def ldm_view(model: Any) -> LdmView:
    """The ldm-named view of ``model`` (an :class:`~lib_loraclr.sd.model.SDModel`); see module doc."""
    return LdmView(model)
