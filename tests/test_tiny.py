"""The tiny model has SD1.5's structure (every kohya module name and kind) and is reproducible."""

from __future__ import annotations

import pytest
import torch

from lib_loraclr.testing.tiny import build_tiny_model
from tests.sd15_reference import kohya_modules


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_model(seed=0)


def test_every_sd15_kohya_module_exists_with_the_same_kind(tiny):
    rows = kohya_modules()
    assert len(rows) == 350
    modules = {
        **{f"unet.{n}": m for n, m in tiny.unet.named_modules()},
        **{f"te.{n}": m for n, m in tiny.text_encoder.named_modules()},
    }
    for name, _kind, path, shape in rows:
        key = ("te." if name.startswith("lora_te") else "unet.") + path
        assert key in modules, f"{name} -> {path} missing from the tiny model"
        weight = modules[key].weight
        # Same layer kind: Linear stays 2-D, 1x1 and 3x3 convs keep their kernel size.
        assert weight.ndim == len(shape), name
        assert tuple(weight.shape[2:]) == shape[2:], name


def test_same_seed_same_weights_other_seed_differs():
    a, b, c = build_tiny_model(seed=3), build_tiny_model(seed=3), build_tiny_model(seed=4)
    for part in ("unet", "text_encoder", "vae"):
        sa, sb, sc = (getattr(m, part).state_dict() for m in (a, b, c))
        assert all(torch.equal(sa[k], sb[k]) for k in sa), part
        assert not all(torch.equal(sa[k], sc[k]) for k in sa), part


def test_no_zero_initialised_layers(tiny):
    # A LoRA on a layer that multiplies by zero downstream would have no visible effect.
    for part, module in tiny.modules().items():
        for name, p in module.named_parameters():
            assert p.abs().max() > 0, f"{part}.{name} is all zeros"
    for name, m in tiny.text_encoder.named_modules():
        if isinstance(m, torch.nn.LayerNorm):
            assert m.bias.abs().max() > 0, name


def test_outputs_depend_on_prompt_timestep_and_attention(tiny):
    torch.manual_seed(0)
    ctx = tiny.encode_prompt(["a photo of a cat", "a dog in the forest"])
    assert ctx.context.shape == (2, 77, 32)
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        e = tiny.eps(x, 500, ctx)
        assert e.shape == x.shape and torch.isfinite(e).all()
        assert 0.05 < e.std() < 5
        assert (tiny.eps(x, 500, ctx.rows([1, 0])) - e.flip(0)).abs().max() > 1e-2
        assert (tiny.eps(x, 20, ctx) - e).abs().max() > 1e-2
        # A small change of one cross-attention key projection changes the prediction visibly.
        layer = tiny.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k
        saved = layer.weight.clone()
        try:
            layer.weight.add_(0.1 * torch.randn_like(saved))
            assert (tiny.eps(x, 500, ctx) - e).abs().max() > 1e-3
        finally:
            layer.weight.copy_(saved)
        img = tiny.decode(x)
    assert img.shape == (2, 3, 64, 64) and 0 <= img.min() and img.max() <= 1


def test_small_enough_for_every_test(tiny):
    """The size, not a timing on a shared machine: SD1.5's layers at widths of a few dozen channels."""
    counts = {part: sum(p.numel() for p in module.parameters()) for part, module in tiny.modules().items()}
    assert sum(counts.values()) < 5_000_000, counts  # SD1.5: about 1.07 billion


def test_dtype_and_device_arguments():
    m = build_tiny_model(seed=0, dtype=torch.float64, with_vae=False)
    assert m.vae is None and m.dtype == torch.float64
    assert m.alphas_cumprod.dtype == torch.float32 and m.alphas_cumprod.shape == (1000,)
    x = torch.randn(1, 4, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        assert m.eps(x, 10, m.encode_prompt(["cat"])).dtype == torch.float64
