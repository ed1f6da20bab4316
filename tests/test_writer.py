"""The writer: weights in the chosen precision, schedules and other buffers in float32; a base the
writer cannot copy is refused before any merge work, with the reader's words (no CLI-only flag)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from lib_loraclr.cli import main
from lib_loraclr.errors import LoraFileError
from lib_loraclr.merge.writer import check_base_file, write_merged_checkpoint


@pytest.mark.parametrize("dtype, torch_dtype", [("fp16", torch.float16), ("fp32", torch.float32)])
def test_weights_take_the_precision_and_schedules_stay_float32(tmp_path, dtype, torch_dtype) -> None:
    base = tmp_path / "base.safetensors"
    save_file(
        {
            "model.diffusion_model.out.2.weight": torch.randn(4, 8, 3, 3),
            "model.diffusion_model.out.2.bias": torch.randn(4),
            "alphas_cumprod": torch.linspace(0.99, 0.01, 10, dtype=torch.float32),
            "betas": torch.linspace(1e-4, 2e-2, 10, dtype=torch.float64),
            "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None],
        },
        str(base),
    )
    out = write_merged_checkpoint(base, tmp_path / "out.safetensors", {}, dtype=dtype)
    written = load_file(str(out))
    assert written["model.diffusion_model.out.2.weight"].dtype == torch_dtype
    assert written["model.diffusion_model.out.2.bias"].dtype == torch_dtype
    assert written["alphas_cumprod"].dtype == torch.float32 and written["betas"].dtype == torch.float32
    assert written["cond_stage_model.transformer.text_model.embeddings.position_ids"].dtype == torch.int64


def test_a_ckpt_base_is_refused_up_front(tmp_path, capsys) -> None:
    base = tmp_path / "old.ckpt"
    torch.save({"state_dict": {}}, base)
    with pytest.raises(LoraFileError, match="pickle"):
        check_base_file(base)
    lora = tmp_path / "l.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(1, 1)}, str(lora))
    assert (
        main(
            [
                "merge",
                "--base",
                str(base),
                "--lora",
                str(lora),
                "--out",
                str(tmp_path / "m.safetensors"),
                "--device",
                "cpu",
                "--max-memory",
                "1GiB",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "pickle" in err and ".safetensors" in err and "--allow-pickle" not in err
