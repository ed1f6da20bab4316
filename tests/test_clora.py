"""CLoRA core: the loss against its formula, the latent update in the reference's latent, the
prediction it denoises with, masks and fusion (on a differentiable toy "UNet", so every expected
value is computed independently)."""

from __future__ import annotations

import math

import pytest
import torch

from lib_loraclr.clora.attention import AttentionMaps
from lib_loraclr.clora.compose import overlap_fraction
from lib_loraclr.clora.core import (
    CloraCore,
    concept_masks,
    fuse,
    group_embeddings,
    morph,
    normalise_maps,
    nt_xent,
    overlap_of,
)
from lib_loraclr.clora.prompts import ComposePlan
from lib_loraclr.clora.settings import CloraSettings


def _direct_nt_xent(e: torch.Tensor, labels: torch.Tensor, t: float) -> float:
    """pytorch_metric_learning's NTXentLoss written out: every ordered positive pair (a, p),
    -log(e^{s_ap/t} / (e^{s_ap/t} + sum_{n: label_n != label_a} e^{s_an/t})), cosine s, mean."""
    z = e / e.norm(dim=1, keepdim=True)
    s = (z @ z.T).tolist()
    n = len(labels)
    terms = []
    for a in range(n):
        for p in range(n):
            if a != p and labels[a] == labels[p]:
                neg = sum(math.exp(s[a][k] / t) for k in range(n) if labels[k] != labels[a])
                terms.append(-math.log(math.exp(s[a][p] / t) / (math.exp(s[a][p] / t) + neg)))
    return sum(terms) / len(terms) if terms else 0.0


@pytest.mark.parametrize("labels", [[0, 0, 1, 1, 1, 2, 0], [0, 1, 1, 2], [5, 0, 5, 9, 9]])
def test_nt_xent_equals_direct_formula(labels) -> None:
    g = torch.Generator().manual_seed(len(labels))
    e = torch.rand(len(labels), 16, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor(labels)
    loss = nt_xent(e, y, 0.5)
    assert float(loss.detach()) == pytest.approx(_direct_nt_xent(e.detach(), y, 0.5), rel=1e-9, abs=1e-12)
    (grad,) = torch.autograd.grad(loss, e)
    assert torch.isfinite(grad).all()


def test_nt_xent_closed_form() -> None:
    """Two groups of two orthogonal directions: every positive has cosine 1, every negative 0, so
    each of the 4 pairs costs ``log(1 + 2 e^{-1/t})``."""
    e = torch.tensor([[2.0, 0.0], [0.5, 0.0], [0.0, 1.0], [0.0, 3.0]], dtype=torch.float64)
    loss = nt_xent(e, torch.tensor([0, 0, 1, 1]), 0.5)
    assert float(loss) == pytest.approx(math.log(1 + 2 * math.exp(-2.0)), rel=1e-12)


def test_quality_proxies_on_hand_made_maps() -> None:
    """Two concepts sharing one of three claimed pixels: mask overlap 1/3; as attention
    distributions (1/2, 1/2, 0, 0) and (0, 1/2, 1/2, 0) they intersect in 1/2."""
    first, second = torch.tensor([1.0, 1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 1.0, 0.0])
    masks = torch.stack([torch.tensor([0.0, 0.0, 0.0, 1.0]), first, second])  # base first
    assert overlap_fraction(masks) == pytest.approx(1 / 3)
    embeddings = torch.stack([first, 3 * first, second])  # a group's members are averaged first
    assert overlap_of(embeddings, torch.tensor([0, 0, 1])) == pytest.approx(0.5)


def test_normalise_maps() -> None:
    assert torch.allclose(normalise_maps(torch.tensor([[1.0, 3.0, 2.0]])), torch.tensor([[0.0, 1.0, 0.5]]))
    assert torch.isfinite(normalise_maps(torch.ones(2, 5))).all()  # flat map: no division by zero


# A plan like "a cat and a dog": concept 0 at token 2 (+ trigger 3 in variant 1), concept 1 at 5/6.
PLAN = ComposePlan(
    "p",
    ("p1", "p2"),
    (),
    (),
    (((2,), (2, 3), (2,)), ((5,), (6,), (5, 6))),
    ((), (2, 3), (5, 6)),
    ("p", "p1", "p2"),
)


def test_masks_threshold_union_morphology_and_base() -> None:
    maps = torch.zeros(6, 16, 77)  # rows (half, variant), 4x4 pixels
    maps[:, :8, 2] = 1.0  # concept 0's subject: top half
    maps[:, 0, 3] = 1.0  # its trigger: one more pixel of the top half
    maps[:, 12:, 6] = 1.0  # concept 1: bottom row only...
    maps[:, 10, 5] = 0.5  # ...and token 5 in pixel 10 at half its max: above 0.4, not above 0.6
    rows = [[0, 3], [1, 4], [2, 5]]
    masks = concept_masks(maps, PLAN, rows, threshold=0.4)
    assert masks[1, :8].all() and not masks[1, 8:].any()
    assert masks[2, 12:].all() and masks[2, 10] == 1 and masks[2, :10].sum() == 0
    assert torch.equal(masks[0], ((masks[1] + masks[2]) == 0).float())
    strict = concept_masks(maps * 0, PLAN, rows, threshold=0.4)  # all-zero maps: nothing over 0.4 * 0
    assert strict[1:].sum() == 0 and strict[0].all()
    m = torch.zeros(1, 1, 5, 5)
    m[0, 0, 2, 2] = 1
    assert morph(m, "dilate").sum() == 9 and morph(morph(m, "dilate"), "erode").sum() == 1
    assert morph(m, "open").sum() == 0 and morph(m, "close").sum() == 1
    wide = concept_masks(torch.zeros(6, 8, 77), PLAN, rows, 0.4, "dilate", map_hw=(2, 4))  # non-square maps
    assert wide.shape == (3, 8)


def test_fused_prediction_is_each_variant_inside_its_mask_and_base_outside() -> None:
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(2 * 3 * 2, 4, 8, 8, generator=g)  # (half, variant, image=2)
    masks = torch.zeros(3, 16)
    masks[1, :6] = 1  # concept 1: map pixels 0..5
    masks[2, 4:10] = 1  # concept 2: pixels 4..9 (4, 5 overlap)
    masks[0] = (masks[1:].sum(0) == 0).float()
    fused = fuse(eps, masks, 3, (8, 8))
    per = eps.reshape(2, 3, 2, 4, 8, 8)
    up = masks.reshape(3, 4, 4).repeat_interleave(2, 1).repeat_interleave(2, 2)  # nearest upsampling x2
    for v, only in [(1, (up[1] == 1) & (up[2] == 0)), (2, (up[2] == 1) & (up[1] == 0)), (0, up[0] == 1)]:
        torch.testing.assert_close(fused[..., only], per[:, v][..., only])
    both = (up[1] == 1) & (up[2] == 1)
    torch.testing.assert_close(fused[..., both], (per[:, 1][..., both] + per[:, 2][..., both]) / 2)


class _ToyUNet:
    """eps and maps from the UNet input ``z = x * c_in``, differentiably (the maps are a softmax of
    a fixed linear function of z; eps is linear in z and in the row's variant)."""

    def __init__(self, maps: AttentionMaps, pixels: int = 16) -> None:
        g = torch.Generator().manual_seed(3)
        self.maps, self.pixels = maps, pixels
        self.weight = torch.randn(pixels * 77, 4 * 16, generator=g, dtype=torch.float64) * 0.5
        self.calls: list[torch.Tensor] = []

    def z_maps(self, z: torch.Tensor) -> torch.Tensor:
        return torch.softmax((z.reshape(z.shape[0], -1) @ self.weight.T).reshape(-1, self.pixels, 77), dim=-1)

    def __call__(self, x_rows: torch.Tensor, sigma_rows: torch.Tensor, rows) -> torch.Tensor:
        z = x_rows * (sigma_rows**2 + 1).rsqrt().reshape(-1, 1, 1, 1)
        self.calls.append(z.detach().clone())
        self.maps.total, self.maps.layers = self.z_maps(z), 1
        return 0.3 * z + torch.tensor([float(r) for r in rows], dtype=z.dtype).reshape(-1, 1, 1, 1)


def _core(reuse: bool = True, **settings) -> tuple[CloraCore, _ToyUNet]:
    maps = AttentionMaps(16)
    toy = _ToyUNet(maps)
    s = CloraSettings(
        enabled=True, max_step=2, refine_steps=(0,), refine_iterations=2, reuse_prediction=reuse, **settings
    )
    return CloraCore(PLAN, s, toy, maps, cfg_scale=5.0), toy


def _loss_at_z(toy: _ToyUNet, core: CloraCore, z: torch.Tensor) -> torch.Tensor:
    maps = toy.z_maps(z.expand(6, -1, -1, -1))
    embeddings, labels = group_embeddings(maps, PLAN, core.variant_rows(core.all_rows))
    return nt_xent(embeddings, labels, 0.5)


@pytest.mark.parametrize("reuse", [True, False])
def test_update_in_reference_latent_and_the_prediction_it_denoises_with(reuse) -> None:
    core, toy = _core(reuse)
    sigma = 3.0
    x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    c_in = (sigma**2 + 1) ** -0.5
    z = (x * c_in).clone()
    for _ in range(core.updates_at(0)):  # the reference: z <- z - 20 dL/dz, 1 + 2 times at a refinement step
        zz = z.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(_loss_at_z(toy, core, zz), zz)
        z_before, z = z, z - 20.0 * grad
    x_in = x.clone()
    denoised = core.denoise(x_in, torch.tensor([sigma]))
    assert core.updates_at(0) == 3 and core.updates_at(1) == 1 and core.updates_at(2) == 0
    torch.testing.assert_close(x_in, z / c_in)  # updated in place, in k-diffusion's x = z / c_in
    losses = [entry[1] for entry in core.state.losses]
    assert len(losses) == 3 and losses[-1] < losses[0]
    at = z_before if reuse else z  # the quirk: the prediction made before the last update
    eps_rows = 0.3 * at + torch.arange(6, dtype=at.dtype).reshape(-1, 1, 1, 1)
    masks = concept_masks(toy.z_maps(at.expand(6, -1, -1, -1)), PLAN, core.variant_rows(core.all_rows), 0.4)
    fused = fuse(eps_rows, masks, 3, (4, 4))
    expected = x_in - sigma * (fused[1] + 5.0 * (fused[0] - fused[1]))
    torch.testing.assert_close(denoised, expected)


def test_masks_only_from_mask_step_and_no_update_after_max_step() -> None:
    core, toy = _core(mask_from_step=1, step_size=0.0)
    x = torch.randn(1, 4, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    denoised = core.denoise(x.clone(), 2.0)
    z = x * (2.0**2 + 1) ** -0.5
    per = (0.3 * z + torch.arange(6, dtype=z.dtype).reshape(-1, 1, 1, 1)).reshape(2, 3, 4, 4, 4)
    guided = per[1].mean(0) + 5.0 * (
        per[0].mean(0) - per[1].mean(0)
    )  # before mask_from_step: all variants averaged
    torch.testing.assert_close(denoised, x - 2.0 * guided[None])
    assert core.state.losses == [] and len(toy.calls) == 1
    core.denoise(x.clone(), 1.0)
    assert core.state.masks[0].sum() < 16  # masks in use from step 1 on


def test_cond_only_loss_uses_the_prompt_half_only() -> None:
    core, toy = _core(cond_only_loss=True)
    core.denoise(torch.randn(1, 4, 4, 4, dtype=torch.float64), 1.5)
    assert [len(c) for c in toy.calls] == [
        3,
        3,
        3,
        6,
    ]  # three loss passes on the prompt rows, then one full pass


def test_explicit_step_index_updates_once_per_step() -> None:
    """Second-order samplers call the denoiser twice per step: with ``step=`` only the first call updates."""
    core, toy = _core()
    x = torch.randn(1, 4, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    core.denoise(x.clone(), 2.0, step=1)
    assert [s for s, _, _ in core.state.losses] == [1] and len(
        toy.calls
    ) == 1  # one update, prediction reused
    core.denoise(x.clone(), 1.5, step=1)
    assert len(core.state.losses) == 1 and len(toy.calls) == 2  # same step again: predict and fuse only
    core.denoise(x.clone(), 1.0, step=0)
    assert [s for s, _, _ in core.state.losses] == [
        1,
        0,
        0,
        0,
    ] and core.state.step == 1  # a refinement step: 1 + 2


def test_a_steps_later_calls_fuse_with_its_first_calls_masks() -> None:
    """Heun, DPM2, DPM++ SDE and Restart combine a step's two predictions: both are fused with the
    masks of the step's first call (one layout per step), though the second call's maps differ."""
    core, toy = _core(step_size=0.0)
    x = torch.randn(1, 4, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    core.denoise(x.clone(), 2.0, step=3)
    first = core.state.masks.clone()
    other = torch.randn(1, 4, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(9)) * 5
    denoised = core.denoise(other.clone(), 1.0, step=3)
    own = concept_masks(toy.maps.mean(), PLAN, core.variant_rows(core.all_rows), 0.4)
    assert not torch.equal(own.cpu(), first)  # this call's own maps would give other masks
    assert torch.equal(core.state.masks, first) and core.state.fused_calls == 2
    z = other * (1.0**2 + 1) ** -0.5
    eps_rows = 0.3 * z + torch.arange(6, dtype=z.dtype).reshape(-1, 1, 1, 1)
    fused = fuse(eps_rows, first.to(z.dtype), 3, (4, 4))
    torch.testing.assert_close(denoised, other - 1.0 * (fused[1] + 5.0 * (fused[0] - fused[1])))
    core.denoise(other.clone(), 0.5, step=4)  # the next step makes its own
    own = concept_masks(toy.maps.mean(), PLAN, core.variant_rows(core.all_rows), 0.4)
    assert torch.equal(core.state.masks, own.cpu())


def test_cond_only_guides_with_the_prompt_half_and_keeps_the_uncond() -> None:
    """The host's "Skip Early CFG" and NGMS skip the unconditional half: the result is the fused
    prompt prediction alone (scale 1), and the uncond the host records is then the prompt's."""
    core, toy = _core(step_size=0.0)
    x = torch.randn(1, 4, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    guided = core.denoise(x.clone(), 2.0, step=0)
    uncond = core.state.last_uncond.clone()
    plain = core.denoise(x.clone(), 2.0, step=1, cond_only=True)
    z = x * (2.0**2 + 1) ** -0.5
    eps_rows = 0.3 * z + torch.arange(6, dtype=z.dtype).reshape(-1, 1, 1, 1)
    fused = fuse(eps_rows, core.state.masks.to(z.dtype), 3, (4, 4))
    torch.testing.assert_close(plain, x - 2.0 * fused[0])
    torch.testing.assert_close(core.state.last_uncond, fused[0])
    assert not torch.allclose(guided, plain) and not torch.allclose(uncond, fused[0])


def test_relative_step_moves_the_latent_by_its_fraction_whatever_the_gradient_scale() -> None:
    """One relative update at step 1 (no refinement there): ``||x_after - x|| = r ||x||``, in the
    loss gradient's direction, for any sigma; the paper's step would grow with the gradient."""
    x = torch.randn(1, 4, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    for sigma in (0.5, 8.0):
        core, toy = _core(step_mode="relative", relative_step=0.05)
        z = (x * (sigma**2 + 1) ** -0.5).clone().requires_grad_(True)
        (grad_z,) = torch.autograd.grad(_loss_at_z(toy, core, z), z)
        grad_x = grad_z * (sigma**2 + 1) ** -0.5
        moved = x.clone()
        core.denoise(moved, torch.tensor([sigma]), step=1)
        delta = x - moved
        assert float(delta.norm() / x.norm()) == pytest.approx(0.05, rel=1e-6)
        torch.testing.assert_close(delta / delta.norm(), grad_x / grad_x.norm())


def test_masks_only_mode_fuses_without_a_gradient_pass() -> None:
    """Masks-only equals the paper's step size 0: one plain pass per call, no loss recorded, the
    same fused prediction; its step size is ignored."""
    x = torch.randn(1, 4, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(12))
    masks_only, toy = _core(step_mode="masks-only", step_size=20.0)
    zero, _ = _core(step_size=0.0)
    assert masks_only.updates_at(0) == 0 and not masks_only.settings.updates_latents
    got, want = masks_only.denoise(x.clone(), 2.0), zero.denoise(x.clone(), 2.0)
    torch.testing.assert_close(got, want)
    assert masks_only.state.losses == [] and len(toy.calls) == 1
    assert masks_only.state.passes["full"] == 0 and masks_only.state.passes["no_grad"] == 1
