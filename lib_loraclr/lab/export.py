"""Putting the lab's world into a WebUI: the checkpoint with its ``.yaml``, the LoRAs with their
activation text, so the lab model can be tried (and tested) like any SD1.5 checkpoint."""

from __future__ import annotations

import shutil
from pathlib import Path

from lib_loraclr.lab import build
from lib_loraclr.lab import world as w
from lib_loraclr.lab.model import webui_yaml, write_clip_folder
from lib_loraclr.testing.synthetic_loras import write_sidecar


def export_to_webui(world: Path, models: Path) -> dict[str, Path]:
    """Copy into ``models`` (a WebUI's ``models`` folder): ``Stable-diffusion/lab_sd15.safetensors``,
    its ``.yaml`` (pointing at ``Stable-diffusion/lab_sd15_clip``, written too) and
    ``Lora/<identity>.safetensors`` each with an A1111 sidecar whose activation text is the
    trigger phrase. Never touches other files; returns the written paths."""
    if not build.world_complete(world):
        raise FileNotFoundError(f"{world} holds no complete lab world")
    ckpt_dir, lora_dir = models / "Stable-diffusion", models / "Lora"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    lora_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = ckpt_dir / build.CHECKPOINT
    shutil.copyfile(world / build.CHECKPOINT, checkpoint)
    clip = write_clip_folder(checkpoint.with_name(checkpoint.stem + "_clip"))
    checkpoint.with_suffix(".yaml").write_text(webui_yaml(str(clip.resolve())))
    written = {"checkpoint": checkpoint, "clip": clip}
    for identity in w.IDENTITIES:
        target = lora_dir / f"{identity.name}.safetensors"
        shutil.copyfile(build.lora_path(world, identity), target)
        write_sidecar(target, identity.phrase)
        written[identity.name] = target
    return written
