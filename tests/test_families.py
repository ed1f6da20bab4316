"""The model-family seam: every fact that differs between families has one owner, and nothing
outside ``lib_loraclr/families`` names a family."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from lib_loraclr import families
from lib_loraclr.families import SD1, SDXL

REPO = Path(__file__).resolve().parents[1]
# a family's id or title as a word: "sd1", "SD1.x", "SDXL", "is_sdxl", "sd3" (not "sd15_config")
_FAMILY_WORD = re.compile(r"(?<![a-z0-9])sd(?:1|2|3|xl)(?![a-z0-9])", re.IGNORECASE)
# the lab is an SD1-architecture model by design (docs/quality.md), not product code
_EXEMPT = ("lib_loraclr/families/", "lib_loraclr/lab/")


def _docstrings(tree: ast.AST) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                found.add(id(body[0].value))
    return found


def family_strings(source: str) -> list[str]:
    """String constants (docstrings aside: they may explain) that name a model family."""
    tree = ast.parse(source)
    docs = _docstrings(tree)
    return [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and id(node) not in docs
        and _FAMILY_WORD.search(node.value)
    ]


def _product_modules() -> list[Path]:
    paths = [*(REPO / "lib_loraclr").rglob("*.py"), *(REPO / "scripts").glob("*.py")]
    return [p for p in paths if not p.relative_to(REPO).as_posix().startswith(_EXEMPT)]


@pytest.mark.parametrize("path", _product_modules(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_no_module_outside_the_families_names_one(path: Path) -> None:
    named = family_strings(path.read_text(encoding="utf-8"))
    assert not named, f"{path.name} names a model family (ask lib_loraclr.families instead): {named}"


def test_the_family_scan_can_fail() -> None:
    planted = (
        'def f():\n    """SD1.x docstrings may explain."""\n    return "sd1", f"is an {x} SDXL", "SD1.5"\n'
    )
    assert sorted(family_strings(planted)) == [" SDXL", "SD1.5", "sd1"]
    assert family_strings('x = "sd15_config", "tiny_sd15.safetensors"') == []


def test_canonical_names_never_collide_and_find_their_family() -> None:
    assert not set(SD1.layers) & set(SDXL.layers)
    assert families.owner("lora_unet_down_blocks_0_attentions_0_proj_in") is SD1
    assert families.owner("lora_unet_input_blocks_4_1_proj_in") is SDXL
    assert families.owner("lora_te2_text_model_encoder_layers_31_mlp_fc2") is SDXL
    # an old spelling finds the canonical layer
    assert families.find_layer("lora_te_encoder_layers_3_mlp_fc1").name == (
        "lora_te_text_model_encoder_layers_3_mlp_fc1"
    )
    assert families.owner("lora_unet_nothing") is None


def test_data_the_engines_read() -> None:
    assert (SD1.native_resolution, SDXL.native_resolution) == (512, 1024)
    assert (SD1.context_width, SDXL.context_width) == (768, 2048)
    assert (SD1.text_width, SDXL.text_width) == (768, 1280)
    assert [t.kohya for t in SDXL.towers] == ["lora_te1_", "lora_te2_"]
    # cross-attention at latent/1../8 in SD1 (down 0-2, mid, up 1-3); SDXL has none at the top level
    assert SD1.cross_attention_downscales == (1, 2, 4, 8)
    assert SDXL.cross_attention_downscales == (2, 4)
    # CLoRA's maps at the paper's W / 32 by default (16 x 16 at 512 px, 32 x 32 at 1024 px)
    from lib_loraclr.clora.attention import attention_levels, map_size

    for family, side in ((SD1, 16), (SDXL, 32)):
        latent = family.native_resolution // family.latent_scale
        assert map_size(latent, latent, "auto", attention_levels(family)) == (side, side)


def test_layer_groups_and_feature_scales_come_from_the_family() -> None:
    from lib_loraclr.merge.options import latent_downscale, layer_group

    assert layer_group("lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k") == "cross_kv"
    assert layer_group("lora_unet_middle_block_1_transformer_blocks_9_ff_net_2") == "spatial"
    assert layer_group("lora_unet_input_blocks_1_0_in_layers_2") is None
    assert layer_group("lora_te2_text_model_encoder_layers_0_self_attn_q_proj") == "te"
    assert latent_downscale("lora_unet_input_blocks_7_1_proj_in") == 4
    assert latent_downscale("lora_unet_output_blocks_3_1_proj_in") == 2
    assert latent_downscale("lora_unet_up_blocks_1_attentions_0_proj_in") == 4
    assert latent_downscale("lora_unet_mid_block_attentions_0_proj_in") == 8


@pytest.mark.parametrize(
    ("flags", "title"),
    [
        ({"is_sdxl": True, "is_sd1": False}, "SDXL"),
        ({"is_sd3": True, "is_sdxl": True}, "SD3"),
        ({"is_sd1": False}, "not SD1.x"),
        ({"is_sd1": True}, None),
    ],
)
def test_the_host_flags_name_the_loaded_family(flags, title) -> None:
    model = type("Model", (), flags)()
    assert families.of_host(model) == title


def test_checkpoint_detection() -> None:
    from tests.sd15_reference import ldm_shapes

    assert families.of_checkpoint(ldm_shapes()) == "sd1"
    assert families.of_checkpoint({"conditioner.embedders.1.model.ln_final.weight": (1280,)}) == "sdxl"
    assert families.of_checkpoint({"cond_stage_model.model.ln_final.weight": (1024,)}) == "sd2"
    assert families.or_default("sd2") is families.DEFAULT and families.get("sdxl") is SDXL
