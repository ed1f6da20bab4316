"""Host patches restore exactly, also when the wrapped call raises."""

from __future__ import annotations

import types

import pytest

from lib_loraclr.webui.patches import on_sampler_created, patched_attribute, wrap_once


def test_patched_attribute_restores_present_and_absent() -> None:
    obj = types.SimpleNamespace(a=1)
    with pytest.raises(KeyError):
        with patched_attribute(obj, "a", 2), patched_attribute(obj, "b", 3):
            assert (obj.a, obj.b) == (2, 3)
            raise KeyError
    assert obj.a == 1 and not hasattr(obj, "b")


def test_sampler_hook_sees_first_sampler_only_and_unwinds() -> None:
    module = types.SimpleNamespace(create_sampler=lambda name, model: f"sampler:{name}")
    original = module.create_sampler
    seen = []
    with on_sampler_created(module, seen.append):
        module.create_sampler("Euler", None)
        module.create_sampler("hires", None)
    assert seen == ["sampler:Euler"] and module.create_sampler is original


def test_wrap_once_removes_itself_even_on_error() -> None:
    class P:
        def sample(self, x):
            if x < 0:
                raise ValueError
            return x

    p = P()
    entered = []

    class Ctx:
        def __enter__(self):
            entered.append("in")

        def __exit__(self, *exc):
            entered.append("out")

    wrap_once(p, "sample", Ctx)
    with pytest.raises(ValueError):
        p.sample(-1)
    assert entered == ["in", "out"] and "sample" not in p.__dict__
    wrap_once(p, "sample", Ctx)
    assert p.sample(2) == 2 and "sample" not in p.__dict__


def test_frozen_parameters_restores_requires_grad() -> None:
    import torch

    layer = torch.nn.Linear(2, 2)
    layer.bias.requires_grad_(False)
    from lib_loraclr.sd.patches import frozen_parameters

    with pytest.raises(ValueError), frozen_parameters(layer):
        assert not layer.weight.requires_grad
        with torch.enable_grad():
            layer.weight.copy_(torch.zeros(2, 2))  # what the WebUI's built-in Lora does in forward
        raise ValueError
    assert layer.weight.requires_grad and not layer.bias.requires_grad


def test_checkpointing_disabled_turns_off_true_flags_only_and_restores() -> None:
    """ldm's BasicTransformerBlock.checkpoint / ResBlock.use_checkpoint and diffusers'
    gradient_checkpointing are switched off inside, exactly restored after an error; other values
    (a False flag, a non-bool attribute of the same name) are left alone."""
    from torch import nn

    from lib_loraclr.sd.patches import checkpointing_disabled

    root = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2)), nn.Linear(2, 2), nn.Linear(2, 2))
    root[0].checkpoint = True
    root[1].use_checkpoint = True
    root[1][0].gradient_checkpointing = True
    root[2].checkpoint = False
    root[3].checkpoint = "every-other-layer"
    with pytest.raises(ValueError), checkpointing_disabled(root):
        assert (root[0].checkpoint, root[1].use_checkpoint, root[1][0].gradient_checkpointing) == (
            False,
            False,
            False,
        )
        assert root[2].checkpoint is False and root[3].checkpoint == "every-other-layer"
        raise ValueError
    assert (
        root[0].checkpoint is True
        and root[1].use_checkpoint is True
        and root[1][0].gradient_checkpointing is True
    )
    assert root[2].checkpoint is False and root[3].checkpoint == "every-other-layer"
    assert not hasattr(root[2], "use_checkpoint")
