"""Each format's delta equals the documented formula on hand-made factors (computed here, independently)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lib_loraclr.lora.file import load_lora
from lib_loraclr.lora.formats import PARSERS, LayerEntries, parse_layer
from lib_loraclr.testing import synthetic_loras as sl

LINEAR = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
CONV = "lora_unet_down_blocks_0_resnets_0_conv1"
ONE_BY_ONE = "lora_unet_down_blocks_0_attentions_0_proj_in"
TEXT = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
TARGETS = {LINEAR: (16, 12), CONV: (8, 6, 3, 3), ONE_BY_ONE: (12, 12, 1, 1), TEXT: (12, 12)}


def _check(path, expected: dict[str, torch.Tensor]) -> None:
    lora = load_lora(path, target_shapes=TARGETS)
    assert set(lora.modules) == set(expected)
    for name, delta in expected.items():
        got = lora.modules[name].delta()
        torch.testing.assert_close(got.reshape(delta.shape), delta, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("alpha", [None, 2.0])
def test_kohya_lora_and_locon(tmp_path, alpha) -> None:
    f = sl.write_kohya_lora(tmp_path / "a.safetensors", TARGETS, rank=4, alpha=alpha)
    scale = (alpha / 4) if alpha is not None else 1.0  # missing alpha == rank
    expected = {}
    for name, shape in TARGETS.items():
        up, down = f[name]["up"], f[name]["down"]
        expected[name] = scale * (up.reshape(up.shape[0], -1) @ down.reshape(4, -1)).reshape(shape)
    _check(tmp_path / "a.safetensors", expected)
    assert load_lora(tmp_path / "a.safetensors").format == "locon"


def test_locon_lora_mid_cp(tmp_path) -> None:
    f = sl.write_kohya_lora(
        tmp_path / "m.safetensors", {CONV: TARGETS[CONV]}, rank=3, alpha=1.5, conv_mid=True
    )
    up, mid, down = f[CONV]["up"][:, :, 0, 0], f[CONV]["mid"], f[CONV]["down"][:, :, 0, 0]
    expected = torch.zeros(TARGETS[CONV])
    for o in range(8):
        for i in range(6):
            expected[o, i] = sum(up[o, n] * mid[n, m] * down[m, i] for n in range(3) for m in range(3))
    _check(tmp_path / "m.safetensors", {CONV: expected * (1.5 / 3)})


@pytest.mark.parametrize("tucker", [False, True])
def test_loha(tmp_path, tucker) -> None:
    f = sl.write_loha(tmp_path / "h.safetensors", TARGETS, rank=2, alpha=1.0, tucker=tucker)
    expected = {}
    for name, shape in TARGETS.items():
        p = f[name]
        if "t1" in p:
            first = torch.einsum("ijkl,ia,jb->abkl", p["t1"], p["w1_a"], p["w1_b"])
            second = torch.einsum("ijkl,ia,jb->abkl", p["t2"], p["w2_a"], p["w2_b"])
        else:
            first = (p["w1_a"] @ p["w1_b"].reshape(2, -1)).reshape(shape)
            second = (p["w2_a"] @ p["w2_b"].reshape(2, -1)).reshape(shape)
        expected[name] = 0.5 * first * second
    _check(tmp_path / "h.safetensors", expected)


@pytest.mark.parametrize("options", [{}, {"factorise_w1": True}, {"factorise_w2": False}, {"tucker": True}])
def test_lokr(tmp_path, options) -> None:
    f = sl.write_lokr(tmp_path / "k.safetensors", TARGETS, rank=2, alpha=4.0, **options)
    expected = {}
    for name, shape in TARGETS.items():
        p = f[name]
        w1 = p["w1"] if "w1" in p else p["w1_a"] @ p["w1_b"]
        if "t2" in p:
            w2 = torch.einsum("ijkl,ia,jb->abkl", p["t2"], p["w2_a"], p["w2_b"])
        elif "w2" in p:
            w2 = p["w2"]
        else:
            w2 = p["w2_a"] @ p["w2_b"]
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        rank_known = "w1_b" in p or "w2_b" in p
        scale = 4.0 / 2 if rank_known else 1.0
        expected[name] = scale * torch.kron(w1.contiguous(), w2.contiguous()).reshape(shape)
    _check(tmp_path / "k.safetensors", expected)


@pytest.mark.parametrize("style", ["peft", "diffusers", "processor"])
def test_diffusers_and_peft(tmp_path, style) -> None:
    linear = {LINEAR: TARGETS[LINEAR], TEXT: TARGETS[TEXT]}
    f = sl.write_diffusers_lora(tmp_path / "d.safetensors", linear, rank=3, style=style)
    expected = {name: f[name]["up"] @ f[name]["down"] for name in linear}
    _check(tmp_path / "d.safetensors", expected)
    assert load_lora(tmp_path / "d.safetensors").format in ("peft", "diffusers")


def test_old_te_spelling_and_fp16_are_read(tmp_path) -> None:
    old = {"lora_te_encoder_layers_0_self_attn_q_proj": (12, 12)}
    f = sl.write_kohya_lora(tmp_path / "o.safetensors", old, rank=2, dtype=torch.float16)
    lora = load_lora(tmp_path / "o.safetensors")
    got = lora.modules[TEXT].delta()
    expected = (
        f["lora_te_encoder_layers_0_self_attn_q_proj"]["up"].half().float()
        @ f["lora_te_encoder_layers_0_self_attn_q_proj"]["down"].half().float()
    )
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("writer", ["kohya_mid", "loha_tucker", "lokr", "kohya"])
def test_forward_delta_equals_dense_delta(tmp_path, writer) -> None:
    torch.manual_seed(0)
    layers = {
        LINEAR: nn.Linear(12, 16),
        CONV: nn.Conv2d(6, 8, 3, padding=1, stride=2),
        ONE_BY_ONE: nn.Conv2d(12, 12, 1),
    }
    targets = {n: tuple(m.weight.shape) for n, m in layers.items()}
    path = tmp_path / "f.safetensors"
    {
        "kohya_mid": lambda: sl.write_kohya_lora(path, targets, conv_mid=True, alpha=2.0),
        "kohya": lambda: sl.write_kohya_lora(path, targets, alpha=2.0),
        "loha_tucker": lambda: sl.write_loha(path, targets, tucker=True),
        "lokr": lambda: sl.write_lokr(path, targets),
    }[writer]()
    lora = load_lora(path, target_shapes=targets)
    for name, layer in layers.items():
        module = lora.modules[name]
        x = torch.randn(2, 12, 5) if isinstance(layer, nn.Linear) else torch.randn(2, layer.in_channels, 7, 7)
        if isinstance(layer, nn.Linear):
            x = x.transpose(1, 2)
            expected = F.linear(x, module.delta().reshape(layer.weight.shape))
        else:
            expected = F.conv2d(
                x, module.delta().reshape(layer.weight.shape), None, layer.stride, layer.padding
            )
        torch.testing.assert_close(module.forward_delta(x, layer), expected, rtol=1e-4, atol=1e-5)
        on_device = module.to(device="cpu", dtype=torch.float32)  # what routing keeps while hooked
        torch.testing.assert_close(on_device.forward_delta(x, layer), expected, rtol=1e-4, atol=1e-5)


def test_modules_are_values(tmp_path) -> None:
    """Nothing is cached on a module: a delta is built from the factors each time it is asked for."""
    path = tmp_path / "v.safetensors"
    sl.write_loha(path, {LINEAR: TARGETS[LINEAR]}, rank=2)
    module = load_lora(path).modules[LINEAR]
    first = module.delta()
    with pytest.raises(dataclasses.FrozenInstanceError):
        module.scale = 2.0
    first.zero_()  # a caller's change to a delta it was given does not reach the module
    assert module.delta().abs().sum() > 0


def test_every_parser_takes_one_layer_and_accepts_or_declines() -> None:
    """One plug-in contract: ``parser(LayerEntries) -> module | None``, keys of other formats unused."""
    g = torch.Generator().manual_seed(0)
    up, down, alpha = torch.randn(16, 2, generator=g), torch.randn(2, 12, generator=g), torch.tensor(1.0)
    tensors = {"lora_up.weight": up, "lora_down.weight": down, "alpha": alpha, "hada_t1": torch.ones(1)}
    layer = LayerEntries(LINEAR, tensors, {s: f"{LINEAR}.{s}" for s in tensors})
    accepted = [p.__name__ for p in PARSERS if p(layer) is not None]
    assert accepted == ["parse_low_rank"]
    module = parse_layer(layer)
    assert module.format == "lora" and set(module.keys) == {
        f"{LINEAR}.lora_up.weight",
        f"{LINEAR}.lora_down.weight",
        f"{LINEAR}.alpha",
    }
    torch.testing.assert_close(module.delta(), 0.5 * up @ down)


def test_metadata_trigger_words_rank_alpha(tmp_path) -> None:
    meta = {
        "ss_tag_frequency": '{"10_sks dog": {"sks dog": 30, "grass": 4, "collar": 9}}',
        "ss_output_name": "corgi",
    }
    path = tmp_path / "corgi.safetensors"
    sl.write_kohya_lora(path, {LINEAR: TARGETS[LINEAR]}, rank=4, alpha=2.0, metadata=meta)
    sl.write_sidecar(path, "corgi dog, red collar")
    lora = load_lora(path)
    assert lora.trigger_words[:2] == ["corgi dog", "red collar"]
    assert "sks dog" in lora.trigger_words
    assert (lora.rank, lora.alpha) == (4, 2.0)
    assert len(lora.short_hash) == 10
