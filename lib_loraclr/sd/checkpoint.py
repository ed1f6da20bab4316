"""SD1.x checkpoints in the original ldm layout <-> :class:`~lib_loraclr.sd.model.SDModel`.

The WebUI loads and saves ``model.diffusion_model.*`` (UNet), ``cond_stage_model.transformer.*``
(CLIP text encoder), ``first_stage_model.*`` (VAE) and 12 noise-schedule buffers. Reading: detect
the family (one this runtime does not load is refused by name), infer widths from tensor shapes (or take the configs we
recorded in the metadata), build the diffusers/transformers modules on the meta device and assign
the converted tensors, so a 4 GB checkpoint is never allocated twice. Every key must be used.
Writing: the inverse, key for key, atomically.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from lib_loraclr import families
from lib_loraclr.errors import LoraFileError
from lib_loraclr.families import DEFAULT
from lib_loraclr.lora.keymap import LDM_TEXT_ROOT, LDM_UNET, te_transformers_to_ldm, unet_diffusers_to_ldm
from lib_loraclr.lora.metadata import checkpoint_family
from lib_loraclr.sd import vae_keys
from lib_loraclr.sd.configs import build_modules, family_config, ldm_schedule_buffers, sd_alphas_cumprod
from lib_loraclr.sd.model import SDModel

log = logging.getLogger(__name__)

UNET = LDM_UNET
TEXT = LDM_TEXT_ROOT
VAE = "first_stage_model."
CONFIG_METADATA_KEY = "loraclr_configs"
SCHEDULE_KEYS = frozenset(ldm_schedule_buffers())
# Keys ldm checkpoints carry that no network uses: the text position ids (a constant) and the EMA copy.
_IGNORED = re.compile(
    r"(cond_stage_model\.transformer\.(text_model\.)?embeddings\.position_ids|model_ema\..*)"
)
# transformers < 4.x layout without "text_model." (A1111's transform_checkpoint_dict_key does the same).
_OLD_TEXT = re.compile(r"cond_stage_model\.transformer\.(embeddings|encoder|final_layer_norm)\.")


# -- family and widths ----------------------------------------------------------------------------
def check_family(shapes: Mapping[str, tuple[int, ...]], source: str) -> None:
    """Refuse a checkpoint of a family this runtime does not load, naming what it is."""
    family = checkpoint_family(shapes)
    if family in families.TITLES and family not in (families.DEFAULT.id, families.UNKNOWN):
        raise LoraFileError(
            source,
            f"is an {families.TITLES[family]} checkpoint; this runtime loads {DEFAULT.title} "
            f"({DEFAULT.example}-family) checkpoints only",
        )  # other shapes (tiny test models) are read as the default family's
    if not any(k.startswith(UNET) for k in shapes):
        raise LoraFileError(source, f"has no '{UNET}*' keys: not a Stable Diffusion checkpoint in ldm layout")


def infer_configs(
    shapes: dict[str, tuple[int, ...]], source: str = "<state dict>"
) -> dict[str, dict[str, Any]]:
    """Configs for the networks from ldm tensor shapes: the family's inference (it knows which keys
    show which widths) over its shipped configs, unless the checkpoint records ours."""
    family = families.or_default(checkpoint_family(shapes))
    if family.infer_configs is None:
        raise LoraFileError(source, f"{family.title} checkpoints cannot be read by this runtime yet")
    return family.infer_configs(shapes, lambda part: family_config(family, part), source)


def to_ldm_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """Every tensor of ``model`` under its ldm checkpoint key (plus the schedule buffers)."""
    out: dict[str, torch.Tensor] = {}
    for key, t in model.unet.state_dict().items():
        out[unet_diffusers_to_ldm(key)] = t
    for key, t in model.text_encoder.state_dict().items():
        out[te_transformers_to_ldm(key)] = t
    n_pos = int(model.text_encoder.config.max_position_embeddings)
    out[TEXT + "text_model.embeddings.position_ids"] = torch.arange(n_pos, device=model.device).unsqueeze(0)
    if model.vae is not None:
        levels = len(model.vae.config.block_out_channels)
        for key, t in model.vae.state_dict().items():
            ldm = vae_keys.vae_diffusers_to_ldm(key, levels)
            out[VAE + ldm] = vae_keys.to_ldm_shape(ldm, t)
    sched = ldm_schedule_buffers(model.configs.get("scheduler"))
    sched["alphas_cumprod"] = model.alphas_cumprod.detach().to("cpu", torch.float32)
    out.update(sched)
    return out


def _normalise_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {(_OLD_TEXT.sub(lambda m: f"{TEXT}text_model.{m[1]}.", k)): v for k, v in sd.items()}


def model_from_ldm_state_dict(
    state_dict: dict[str, torch.Tensor],
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    configs: dict[str, dict[str, Any]] | None = None,
    tokenizer: Any = None,
    source: str = "<state dict>",
) -> Any:
    """Build an :class:`SDModel` from an ldm-layout state dict (strict: every key used)."""
    sd = _normalise_keys(state_dict)
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    check_family(shapes, source)
    cfg = configs or infer_configs(shapes, source)
    unet, text_encoder, vae = build_modules(cfg["unet"], cfg["text_encoder"], cfg.get("vae"), device="meta")
    dtype = dtype or torch.float32
    used: set[str] = set()

    def take(module: Any, part: str, ldm_key_of: Any, reshape: Any = None) -> None:
        wanted = {}
        for key, meta in module.state_dict().items():
            ldm = ldm_key_of(key)
            if ldm not in sd:
                wanted[key] = None
                continue
            t = sd[ldm]
            t = reshape(ldm[len(VAE) :], t) if reshape else t
            if tuple(t.shape) != tuple(meta.shape):
                raise LoraFileError(
                    source,
                    f"{ldm} has shape {tuple(t.shape)}, the {part} built for it expects {tuple(meta.shape)}",
                )
            # a copy: never the file's memory map (a mapped file cannot be replaced on Windows
            # while the model lives, and its tensors are not aligned as the allocator's are)
            wanted[key] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype, copy=True)
            used.add(ldm)
        missing = [ldm_key_of(k) for k, v in wanted.items() if v is None]
        if missing:
            raise LoraFileError(
                source,
                f"{len(missing)} {part} keys are missing (first: {missing[:3]}); the file is incomplete or not {DEFAULT.title}",
            )
        module.load_state_dict(wanted, strict=True, assign=True)

    take(unet, "UNet", unet_diffusers_to_ldm)
    take(text_encoder, "text encoder", te_transformers_to_ldm)
    _restore_buffers(text_encoder, device)
    if vae is not None:
        levels = len(cfg["vae"]["block_out_channels"])
        take(
            vae, "VAE", lambda k: VAE + vae_keys.vae_diffusers_to_ldm(k, levels), vae_keys.to_diffusers_shape
        )
    else:
        log.warning("%s has no VAE (first_stage_model.*); images cannot be decoded", source)
    unexpected = [k for k in sd if k not in used and k not in SCHEDULE_KEYS and not _IGNORED.fullmatch(k)]
    if unexpected:
        raise LoraFileError(
            source,
            f"{len(unexpected)} keys are not part of an {DEFAULT.title} model (first: {unexpected[:3]}); "
            f"not an {DEFAULT.title} checkpoint",
        )
    alphas = sd.get("alphas_cumprod")
    alphas = alphas.to(torch.float32) if alphas is not None else sd_alphas_cumprod(cfg["scheduler"])
    model = SDModel(unet, text_encoder, tokenizer, vae, alphas.to(device), configs=cfg)
    return model.eval().requires_grad_(False)


def _restore_buffers(module: torch.nn.Module, device: torch.device | str) -> None:
    """Non-persistent buffers stay on meta after ``assign``; recreate the one CLIP has."""
    for name, buf in list(module.named_buffers()):
        if buf.is_meta:
            if not name.endswith("position_ids"):
                raise RuntimeError(f"cannot materialise buffer {name}")
            owner = module.get_submodule(name.rsplit(".", 1)[0])
            owner.register_buffer(
                "position_ids", torch.arange(buf.shape[-1], device=device).expand(1, -1), persistent=False
            )


# -- files ----------------------------------------------------------------------------------------
def read_state_dict(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a ``.safetensors`` checkpoint; ``.ckpt``/``.pt`` only weights-only."""
    p = Path(path)
    if not p.is_file():
        raise LoraFileError(p, f"file not found; give the path of an {DEFAULT.title} .safetensors checkpoint")
    if p.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(p), framework="pt") as fh:
                meta = fh.metadata() or {}
                return {k: fh.get_tensor(k) for k in fh.keys()}, meta
        except (SafetensorError, OSError, ValueError) as exc:
            raise LoraFileError(p, f"not a readable safetensors file ({exc})") from exc
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means: refuse the file
        raise LoraFileError(
            p,
            f"refused: not loadable with torch.load(weights_only=True) ({type(exc).__name__}); convert it to .safetensors",
        ) from exc
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        sd = (
            {k: v for k, v in (sd or {}).items() if isinstance(v, torch.Tensor)}
            if isinstance(sd, dict)
            else None
        )
        if not sd:
            raise LoraFileError(p, "holds no tensor state dict; convert it to .safetensors")
    return sd, {}


def load_checkpoint(
    path: str | os.PathLike[str],
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    tokenizer: Any = None,
) -> Any:
    sd, meta = read_state_dict(path)
    configs = None
    if CONFIG_METADATA_KEY in meta:
        try:
            configs = json.loads(meta[CONFIG_METADATA_KEY])
        except json.JSONDecodeError as exc:
            raise LoraFileError(path, f"metadata {CONFIG_METADATA_KEY!r} is not valid JSON ({exc})") from exc
    if tokenizer is None:
        from lib_loraclr.sd.tokenizer import load_clip_tokenizer

        tokenizer = load_clip_tokenizer()
    return model_from_ldm_state_dict(
        sd, device=device, dtype=dtype, configs=configs, tokenizer=tokenizer, source=str(path)
    )


def canonical_header(path: str | os.PathLike[str]) -> None:
    """Rewrite a safetensors file's JSON header with its keys sorted, in place and at the same
    length. safetensors writes its header from hash maps, so the same tensors and metadata give
    other bytes on every write (another sha256, another A1111 short hash); sorted, two identical
    merges are byte-identical. The tensor data is not touched."""
    with open(path, "r+b") as fh:
        size = int.from_bytes(fh.read(8), "little")
        raw = fh.read(size)
        header = json.dumps(
            json.loads(raw), sort_keys=True, separators=(",", ":"), ensure_ascii=False
        ).encode()
        if len(header) > size:  # cannot happen for the same content; keep safetensors' bytes then
            return
        fh.seek(8)
        fh.write(header + b" " * (size - len(header)))


def atomic_save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike[str], metadata: dict[str, str] | None = None
) -> None:
    """Write a safetensors file via a temp file in the same folder + ``os.replace``: readers see the
    old file or the complete new one, never a partial write (also after an exception or kill)."""
    from safetensors.torch import save_file

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        canonical_header(tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(
    model: Any,
    path: str | os.PathLike[str],
    dtype: torch.dtype | None = None,
    metadata: dict[str, str] | None = None,
) -> None:
    """``model`` as an ldm-layout checkpoint; floating tensors cast to ``dtype`` (default: as is),
    the schedule buffers kept float32 like ldm's; our configs recorded in the metadata."""
    tensors = {}
    for k, t in to_ldm_state_dict(model).items():
        keep = k in SCHEDULE_KEYS or not t.is_floating_point() or dtype is None
        tensors[k] = (t if keep else t.to(dtype)).cpu()
    meta = {CONFIG_METADATA_KEY: json.dumps(model.configs, sort_keys=True), **(metadata or {})}
    atomic_save_safetensors(tensors, path, meta)
