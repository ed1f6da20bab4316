"""Per-row routing equals applying each LoRA alone to its rows, and leaves the layers untouched."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lib_loraclr.lora.routing import RoutedLora, RoutingError, route_loras


@dataclass(eq=False)
class DenseModule:
    """A LoRA module given by its full delta; independent of the real format parsers."""

    weight: torch.Tensor

    def delta(self, dtype=torch.float32, device=None) -> torch.Tensor:
        return self.weight.to(dtype=dtype, device=device)

    def to(self, device=None, dtype=None) -> DenseModule:
        return DenseModule(self.weight.to(device=device, dtype=dtype))

    def forward_delta(self, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        if isinstance(layer, nn.Conv2d):
            return F.conv2d(x, self.weight, None, layer.stride, layer.padding, layer.dilation, layer.groups)
        return F.linear(x, self.weight)


@dataclass(eq=False)
class FakeLora:
    name: str
    modules: dict = field(default_factory=dict)


def _layers() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {
        "lora_unet_a": nn.Linear(6, 5),
        "lora_unet_conv": nn.Conv2d(3, 4, 3, padding=1),
        "lora_te_text_model_q": nn.Linear(6, 6),
    }


def _loras(layers: dict[str, nn.Module]) -> list[FakeLora]:
    gen = torch.Generator().manual_seed(1)
    loras = []
    for k in range(3):
        modules = {
            name: DenseModule(torch.randn(layer.weight.shape, generator=gen))
            for name, layer in layers.items()
        }
        if k == 2:
            modules.pop("lora_unet_conv")  # a LoRA that does not touch every layer
        loras.append(FakeLora(f"lora{k}", modules))
    return loras


def _alone(layer: nn.Module, x: torch.Tensor, deltas: list[tuple[torch.Tensor, float]]) -> torch.Tensor:
    """Reference: bake the deltas into a copy of the weight, as the WebUI's built-in does."""
    weight = layer.weight.detach().clone()
    for delta, multiplier in deltas:
        weight = weight + multiplier * delta
    if isinstance(layer, nn.Conv2d):
        return F.conv2d(x, weight, layer.bias, layer.stride, layer.padding)
    return F.linear(x, weight, layer.bias)


@pytest.mark.parametrize("name", ["lora_unet_a", "lora_unet_conv", "lora_te_text_model_q"])
def test_routing_equals_each_lora_alone_row_by_row(name: str) -> None:
    layers = _layers()
    loras = _loras(layers)
    layer = layers[name]
    x = torch.randn(5, 3, 8, 8) if isinstance(layer, nn.Conv2d) else torch.randn(5, 7, 6)
    rows = [
        [],
        [RoutedLora(loras[0], te_multiplier=0.5, unet_multiplier=0.8)],
        [RoutedLora(loras[1])],
        [RoutedLora(loras[0], 0.5, 0.8), RoutedLora(loras[2], 1.0, 1.0)],  # a style LoRA on top
        [RoutedLora(loras[2], 1.0, 1.0)],
    ]
    with route_loras(layers, loras) as router:
        router.set_rows(rows)
        routed = layer(x)
    for b, routed_loras in enumerate(rows):
        deltas = [
            (r.lora.modules[name].weight, r.multiplier(name)) for r in routed_loras if name in r.lora.modules
        ]
        expected = _alone(layer, x[b : b + 1], deltas)
        torch.testing.assert_close(routed[b : b + 1], expected, rtol=1e-5, atol=1e-5)


def test_layers_untouched_after_exit_and_after_exception() -> None:
    layers = _layers()
    loras = _loras(layers)
    before = {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in layers.items()}
    x = torch.randn(2, 4, 6)
    plain = layers["lora_unet_a"](x)
    with pytest.raises(ZeroDivisionError):
        with route_loras(layers, loras) as router:
            router.set_rows([[RoutedLora(loras[0])], []])
            assert not torch.equal(layers["lora_unet_a"](x), plain)
            raise ZeroDivisionError
    for name, layer in layers.items():
        assert not layer._forward_hooks, name
        for key, value in layer.state_dict().items():
            assert torch.equal(value, before[name][key])
    assert torch.equal(layers["lora_unet_a"](x), plain)


def test_no_rows_means_plain_model_and_rows_context_restores() -> None:
    layers = _layers()
    loras = _loras(layers)
    x = torch.randn(2, 4, 6)
    plain = layers["lora_unet_a"](x)
    with route_loras(layers, loras) as router:
        assert torch.equal(layers["lora_unet_a"](x), plain)
        router.set_rows([[RoutedLora(loras[1])], [RoutedLora(loras[1])]])
        with router.rows(None):
            assert torch.equal(layers["lora_unet_a"](x), plain)
        assert not torch.equal(layers["lora_unet_a"](x), plain)


def test_routing_is_differentiable_to_the_input() -> None:
    layers = _layers()
    loras = _loras(layers)
    x = torch.randn(2, 4, 6, requires_grad=True)
    with route_loras(layers, loras) as router:
        router.set_rows([[RoutedLora(loras[0])], []])
        layers["lora_unet_a"](x).sum().backward()
    delta = loras[0].modules["lora_unet_a"].weight
    w = layers["lora_unet_a"].weight.detach()
    torch.testing.assert_close(x.grad[0], (w + delta).sum(0).expand(4, 6))
    torch.testing.assert_close(x.grad[1], w.sum(0).expand(4, 6))


def test_wrong_batch_and_unknown_lora_are_clear_errors() -> None:
    layers = _layers()
    loras = _loras(layers)
    with route_loras(layers, loras[:1]) as router:
        with pytest.raises(RoutingError, match="not installed"):
            router.set_rows([[RoutedLora(loras[1])]])
        router.set_rows([[RoutedLora(loras[0])], []])
        with pytest.raises(RoutingError, match="batch of 3 rows"):
            layers["lora_unet_a"](torch.randn(3, 6))
        x = torch.randn(2, 6)  # neither error changed the rows set last
        layer, delta = layers["lora_unet_a"], loras[0].modules["lora_unet_a"].weight
        torch.testing.assert_close(layer(x)[:1], _alone(layer, x[:1], [(delta, 1.0)]))
        torch.testing.assert_close(layer(x)[1:], _alone(layer, x[1:], []))
