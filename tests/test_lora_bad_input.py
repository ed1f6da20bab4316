"""Bad LoRA files give specific errors that name the file and the fix, never a crash."""

from __future__ import annotations

import json
import struct
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from lib_loraclr.errors import LoraFileError, ModelMismatchError
from lib_loraclr.lora.file import check_base_model, load_lora
from lib_loraclr.testing import synthetic_loras as sl

LINEAR = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


def test_missing_file(tmp_path) -> None:
    with pytest.raises(LoraFileError, match=r"missing\.safetensors: file not found"):
        load_lora(tmp_path / "missing.safetensors")


def test_empty_file(tmp_path) -> None:
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(LoraFileError, match="empty.safetensors: is empty"):
        load_lora(tmp_path / "empty.safetensors")


def test_truncated_file(tmp_path) -> None:
    path = tmp_path / "t.safetensors"
    sl.write_kohya_lora(path, {LINEAR: (16, 12)})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40])
    with pytest.raises(LoraFileError, match="t.safetensors: .*(truncated|outside)"):
        load_lora(path)
    path.write_bytes(data[:5])
    with pytest.raises(LoraFileError, match="truncated"):
        load_lora(path)


def test_invalid_header(tmp_path) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", 10) + b"not json!!" + b"\0" * 16)
    with pytest.raises(LoraFileError, match="bad.safetensors: has an invalid safetensors header"):
        load_lora(path)
    path.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(LoraFileError, match="not a valid safetensors file"):
        load_lora(path)


def test_non_tensor_entry(tmp_path) -> None:
    header = json.dumps({"lora_unet_x.lora_up.weight": "hello"}).encode()
    path = tmp_path / "nt.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(LoraFileError, match="is not a tensor"):
        load_lora(path)


def test_pickles_refused_unless_weights_only(tmp_path) -> None:
    path = tmp_path / "old.pt"
    torch.save(
        {f"{LINEAR}.lora_up.weight": torch.ones(16, 2), f"{LINEAR}.lora_down.weight": torch.ones(2, 12)}, path
    )
    with pytest.raises(LoraFileError, match="pickle"):
        load_lora(path)
    lora = load_lora(path, allow_pickle=True)
    assert LINEAR in lora.modules

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt", _use_new_zipfile_serialization=True)
    with pytest.raises(LoraFileError, match="weights-only"):
        load_lora(tmp_path / "evil.pt", allow_pickle=True)


def test_shapes_that_do_not_fit(tmp_path) -> None:
    path = tmp_path / "wide.safetensors"
    sl.write_kohya_lora(path, {LINEAR: (16, 12)})
    with pytest.raises(
        LoraFileError, match=r"1 of 1 layers do not fit .* \(16, 12\) for a \(32, 32\) weight"
    ):
        load_lora(path, target_shapes={LINEAR: (32, 32)})


def test_nan_and_inf(tmp_path) -> None:
    path = tmp_path / "nan.safetensors"
    save_file(
        {
            f"{LINEAR}.lora_up.weight": torch.full((16, 2), float("nan")),
            f"{LINEAR}.lora_down.weight": torch.ones(2, 12),
        },
        str(path),
    )
    with pytest.raises(LoraFileError, match="nan.safetensors: tensor .* NaN or Inf"):
        load_lora(path)


def test_no_known_keys(tmp_path) -> None:
    path = tmp_path / "alien.safetensors"
    save_file({"model.something.weight": torch.ones(2, 2)}, str(path))
    with pytest.raises(
        LoraFileError, match=r"no known LoRA keys \(tried kohya LoRA/LoCon.*found e.g. model.something.weight"
    ):
        load_lora(path)


def test_wrong_base_model(tmp_path) -> None:
    sdxl = tmp_path / "xl.safetensors"
    save_file(
        {
            "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.ones(4, 2),
            "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.ones(2, 4),
        },
        str(sdxl),
    )
    with pytest.raises(ModelMismatchError, match="xl.safetensors: this LoRA was made for SDXL"):
        load_lora(sdxl)
    sd2 = tmp_path / "sd2.safetensors"
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    sl.write_kohya_lora(sd2, {name: (320, 1024)})
    lora = load_lora(sd2)
    assert lora.base_model == "sd2"
    with pytest.raises(ModelMismatchError, match="made for SD2.x but the loaded model is SD1.x"):
        check_base_model(lora, "sd1")


def test_unused_keys_are_warned_not_hidden(tmp_path, caplog) -> None:
    path = tmp_path / "extra.safetensors"
    sl.write_kohya_lora(path, {LINEAR: (16, 12)})
    tensors = dict(__import__("safetensors.torch", fromlist=["load_file"]).load_file(str(path)))
    tensors["lora_unet_foo.dora_scale"] = torch.ones(3)
    save_file(tensors, str(path))
    lora = load_lora(path)
    assert lora.unused_keys == ["lora_unet_foo.dora_scale"]
    assert "not used" in caplog.text


def test_cli_error_is_one_clear_line(tmp_path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "lib_loraclr", "inspect", str(tmp_path / "nope.safetensors")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: nope.safetensors: file not found")
