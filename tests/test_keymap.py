"""Layer names resolve onto the real SD1.5 layout (shared key lists) and onto both runtimes' modules."""

from __future__ import annotations

import pytest

from lib_loraclr.lora import keymap, metadata
from tests.sd15_reference import kohya_modules, ldm_shapes


def test_all_350_kohya_modules_map_to_ldm_weights_of_matching_shape() -> None:
    shapes = ldm_shapes()
    modules = kohya_modules()
    assert len(modules) == 350
    assert sum(1 for m in modules if m[1] == "lora") == 264
    for name, _, path, shape in modules:
        canonical = keymap.normalise_kohya_name(name)
        side, diffusers_path = keymap.kohya_to_diffusers(canonical)
        assert diffusers_path.removeprefix("text_model.") == path, name
        assert keymap.ldm_weight_shape(name, shapes) == shape, name
        assert keymap.diffusers_to_kohya(side, diffusers_path) == canonical


def test_candidate_names_cover_the_shared_list_and_nothing_unknown() -> None:
    shapes = ldm_shapes()
    listed = {keymap.normalise_kohya_name(m[0]) for m in kohya_modules()}
    resolved, unresolved = keymap.resolve_against_keys(keymap.sd1_layer_names(), shapes)
    assert listed <= set(resolved)
    # the only candidates SD1.5 lacks are resnets whose width does not change (no conv_shortcut)
    assert all(name.endswith("conv_shortcut") for name in unresolved)


@pytest.mark.parametrize(
    "name",
    [
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_out_0",
        "lora_unet_up_blocks_3_attentions_2_proj_out",
    ],
)
def test_examples(name: str) -> None:
    assert keymap.kohya_to_ldm(name).startswith("model.diffusion_model.")
    assert keymap.kohya_to_ldm("lora_te_encoder_layers_3_mlp_fc1") == (
        "cond_stage_model.transformer.text_model.encoder.layers.3.mlp.fc1"
    )
    assert keymap.kohya_to_diffusers("lora_unet_unknown_layer") is None
    assert keymap.kohya_to_ldm("lora_te1_text_model_encoder_layers_0_mlp_fc1") is None


def _meta_sd15():
    """The real SD1.5 UNet and text encoder built on the meta device (shapes only, no memory)."""
    import json
    from importlib.resources import files

    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    def config(name: str) -> dict:
        raw = json.loads((files("lib_loraclr.sd") / "json" / f"sd15_{name}.json").read_text())
        return {k: v for k, v in raw.items() if not k.startswith("_")}

    with torch.device("meta"):
        unet = UNet2DConditionModel(**config("unet"))
        text = CLIPTextModel(CLIPTextConfig(**config("text_encoder")))
    return unet, text


@pytest.fixture(scope="module")
def meta_sd15():
    return _meta_sd15()


def test_every_sd15_unet_key_converts_both_ways_onto_the_diffusers_unet(meta_sd15) -> None:
    unet, _ = meta_sd15
    diffusers_shapes = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    ldm = {k: s for k, s in ldm_shapes().items() if k.startswith(keymap.LDM_UNET)}
    assert len(ldm) == len(diffusers_shapes) == 686
    converted = {}
    for key, shape in ldm.items():
        target = keymap.unet_ldm_to_diffusers(key)
        assert diffusers_shapes.get(target) == shape, (key, target)
        assert keymap.unet_diffusers_to_ldm(target) == key
        converted[target] = key
    assert converted.keys() == diffusers_shapes.keys()  # a bijection: every diffusers key hit once


def test_every_sd15_text_encoder_key_converts_both_ways(meta_sd15) -> None:
    _, text = meta_sd15
    prefix = keymap.transformers_text_prefix(text)
    tf_shapes = {k: tuple(v.shape) for k, v in text.state_dict().items()}
    ldm = {
        k: s for k, s in ldm_shapes().items() if k.startswith("cond_stage_model.") and "position_ids" not in k
    }
    assert len(ldm) == len(tf_shapes) == 196
    converted = {}
    for key, shape in ldm.items():
        target = keymap.te_ldm_to_transformers(key, prefix)
        assert tf_shapes.get(target) == shape, (key, target)
        assert keymap.te_transformers_to_ldm(target) == key
        old_layout = key.replace("transformer.text_model.", "transformer.")  # checkpoints without text_model.
        assert keymap.te_ldm_to_transformers(old_layout, prefix) == target
        converted[target] = key
    assert converted.keys() == tf_shapes.keys()


@pytest.mark.parametrize(
    "bad",
    [
        "model.diffusion_model.input_blocks.12.0.in_layers.0.weight",
        "model.diffusion_model.output_blocks.0.1.conv.weight",
        "model.diffusion_model.label_emb.0.0.weight",
        "middle_block.3.in_layers.0.weight",
        "input_blocks.1.0.nonsense.weight",
    ],
)
def test_unknown_unet_keys_raise(bad: str) -> None:
    with pytest.raises(KeyError, match="not an SD1.x UNet key"):
        keymap.unet_ldm_to_diffusers(bad)
    with pytest.raises(KeyError):
        keymap.unet_diffusers_to_ldm("down_blocks.0.resnets.0.nonsense.weight")
    with pytest.raises(KeyError):
        keymap.te_ldm_to_transformers("cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight")


def test_ldm_view_and_diffusers_layer_maps_agree(tiny_model) -> None:
    from lib_loraclr.testing.ldm_view import ldm_view

    diffusers_map = tiny_model.layer_map()
    ldm_map = keymap.layer_map_ldm(ldm_view(tiny_model))
    listed = {keymap.normalise_kohya_name(m[0]) for m in kohya_modules()}
    assert listed <= set(diffusers_map)
    assert set(ldm_map) == set(diffusers_map)
    assert all(ldm_map[name] is diffusers_map[name] for name in ldm_map)


def test_text_encoder_found_under_the_webui_prompt_hijack(tiny_model) -> None:
    """A1111 wraps the embedder: layers live under cond_stage_model.wrapped.transformer."""
    from torch import nn

    root = nn.Module()
    root.cond_stage_model = nn.Module()
    root.cond_stage_model.wrapped = nn.Module()
    root.cond_stage_model.wrapped.transformer = nn.Module()
    root.cond_stage_model.wrapped.transformer.text_model = (
        tiny_model.text_encoder.text_model
        if hasattr(tiny_model.text_encoder, "text_model")
        else tiny_model.text_encoder
    )
    found = keymap.layer_map_ldm(root)
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in found
    assert len(found) == 72


def _kohya_header(names_shapes: dict[str, tuple[int, ...]], rank: int = 4) -> dict[str, tuple[int, ...]]:
    out = {}
    for name, (o, i) in names_shapes.items():
        out[f"{name}.lora_down.weight"] = (rank, i)
        out[f"{name}.lora_up.weight"] = (o, rank)
        out[f"{name}.alpha"] = ()
    return out


K = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
Q = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"


@pytest.mark.parametrize(
    "shapes, family",
    [
        (_kohya_header({K: (640, 768), Q: (768, 768)}), "sd1"),
        (_kohya_header({K: (640, 1024)}), "sd2"),
        (_kohya_header({"lora_te_text_model_encoder_layers_22_mlp_fc1": (4096, 1024)}), "sd2"),
        (_kohya_header({Q: (1024, 1024)}), "sd2"),
        (_kohya_header({Q: (768, 768)}), "sd1"),
        (_kohya_header({"lora_te1_text_model_encoder_layers_0_mlp_fc1": (3072, 768)}), "sdxl"),
        (_kohya_header({"lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k": (640, 2048)}), "sdxl"),
        (_kohya_header({K: (640, 2048)}), "sdxl"),
        ({"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": (4, 1024)}, "sd2"),
        (
            {
                "down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor.to_k_lora.down.weight": (
                    4,
                    768,
                )
            },
            "sd1",
        ),
        ({"text_encoder_2.text_model.encoder.layers.0.mlp.fc1.lora_A.weight": (4, 1280)}, "sdxl"),
        ({f"{K}.lokr_w1": (4, 8), f"{K}.lokr_w2_b": (2, 128)}, "sd2"),
        ({f"{K}.hada_w1_b": (2, 768)}, "sd1"),
        (_kohya_header({"lora_unet_down_blocks_0_resnets_0_conv1": (320, 320)}), "unknown"),
    ],
)
def test_lora_family_from_header_shapes(shapes, family) -> None:
    assert metadata.lora_family(shapes) == family


def test_lora_family_falls_back_to_metadata() -> None:
    conv = _kohya_header({"lora_unet_down_blocks_0_resnets_0_conv1": (320, 320)})
    assert metadata.lora_family(conv, {"ss_base_model_version": "sdxl_base_v1-0"}) == "sdxl"
    assert metadata.lora_family(conv, {"modelspec.architecture": "stable-diffusion-v1/lora"}) == "sd1"
    assert metadata.lora_family(conv, {"ss_base_model_version": "sd_v2"}) == "sd2"


def test_checkpoint_family_and_mismatch_message_names_both() -> None:
    from lib_loraclr.errors import ModelMismatchError

    assert metadata.checkpoint_family(ldm_shapes()) == "sd1"
    sd2 = dict(ldm_shapes())
    sd2["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"] = (320, 1024)
    assert metadata.checkpoint_family(sd2) == "sd2"
    assert metadata.checkpoint_family({"conditioner.embedders.0.x": (1,)}) == "sdxl"
    metadata.require_family("sd1", "sd1", "a.safetensors")
    metadata.require_family("unknown", "sd1", "a.safetensors")
    with pytest.raises(
        ModelMismatchError, match=r"a.safetensors: .*made for SDXL but the loaded model is SD1.x"
    ):
        metadata.require_family("sdxl", "sd1", "a.safetensors")


def test_keymap_does_not_import_torch() -> None:
    """``inspect`` reads headers only; the name rules must not pull torch in."""
    import subprocess
    import sys

    code = "import sys, lib_loraclr.lora.keymap; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
