"""Checkpoints in the original ldm/sgm layout <-> :class:`~lib_loraclr.sd.model.SDModel`.

The WebUI loads and saves ``model.diffusion_model.*`` (UNet), the text towers under their family's
roots (SD1: ``cond_stage_model.transformer.*``; SDXL: ``conditioner.embedders.0.transformer.*`` and
OpenCLIP's ``conditioner.embedders.1.model.*``), ``first_stage_model.*`` (VAE) and, for SD1, 12
noise-schedule buffers. Reading: detect the family (one this runtime does not load is refused by
name), infer widths from tensor shapes (or take the configs we recorded in the metadata), build the
diffusers/transformers modules on the meta device and assign the converted tensors, so a 7 GB
checkpoint is never allocated twice. Every key must be used. Writing: the inverse, key for key,
atomically.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from lib_loraclr import families
from lib_loraclr.errors import LoraFileError
from lib_loraclr.families import ModelFamily
from lib_loraclr.families.layout import Source, TextTower
from lib_loraclr.lora.keymap import LDM_TEXT_ROOT, LDM_UNET
from lib_loraclr.lora.metadata import checkpoint_family
from lib_loraclr.sd import vae_keys
from lib_loraclr.sd.configs import (
    TOWER_PARTS,
    build_networks,
    family_config,
    ldm_schedule_buffers,
    sd_alphas_cumprod,
)
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
def runtime_family(shapes: Mapping[str, tuple[int, ...]], source: str) -> ModelFamily:
    """The family of a checkpoint this runtime loads; one it does not load is refused by name."""
    found = checkpoint_family(shapes)
    family = families.or_default(found)
    if found in families.TITLES and found not in (family.id, families.UNKNOWN):
        runs = " and ".join(f"{f.title} ({f.example})" for f in families.FAMILIES)
        raise LoraFileError(
            source, f"is an {families.TITLES[found]} checkpoint; this runtime loads {runs} checkpoints"
        )  # other shapes (tiny test models) are read as the default family's
    if not any(k.startswith(UNET) for k in shapes):
        raise LoraFileError(source, f"has no '{UNET}*' keys: not a Stable Diffusion checkpoint in ldm layout")
    return family


def infer_configs(
    shapes: dict[str, tuple[int, ...]], source: str = "<state dict>"
) -> dict[str, dict[str, Any]]:
    """Configs for the networks from ldm tensor shapes: the family's inference (it knows which keys
    show which widths) over its shipped configs, unless the checkpoint records ours."""
    family = families.or_default(checkpoint_family(shapes))
    if family.infer_configs is None:
        raise LoraFileError(source, f"{family.title} checkpoints cannot be read by this runtime yet")
    return family.infer_configs(shapes, lambda part: family_config(family, part), source)


def tower_to_ldm(tower: TextTower, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers text tower's state dict under its checkpoint keys (fused row blocks joined
    in their order, transposed tensors turned back, the layout's extra scalars added)."""
    out: dict[str, torch.Tensor] = {}
    blocks: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for key, t in state.items():
        where = tower.source(key)
        t = t.T if where.transposed else t
        if where.block is None:
            out[where.key] = t
        else:
            blocks.setdefault(where.key, []).append((where.block[0], t))
    for key, parts in blocks.items():
        out[key] = torch.cat([t for _, t in sorted(parts, key=lambda p: p[0])])
    for key, value in tower.ldm_extras().items():
        out[key] = torch.tensor(value, dtype=torch.float32)
    return out


def to_ldm_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """Every tensor of ``model`` under its checkpoint key, as the family's checkpoints hold them
    (SD1: plus the position ids and the 12 schedule buffers ldm keeps)."""
    family = model.family
    out: dict[str, torch.Tensor] = {}
    for key, t in model.unet.state_dict().items():
        out[family.unet_key_to_ldm(key)] = t
    for tower, encoder in zip(family.towers, model.text_encoders, strict=True):
        out.update(tower_to_ldm(tower, encoder.state_dict()))
        if tower.position_ids:
            n_pos = int(encoder.config.max_position_embeddings)
            ids = torch.arange(n_pos, device=model.device).unsqueeze(0)
            out[tower.ldm + "text_model.embeddings.position_ids"] = ids
    if model.vae is not None:
        levels = len(model.vae.config.block_out_channels)
        for key, t in model.vae.state_dict().items():
            ldm = vae_keys.vae_diffusers_to_ldm(key, levels)
            out[VAE + ldm] = vae_keys.to_ldm_shape(ldm, t)
    if family.schedule_buffers:
        sched = ldm_schedule_buffers(model.configs.get("scheduler"))
        sched["alphas_cumprod"] = model.alphas_cumprod.detach().to("cpu", torch.float32)
        out.update(sched)
    return out


def _normalise_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {(_OLD_TEXT.sub(lambda m: f"{TEXT}text_model.{m[1]}.", k)): v for k, v in sd.items()}


class _Reader:
    """Takes each network's tensors out of a checkpoint state dict, checking shapes and counting
    which keys were used, so that a key no network takes is reported."""

    def __init__(self, sd: dict[str, torch.Tensor], family: ModelFamily, device, dtype, source: str) -> None:
        self.sd, self.family, self.device, self.dtype, self.source = sd, family, device, dtype, source
        self.used: set[str] = set()

    def take(
        self,
        module: torch.nn.Module,
        part: str,
        source_of: Callable[[str], Source],
        reshape: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        wanted: dict[str, torch.Tensor | None] = {}
        missing = []
        for key, meta in module.state_dict().items():
            try:
                where = source_of(key)
            except KeyError:
                raise LoraFileError(
                    self.source,
                    f"its keys are {self.family.title}'s but the {part} built from its configs has "
                    f"{key!r}, which {self.family.title} lacks; the file mixes two families' keys",
                ) from None
            if where.key not in self.sd:
                missing.append(where.key)
                continue
            t = where.of(self.sd[where.key])
            t = reshape(where.key, t) if reshape else t
            if tuple(t.shape) != tuple(meta.shape):
                raise LoraFileError(
                    self.source,
                    f"{where.key} has shape {tuple(t.shape)}, the {part} built for it expects {tuple(meta.shape)}",
                )
            # a copy: never the file's memory map (a mapped file cannot be replaced on Windows
            # while the model lives, and its tensors are not aligned as the allocator's are)
            dtype = self.dtype if t.is_floating_point() else t.dtype
            wanted[key] = t.to(device=self.device, dtype=dtype, copy=True).contiguous()
            self.used.add(where.key)
        if missing:
            raise LoraFileError(
                self.source,
                f"{len(missing)} {part} keys are missing (first: {missing[:3]}); "
                f"the file is incomplete or not {self.family.title}",
            )
        module.load_state_dict(wanted, strict=True, assign=True)

    def unused(self) -> list[str]:
        extras = {k for tower in self.family.towers for k in tower.ldm_extras()}
        return [
            k
            for k in self.sd
            if k not in self.used and k not in SCHEDULE_KEYS and k not in extras and not _IGNORED.fullmatch(k)
        ]


def model_from_ldm_state_dict(
    state_dict: dict[str, torch.Tensor],
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    configs: dict[str, dict[str, Any]] | None = None,
    tokenizer: Any = None,
    source: str = "<state dict>",
) -> Any:
    """Build an :class:`SDModel` of the checkpoint's family from a state dict in its checkpoint
    layout (strict: every key used)."""
    sd = _normalise_keys(state_dict)
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    family = runtime_family(shapes, source)
    cfg = configs or infer_configs(shapes, source)
    nets = build_networks(cfg, device="meta")
    reader = _Reader(sd, family, device, dtype or torch.float32, source)
    reader.take(nets["unet"], "UNet", lambda k: Source(family.unet_key_to_ldm(k)))
    encoders = [nets[part] for part in TOWER_PARTS if part in nets]
    if len(encoders) != len(family.towers):
        raise LoraFileError(
            source, f"its configs name {len(encoders)} text towers; {family.title} has {len(family.towers)}"
        )
    for tower, encoder in zip(family.towers, encoders, strict=True):
        reader.take(encoder, "text encoder", tower.source)
        _restore_buffers(encoder, device)
    vae = nets.get("vae")
    if vae is not None:
        levels = len(cfg["vae"]["block_out_channels"])

        def vae_source(key: str) -> Source:
            return Source(VAE + vae_keys.vae_diffusers_to_ldm(key, levels))

        def vae_shape(key: str, t: torch.Tensor) -> torch.Tensor:
            return vae_keys.to_diffusers_shape(key[len(VAE) :], t)

        reader.take(vae, "VAE", vae_source, vae_shape)
    else:
        log.warning("%s has no VAE (first_stage_model.*); images cannot be decoded", source)
    unexpected = reader.unused()
    if unexpected:
        raise LoraFileError(
            source,
            f"{len(unexpected)} keys are not part of an {family.title} model (first: {unexpected[:3]}); "
            f"not an {family.title} checkpoint",
        )
    alphas = sd.get("alphas_cumprod")
    alphas = alphas.to(torch.float32) if alphas is not None else sd_alphas_cumprod(cfg["scheduler"])
    scaling = (cfg.get("vae") or family_config(family, "vae")).get("scaling_factor", 0.18215)
    model = SDModel(
        nets["unet"],
        encoders[0],
        tokenizer,
        vae,
        alphas.to(device),
        configs=cfg,
        vae_scaling_factor=float(scaling),
        text_encoder_2=encoders[1] if len(encoders) > 1 else None,
        family=family,
    )
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
        raise LoraFileError(p, "file not found; give the path of a Stable Diffusion .safetensors checkpoint")
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
