"""LoRA files written the way their own tools write them (not by our writers) read back to the
weight change those tools merge: PEFT adapters on the tiny diffusers UNet and CLIP, saved as
diffusers' training scripts save them and as diffusers' kohya conversion writes them.

The expected delta of every layer is PEFT's own ``get_delta_weight`` (what ``merge_adapter`` adds).
"""

from __future__ import annotations

import copy

import pytest
import torch

from lib_loraclr.lora import keymap
from lib_loraclr.lora.file import load_lora
from lib_loraclr.testing.tiny import build_tiny_model

peft = pytest.importorskip("peft", reason="peft is a dev requirement (requirements-dev.txt)")
diffusers_utils = pytest.importorskip("diffusers.utils")

RANK = 4
UNET_TARGETS = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.2",
    "conv1",
    "conv_shortcut",
]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]


def _adapted(module: torch.nn.Module, targets: list[str], seed: int) -> torch.nn.Module:
    """``module`` with PEFT LoRA layers injected by PEFT, every factor drawn at random (PEFT
    starts ``lora_B`` at zero, which would make every delta zero)."""
    config = peft.LoraConfig(
        r=RANK, lora_alpha=RANK, target_modules=targets
    )  # the files carry no other alpha
    adapted = peft.inject_adapter_in_model(config, copy.deepcopy(module))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return adapted


def _peft_deltas(adapted: torch.nn.Module, side: str) -> dict[str, torch.Tensor]:
    """Canonical layer name -> PEFT's merged weight change for that layer."""
    from peft.tuners.lora import LoraLayer

    return {
        keymap.diffusers_to_kohya(side, name): layer.get_delta_weight("default").detach()
        for name, layer in adapted.named_modules()
        if isinstance(layer, LoraLayer)
    }


@pytest.fixture(scope="module")
def adapters():
    tiny = build_tiny_model(seed=0, with_vae=False)
    return _adapted(tiny.unet, UNET_TARGETS, 1), _adapted(tiny.text_encoder, TEXT_TARGETS, 2)


def _assert_same(lora, expected: dict[str, torch.Tensor]) -> None:
    assert lora.unused_keys == []
    assert set(lora.modules) == set(expected)
    for name, delta in expected.items():
        got = lora.modules[name].delta()
        torch.testing.assert_close(got.reshape(delta.shape), delta, rtol=1e-4, atol=1e-6, msg=name)


def test_diffusers_save_lora_weights(tmp_path, adapters) -> None:
    """``StableDiffusionPipeline.save_lora_weights`` of PEFT state dicts, as diffusers'
    ``train_dreambooth_lora.py`` saves them (``unet.``/``text_encoder.`` prefixes)."""
    from diffusers import StableDiffusionPipeline

    unet, text_encoder = adapters
    StableDiffusionPipeline.save_lora_weights(
        tmp_path,
        unet_lora_layers=diffusers_utils.convert_state_dict_to_diffusers(
            peft.get_peft_model_state_dict(unet)
        ),
        text_encoder_lora_layers=diffusers_utils.convert_state_dict_to_diffusers(
            peft.get_peft_model_state_dict(text_encoder)
        ),
    )
    lora = load_lora(tmp_path / "pytorch_lora_weights.safetensors", model_family="sd1")
    _assert_same(lora, {**_peft_deltas(unet, "unet"), **_peft_deltas(text_encoder, "te")})
    assert lora.format in ("diffusers", "peft")


def test_raw_peft_state_dict(tmp_path, adapters) -> None:
    """``get_peft_model_state_dict`` saved as it is (``lora_A``/``lora_B``, no prefix)."""
    from safetensors.torch import save_file

    unet, _ = adapters
    save_file(
        {k: v.contiguous() for k, v in peft.get_peft_model_state_dict(unet).items()},
        tmp_path / "peft.safetensors",
    )
    lora = load_lora(tmp_path / "peft.safetensors")
    _assert_same(lora, _peft_deltas(unet, "unet"))
    assert lora.format == "peft"


def test_diffusers_kohya_conversion(tmp_path, adapters) -> None:
    """``convert_state_dict_to_kohya`` (kohya names, ``lora_down``/``lora_up``, ``alpha``) of the
    UNet adapter. Its text-encoder names are SDXL's (``lora_te1_``), so only the UNet is used."""
    from safetensors.torch import save_file

    unet, _ = adapters
    state = {f"unet.{k}": v for k, v in peft.get_peft_model_state_dict(unet).items()}
    save_file(
        {k: v.contiguous() for k, v in diffusers_utils.convert_state_dict_to_kohya(state).items()},
        tmp_path / "k.safetensors",
    )
    lora = load_lora(tmp_path / "k.safetensors", model_family="sd1")
    _assert_same(lora, _peft_deltas(unet, "unet"))
    assert lora.format == "locon"  # conv1/conv_shortcut are LoCon layers


@pytest.mark.parametrize("algo", ["loha", "lokr"])
def test_lycoris_kohya_network(tmp_path, algo) -> None:
    """A LyCORIS network as kohya's trainer builds and saves it (``lycoris.kohya.create_network``,
    ``save_weights``); expected: the change each LyCORIS module makes to its layer's output in its
    own forward pass (read on the identity). Not ``get_diff_weight``: in lycoris-lora 4.1.3 LoHa's
    applies ``alpha / rank`` twice (``get_weight`` already includes it), unlike its forward."""
    lycoris_kohya = pytest.importorskip(
        "lycoris.kohya", reason="lycoris-lora is a dev requirement (requirements-dev.txt)"
    )
    tiny = build_tiny_model(seed=0, with_vae=False)
    network = lycoris_kohya.create_network(
        1.0, RANK, 2.0, None, tiny.text_encoder, tiny.unet, algo=algo, preset="attn-mlp"
    )
    network.apply_to(tiny.text_encoder, tiny.unet, True, True)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in network.parameters():  # LyCORIS starts one factor at zero
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    path = tmp_path / f"{algo}.safetensors"
    network.save_weights(str(path), torch.float32, None)
    modules = [*network.text_encoder_loras, *network.unet_loras]
    assert all(tuple(m.shape[2:]) in ((), (1, 1)) for m in modules)  # attn-mlp: Linear and 1x1 proj convs
    with torch.no_grad():
        expected = {}
        for m in modules:
            eye = torch.eye(m.shape[1]).reshape(m.shape[1], m.shape[1], *m.shape[2:])
            change = (m(eye) - m.org_forward(eye)).flatten(1)  # row i: the layer's change for input e_i
            expected[keymap.normalise_kohya_name(m.lora_name)] = change.T.reshape(m.shape)
    lora = load_lora(path, model_family="sd1")
    _assert_same(lora, expected)
    assert lora.format == algo
