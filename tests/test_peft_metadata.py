"""PEFT files whose lora_alpha lives only in diffusers' ``lora_adapter_metadata``: applied at the
host's scale (1, as A1111's built-in does), with a warning that says which weight gives the trained
strength."""

from __future__ import annotations

import json
import logging

import torch
from safetensors.torch import save_file

from lib_loraclr.lora.file import load_lora
from lib_loraclr.lora.metadata import peft_alpha_note


def _peft_file(path, metadata: dict | None):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.randn(
            4, 320, generator=g
        ),
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.randn(
            320, 4, generator=g
        ),
    }
    meta = {"format": "pt"}
    if metadata is not None:
        meta["lora_adapter_metadata"] = json.dumps(metadata)
    save_file(tensors, str(path), metadata=meta)
    return tensors


def test_alpha_only_in_metadata_keeps_the_hosts_scale_and_says_the_weight(tmp_path, caplog) -> None:
    path = tmp_path / "peft_dog.safetensors"
    tensors = _peft_file(path, {"unet.r": 4, "unet.lora_alpha": 8, "unet.use_rslora": False})
    with caplog.at_level(logging.WARNING):
        lora = load_lora(path)
    (module,) = lora.modules.values()
    A, B = tensors.values()
    torch.testing.assert_close(module.delta().reshape(320, 320), B @ A)  # scale 1, as A1111's built-in
    assert "trained scale of unet 2" in caplog.text and "<lora:peft_dog:2>" in caplog.text


def test_the_note_reads_rslora_parts_and_stays_quiet_at_scale_one() -> None:
    both = {
        "unet.r": 16,
        "unet.lora_alpha": 16,
        "text_encoder.r": 4,
        "text_encoder.lora_alpha": 8,
        "text_encoder.use_rslora": True,
    }
    note = peft_alpha_note({"lora_adapter_metadata": json.dumps(both)}, "x")
    assert (
        "text_encoder 4" in note and "<lora:x:4:1>" in note
    )  # rsLoRA: alpha / sqrt(r); A1111's TE:UNET form
    assert (
        peft_alpha_note({"lora_adapter_metadata": json.dumps({"unet.r": 8, "unet.lora_alpha": 8})}, "x")
        is None
    )
    assert (
        peft_alpha_note({}, "x") is None
        and peft_alpha_note({"lora_adapter_metadata": "{not json"}, "x") is None
    )
