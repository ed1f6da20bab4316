"""The tiny SDXL model has SDXL's architecture: its layout, conditioning and every kohya name."""

from __future__ import annotations

import pytest
import torch

from lib_loraclr.families import SDXL
from lib_loraclr.sd.cond import Cond
from lib_loraclr.testing.tiny_sdxl import build_tiny_sdxl
from tests.sdxl_reference import sdxl_kohya_modules


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_sdxl(seed=0)


def test_the_layout_is_sdxls(tiny) -> None:
    unet = tiny.unet
    assert [type(b).__name__ for b in unet.down_blocks] == [
        "DownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
    ]
    assert [len(a.transformer_blocks) for a in unet.down_blocks[1].attentions] == [2, 2]
    assert [len(a.transformer_blocks) for a in unet.down_blocks[2].attentions] == [10, 10]
    assert len(unet.mid_block.attentions[0].transformer_blocks) == 10
    assert unet.config.addition_embed_type == "text_time"
    # the vector: tower 2's pooled projection and six size embeddings, as SDXL's 1280 + 6 x 256
    width = tiny.text_encoder_2.config.projection_dim + 6 * unet.config.addition_time_embed_dim
    assert (
        unet.add_embedding.linear_1.in_features == unet.config.projection_class_embeddings_input_dim == width
    )
    assert (
        unet.config.cross_attention_dim
        == tiny.text_encoder.config.hidden_size + tiny.text_encoder_2.config.hidden_size
    )
    assert (tiny.text_encoder.config.num_hidden_layers, tiny.text_encoder_2.config.num_hidden_layers) == (
        12,
        32,
    )


def test_same_seed_same_weights_other_seed_other() -> None:
    a, b, c = build_tiny_sdxl(1), build_tiny_sdxl(1), build_tiny_sdxl(2)
    key = "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k.weight"
    assert torch.equal(a.unet.state_dict()[key], b.unet.state_dict()[key])
    assert not torch.equal(a.unet.state_dict()[key], c.unet.state_dict()[key])


def test_a_step_runs_with_sdxl_conditioning_and_the_vector_matters(tiny) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    context = torch.randn(2, 77, tiny.unet.config.cross_attention_dim, generator=gen)
    pooled = torch.randn(2, tiny.text_encoder_2.config.projection_dim, generator=gen)
    sizes = torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)
    t = torch.tensor([500, 500])
    out = tiny.eps(x, t, Cond(context, {"text_embeds": pooled, "time_ids": sizes}))
    assert out.shape == x.shape and torch.isfinite(out).all()
    other = tiny.eps(x, t, Cond(context, {"text_embeds": pooled, "time_ids": sizes * 2}))
    assert not torch.allclose(out, other)


def test_encode_prompt_makes_sgms_conditioning(tiny) -> None:
    """Both towers' penultimate layers side by side, the second tower's pooled projection, and
    the native square as (original, crop, target) sizes; OpenCLIP's padding on the second tower."""
    prompts = ["a photo of a cat", "a dog"]
    cond = tiny.encode_prompt(prompts)
    ids_1, ids_2 = tiny.tokenize(prompts), tiny.tokenize(prompts, pad_id=0)
    assert int(ids_2[1, -1]) == 0 and int(ids_1[1, -1]) == tiny.tokenizer.eos_token_id
    with torch.no_grad():
        h1 = tiny.text_encoder(input_ids=ids_1, output_hidden_states=True).hidden_states[-2]
        out_2 = tiny.text_encoder_2(input_ids=ids_2, output_hidden_states=True)
    torch.testing.assert_close(cond.context, torch.cat([h1, out_2.hidden_states[-2]], dim=-1))
    torch.testing.assert_close(cond.extra["text_embeds"], out_2.text_embeds)
    side = tiny.native_resolution
    assert cond.extra["time_ids"].tolist() == [[side, side, 0, 0, side, side]] * 2
    assert tiny.encode_prompt(prompts, size=(96, 128)).extra["time_ids"][0].tolist() == [
        96,
        128,
        0,
        0,
        96,
        128,
    ]
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(tiny.eps(x, 300, cond)).all()


def test_every_kohya_sdxl_name_is_a_layer_of_the_tiny_model(tiny) -> None:
    layers = tiny.layer_map()
    names = [m[0] for m in sdxl_kohya_modules()]
    assert set(names) <= set(layers)
    assert set(layers) <= set(SDXL.layers)
    # the tiny widths scale the full size's: every layer's kind (Linear/Conv, kernel) is the same
    for name, _, _, _, _, shape in sdxl_kohya_modules():
        assert layers[name].weight.ndim == len(shape), name


def test_cross_attention_pairs_follow_sdxls_run_order(tiny) -> None:
    """SDXL's layer names are ldm-style (input/middle/output blocks): CLoRA's hooks order them by
    the family's run order, not by parsing diffusers' words."""
    from lib_loraclr.clora.attention import cross_attention_pairs

    names = [p[0] for p in cross_attention_pairs(tiny.layer_map())]
    assert len(names) == 2 * 2 + 2 * 10 + 10 + 3 * 10 + 3 * 2  # down 1-2, middle, up 0-1
    assert names[0].startswith("lora_unet_input_blocks_4_1_transformer_blocks_0")
    assert names[24].startswith("lora_unet_middle_block_1_transformer_blocks_0")
    assert names[-1].startswith("lora_unet_output_blocks_5_1_transformer_blocks_1")


def test_clora_map_levels_follow_the_familys_attention() -> None:
    """SDXL has no cross-attention at W/8: auto picks W/32 (32 x 32 at 1024 px) or the finest
    level it has, and W/8 is refused with the levels there are."""
    from lib_loraclr.clora.attention import attention_levels, map_size

    levels = attention_levels(SDXL)
    assert levels == (1, 2)
    assert map_size(128, 128, "auto", levels) == (32, 32)  # 1024 px
    assert map_size(64, 64, "auto", levels) == (16, 16)  # 512 px: W/32 would be 16 x 16, kept
    assert map_size(16, 16, "auto", levels) == (8, 8)  # 128 px: W/16
    assert map_size(8, 8, "auto", levels) == (4, 4)  # nothing finer exists
    with pytest.raises(ValueError, match="W/16, W/32|W/32, W/16"):
        map_size(128, 128, "W/8", levels)
