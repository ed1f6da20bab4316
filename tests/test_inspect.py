"""``inspect`` reads only headers: format, base model, rank, and how the layers resolve on a checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lib_loraclr.lora.file import inspect_lora
from lib_loraclr.testing import synthetic_loras as sl
from tests.sd15_reference import kohya_modules, ldm_shapes, write_header_only_checkpoint


@pytest.fixture(scope="module")
def full_sd15(tmp_path_factory):
    return write_header_only_checkpoint(tmp_path_factory.mktemp("ckpt") / "sd15.safetensors", ldm_shapes())


def test_standard_kohya_lora_resolves_264_of_264_on_full_sd15(tmp_path, full_sd15) -> None:
    targets = {name: shape for name, kind, _, shape in kohya_modules() if kind == "lora"}
    lora = tmp_path / "standard.safetensors"
    sl.write_kohya_lora(lora, targets, rank=1, alpha=1.0, metadata={"ss_output_name": "standard"})
    result = subprocess.run(
        [sys.executable, "-m", "lib_loraclr", "inspect", str(lora), "--base", str(full_sd15), "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    info = json.loads(result.stdout)
    assert info["format"] == "lora"
    assert info["base_model"] == "sd1"
    assert info["rank"] == 1
    assert info["modules"] == 264
    assert info["resolved"] == 264
    assert info["unresolved"] == []
    assert info["trigger_words"] == ["standard"]


def test_locon_on_full_sd15_and_unresolved_listed(tmp_path, full_sd15) -> None:
    targets = {name: shape for name, _, _, shape in kohya_modules()}
    targets["lora_unet_down_blocks_0_resnets_0_conv_shortcut"] = (320, 320, 1, 1)  # not in SD1.5
    lora = tmp_path / "locon.safetensors"
    sl.write_kohya_lora(lora, targets, rank=1)
    info = inspect_lora(lora, base=full_sd15)
    assert info["format"] == "locon"
    assert info["modules"] == 351
    assert info["resolved"] == 350
    assert info["unresolved"] == ["lora_unet_down_blocks_0_resnets_0_conv_shortcut"]


@pytest.mark.parametrize(
    "writer, fmt",
    [
        (lambda p, t: sl.write_loha(p, t), "loha"),
        (lambda p, t: sl.write_lokr(p, t), "lokr"),
        (lambda p, t: sl.write_diffusers_lora(p, t, style="peft"), "peft"),
        (lambda p, t: sl.write_diffusers_lora(p, t, style="diffusers"), "diffusers"),
    ],
)
def test_formats_are_named(tmp_path, full_sd15, writer, fmt) -> None:
    targets = {name: shape for name, kind, _, shape in kohya_modules() if kind == "lora"}
    targets = dict(list(targets.items())[:40])
    lora = tmp_path / f"{fmt}.safetensors"
    writer(lora, targets)
    info = inspect_lora(lora, base=full_sd15)
    assert info["format"] == fmt
    assert info["resolved"] == info["modules"] > 0


def test_human_readable_output(tmp_path) -> None:
    lora = tmp_path / "x.safetensors"
    sl.write_kohya_lora(lora, {"lora_te_text_model_encoder_layers_0_mlp_fc1": (8, 4)}, rank=2)
    out = subprocess.run(
        [sys.executable, "-m", "lib_loraclr", "inspect", str(lora)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "format" in out.stdout and "lora" in out.stdout
