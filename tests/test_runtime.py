"""SD1.x runtime: exact ldm layout of the full SD1.5 config, tiny checkpoint round trip, strictness."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from lib_loraclr.errors import LoraFileError
from lib_loraclr.lora.keymap import transformers_text_prefix
from lib_loraclr.sd import checkpoint as cl
from lib_loraclr.sd.checkpoint import (
    load_checkpoint,
    model_from_ldm_state_dict,
    save_checkpoint,
    to_ldm_state_dict,
)
from lib_loraclr.sd.configs import build_modules, sd15_config, sd_alphas_cumprod
from lib_loraclr.sd.model import SDModel
from lib_loraclr.testing.ldm_view import ldm_view
from lib_loraclr.testing.tiny import build_tiny_model, tiny_configs
from tests.sd15_reference import ldm_shapes


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_model(seed=0)


@pytest.fixture(scope="module")
def tiny_file(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_checkpoint(tiny, path)
    return path


def test_full_sd15_config_has_exactly_the_real_checkpoint_layout():
    want = ldm_shapes()
    cfg = {p: sd15_config(p) for p in ("unet", "text_encoder", "vae", "scheduler")}
    unet, te, vae = build_modules(cfg["unet"], cfg["text_encoder"], cfg["vae"], device="meta")  # no 4 GB
    model = SDModel(unet, te, None, vae, sd_alphas_cumprod(), configs=cfg)
    got = {k: tuple(v.shape) for k, v in to_ldm_state_dict(model).items()}
    assert set(got) == set(want), (sorted(set(want) - set(got))[:5], sorted(set(got) - set(want))[:5])
    assert {k: v for k, v in got.items() if v != want[k]} == {}
    # ...and the widths are recovered from those shapes alone.
    inferred = cl.infer_configs(want)
    assert inferred["unet"]["block_out_channels"] == [320, 640, 1280, 1280]
    assert inferred["unet"]["cross_attention_dim"] == 768
    assert (
        inferred["text_encoder"]["num_hidden_layers"] == 12
        and inferred["text_encoder"]["num_attention_heads"] == 12
    )
    assert inferred["vae"]["block_out_channels"] == [128, 256, 512, 512]


def test_round_trip_gives_identical_weights_and_the_same_outputs(tiny, tiny_file):
    """The state dicts prove the round trip bit for bit. The outputs of two model instances are
    compared with a tolerance: the same weights in two allocations may be summed in another order
    by the CPU kernels (PyTorch promises no bitwise equality there; 5e-7 apart was seen)."""
    loaded = load_checkpoint(tiny_file)
    assert loaded.configs == tiny.configs
    assert torch.equal(tiny.alphas_cumprod, loaded.alphas_cumprod)
    for part in ("unet", "text_encoder", "vae"):
        a, b = getattr(tiny, part).state_dict(), getattr(loaded, part).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        # copies in the allocator's memory, not views of the file's memory map
        assert all(t.data_ptr() % 64 == 0 for t in b.values() if t.numel())
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8)
    prompts = ["a photo of a cat", "a dog"]
    with torch.no_grad():
        ctx, ctx2 = tiny.encode_prompt(prompts), loaded.encode_prompt(prompts)
        torch.testing.assert_close(ctx.context, ctx2.context, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(tiny.eps(x, 321, ctx), loaded.eps(x, 321, ctx), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(tiny.decode(x), loaded.decode(x), rtol=1e-5, atol=1e-6)


def test_written_layout_and_dtypes(tiny, tmp_path):
    from safetensors import safe_open

    path = tmp_path / "half.safetensors"
    save_checkpoint(tiny, path, dtype=torch.float16, metadata={"note": "x"})
    with safe_open(str(path), framework="pt") as fh:
        keys = set(fh.keys())
        assert fh.metadata()["note"] == "x" and cl.CONFIG_METADATA_KEY in fh.metadata()
        assert fh.get_tensor("model.diffusion_model.out.2.weight").dtype == torch.float16
        assert fh.get_tensor("alphas_cumprod").dtype == torch.float32
        assert (
            fh.get_tensor("cond_stage_model.transformer.text_model.embeddings.position_ids").dtype
            == torch.int64
        )
    assert keys == set(to_ldm_state_dict(tiny))
    assert "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight" in keys
    assert "first_stage_model.decoder.up.3.block.0.conv1.weight" in keys
    assert len(keys) == 1143  # as many keys as a real SD1.5 checkpoint (same structure, small widths)
    half = load_checkpoint(path, dtype=torch.float16)
    assert half.dtype == torch.float16


def test_infers_widths_without_metadata(tiny):
    sd = to_ldm_state_dict(tiny)
    inferred = cl.infer_configs({k: tuple(v.shape) for k, v in sd.items()})
    want = tiny_configs()
    for key in ("block_out_channels", "cross_attention_dim", "in_channels", "out_channels"):
        assert inferred["unet"][key] == want["unet"][key]
    for key in (
        "hidden_size",
        "num_hidden_layers",
        "intermediate_size",
        "vocab_size",
        "max_position_embeddings",
    ):
        assert inferred["text_encoder"][key] == want["text_encoder"][key]
    assert inferred["vae"]["block_out_channels"] == want["vae"]["block_out_channels"]
    # Heads/groups are invisible in shapes: with the right ones given, the state dict loads strictly.
    model = model_from_ldm_state_dict(sd, configs=tiny.configs, tokenizer=tiny.tokenizer)
    assert torch.equal(model.unet.conv_in.weight, tiny.unet.conv_in.weight)


def _edited(tiny, **changes):
    sd = dict(to_ldm_state_dict(tiny))
    for key, value in changes.items():
        if value is None:
            sd.pop(key)
        else:
            sd[key] = value
    return sd


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model.diffusion_model.out.2.bias": None}, "1 UNet keys are missing.*out.2.bias"),
        ({"model.diffusion_model.extra.weight": torch.zeros(1)}, "not part of an SD1.x model.*extra.weight"),
        (
            {"model.diffusion_model.out.2.weight": torch.zeros(4, 16, 1, 1)},
            r"out.2.weight has shape \(4, 16, 1, 1\)",
        ),
        ({"conditioner.embedders.0.transformer.text_model.x": torch.zeros(1)}, "SDXL"),
        ({"cond_stage_model.model.token_embedding.weight": torch.zeros(1)}, "SD2"),
    ],
)
def test_strict_loading_names_the_problem(tiny, change, message):
    with pytest.raises(LoraFileError, match=message):
        model_from_ldm_state_dict(_edited(tiny, **change), configs=tiny.configs, tokenizer=tiny.tokenizer)


def test_ema_and_position_ids_are_accepted(tiny):
    """An EMA entry is ignored and missing position ids are rebuilt: the model loads with the
    checkpoint's weights and CLIP's positions 0..76."""
    sd = _edited(tiny, **{"model_ema.decay": torch.tensor(0.999)})
    sd.pop("cond_stage_model.transformer.text_model.embeddings.position_ids")
    model = model_from_ldm_state_dict(sd, configs=tiny.configs, tokenizer=tiny.tokenizer)
    want = {k: v for k, v in to_ldm_state_dict(tiny).items()}
    got = to_ldm_state_dict(model)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    positions = model.text_encoder.get_submodule(transformers_text_prefix(model.text_encoder) + "embeddings")
    assert torch.equal(positions.position_ids, torch.arange(77).expand(1, -1))


def test_bad_files(tmp_path):
    with pytest.raises(LoraFileError, match="file not found"):
        load_checkpoint(tmp_path / "nope.safetensors")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(LoraFileError, match="not a readable safetensors"):
        load_checkpoint(broken)
    pickled = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "obj": Path("x")}, pickled)
    with pytest.raises(LoraFileError, match="weights_only"):
        load_checkpoint(pickled)


def test_writer_is_atomic(tiny, tmp_path, monkeypatch):
    import safetensors.torch

    target = tmp_path / "out.safetensors"
    target.write_bytes(b"old")

    def failing(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", failing)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tiny, target)
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.safetensors"]


def test_ldm_view_exposes_the_same_modules_under_webui_names(tiny):
    view = ldm_view(tiny)
    modules = dict(view.named_modules())
    to_k = tiny.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k
    assert modules["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k"] is to_k
    assert (
        modules["model.diffusion_model.output_blocks.2.1.conv"] is tiny.unet.up_blocks[0].upsamplers[0].conv
    )
    q = modules["cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj"]
    assert (
        q.weight
        is tiny.text_encoder.get_submodule(
            transformers_text_prefix(tiny.text_encoder) + "encoder.layers.0.self_attn.q_proj"
        ).weight
    )
    # Every parameter of the view is the runtime's own tensor, named as in the written checkpoint.
    ldm = to_ldm_state_dict(tiny)
    params = dict(view.named_parameters())
    assert set(params) == set(ldm) - cl.SCHEDULE_KEYS - {
        "cond_stage_model.transformer.text_model.embeddings.position_ids"
    }
    ours = {id(p) for m in tiny.modules().values() for p in m.parameters()}
    assert {id(p) for p in params.values()} == ours
    for key, p in params.items():
        assert torch.equal(
            cl.vae_keys.to_ldm_shape(key[len(cl.VAE) :], p) if key.startswith(cl.VAE) else p, ldm[key]
        )
    x = torch.randn(1, 4, 8, 8)
    ctx = tiny.encode_prompt(["a cat"])
    with torch.no_grad():
        assert torch.equal(
            view.apply_model(x, torch.tensor([5]), {"c_crossattn": [ctx.context]}), tiny.eps(x, 5, ctx)
        )


def test_layer_maps_agree_between_runtimes(tiny):
    keymap = pytest.importorskip("lib_loraclr.lora.keymap")
    from_view = keymap.layer_map_ldm(ldm_view(tiny))
    from_diffusers = tiny.layer_map()
    assert len(from_diffusers) == 354  # the 350 kohya names of SD1.5 + conv_in/out, time embedding
    assert from_view.keys() == from_diffusers.keys()
    assert all(from_view[k] is from_diffusers[k] for k in from_view)
