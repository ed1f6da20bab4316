"""CLoRA outside the WebUI on a tiny SDXL: the weighted encoder makes sgm's conditioning from both
towers as A1111 does, and a two-LoRA composition runs with its own masks, leaving the model as it
was."""

from __future__ import annotations

import pytest
import torch

from lib_loraclr.clora.compose import compose
from lib_loraclr.clora.encode import encode_weighted
from lib_loraclr.clora.settings import CloraSettings
from lib_loraclr.lora.file import load_lora
from lib_loraclr.testing import synthetic_loras as sl
from lib_loraclr.testing.tiny_sdxl import build_tiny_sdxl


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_sdxl(seed=5)


def test_plain_text_gives_what_encode_prompt_gives(tiny) -> None:
    """No weights, one chunk: the A1111-style encoder and the plain one agree on every part."""
    texts = ["a photo of a cat", "two dogs on the grass"]
    with torch.no_grad():
        weighted, plain = (
            encode_weighted(tiny, texts, size=(96, 64)),
            tiny.encode_prompt(texts, size=(96, 64)),
        )
    torch.testing.assert_close(weighted.context, plain.context)
    assert set(weighted.extra) == {"text_embeds", "time_ids"}
    for key in weighted.extra:
        torch.testing.assert_close(weighted.extra[key], plain.extra[key])
    assert weighted.extra["time_ids"][0].tolist() == [96, 64, 0, 0, 96, 64]


def test_emphasis_scales_both_towers_and_not_the_pooled_vector(tiny) -> None:
    with torch.no_grad():
        plain, strong = encode_weighted(tiny, ["a cat"]), encode_weighted(tiny, ["a (cat:1.5)"])
    width_l = tiny.text_encoder.config.hidden_size
    for part in (slice(0, width_l), slice(width_l, None)):
        assert not torch.allclose(plain.context[..., part], strong.context[..., part])
    torch.testing.assert_close(plain.extra["text_embeds"], strong.extra["text_embeds"])


def test_an_empty_negative_is_zeros_as_in_a1111(tiny) -> None:
    with torch.no_grad():
        cond = encode_weighted(tiny, ["a cat", "", "blurry"], negatives=2)
        unmarked = encode_weighted(tiny, ["a cat", ""])
    assert cond.context[1].abs().sum() == 0 and cond.extra["text_embeds"][1].abs().sum() == 0
    assert cond.context[2].abs().sum() > 0  # a written negative is encoded
    assert cond.extra["time_ids"][1].abs().sum() > 0  # the sizes stay
    assert unmarked.context[1].abs().sum() > 0  # an empty positive prompt is encoded


def test_two_sdxl_loras_compose_with_their_own_masks(tiny, tmp_path) -> None:
    loras = {
        f"c{seed}": lora for seed, lora in zip((1, 2), sl.concept_loras(tiny, tmp_path, (1, 2)), strict=True)
    }
    assert {load_lora(tmp_path / f"{n}.safetensors").base_model for n in loras} == {"sdxl"}
    before = {k: v.clone() for k, v in tiny.unet.state_dict().items()}
    settings = CloraSettings(enabled=True, max_step=2, refine_steps=(0,), refine_iterations=1)
    result = compose(
        tiny,
        "a <lora:c1:1> cat and a <lora:c2:1> dog",
        loras,
        settings,
        steps=3,
        width=128,
        height=128,
        sampler="euler",
        triggers={"c1": "sks", "c2": "zwx"},
    )
    assert result.latents.shape == (1, 4, 16, 16) and torch.isfinite(result.latents).all()
    state = result.core.state
    # SDXL's maps come from its cross-attention levels (W/16, W/32), never the top one
    assert state.map_hw in ((4, 4), (8, 8))
    # the base prompt's mask and one per bound LoRA
    assert state.masks is not None and state.masks.shape == (3, state.map_hw[0] * state.map_hw[1])
    after = tiny.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_the_cli_composes_on_an_sdxl_checkpoint(tmp_path) -> None:
    """An sgm-layout file (VAE included) through ``compose``: the family comes from the file, the
    LoRAs are read with SDXL's names, the picture is decoded by SDXL's VAE."""
    from PIL import Image

    from lib_loraclr.cli import main
    from lib_loraclr.sd.checkpoint import save_checkpoint

    model = build_tiny_sdxl(seed=6, with_vae=True)
    save_checkpoint(model, tmp_path / "tiny_sdxl.safetensors")
    sl.concept_loras(model, tmp_path, (1, 2))
    out = tmp_path / "out.png"
    argv = ["compose", "--base", str(tmp_path / "tiny_sdxl.safetensors"), "--lora-dir", str(tmp_path)]
    argv += ["--prompt", "a <lora:c1:1> cat and a <lora:c2:1> dog", "--out", str(out)]
    argv += ["--steps", "2", "--width", "64", "--height", "64", "--max-step", "1", "--device", "cpu"]
    argv += ["--refine-iterations", "1"]
    assert main(argv) == 0
    assert Image.open(out).size == (64, 64)
