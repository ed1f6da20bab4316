"""Reference samplers against a Gaussian target whose exact denoiser and ODE solution are known.

Data x0 ~ N(mu, s^2) per coordinate. Then D(x; sigma) = mu + s^2 / (s^2 + sigma^2) (x - mu) exactly,
and the probability-flow ODE maps x at sigma to mu + sqrt((s^2 + sigma'^2) / (s^2 + sigma^2)) (x - mu).
"""

from __future__ import annotations

import pytest
import torch

from lib_loraclr.sd import sampling as S
from lib_loraclr.sd.cond import Cond
from lib_loraclr.sd.configs import sd_alphas_cumprod

MU, SD = 0.7, 0.5


def gaussian_denoiser(x, sigma, **_):
    sigma = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
    return MU + SD**2 / (SD**2 + sigma**2) * (x - MU)


def exact_flow(x, sigma_from, sigma_to):
    return MU + ((SD**2 + sigma_to**2) / (SD**2 + sigma_from**2)) ** 0.5 * (x - MU)


@pytest.fixture
def start():
    g = torch.Generator().manual_seed(0)
    sigmas = S.sigmas_karras(10, 0.03, 14.6)
    return torch.randn(4, 4, 8, 8, generator=g, dtype=torch.float64) * sigmas[0], sigmas


def _err(sampler, x, steps, **kw):
    sigmas = S.sigmas_karras(steps, 0.03, 14.6).double()
    out = sampler(gaussian_denoiser, x, sigmas, disable=True, **kw)
    # The last step (lowest sigma -> 0) is the denoiser itself in every sampler; compare with the
    # exact flow down to the lowest sigma followed by that step.
    want = gaussian_denoiser(exact_flow(x, sigmas[0], sigmas[-2]), sigmas[-2:-1])
    return (out - want).abs().max().item()


@pytest.mark.parametrize("sampler", [S.sample_euler, S.sample_dpmpp_2m, S.sample_ddim])
def test_deterministic_samplers_converge_to_the_exact_flow(sampler, start):
    x, _ = start
    errors = [_err(sampler, x, n) for n in (20, 80, 320)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.01


def test_convergence_orders(start):
    # 4x the steps: Euler (first order) cuts the error ~4x, DPM-Solver++(2M) (second order) ~16x.
    x, _ = start
    euler = _err(S.sample_euler, x, 80) / _err(S.sample_euler, x, 320)
    dpm = _err(S.sample_dpmpp_2m, x, 80) / _err(S.sample_dpmpp_2m, x, 320)
    assert 3.0 < euler < 5.5
    assert dpm > 10.0


def test_ddim_eta0_equals_euler(start):
    x, sigmas = start
    sigmas = sigmas.double()
    a = S.sample_euler(gaussian_denoiser, x, sigmas, disable=True)
    b = S.sample_ddim(gaussian_denoiser, x, sigmas, disable=True)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(("sampler", "kw"), [(S.sample_euler_ancestral, {}), (S.sample_ddim, {"eta": 1.0})])
def test_stochastic_samplers_hit_the_target_distribution(sampler, kw):
    g = torch.Generator().manual_seed(1)
    sigmas = S.sigmas_karras(300, 0.03, 14.6).double()
    x = torch.randn(20000, generator=g, dtype=torch.float64) * sigmas[0]
    out = sampler(gaussian_denoiser, x, sigmas, disable=True, generator=g, **kw)
    assert abs(out.mean().item() - MU) < 0.02
    assert abs(out.std().item() - SD) < 0.015
    # Same generator state -> same samples.
    a = sampler(
        gaussian_denoiser, x[:10], sigmas, disable=True, generator=torch.Generator().manual_seed(5), **kw
    )
    b = sampler(
        gaussian_denoiser, x[:10], sigmas, disable=True, generator=torch.Generator().manual_seed(5), **kw
    )
    assert torch.equal(a, b)


def test_ddim_eta1_equals_euler_ancestral(start):
    # Both add DDPM's posterior noise: the same update written in alpha and in sigma variables.
    x, sigmas = start
    a = S.sample_ddim(
        gaussian_denoiser,
        x,
        sigmas.double(),
        disable=True,
        eta=1.0,
        generator=torch.Generator().manual_seed(3),
    )
    b = S.sample_euler_ancestral(
        gaussian_denoiser, x, sigmas.double(), disable=True, generator=torch.Generator().manual_seed(3)
    )
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("sampler", list(S.SAMPLERS.values()))
def test_in_place_update_inside_the_denoiser_is_honoured(sampler, start):
    """The CLoRA core may move x in place before predicting: the step must continue from it."""
    x, sigmas = start
    calls = []

    def updating(x_, sigma, **kw):
        if not calls:
            x_.add_(0.25)
        calls.append(1)
        return gaussian_denoiser(x_, sigma, **kw)

    before = x.clone()
    kw = {"generator": torch.Generator().manual_seed(0)} if sampler in (S.sample_euler_ancestral,) else {}
    got = sampler(updating, x, sigmas.double(), disable=True, **kw)
    kw = {"generator": torch.Generator().manual_seed(0)} if kw else {}
    want = sampler(gaussian_denoiser, x + 0.25, sigmas.double(), disable=True, **kw)
    torch.testing.assert_close(got, want)
    assert torch.equal(x, before), "the caller's latent must not be modified"
    assert len(calls) == len(sigmas) - 1


def test_callback_sees_every_step(start):
    x, sigmas = start
    seen = []
    S.sample_euler(gaussian_denoiser, x, sigmas.double(), callback=seen.append, disable=True)
    assert [d["i"] for d in seen] == list(range(len(sigmas) - 1))
    assert set(seen[0]) == {"x", "i", "sigma", "sigma_hat", "denoised"}


def test_schedules():
    ac = sd_alphas_cumprod()
    sig = S.sigmas_from_alphas(ac, 20)
    assert sig.shape == (21,) and sig[-1] == 0
    assert torch.all(sig[:-1] > sig[1:])
    # The familiar SD1.x noise range.
    assert abs(sig[0].item() - 14.6146) < 1e-3 and abs(sig[-2].item() - 0.0292) < 1e-3
    ddim = S.sigmas_ddim(ac, 50)
    assert ddim.shape == (51,) and torch.all(ddim[:-1] > ddim[1:])
    k = S.sigmas_karras(5, 0.1, 10.0)
    assert k.shape == (6,) and abs(k[0].item() - 10) < 1e-4 and abs(k[4].item() - 0.1) < 1e-5 and k[5] == 0


def test_sigma_t_round_trip():
    sched = S.DiscreteSchedule(sd_alphas_cumprod())
    t = torch.tensor([0.0, 1.0, 10.5, 500.25, 999.0])
    torch.testing.assert_close(sched.sigma_to_t(sched.t_to_sigma(t)), t, atol=1e-3, rtol=0)
    torch.testing.assert_close(sched.t_to_sigma(torch.tensor([0.0, 999.0])), sched.sigmas[[0, 999]])


def test_eps_denoiser_scaling():
    ac = sd_alphas_cumprod()
    seen = {}

    def eps_fn(x_in, t, cond):
        seen.update(x_in=x_in, t=t, cond=cond)
        return torch.full_like(x_in, 0.5)

    den = S.EpsDenoiser(eps_fn, ac)
    sigma = den.schedule.sigmas[[100, 700]]
    x = torch.ones(2, 4, 2, 2)
    out = den(x, sigma, cond="ctx")
    torch.testing.assert_close(seen["t"], torch.tensor([100.0, 700.0]), atol=1e-3, rtol=0)
    torch.testing.assert_close(seen["x_in"][:, 0, 0, 0], 1 / (sigma**2 + 1) ** 0.5)
    torch.testing.assert_close(out[:, 0, 0, 0], 1 - 0.5 * sigma)
    assert seen["cond"] == "ctx"
    assert den.get_sigmas(10).shape == (11,)


def test_cfg_denoiser_batches_both_halves():
    calls = []

    def den(x, sigma, cond):
        calls.append(x.shape[0])
        return x * 0 + cond.context.reshape(-1, 1)

    cfg = S.CFGDenoiser(den)
    x = torch.zeros(2, 3)
    cond, uncond = Cond(torch.tensor([[2.0], [4.0]])), Cond(torch.tensor([[1.0], [1.0]]))
    out = cfg(x, torch.tensor(1.0), cond=cond, uncond=uncond, cond_scale=3.0)
    torch.testing.assert_close(out, torch.tensor([[4.0] * 3, [10.0] * 3]))
    assert calls == [4]
