"""Composition on the tiny model: per-row routing equals each LoRA alone, batched equals the
reference's per-variant loop, the model is untouched afterwards (also after an error), the
weighted encoder, the CLI and the demo figures."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from lib_loraclr.clora.compose import compose, plain_generation, row_loras, run_compose_demo
from lib_loraclr.clora.encode import encode_weighted
from lib_loraclr.clora.prompts import Binding, plan_composition
from lib_loraclr.clora.settings import CloraSettings
from lib_loraclr.clora.tokens import tokenizer_counter
from lib_loraclr.errors import PromptError
from lib_loraclr.lora.file import load_lora
from lib_loraclr.lora.keymap import layer_map_diffusers
from lib_loraclr.lora.routing import route_loras
from lib_loraclr.sd.cond import Cond
from lib_loraclr.testing import synthetic_loras as sl


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory, tiny_model):
    d = tmp_path_factory.mktemp("compose")
    targets = sl.standard_targets(sl.layer_shapes(tiny_model.layer_map()))
    for k, name in enumerate(("cat_lora", "dog_lora", "style_lora")):
        sl.write_kohya_lora(d / f"{name}.safetensors", targets, rank=4, alpha=4.0, seed=30 + k, scale=0.12)
    return d


@pytest.fixture(scope="module")
def loras(lora_dir):
    return {
        name: load_lora(lora_dir / f"{name}.safetensors") for name in ("cat_lora", "dog_lora", "style_lora")
    }


PROMPT = "a <lora:cat_lora:1> cat and a <lora:dog_lora:0.8> dog, <lora:style_lora:0.5>"
TRIGGERS = {"cat_lora": "sks", "dog_lora": "zwx", "style_lora": ""}


def _merged_unet(model, loras_and_weights):
    """An independent reference: a copy of the UNet with the LoRAs' deltas added to the weights."""
    unet = copy.deepcopy(model.unet)
    layers = layer_map_diffusers(unet, model.text_encoder)
    with torch.no_grad():
        for lora, weight in loras_and_weights:
            for name, module in lora.modules.items():
                if name.startswith("lora_unet") and name in layers:
                    layers[name].weight += weight * module.delta(dtype=torch.float32).reshape(
                        layers[name].weight.shape
                    )
    return unet


def test_routed_rows_equal_each_lora_alone(tiny_model, loras) -> None:
    plan = plan_composition(PROMPT, tokenizer_counter(tiny_model.tokenizer), TRIGGERS.get)
    rows = row_loras(plan, loras, images=1)  # (half, variant): base+style, cat+style, dog+style, twice
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 4, 8, 8, generator=g)
    context = torch.randn(6, 77, tiny_model.context_dim, generator=g)
    t = torch.full((6,), 700.0)
    with torch.no_grad():
        with route_loras(tiny_model.layer_map(), list(loras.values())) as router:
            router.set_rows(rows)
            routed = tiny_model.eps(x, t, Cond(context))
        style = (loras["style_lora"], 0.5)
        for r, extra in enumerate([[], [(loras["cat_lora"], 1.0)], [(loras["dog_lora"], 0.8)]] * 2):
            unet = _merged_unet(tiny_model, [*extra, style])
            alone = unet(
                x[r : r + 1], t[r : r + 1], encoder_hidden_states=context[r : r + 1], return_dict=False
            )[0]
            torch.testing.assert_close(routed[r : r + 1], alone, rtol=1e-4, atol=1e-5)


SETTINGS = CloraSettings(enabled=True, max_step=3, refine_steps=(0,), refine_iterations=3)


def _run(model, loras, **kwargs):
    return compose(
        model,
        PROMPT,
        loras,
        SETTINGS,
        steps=4,
        width=128,
        height=128,
        sampler="euler",
        triggers=TRIGGERS,
        **kwargs,
    )


def test_batched_equals_sequential_and_update_lowers_loss(tiny_model, loras) -> None:
    batched = _run(tiny_model, loras)
    sequential = _run(tiny_model, loras, sequential=True)
    torch.testing.assert_close(batched.latents, sequential.latents, rtol=1e-4, atol=1e-4)
    assert batched.plan.variants == ("a sks cat and a dog,", "a cat and a zwx dog,")
    losses = [loss for step, loss, _ in batched.core.state.losses if step == 0]
    assert len(losses) == 4 and losses[-1] < losses[0]  # 1 + 3 refinement updates lower the contrastive loss
    # the schedule the settings ask for: 1 + 3 refinement updates at step 0, one at steps 1 and 2, none from max_step=3
    assert [step for step, _, _ in batched.core.state.losses] == [0, 0, 0, 0, 1, 2]


def test_model_untouched_also_after_exception(own_tiny_model, tiny_model, loras) -> None:
    """The failed run is made on a private copy; the session's model, never composed with, is the
    reference it must still equal (weights, hooks and what it generates)."""
    model = own_tiny_model
    calls = []

    def boom(info):
        calls.append(1)
        raise RuntimeError("stop mid-sampling")

    with pytest.raises(RuntimeError, match="mid-sampling"):
        _run(model, loras, callback=boom)
    assert calls
    for module in [*model.unet.modules(), *model.text_encoder.modules()]:
        assert not module._forward_hooks and not module._forward_pre_hooks
    reference = {
        **tiny_model.unet.state_dict(),
        **{f"te.{k}": v for k, v in tiny_model.text_encoder.state_dict().items()},
    }
    after = {**model.unet.state_dict(), **{f"te.{k}": v for k, v in model.text_encoder.state_dict().items()}}
    assert reference.keys() == after.keys() and all(torch.equal(reference[k], after[k]) for k in reference)
    plain, _ = plain_generation(model, "a cat and a dog", steps=2, width=64, height=64, sampler="euler")
    expected, _ = plain_generation(
        tiny_model, "a cat and a dog", steps=2, width=64, height=64, sampler="euler"
    )
    assert torch.equal(plain, expected)


def test_unknown_lora_and_explicit_bindings(tiny_model, loras) -> None:
    with pytest.raises(PromptError, match="LoRA not found: nope"):
        compose(tiny_model, "a <lora:nope:1> cat", loras, SETTINGS, steps=1, width=64, height=64)
    result = compose(
        tiny_model,
        "a cat and a dog",
        loras,
        CloraSettings(enabled=True, max_step=0),
        steps=1,
        width=64,
        height=64,
        bindings=[Binding.of("cat_lora", 1.0, "cat", "sks"), Binding.of("dog_lora", 0.7, "dog")],
    )
    assert result.plan.prompts == ("a cat and a dog", "a sks cat and a dog", "a cat and a dog")


def test_weighted_encoder(tiny_model) -> None:
    with torch.no_grad():
        plain = tiny_model.encode_prompt(["a cat and a dog"]).context
        ours = encode_weighted(
            tiny_model, ["a cat and a dog", "a (cat:1.5) and a dog", "a cat BREAK a dog"]
        ).context
    assert ours.shape[1] == 154  # the BREAK prompt has two chunks; the others are padded with empty chunks
    torch.testing.assert_close(ours[:1, :77], plain)
    # A1111's emphasis: token 2 ("cat") scaled by 1.5, then the whole chunk by one factor restoring its mean
    factor = float(
        ours[1, :77].mean() / (ours[0, :77] * torch.tensor([1.0, 1.0, 1.5] + [1.0] * 74)[:, None]).mean()
    )
    torch.testing.assert_close(ours[1, 0], ours[0, 0] * factor)
    torch.testing.assert_close(ours[1, 2], ours[0, 2] * 1.5 * factor)
    torch.testing.assert_close(ours[1, :77].mean(), ours[0, :77].mean())


def test_cli_and_demo(tmp_path, tiny_model, lora_dir) -> None:
    from lib_loraclr.cli import main
    from lib_loraclr.sd.checkpoint import save_checkpoint

    ckpt = tmp_path / "tiny.safetensors"
    save_checkpoint(tiny_model, str(ckpt))
    out = tmp_path / "out.png"
    code = main(
        [
            "compose",
            "--base",
            str(ckpt),
            "--prompt",
            "a <lora:cat_lora:1> cat and a <lora:dog_lora:1> dog",
            "--lora-dir",
            str(lora_dir),
            "--out",
            str(out),
            "--save-masks",
            str(tmp_path / "masks"),
            "--steps",
            "2",
            "--width",
            "64",
            "--height",
            "64",
            "--max-step",
            "1",
            "--refine-iterations",
            "1",
            "--device",
            "cpu",
        ]
    )
    assert code == 0 and out.is_file() and (tmp_path / "masks" / "mask_1_cat_lora.png").is_file()
    figures = run_compose_demo(
        tiny_model,
        [lora_dir / "cat_lora.safetensors", lora_dir / "dog_lora.safetensors"],
        tmp_path / "demo",
        steps=3,
        size=64,
    )
    assert figures["loss_after"] < figures["loss_before"]
    assert all(Path(p).is_file() for p in figures["masks"])


def test_trainable_weights_get_no_gradient_and_stay_trainable(own_tiny_model, loras) -> None:
    model = own_tiny_model  # its flags are changed here
    params = list(model.unet.parameters())
    for p in params:
        p.requires_grad_(True)
    result = compose(
        model,
        PROMPT,
        loras,
        CloraSettings(enabled=True, max_step=1, refine_steps=()),
        steps=1,
        width=64,
        height=64,
        sampler="euler",
        triggers=TRIGGERS,
    )
    assert len(result.core.state.losses) == 1  # a latent update ran (gradient to the latent only)
    assert all(p.requires_grad and p.grad is None for p in params)
