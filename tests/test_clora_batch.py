"""Several images in one UNet pass (CloraBatch): each image's latent, prediction, losses and masks
equal the same image composed alone; the step loop reads nothing back to the host;
``compose(images=N)`` gives each image its own masks; the trimmed graph changes nothing."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from lib_loraclr.clora.attention import AttentionMaps
from lib_loraclr.clora.batch import CloraBatch
from lib_loraclr.clora.compose import compose
from lib_loraclr.clora.core import CloraCore
from lib_loraclr.clora.prompts import ComposePlan
from lib_loraclr.clora.settings import CloraSettings
from tests.test_compose import PROMPT, TRIGGERS, lora_dir, loras  # noqa: F401 - module fixtures

# "a cat and a dog" (as tests/test_clora.py), "a hat" (one concept) and a plan binding nothing
TWO = ComposePlan(
    "p",
    ("p1", "p2"),
    (),
    (),
    (((2,), (2, 3), (2,)), ((5,), (6,), (5, 6))),
    ((), (2, 3), (5, 6)),
    ("p", "p1", "p2"),
)
ONE = ComposePlan("q", ("q1",), (), (), (((4,), (3, 4)),), ((), (3, 4)), ("q", "q1"))
NONE = ComposePlan("r", (), (), (), (), ((),), ("r",))
SETTINGS = CloraSettings(enabled=True, max_step=2, refine_steps=(0,), refine_iterations=2)


class _Toy:
    """eps and maps of each row from its UNet input ``z = x * c_in`` (differentiably) and its
    image's own row number, so that a row computes the same in a batch as alone."""

    def __init__(self, maps: AttentionMaps, local: list[int]) -> None:
        g = torch.Generator().manual_seed(3)
        self.maps, self.local = maps, local
        self.weight = torch.randn(16 * 77, 4 * 16, generator=g, dtype=torch.float64) * 0.5
        self.calls: list[int] = []

    def __call__(self, x_rows: torch.Tensor, sigma_rows: torch.Tensor, rows) -> torch.Tensor:
        z = x_rows * (sigma_rows**2 + 1).rsqrt().reshape(-1, 1, 1, 1)
        self.calls.append(len(rows))
        logits = (z.reshape(z.shape[0], -1) @ self.weight.T).reshape(-1, 16, 77)
        self.maps.total, self.maps.layers = torch.softmax(logits, dim=-1), 1
        offset = torch.tensor([float(self.local[r]) for r in rows], dtype=z.dtype)
        return 0.3 * z + offset.reshape(-1, 1, 1, 1)


def _batch(plans, settings=SETTINGS) -> tuple[CloraBatch, _Toy]:
    maps = AttentionMaps(16)
    cores = [CloraCore(plan, settings, None, maps, cfg_scale=5.0) for plan in plans]
    toy = _Toy(maps, [r for core in cores for r in core.all_rows])
    return CloraBatch(cores, toy, maps), toy


CALLS = [(3.0, 0), (2.0, 1), (2.0, 1), (1.0, 2)]  # (sigma, step): step 1 twice, as Heun calls


@pytest.mark.parametrize("reuse", [True, False])
def test_batch_equals_each_image_alone(reuse) -> None:
    """Images with different plans (3, 2 and 1 variants; the last binds nothing, so it makes no
    update while the others do) in one pass per pass kind: latents, predictions, losses and masks
    are each image's own, as if it were composed alone."""
    settings = replace(SETTINGS, reuse_prediction=reuse)
    plans = [TWO, ONE, NONE, TWO]
    g = torch.Generator().manual_seed(11)
    x0 = torch.randn(len(plans), 4, 4, 4, generator=g, dtype=torch.float64)
    batch, toy = _batch(plans, settings)
    x, outs = x0.clone(), []
    for sigma, step in CALLS:
        outs.append(batch.denoise(x, torch.tensor(sigma, dtype=torch.float64), step))
    # one pass for all images at a time: step 0's 3 updates and the prediction of the image that
    # makes none (with reuse the others take theirs from the last update's pass), step 1's update
    # and that prediction again, then one prediction pass per call; each image alone makes as many
    assert len(toy.calls) == 4 + 2 + 1 + 1
    for b, plan in enumerate(plans):
        alone, alone_toy = _batch([plan], settings)
        xb = x0[b : b + 1].clone()
        for (sigma, step), out in zip(CALLS, outs, strict=True):
            torch.testing.assert_close(
                alone.denoise(xb, torch.tensor(sigma, dtype=torch.float64), step), out[b : b + 1]
            )
        torch.testing.assert_close(xb, x[b : b + 1])
        mine, own = batch.cores[b].state, alone.cores[0].state
        assert [s for s, _, _ in mine.losses] == [s for s, _, _ in own.losses]
        assert [v for _, v, _ in mine.losses] == pytest.approx([v for _, v, _ in own.losses], rel=1e-9)
        assert [v for _, v in mine.overlaps] == pytest.approx(
            [v for _, v in own.overlaps], rel=1e-9, abs=1e-6
        )
        assert torch.equal(mine.masks, own.masks) and mine.fused_calls == own.fused_calls == len(CALLS)
    assert [len(c.state.losses) for c in batch.cores] == [4, 4, 0, 4]
    assert not torch.equal(batch.cores[0].state.masks, batch.cores[3].state.masks)  # each its own masks


def test_the_step_loop_reads_nothing_back(monkeypatch) -> None:
    """No ``float()``, ``.item()``, ``.tolist()``, truth test or copy to the CPU of a tensor in a
    denoiser call (each waits for the device on a GPU): losses are read back when asked for."""
    batch, _ = _batch([TWO, ONE])
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    batch.denoise(x, torch.tensor(3.0, dtype=torch.float64), 0)  # caches built on the first call

    def refuse(*args, **kwargs):
        raise AssertionError("a value was read back to the host")

    with monkeypatch.context() as patch:
        for name in ("__bool__", "__float__", "__int__", "item", "tolist", "cpu", "numpy"):
            patch.setattr(torch.Tensor, name, refuse)
        for sigma, step in [(2.0, 1), (2.0, 1), (1.0, 2)]:
            batch.denoise(x, torch.tensor(sigma, dtype=torch.float64), step)
    state = batch.cores[0].state
    assert state.updates == 4 and [s for s, _, _ in state.losses] == [0, 0, 0, 1]
    assert all(isinstance(v, float) for _, v, _ in state.losses)


def test_compose_images_are_each_composed_alone(tiny_model, loras) -> None:  # noqa: F811
    """``compose(images=4)``: one UNet pass per pass (as many UNet calls as one image alone
    makes), each image with its own masks and loss, equal to four single compositions."""
    settings = CloraSettings(enabled=True, max_step=2, refine_steps=(0,), refine_iterations=1)
    kwargs = dict(steps=3, width=64, height=64, sampler="euler", triggers=TRIGGERS)
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(8))
    calls: list[int] = []
    handle = tiny_model.unet.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    try:
        batched = compose(tiny_model, PROMPT, loras, settings, images=4, latents=latents, **kwargs)
        batched_calls, calls[:] = list(calls), []
        singles = [
            compose(tiny_model, PROMPT, loras, settings, latents=latents[b : b + 1], **kwargs)
            for b in range(4)
        ]
    finally:
        handle.remove()
    assert len(batched_calls) == len(calls) // 4 and all(rows == 4 * 6 for rows in batched_calls)
    for b, single in enumerate(singles):
        torch.testing.assert_close(batched.latents[b : b + 1], single.latents, rtol=1e-4, atol=1e-4)
        mine, own = batched.cores[b].state, single.core.state
        assert [v for _, v, _ in mine.losses] == pytest.approx(
            [v for _, v, _ in own.losses], rel=1e-4, abs=1e-6
        )
        assert torch.equal(mine.masks, own.masks)


def test_trimmed_graph_gives_the_same_composition(tiny_model, loras) -> None:  # noqa: F811
    """The pass that gives both the loss and the prediction stops recording its graph after the
    last map layer (its prediction is used detached): same latents and losses as with the whole
    graph, the prediction comes out without a graph, and the grad mode is back afterwards."""
    settings = CloraSettings(enabled=True, max_step=2, refine_steps=(0,), refine_iterations=1)
    kwargs = dict(steps=2, width=64, height=64, sampler="euler", triggers=TRIGGERS, seed=3)
    tracked: list[bool] = []
    handle = tiny_model.unet.register_forward_hook(lambda m, args, out: tracked.append(out[0].requires_grad))
    try:
        trimmed = compose(tiny_model, PROMPT, loras, settings, **kwargs)
        trimmed_tracked, tracked[:] = list(tracked), []
        whole = compose(tiny_model, PROMPT, loras, settings, trim_graph=False, **kwargs)
    finally:
        handle.remove()
    assert torch.is_grad_enabled()
    torch.testing.assert_close(trimmed.latents, whole.latents, rtol=1e-5, atol=1e-5)
    assert [v for _, v, _ in trimmed.core.state.losses] == pytest.approx(
        [v for _, v, _ in whole.core.state.losses]
    )
    # the first pass runs whole (the last map layer is not known yet), then both full passes
    full = trimmed.core.state.passes["full"]
    assert full == 2 and trimmed_tracked.count(True) == 1 and tracked.count(True) == 1 + full


def test_grad_mode_is_restored_when_a_trimmed_pass_fails() -> None:
    from lib_loraclr.clora.attention import pass_grad_mode

    with pytest.raises(RuntimeError), pass_grad_mode():
        torch.set_grad_enabled(False)
        raise RuntimeError("mid-pass")
    assert torch.is_grad_enabled()
