"""SDXL checkpoints in sgm's layout <-> the runtime's SDXL model: the keys of a real SDXL base, the
configs recovered from its shapes, OpenCLIP's layout of the second tower, a bit-exact round trip."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lib_loraclr.errors import LoraFileError
from lib_loraclr.families import SDXL
from lib_loraclr.sd import checkpoint as cl
from lib_loraclr.sd.configs import build_networks, family_config, sd_alphas_cumprod
from lib_loraclr.sd.model import SDModel
from lib_loraclr.testing.tiny_sdxl import build_tiny_sdxl
from tests.sdxl_reference import sdxl_ldm_shapes

G = SDXL.towers[1].ldm  # "conditioner.embedders.1.model."


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_sdxl(seed=3)


@pytest.fixture(scope="module")
def loaded(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("sdxl") / "tiny_sdxl.safetensors"
    cl.save_checkpoint(tiny, path)
    return cl.load_checkpoint(path, tokenizer=tiny.tokenizer)


def test_a_full_size_sdxl_writes_exactly_the_keys_and_shapes_of_sdxl_base():
    configs = {part: family_config(SDXL, part) for part in SDXL.config_parts}
    nets = build_networks(configs, device="meta")  # 3.5 billion parameters, nothing allocated
    model = SDModel(
        nets["unet"],
        nets["text_encoder"],
        None,
        nets["vae"],
        sd_alphas_cumprod(configs["scheduler"]),
        configs=configs,
        text_encoder_2=nets["text_encoder_2"],
        family=SDXL,
    )
    want = sdxl_ldm_shapes()
    got = {k: tuple(v.shape) for k, v in cl.to_ldm_state_dict(model).items()}
    assert set(got) == set(want), (sorted(set(want) - set(got))[:5], sorted(set(got) - set(want))[:5])
    assert {k: v for k, v in got.items() if v != want[k]} == {}


def test_sdxl_bases_configs_are_recovered_from_its_shapes_alone():
    inferred = cl.infer_configs(sdxl_ldm_shapes())
    assert inferred == {part: family_config(SDXL, part) for part in SDXL.config_parts}


def test_the_round_trip_is_bit_exact_and_keeps_the_family(tiny, loaded):
    assert loaded.family is SDXL and loaded.text_encoder_2 is not None
    want, got = cl.to_ldm_state_dict(tiny), cl.to_ldm_state_dict(loaded)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert loaded.vae_scaling_factor == family_config(SDXL, "vae")["scaling_factor"]
    assert "alphas_cumprod" not in want  # sgm keeps no schedule in its checkpoints
    assert torch.equal(loaded.alphas_cumprod, tiny.alphas_cumprod)


def test_the_loaded_model_conditions_and_denoises_as_the_original(tiny, loaded):
    prompts = ["a photo of a cat", "a dog on grass"]
    a, b = tiny.encode_prompt(prompts), loaded.encode_prompt(prompts)
    assert torch.allclose(a.context, b.context, atol=1e-6)
    assert set(a.extra) == set(b.extra) == {"text_embeds", "time_ids"}
    assert all(torch.allclose(a.extra[k], b.extra[k], atol=1e-6) for k in a.extra)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(tiny.eps(x, 500, a), loaded.eps(x, 500, b), atol=1e-5)


def _openclip_reference(sd: dict, ids: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """OpenCLIP's text transformer run from its own tensors (fused ``in_proj_weight`` through
    ``nn.MultiheadAttention``, ``x @ text_projection``): sgm's penultimate output and pooled vector."""
    x = sd[G + "token_embedding.weight"][ids] + sd[G + "positional_embedding"]
    width, n = x.shape[-1], ids.shape[1]
    mask = torch.full((n, n), float("-inf")).triu(1)
    blocks = sorted({int(k.split(".")[6]) for k in sd if k.startswith(G + "transformer.resblocks.")})
    penultimate = x
    for i in blocks:
        p = f"{G}transformer.resblocks.{i}."
        if i == blocks[-1]:
            penultimate = x
        attn = nn.MultiheadAttention(width, heads, batch_first=True)
        attn.load_state_dict({k: sd[p + "attn." + k] for k in attn.state_dict()})
        h = nn.functional.layer_norm(x, (width,), sd[p + "ln_1.weight"], sd[p + "ln_1.bias"])
        x = x + attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        h = nn.functional.layer_norm(x, (width,), sd[p + "ln_2.weight"], sd[p + "ln_2.bias"])
        h = nn.functional.gelu(h @ sd[p + "mlp.c_fc.weight"].T + sd[p + "mlp.c_fc.bias"])
        x = x + h @ sd[p + "mlp.c_proj.weight"].T + sd[p + "mlp.c_proj.bias"]
    x = nn.functional.layer_norm(x, (width,), sd[G + "ln_final.weight"], sd[G + "ln_final.bias"])
    pooled = x[torch.arange(len(ids)), ids.argmax(-1)] @ sd[G + "text_projection"]
    return penultimate, pooled


@torch.no_grad()
def test_the_second_tower_is_in_openclips_layout(tiny):
    """Run OpenCLIP's own forward on the tensors we write: it gives the context half and the
    pooled vector that the transformers tower gives, so q/k/v order, the projection's transpose
    and every leaf name are OpenCLIP's."""
    sd = {k: v.float() for k, v in cl.to_ldm_state_dict(tiny).items() if k.startswith(G)}
    assert sd[G + "transformer.resblocks.0.attn.in_proj_weight"].shape[0] == 3 * 48  # q, k, v rows
    ids = tiny.tokenize(["a photo of a cat", "two dogs"], pad_id=SDXL.towers[1].pad_id)
    penultimate, pooled = _openclip_reference(sd, ids, tiny.text_encoder_2.config.num_attention_heads)
    cond = tiny.encode_prompt(["a photo of a cat", "two dogs"])
    width_l = tiny.text_encoder.config.hidden_size
    assert torch.allclose(cond.context[..., width_l:], penultimate, atol=1e-5)
    assert torch.allclose(cond.extra["text_embeds"], pooled, atol=1e-5)


def test_a_key_outside_openclips_layout_is_refused_by_name():
    with pytest.raises(KeyError, match="OpenCLIP"):
        SDXL.towers[1].source("text_model.encoder.layers.0.self_attn.rotary.weight")


def test_a_mixed_file_and_an_sd2_file_are_refused(tiny):
    sd = dict(cl.to_ldm_state_dict(tiny))
    with pytest.raises(LoraFileError, match="SD2.x checkpoint; this runtime loads SD1.x .* and SDXL"):
        cl.model_from_ldm_state_dict({**sd, "cond_stage_model.model.ln_final.weight": torch.ones(2)})
    missing = {k: v for k, v in sd.items() if not k.startswith(G + "transformer.resblocks.3.")}
    with pytest.raises(LoraFileError, match="text encoder keys are missing.*resblocks.3"):
        cl.model_from_ldm_state_dict(missing, configs=tiny.configs, tokenizer=tiny.tokenizer)
