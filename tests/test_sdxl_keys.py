"""SDXL's LoRA key names resolve onto the vendored full-size SDXL lists (tests/data, generated from
the architecture and checked against diffusers' converters) and onto the tiny SDXL model."""

from __future__ import annotations

import logging

import pytest
import torch

from lib_loraclr.families import SDXL
from lib_loraclr.lora import keymap
from lib_loraclr.lora.file import canonical_module_name, load_lora
from lib_loraclr.testing import synthetic_loras as sl
from tests.sdxl_reference import sdxl_kohya_modules, sdxl_ldm_shapes


def test_every_kohya_sdxl_name_maps_to_a_real_layer_and_none_twice() -> None:
    shapes = sdxl_ldm_shapes()
    modules = sdxl_kohya_modules()
    assert len(modules) == 1052 and sum(1 for m in modules if m[1] == "lora") == 986  # 722 UNet + 72 + 192
    targets = set()
    for name, _, path, key, rows, shape in modules:
        assert SDXL.canonical(name) == name, name
        assert keymap.ldm_target(name, SDXL) == (key, rows), name
        assert key in shapes, name
        assert keymap.ldm_weight_shape(name, shapes, SDXL) == shape, name
        assert keymap.kohya_to_diffusers(name, SDXL)[1] == path, name
        targets.add((key, rows))
    assert len(targets) == len(modules)  # no two names on one weight (or one row block)
    listed = {m[0] for m in modules}
    resolved, unresolved = keymap.resolve_against_keys(SDXL.layers, shapes, SDXL)
    assert listed <= set(resolved)
    # the only layers the architecture lists that SDXL lacks: resnets whose width does not change
    assert unresolved and all(n.endswith("skip_connection") for n in unresolved)


def test_te2_q_k_v_are_row_blocks_of_one_fused_weight() -> None:
    shapes = sdxl_ldm_shapes()
    blocks = [
        keymap.ldm_target(f"lora_te2_text_model_encoder_layers_5_self_attn_{p}_proj", SDXL) for p in "qkv"
    ]
    assert {key for key, _ in blocks} == {
        "conditioner.embedders.1.model.transformer.resblocks.5.attn.in_proj_weight"
    }
    assert [rows for _, rows in blocks] == [(0, 1280), (1280, 2560), (2560, 3840)]
    assert shapes[blocks[0][0]] == (3840, 1280)
    assert (
        keymap.kohya_to_ldm("lora_te2_text_model_encoder_layers_5_self_attn_q_proj", SDXL) is None
    )  # no module
    assert keymap.kohya_to_ldm("lora_te2_text_model_encoder_layers_5_mlp_fc1", SDXL).endswith(
        "resblocks.5.mlp.c_fc"
    )


def test_diffusers_style_kohya_and_peft_names_find_the_same_layers() -> None:
    for name, _, path, _, _, _ in sdxl_kohya_modules():
        if name.startswith("lora_unet_"):
            assert SDXL.canonical("lora_unet_" + path.replace(".", "_")) == name, (
                name
            )  # kohya diffusers-style
            assert canonical_module_name(f"unet.{path}", SDXL) == (name, "diffusers")
            assert canonical_module_name(path, SDXL) == (name, "diffusers")  # raw PEFT / old diffusers
        else:
            prefix = "text_encoder." if name.startswith("lora_te1_") else "text_encoder_2."
            assert canonical_module_name(prefix + path, SDXL) == (name, "diffusers"), name
            old = name.replace("_text_model_encoder_", "_encoder_")
            assert SDXL.canonical(old) == name
    # the examples of SDXL.md: ldm-style and its diffusers-style twin
    assert SDXL.canonical("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q") == (
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    )
    assert SDXL.canonical("lora_unet_up_blocks_0_upsamplers_0_conv") == "lora_unet_output_blocks_2_2_conv"
    assert SDXL.canonical("lora_unet_down_blocks_0_attentions_0_proj_in") is None  # no attention at the top


def test_every_sdxl_unet_key_converts_both_ways_onto_the_diffusers_unet() -> None:
    from diffusers import UNet2DConditionModel

    from lib_loraclr.sd.configs import family_config

    with torch.device("meta"):
        unet = UNet2DConditionModel(**family_config(SDXL, "unet"))
    diffusers_shapes = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    ldm = {k: s for k, s in sdxl_ldm_shapes().items() if k.startswith(keymap.LDM_UNET)}
    assert len(ldm) == len(diffusers_shapes) == 1680
    converted = {}
    for key, shape in ldm.items():
        target = keymap.unet_ldm_to_diffusers(key, SDXL)
        assert diffusers_shapes.get(target) == shape, (key, target)
        assert keymap.unet_diffusers_to_ldm(target, SDXL) == key
        converted[target] = key
    assert converted.keys() == diffusers_shapes.keys()
    with pytest.raises(KeyError, match="not an SDXL UNet key"):
        keymap.unet_ldm_to_diffusers("model.diffusion_model.input_blocks.1.1.proj_in.weight", SDXL)


def _tiny_shapes():
    from lib_loraclr.testing.tiny_sdxl import build_tiny_sdxl

    return sl.layer_shapes(build_tiny_sdxl(0).layer_map())


@pytest.fixture(scope="module")
def tiny_shapes():
    return _tiny_shapes()


@pytest.mark.parametrize("writer", ["kohya", "peft", "loha"])
def test_sdxl_lora_files_read_onto_the_tiny_model(tmp_path, tiny_shapes, writer) -> None:
    targets = sl.standard_targets(tiny_shapes, locon=writer == "kohya")
    path = tmp_path / f"{writer}.safetensors"
    if writer == "kohya":
        sl.write_kohya_lora(path, targets, rank=2)
    elif writer == "peft":
        sl.write_diffusers_lora(path, targets, rank=2, family=SDXL)
    else:
        sl.write_loha(path, {n: s for n, s in targets.items() if len(s) == 2}, rank=2)
    lora = load_lora(path, model_family="sdxl", target_shapes=tiny_shapes)
    expected = {n for n, s in targets.items() if writer == "kohya" or len(s) == 2}
    assert set(lora.modules) == expected and not lora.unused_keys
    assert lora.base_model == "sdxl"
    assert {n for n in lora.modules if n.startswith("lora_te2_")}  # the second tower is read
    name = "lora_unet_input_blocks_7_1_transformer_blocks_9_attn2_to_k"
    assert tuple(lora.modules[name].delta().shape) == tiny_shapes[name]


def test_a_te2_layer_without_all_of_q_k_v_out_is_left_out_as_the_host_does(
    tmp_path, tiny_shapes, caplog
) -> None:
    names = [f"lora_te2_text_model_encoder_layers_0_self_attn_{p}_proj" for p in ("q", "k", "v", "out")]
    names += [f"lora_te2_text_model_encoder_layers_1_self_attn_{p}_proj" for p in ("q", "k")]
    path = tmp_path / "partial.safetensors"
    sl.write_kohya_lora(path, {n: tiny_shapes[n] for n in names}, rank=2)
    with caplog.at_level(logging.WARNING):
        lora = load_lora(path, model_family="sdxl")
    assert set(lora.modules) == set(names[:4])
    assert len(lora.unused_keys) == 4  # two layers' lora_down and lora_up
    assert "the WebUI skips such layers" in caplog.text


def test_an_sdxl_lora_on_the_default_family_is_still_refused_by_name(tmp_path, tiny_shapes) -> None:
    from lib_loraclr.errors import ModelMismatchError

    path = tmp_path / "xl.safetensors"
    sl.write_kohya_lora(path, {n: s for n, s in list(tiny_shapes.items())[:4]}, rank=2)
    with pytest.raises(ModelMismatchError, match="made for SDXL but the loaded model is SD1.x"):
        load_lora(path, model_family="sd1")
