"""The lab's attention grounding: which tokens name which object, the masks, and the loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lib_loraclr.lab import grounding as gr
from lib_loraclr.lab import world as w


def test_word_classes_point_class_and_modifier_words_at_their_object() -> None:
    cat, dog = w.CLASSES.index("cat"), w.CLASSES.index("dog")
    got = gr.word_classes("a photo of a red cat and sks dog on grass")
    assert got == [-1, -1, -1, -1, cat, cat, -1, dog, dog, -1, -1]


class _WordTokenizer:
    """Two tokens for "photo", one for every other word (a word of several tokens)."""

    def __call__(self, word: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [0, 0] if word == "photo" else [0]}


def test_token_classes_follow_the_start_token_and_multi_token_words() -> None:
    dog = w.CLASSES.index("dog")
    got = gr.token_classes(_WordTokenizer(), "a photo of a blue dog", tokens=10)
    assert got.tolist() == [-1, -1, -1, -1, -1, -1, dog, dog, -1, -1]


def test_coverage_and_targets_give_each_token_its_object_share() -> None:
    classes = np.zeros((1, 64, 64), np.int8)
    classes[0, :32, :32] = 1 + w.CLASSES.index("hat")  # the top-left quarter
    caption = "a yellow hat"
    g = gr.grounding_for(_WordTokenizer(), [caption], classes, (8, 8), weight=1.0, tokens=6)
    targets = g.targets(torch.tensor([0]))
    assert targets.shape == (1, 6, 64)
    expected = torch.zeros(8, 8)
    expected[:4, :4] = 1
    for token in (2, 3):  # "yellow", "hat"
        assert torch.equal(targets[0, token], expected.reshape(64))
    assert targets[0, [0, 1, 4, 5]].abs().sum() == 0


def test_loss_is_low_on_maps_inside_their_objects_and_high_outside() -> None:
    mask = torch.zeros(1, 3, 16)
    mask[0, 1, :4] = 1
    inside = torch.full((1, 16, 3), 1e-6)
    inside[0, :4, 1] = 0.25
    outside = torch.full((1, 16, 3), 1e-6)
    outside[0, 8:12, 1] = 0.25
    assert gr.grounding_loss(inside, mask) < 0.05
    assert gr.grounding_loss(outside, mask) > 1.0
    assert gr.inside_share(inside, mask) == pytest.approx(1.0, abs=1e-4)
    assert gr.inside_share(outside, mask) == pytest.approx(0.0, abs=1e-4)


def test_loss_without_named_objects_is_zero_and_keeps_the_graph() -> None:
    maps = torch.rand(2, 16, 3, requires_grad=True)
    loss = gr.grounding_loss(maps, torch.zeros(2, 3, 16))
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert maps.grad is not None


def test_grounding_moves_a_tiny_models_attention_onto_the_object() -> None:
    """A few steps of the grounding loss alone raise the share of a word's attention on its
    object in a tiny lab-architecture model: the loss reaches the maps the hooks record."""
    from lib_loraclr.clora.attention import capture_maps, heads_by_projection
    from lib_loraclr.lab.model import build_lab_model
    from lib_loraclr.sd.tokenizer import load_clip_tokenizer

    model = build_lab_model(seed=0, tokenizer=load_clip_tokenizer())
    data = w.make_dataset(8, seed=3)
    g = gr.grounding_for(model.tokenizer, data["captions"], data["classes"], (8, 8), weight=1.0)
    ids = model.tokenize(data["captions"])
    idx = torch.arange(8)
    x = torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.full((8,), 500)
    params = [p for n, p in model.unet.named_parameters() if "attn2" in n]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=5e-3)  # small steps: the same climb on any thread count
    context = model.text_encoder(input_ids=ids).last_hidden_state.detach()
    shares, losses = [], []
    with capture_maps(model.layer_map(), heads_by_projection(model.unet), 64) as maps:
        for _ in range(40):
            maps.reset()
            model.unet(x, t, encoder_hidden_states=context)
            loss = gr.grounding_loss(maps.mean(), g.targets(idx))
            shares.append(gr.inside_share(maps.mean().detach(), g.targets(idx)))
            losses.append(float(loss.detach()))
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert losses[-1] < losses[0]
    assert shares[-1] > shares[0] + 0.02  # 0.167 -> 0.21 on one thread, 0.23 on two
