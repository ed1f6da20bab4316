"""The merge on a tiny SDXL: every layer kind of both towers and the UNet is merged, the model is
left as it was, and the merged checkpoint, written in sgm's layout (the second tower's q/k/v as row
blocks of OpenCLIP's fused tensor), loads back as the base plus exactly the merged offsets."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from lib_loraclr.families import SDXL
from lib_loraclr.merge.engine import MergeConfig, merge_loras
from lib_loraclr.merge.writer import weight_source, write_merged_checkpoint
from lib_loraclr.sd.checkpoint import load_checkpoint, save_checkpoint
from lib_loraclr.testing import synthetic_loras as sl
from lib_loraclr.testing.tiny_sdxl import build_tiny_sdxl

Q2 = "lora_te2_text_model_encoder_layers_3_self_attn_q_proj"
V2 = "lora_te2_text_model_encoder_layers_3_self_attn_v_proj"


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sdxl_merge")
    model = build_tiny_sdxl(seed=7)
    loras = sl.concept_loras(model, folder, (11, 12))
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    config = MergeConfig(concepts=("sks cat", "zwx dog"), steps=2, iterations=3, resolution=64)
    results = merge_loras(model, loras, config, methods=["loraclr", "sum"])
    assert all(torch.equal(before[k], v) for k, v in model.unet.state_dict().items())
    return folder, model, loras, results


def test_every_layer_kind_of_sdxl_is_merged(merged) -> None:
    _, model, loras, results = merged
    names = set(results["loraclr"].offsets)
    assert names == set(loras[0].modules)  # both towers' layers and the UNet's, as the LoRAs have them
    assert {Q2, V2, "lora_te1_text_model_encoder_layers_0_mlp_fc1"} <= names
    assert any(n.startswith("lora_unet_output_blocks_") for n in names)
    for name in (Q2, "lora_unet_middle_block_1_transformer_blocks_9_attn2_to_k"):
        summed = sum(lora.modules[name].delta(dtype=torch.float32) for lora in loras)
        torch.testing.assert_close(results["sum"].offsets[name].reshape(summed.shape), summed)


def test_the_merged_sdxl_checkpoint_is_the_base_plus_the_offsets(merged) -> None:
    folder, model, _, results = merged
    base, out = folder / "base.safetensors", folder / "merged.safetensors"
    save_checkpoint(model, base)
    offsets = results["loraclr"].offsets
    write_merged_checkpoint(base, out, offsets, dtype="fp32")
    original, written = load_file(str(base)), load_file(str(out))
    where = weight_source(Q2, original)
    assert (
        where is not None and where.key.endswith("resblocks.3.attn.in_proj_weight") and where.block == (0, 3)
    )
    changed = {k for k in original if not torch.equal(original[k], written[k])}
    assert changed == {weight_source(n, original).key for n in offsets}
    loaded = load_checkpoint(out, tokenizer=model.tokenizer)
    assert loaded.family is SDXL
    layers, base_layers = loaded.layer_map(), model.layer_map()
    for name, delta in offsets.items():
        want = base_layers[name].weight + delta.reshape(base_layers[name].weight.shape)
        torch.testing.assert_close(layers[name].weight, want, rtol=1e-5, atol=1e-6)


def test_the_cli_merges_sdxl_loras_into_an_sdxl_checkpoint(merged, capsys) -> None:
    """``merge`` on an sgm-layout file: the plan reads its headers, the LoRAs are read with
    SDXL's names, the merged file loads back as SDXL with the merged text and UNet layers."""
    import json

    from lib_loraclr.cli import main

    folder, model, loras, _ = merged
    base, out = folder / "cli_base.safetensors", folder / "cli_merged.safetensors"
    save_checkpoint(model, base)
    args = ["merge", "--base", str(base), "--out", str(out), "--report", str(folder / "r.json")]
    for lora, concept in zip(loras, ("sks cat", "zwx dog"), strict=True):
        args += ["--lora", str(lora.path), "--concept", concept]
    args += ["--steps", "2", "--resolution", "64", "--iterations", "3", "--device", "cpu"]
    assert main([*args, "--max-memory", "20GiB"]) == 0
    report = json.loads((folder / "r.json").read_text())
    assert [c["concept"] for c in report["methods"]["loraclr"]["concepts"]] == ["sks cat", "zwx dog"]
    loaded = load_checkpoint(out, tokenizer=model.tokenizer)
    assert loaded.family is SDXL
    for name in (Q2, "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_v"):
        assert not torch.equal(loaded.layer_map()[name].weight, model.layer_map()[name].weight), name
    capsys.readouterr()
