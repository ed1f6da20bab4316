"""The WebUI's loaded SD1.x model seen through the small interface our engines use.

Duck-typed on the objects A1111 1.8.0 hands extensions (``shared.sd_model``: an ldm
``LatentDiffusion`` with ``apply_model``, ``get_learned_conditioning``, ``alphas_cumprod`` and the
original module names); nothing here imports the WebUI, so the same code runs against the CI
stand-in and the real host.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from lib_loraclr import families
from lib_loraclr.errors import LoraClrError
from lib_loraclr.lora import keymap
from lib_loraclr.sd.cond import Cond
from lib_loraclr.sd.configs import native_resolution

log = logging.getLogger(__name__)


_SUPPORTED = families.DEFAULT  # the one family the WebUI paths run today (issue 17 lifts this)


class _SizedPrompts(list):
    """A prompt list with the picture's size as attributes, the shape of the host's
    ``prompt_parser.SdConditioning`` (a list subclass) that its conditioning code reads."""

    height: int
    width: int


def require_sd1(sd_model: Any) -> None:
    """Refuse anything but a model of the supported family, naming the loaded one (from the
    host's flags: SD3, SDXL, SD2.x, or one the host does not flag as supported, e.g. a later family
    or a diffusers pipeline)."""
    title, example = _SUPPORTED.title, _SUPPORTED.example
    if sd_model is None:
        raise LoraClrError(f"no model is loaded; load an {title} checkpoint (e.g. {example})")
    family = families.of_host(sd_model)
    if family is None and getattr(getattr(sd_model, "model", None), "diffusion_model", None) is None:
        family = f"not {title} (it has no ldm UNet at model.diffusion_model)"
    if family is not None:
        raise LoraClrError(
            f"the loaded model is {family}; LoRACLR and CLoRA work on {title} models only: "
            f"load an {title} checkpoint (e.g. {example})"
        )


class WebUIModel:
    """Adapter over the WebUI's ``sd_model`` with the merge/compose model interface."""

    def __init__(self, sd_model: Any) -> None:
        require_sd1(sd_model)
        self.sd_model = sd_model
        self._layer_map: dict[str, nn.Module] | None = None

    @property
    def family(self) -> families.ModelFamily:
        return _SUPPORTED

    @property
    def native_resolution(self) -> int:
        """From the latent size of the model's yaml (ldm's ``image_size``: 64 in A1111's
        v1-inference.yaml, 8 in the lab's), else SD1.x's 512."""
        return native_resolution(getattr(self.sd_model, "image_size", None))

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.sd_model.alphas_cumprod

    @property
    def device(self) -> torch.device:
        return next(self.sd_model.model.diffusion_model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.sd_model.model.diffusion_model.parameters()).dtype

    @property
    def tokenizer(self) -> Any:
        cond = self.sd_model.cond_stage_model
        wrapped = getattr(cond, "wrapped", cond)
        return getattr(wrapped, "tokenizer", None)

    def layer_map(self) -> dict[str, nn.Module]:
        if self._layer_map is None:
            self._layer_map = keymap.layer_map_ldm(self.sd_model)
        return self._layer_map

    def encode_prompt(self, prompts: list[str] | str, size: tuple[int, int] | None = None) -> Cond:
        """The WebUI's own conditioning (emphasis syntax, textual inversions, long prompts), every
        part of it: a model whose learned conditioning is a dict (sgm's, with ``crossattn`` and a
        ``vector``) keeps its other tensors as the :class:`Cond`'s extra parts. ``size`` (height,
        width) rides on the prompt list as the host's ``SdConditioning`` carries it, where sgm's
        conditioning reads the picture size from; ldm's ignores it."""
        if isinstance(prompts, str):
            prompts = [prompts]
        batch = _SizedPrompts(prompts)
        if size is not None:
            batch.height, batch.width = size
        return cond_from_host(self.sd_model.get_learned_conditioning(batch))

    def eps(self, x: torch.Tensor, t: torch.Tensor | float | int, cond: Cond) -> torch.Tensor:
        if not torch.is_tensor(t):
            t = torch.tensor([float(t)], device=x.device)
        t = t.to(x.device).reshape(-1).expand(x.shape[0])
        return self.sd_model.apply_model(x, t, host_cond(cond))


def cond_from_host(learned: Any) -> Cond:
    """The host's learned conditioning (ldm: a context tensor; sgm: a dict of ``crossattn`` and
    the rest) as one :class:`Cond`."""
    if not isinstance(learned, dict):
        return Cond(learned)
    extra = {k: v for k, v in learned.items() if k != "crossattn" and torch.is_tensor(v)}
    return Cond(learned["crossattn"], extra)


def host_cond(cond: Cond, image_cond: torch.Tensor | None = None) -> dict[str, Any]:
    """What the host's denoiser hands its model for ``cond``: ldm's ``{"c_crossattn": [context]}``,
    or, for a conditioning with more parts, sgm's dict of them (A1111's ``CFGDenoiser`` builds
    the same two forms), with ``c_concat`` when the sampler has an image conditioning."""
    out: dict[str, Any] = (
        {"crossattn": cond.context, **cond.extra} if cond.extra else {"c_crossattn": [cond.context]}
    )
    if image_cond is not None:
        out["c_concat"] = [image_cond]
    return out


@contextlib.contextmanager
def builtin_lora_suspended(root: nn.Module, networks: Any = None) -> Iterator[None]:
    """Clean base weights while we work, the built-in Lora extension's patches put back after.

    A1111's built-in writes LoRA deltas into the weights and keeps them until a forward sees
    another set; merging or composing on such weights would bake a stray LoRA in. We swap its
    backups in for the duration and restore the patched tensors (and its bookkeeping) exactly.
    Its patched ``forward`` re-applies ``networks.loaded_networks`` whenever a layer's names differ
    from them, so that list (the built-in's module, ``networks``) is emptied for the block too.
    """
    saved: list[tuple[nn.Module, torch.Tensor, torch.Tensor | None, Any]] = []
    loaded = getattr(networks, "loaded_networks", None)
    loaded_before = list(loaded) if loaded is not None else None
    try:
        if loaded is not None:
            loaded.clear()
        for module in root.modules():
            names = getattr(module, "network_current_names", ())
            backup = getattr(module, "network_weights_backup", None)
            if not names or backup is None or not hasattr(module, "weight"):
                continue
            bias_backup = getattr(module, "network_bias_backup", None)
            saved.append(
                (
                    module,
                    module.weight.detach().clone(),
                    module.bias.detach().clone() if bias_backup is not None else None,
                    names,
                )
            )
            with torch.no_grad():
                module.weight.copy_(backup)
                if bias_backup is not None and module.bias is not None:
                    module.bias.copy_(bias_backup)
            module.network_current_names = ()
        if saved:
            log.info("suspended the built-in Lora extension's patches on %d layers", len(saved))
        yield
    finally:
        with torch.no_grad():
            for module, weight, bias, names in saved:
                module.weight.copy_(weight)
                if bias is not None:
                    module.bias.copy_(bias)
                module.network_current_names = names
        if loaded is not None:
            loaded[:] = loaded_before


@contextlib.contextmanager
def side_model(
    sd_model: Any, state_dict: dict[str, torch.Tensor], free_bytes: int | None = None
) -> Iterator[Any]:
    """A copy of the loaded model holding another checkpoint's weights, dropped afterwards.

    Uses the WebUI's own architecture (no second runtime needed); refused with a clear message
    when the copy would not fit in ``free_bytes`` of memory.
    """
    need = sum(p.numel() * p.element_size() for p in sd_model.parameters())
    if free_bytes is not None and need * 1.2 > free_bytes:
        raise LoraClrError(
            f"merging on another base needs a second copy of the model ({need / 2**30:.1f} GiB) but only "
            f"{free_bytes / 2**30:.1f} GiB is free; load that checkpoint in the WebUI first and merge on the loaded model"
        )
    copy_model = copy.deepcopy(sd_model)
    try:
        # only the UNet and the text encoder take part in a merge; the VAE (whose layout differs
        # between ldm and diffusers-style files, and is often swapped) stays the loaded one's
        merged_parts = ("model.diffusion_model.", "cond_stage_model.")
        missing, _ = copy_model.load_state_dict(
            {k: v for k, v in state_dict.items() if k.startswith(merged_parts)}, strict=False
        )
        wanted = {k for k in copy_model.state_dict() if k.startswith(merged_parts)}
        lacking = sorted(wanted & set(missing))
        if lacking:
            raise LoraClrError(
                f"the base checkpoint lacks {len(lacking)} tensors of the model, e.g. {lacking[0]}; is it an {_SUPPORTED.title} checkpoint?"
            )
        yield copy_model
    finally:
        del copy_model
