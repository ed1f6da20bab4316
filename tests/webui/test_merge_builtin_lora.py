"""The built-in Lora re-applies the last generation's LoRAs on every forward while its bookkeeping
differs from ``loaded_networks``: a merge must not bake them in, and must leave them as they were."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from tests.webui.test_merge_tab import ROWS, Tab

LAYER = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q"


def _generate_with_a_lora_tag(host) -> torch.nn.Module:
    """What a generation with ``<lora:stray:1>`` leaves behind: the network loaded, the layer patched."""
    layer = dict(host.view.named_modules())[LAYER]
    net = host.networks.Network("stray", None)
    net.deltas[id(layer)] = torch.full_like(layer.weight, 0.25)
    host.networks.loaded_networks[:] = [net]
    layer(torch.zeros(1, layer.in_features))  # the built-in applies on forward
    assert layer.network_current_names == (("stray", 1.0, 1.0, None),)
    return layer


def test_a_merge_after_a_generation_with_a_lora_equals_one_after_a_plain_generation(host) -> None:
    tabs = Tab(host)
    layer = _generate_with_a_lora_tag(host)
    patched = layer.weight.detach().clone()
    _, _, status = tabs.merge(ROWS, method="Least squares", output_name="after_lora")
    assert "Saved" in status, status
    assert torch.equal(layer.weight, patched) and layer.network_current_names == (("stray", 1.0, 1.0, None),)
    assert [n.name for n in host.networks.loaded_networks] == ["stray"]

    host.networks.loaded_networks.clear()  # a plain generation: the built-in restores on forward
    layer(torch.zeros(1, layer.in_features))
    assert not torch.equal(layer.weight, patched)
    _, _, status = tabs.merge(ROWS, method="Least squares", output_name="after_plain")
    assert "Saved" in status, status
    a = load_file(str(host.ckpt_dir / "after_lora.safetensors"))
    b = load_file(str(host.ckpt_dir / "after_plain.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
