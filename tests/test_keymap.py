"""Layer names resolve onto the real SD1.5 layout (shared key lists) and onto both runtimes' modules."""

from __future__ import annotations

import pytest

from lib_loraclr import keymap
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
    ["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_out_0", "lora_unet_up_blocks_3_attentions_2_proj_out"],
)
def test_examples(name: str) -> None:
    assert keymap.kohya_to_ldm(name).startswith("model.diffusion_model.")
    assert keymap.kohya_to_ldm("lora_te_encoder_layers_3_mlp_fc1") == (
        "cond_stage_model.transformer.text_model.encoder.layers.3.mlp.fc1"
    )
    assert keymap.kohya_to_diffusers("lora_unet_unknown_layer") is None
    assert keymap.kohya_to_ldm("lora_te1_text_model_encoder_layers_0_mlp_fc1") is None


def test_ldm_view_and_diffusers_layer_maps_agree(tiny_model) -> None:
    from lib_loraclr.ldm_view import ldm_view

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
    root.cond_stage_model.wrapped.transformer.text_model = tiny_model.text_encoder.text_model if hasattr(
        tiny_model.text_encoder, "text_model") else tiny_model.text_encoder  # fmt: skip
    found = keymap.layer_map_ldm(root)
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in found
    assert len(found) == 72
