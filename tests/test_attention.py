"""Attention capture: equals the explicit softmax(QK^T/sqrt(d)), keeps the fast kernel, stops early, unhooks."""

from __future__ import annotations

import pytest
import torch

from lib_loraclr.clora.attention import (
    StopForward,
    capture_maps,
    cross_attention_pairs,
    heads_by_projection,
    map_size,
    map_tokens,
)
from lib_loraclr.sd.cond import Cond


class _Recorder:
    """A classic diffusers processor that stores the probabilities it computes (the reference's way)."""

    def __init__(self, store: list, inner) -> None:
        self.store, self.inner = store, inner

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        if encoder_hidden_states is not None:
            q = attn.head_to_batch_dim(attn.to_q(hidden_states))
            k = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
            probs = attn.get_attention_scores(q, k, None)  # (B*heads, N, 77)
            self.store.append(probs.reshape(hidden_states.shape[0], attn.heads, *probs.shape[1:]))
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)


@pytest.fixture(scope="module")
def tiny_model():
    """A private model (one for this module): these tests swap diffusers attention processors,
    which must not leak into the session-wide model other tests share."""
    from lib_loraclr.testing.tiny import build_tiny_model

    return build_tiny_model(seed=0)


def _inputs(model, batch=3, side=16):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, side, side, generator=g)
    context = torch.randn(batch, 77, model.context_dim, generator=g)
    return x, torch.full((batch,), 500.0), Cond(context)


def test_maps_equal_explicit_softmax_and_outputs_unchanged(tiny_model) -> None:
    unet = tiny_model.unet
    x, t, context = _inputs(tiny_model)
    processors = dict(unet.attn_processors)
    tokens = map_tokens(16, 16)
    with torch.no_grad():
        plain = tiny_model.eps(x, t, context)
        with capture_maps(tiny_model.layer_map(), heads_by_projection(unet), tokens) as maps:
            assert {k: type(v) for k, v in unet.attn_processors.items()} == {
                k: type(v) for k, v in processors.items()
            }
            hooked = tiny_model.eps(x, t, context)
            got = maps.mean()
        store: list = []
        unet.set_attn_processor({k: _Recorder(store, v) for k, v in processors.items()})
        try:
            tiny_model.eps(x, t, context)
        finally:
            unet.set_attn_processor(processors)
    torch.testing.assert_close(hooked, plain, rtol=0, atol=0)
    chosen = [p for p in store if p.shape[2] == tokens]
    assert len(chosen) == maps.layers == 5  # SD1.5 layout: 2 down + 3 up cross-attentions at that level
    expected = torch.stack([p.float().mean(dim=1) for p in chosen]).mean(dim=0)
    assert got.shape == (3, tokens, 77)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.sum(dim=-1), torch.ones(3, tokens))


def test_maps_are_differentiable_wrt_latent(tiny_model) -> None:
    x, t, context = _inputs(tiny_model, batch=2)
    x.requires_grad_(True)
    with capture_maps(
        tiny_model.layer_map(), heads_by_projection(tiny_model.unet), map_tokens(16, 16)
    ) as maps:
        tiny_model.eps(x, t, context)
        (grad,) = torch.autograd.grad(maps.mean()[:, :, 3].std(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_stop_forward_skips_the_rest_and_hooks_go_away(tiny_model) -> None:
    unet = tiny_model.unet
    x, t, context = _inputs(tiny_model, batch=1)
    ran = []
    last_up = unet.up_blocks[-1].register_forward_hook(lambda *a: ran.append(1))
    try:
        with (
            torch.no_grad(),
            capture_maps(tiny_model.layer_map(), heads_by_projection(unet), map_tokens(16, 16)) as maps,
        ):
            tiny_model.eps(x, t, context)
            maps.expected_layers = maps.layers
            assert ran == [1]
            maps.reset(stop_early=True)
            with pytest.raises(StopForward):
                tiny_model.eps(x, t, context)
            assert ran == [1] and maps.layers == 5  # the high-resolution up block never ran
            raise KeyError("boom")
    except KeyError:
        pass
    finally:
        last_up.remove()
    assert all(not m._forward_hooks for m in unet.modules())


def test_pairs_in_unet_order_and_map_sizes(tiny_model) -> None:
    names = [p[0] for p in cross_attention_pairs(tiny_model.layer_map())]
    assert names[0].startswith("lora_unet_down_blocks_0") and names[-1].startswith("lora_unet_up_blocks_3")
    assert len(names) == 16  # SD1.x: 6 down, 1 mid, 9 up
    assert map_tokens(64, 64) == 256 and map_size(64, 64) == (16, 16)  # 512x512
    assert map_size(64, 96) == (16, 24) and map_tokens(64, 96) == 384  # 512x768
    assert map_size(65, 65) == (17, 17)  # 520x520: each downsample rounds up, as the reference's ceil(W/32)


@pytest.mark.parametrize(
    "latent, level, expected",
    [
        (64, "auto", (16, 16)),  # 512 px: the paper's W/32
        (32, "auto", (8, 8)),  # 256 px: W/32 is still 8 x 8
        (16, "auto", (8, 8)),  # 128 px: W/32 would be 4 x 4, so W/16
        (8, "auto", (8, 8)),  # the lab's 64 px: W/8, the latent itself
        (4, "auto", (4, 4)),  # nothing finer than the latent exists
        (128, "auto", (32, 32)),  # SDXL's 1024 px: W/32 is 32 x 32
        (8, "W/32", (2, 2)),  # the paper's level, asked for by name, even where it is tiny
        (64, "W/16", (32, 32)),
        (64, "W/8", (64, 64)),
    ],
)
def test_map_levels(latent, level, expected) -> None:
    assert map_size(latent, latent, level) == expected
    assert map_tokens(latent, latent, level) == expected[0] * expected[1]
