"""CLoRA engine: loss vs direct formula, the update lowers it, fusion, batched == sequential, restore."""

from __future__ import annotations

import math

import pytest
import torch

from lib_loraclr import synthetic_loras as sl
from lib_loraclr.clora import concept_masks, fuse, normalise_maps, nt_xent
from lib_loraclr.clora_config import CloraSettings
from lib_loraclr.compose import compose, plain_generation
from lib_loraclr.lora_file import load_lora
from lib_loraclr.prompts import ComposePlan


def test_nt_xent_equals_direct_formula() -> None:
    g = torch.Generator().manual_seed(0)
    e = torch.rand(7, 16, generator=g)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 0])
    t = 0.5
    z = e / e.norm(dim=1, keepdim=True)
    s = z @ z.T
    terms = []
    for a in range(7):
        for p in range(7):
            if a != p and labels[a] == labels[p]:
                neg = sum(math.exp(s[a, n] / t) for n in range(7) if labels[n] != labels[a])
                terms.append(-math.log(math.exp(s[a, p] / t) / (math.exp(s[a, p] / t) + neg)))
    assert float(nt_xent(e, labels, t)) == pytest.approx(sum(terms) / len(terms), rel=1e-5)


def test_normalise_and_masks_and_fusion() -> None:
    maps = torch.zeros(2 * 3, 16, 77)  # rows (half, variant, image=1), 4x4 pixels
    maps[:, :8, 5] = 1.0  # token 5 (concept 1) on the top half
    maps[:, 8:, 9] = 1.0  # token 9 (concept 2) on the bottom half
    plan = ComposePlan("p", ("p1", "p2"), (), (), (((5,), (5,), (5,)), ((9,), (9,), (9,))), ((), (5,), (9,)), ("p", "p1", "p2"))
    rows = [[0, 3], [1, 4], [2, 5]]
    masks = concept_masks(maps, plan, rows, threshold=0.4)
    assert masks[1, :8].all() and not masks[1, 8:].any() and masks[2, 8:].all() and not masks[0].any()
    eps = torch.stack([torch.full((4, 8, 8), float(v)) for _ in range(2) for v in range(3)])  # variant v predicts v
    fused = fuse(eps, masks, 3, (8, 8))
    assert torch.all(fused[:, 0, :, :4] == 1) and torch.all(fused[:, 0, :, 4:] == 2)
    assert torch.allclose(normalise_maps(torch.tensor([[1.0, 3.0, 2.0]])), torch.tensor([[0.0, 1.0, 0.5]]))


@pytest.fixture(scope="module")
def loras(tmp_path_factory, tiny_model):
    d = tmp_path_factory.mktemp("clora")
    targets = sl.standard_targets(sl.layer_shapes(tiny_model.layer_map()))
    out = {}
    for k, name in enumerate(("cat_lora", "dog_lora")):
        sl.write_kohya_lora(d / f"{name}.safetensors", targets, rank=4, alpha=4.0, seed=30 + k, scale=0.12)
        out[name] = load_lora(d / f"{name}.safetensors")
    return out


PROMPT = "a <lora:cat_lora:1> cat and a <lora:dog_lora:0.8> dog"
TRIGGERS = {"cat_lora": "sks", "dog_lora": "zwx"}


def _run(model, loras, **kwargs):
    settings = CloraSettings(enabled=True, max_step=3, refine_steps=(0,), refine_iterations=3)
    return compose(model, PROMPT, loras, settings, steps=4, width=128, height=128, sampler="euler", triggers=TRIGGERS, **kwargs)


def test_update_lowers_loss_and_batched_equals_sequential(tiny_model, loras) -> None:
    batched = _run(tiny_model, loras)
    losses = [entry[1] for entry in batched.core.state.losses]
    assert losses[2] < losses[0]  # the refinement iterations at step 0 lower the contrastive loss
    sequential = _run(tiny_model, loras, sequential=True)
    torch.testing.assert_close(batched.latents, sequential.latents, rtol=1e-4, atol=1e-4)
    assert batched.plan.variants == ("a sks cat and a dog", "a cat and a zwx dog")


def test_model_untouched_also_after_exception(tiny_model, loras) -> None:
    before = {k: v.clone() for k, v in tiny_model.unet.state_dict().items()}
    calls = []

    def boom(info):
        calls.append(1)
        raise RuntimeError("stop mid-sampling")

    with pytest.raises(RuntimeError, match="mid-sampling"):
        _run(tiny_model, loras, callback=boom)
    assert calls
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in tiny_model.unet.modules())
    assert all(not m._forward_hooks for m in tiny_model.text_encoder.modules())
    assert all(torch.equal(before[k], v) for k, v in tiny_model.unet.state_dict().items())
    plain_a, _ = plain_generation(tiny_model, "a cat and a dog", steps=2, width=64, height=64, sampler="euler")
    plain_b, _ = plain_generation(tiny_model, "a cat and a dog", steps=2, width=64, height=64, sampler="euler")
    assert torch.equal(plain_a, plain_b)
